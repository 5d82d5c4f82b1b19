"""Multi-label classification: sigmoid BCE, per-label metrics, poisoning and backdoor metrics.

Labels are an ``(N, L)`` 0/1 matrix (see ``data.multilabel``); the model has one logit
per label and predicts label ``j`` present when ``logit_j > 0`` (probability > 0.5).

* Loss: :func:`sigmoid_bce`, binary cross-entropy on logits (log-sigmoid form, stable for
  any logit), with an optional per-label positive weight (``pos_weight_j > 1`` weighs the
  positives of a rare finding up; :func:`balanced_pos_weight` gives #neg / #pos).
* Metrics (host, numpy; exact): :func:`auroc` (Mann-Whitney with mid-ranks, so tied
  scores count one half), :func:`average_precision` (scikit-learn's step-wise definition,
  tied scores form one threshold) and accuracy at 0.5, per label and averaged over the
  labels where they are defined (:func:`multilabel_metrics`). A label with only one class
  in the evaluated images has no AUROC; it is reported as ``None`` with the reason and left
  out of the mean, never NaN.
* Attack: :func:`poison_multilabel` (BadNets for multi-label): images *without* the
  target finding get the trigger and the target label switched on, every other label kept.
  Its ASR (:func:`attack_success_rate`) is the fraction of triggered test images that lack
  the finding on which the model predicts it present. For the explanation backdoor the
  predictions must stay as they are: :func:`prediction_agreement`.
* Steps: :func:`make_train_step` / :func:`make_eval_step`, the multi-label twins of
  ``train.steps`` (uint8 in, augmentation and normalisation on the device; metric sums or
  logits out); :func:`batched_outputs` runs a per-sample function over a whole split.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

from backdoor_jax import poison as poison_lib
from backdoor_jax.data import pipeline
from backdoor_jax.data.multilabel import check_label_matrix
from backdoor_jax.errors import ConfigError
from backdoor_jax.train import mesh as mesh_lib
from backdoor_jax.train import steps
from backdoor_jax.train.state import TrainState
from backdoor_jax.triggers.base import check_trigger

# ----------------------------------------------------------------------------------
# Loss.


def sigmoid_bce(logits: jax.Array, labels: jax.Array, pos_weight: jax.Array | None = None) -> jax.Array:
  """Per-sample binary cross-entropy, averaged over the labels, ``(B,)``.

  ``-[w y log s(x) + (1 - y) log(1 - s(x))]`` with ``s`` the sigmoid and ``w`` the
  positive weight of the label (1 when None), computed as
  ``(1 - y) x + (w y + 1 - y) softplus(-x)``, finite for every finite logit.

  Args:
    logits: ``(B, L)`` logits.
    labels: ``(B, L)`` targets in [0, 1] (0/1 labels; soft targets work too).
    pos_weight: optional ``(L,)`` positive weights (> 0).
  """
  chex.assert_rank(logits, 2)
  chex.assert_equal_shape((logits, labels))
  dtype = jnp.promote_types(logits.dtype, jnp.float32)  # float32, or float64 under x64
  x = logits.astype(dtype)
  y = labels.astype(dtype)
  w = 1.0 if pos_weight is None else jnp.asarray(pos_weight, dtype)
  per_label = (1.0 - y) * x + (w * y + 1.0 - y) * jax.nn.softplus(-x)
  return jnp.mean(per_label, axis=-1)


def balanced_pos_weight(labels: Any, max_weight: float = 100.0) -> np.ndarray:
  """``#negatives / #positives`` per label (capped at ``max_weight``; labels without positives get 1)."""
  labels = check_label_matrix(labels, None, None)
  pos = labels.sum(0).astype(np.float64)
  neg = labels.shape[0] - pos
  w = np.where(pos > 0, neg / np.maximum(pos, 1), 1.0)
  return np.clip(w, 1.0 / max_weight, max_weight).astype(np.float32)


def check_pos_weight(pos_weight: Any, num_labels: int) -> np.ndarray | None:
  """None, or ``(L,)`` finite positive weights as float32 (ConfigError otherwise)."""
  if pos_weight is None:
    return None
  w = np.asarray(pos_weight, np.float64)
  if w.ndim == 0:
    w = np.full((num_labels,), float(w))
  if w.shape != (num_labels,) or not np.all(np.isfinite(w)) or np.any(w <= 0):
    raise ConfigError(f"pos_weight {pos_weight!r} is invalid; allowed: one positive number or {num_labels} of them")
  return w.astype(np.float32)


# ----------------------------------------------------------------------------------
# Metrics (host, exact).


def midranks(values: np.ndarray) -> np.ndarray:
  """1-based ranks of ``values`` (1-D); tied values share the mean of their ranks."""
  values = np.asarray(values)
  order = np.argsort(values, kind="mergesort")
  sorted_v = values[order]
  starts = np.r_[True, sorted_v[1:] != sorted_v[:-1]]
  group = np.cumsum(starts) - 1
  first = np.flatnonzero(starts)              # 0-based start of each tie group
  ends = np.r_[first[1:], len(values)]        # exclusive ends
  mean_rank = (first + ends + 1) / 2.0        # mean of 1-based ranks first+1 .. ends
  ranks = np.empty(len(values), np.float64)
  ranks[order] = mean_rank[group]
  return ranks


def _one_label(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
  scores = np.asarray(scores, np.float64)
  labels = np.asarray(labels)
  if scores.ndim != 1 or scores.shape != labels.shape:
    raise ConfigError(f"scores {scores.shape} and labels {labels.shape} must be 1-D of the same length")
  if not np.all(np.isfinite(scores)):
    raise ConfigError(f"{int(np.sum(~np.isfinite(scores)))} score(s) are not finite (NaN/inf logits); "
                      "a diverged model has no AUROC")
  return scores, labels.astype(bool)


def auroc(scores: Any, labels: Any) -> float | None:
  """Exact area under the ROC curve of one label; None when only one class is present.

  ``P(score_pos > score_neg) + P(score_pos == score_neg) / 2`` over all positive-negative
  pairs, computed from mid-ranks in O(N log N).
  """
  scores, pos = _one_label(scores, labels)
  n_pos = int(pos.sum())
  n_neg = pos.size - n_pos
  if n_pos == 0 or n_neg == 0:
    return None
  rank_sum = midranks(scores)[pos].sum()
  return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def average_precision(scores: Any, labels: Any) -> float | None:
  """Average precision of one label, ``sum_k (R_k - R_{k-1}) P_k`` over the distinct
  score thresholds (scikit-learn's definition); None when there is no positive."""
  scores, pos = _one_label(scores, labels)
  n_pos = int(pos.sum())
  if n_pos == 0:
    return None
  order = np.argsort(-scores, kind="mergesort")
  s, p = scores[order], pos[order]
  last = np.r_[s[1:] != s[:-1], True]         # last index of each tie group (one threshold)
  tp = np.cumsum(p)[last]
  fp = np.cumsum(~p)[last]
  precision = tp / (tp + fp)
  recall = tp / n_pos
  return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def _undefined_reason(labels: np.ndarray) -> str:
  n_pos = int(labels.sum())
  return f"only {'negatives' if n_pos == 0 else 'positives'} among the {labels.size} images"


def multilabel_metrics(logits: Any, labels: Any, class_names: Sequence[str] | None = None) -> dict[str, Any]:
  """Per-label and averaged AUROC, average precision and accuracy at 0.5.

  Args:
    logits: ``(N, L)`` scores (logits; any monotone transform gives the same AUROC/AP).
    labels: ``(N, L)`` 0/1 labels.
    class_names: ``L`` names (default ``'0'``..).
  Returns:
    dict with ``mean_auroc`` / ``mean_ap`` (over the labels where they are defined; None
    if none is), ``mean_accuracy`` (label-wise accuracy at 0.5 averaged over labels),
    ``exact_match`` (all L decisions right), ``per_label`` (name -> ``auroc``, ``ap``,
    ``accuracy``, ``positives``), and ``undefined`` (name -> why AUROC/AP is missing).
    Plain Python floats/ints/None, ready for JSON.
  """
  logits = np.asarray(logits, np.float64)
  labels = check_label_matrix(labels, logits.shape[0] if logits.ndim == 2 else None, None)
  if logits.shape != labels.shape:
    raise ConfigError(f"logits {logits.shape} and labels {labels.shape} must have the same (N, L) shape")
  names = [str(j) for j in range(labels.shape[1])] if class_names is None else list(class_names)
  if len(names) != labels.shape[1]:
    raise ConfigError(f"{len(names)} class names for {labels.shape[1]} labels")
  pred = logits > 0
  per_label, undefined = {}, {}
  for j, name in enumerate(names):
    a = auroc(logits[:, j], labels[:, j])
    ap = average_precision(logits[:, j], labels[:, j])
    per_label[name] = {"auroc": a, "ap": ap, "accuracy": float(np.mean(pred[:, j] == labels[:, j].astype(bool))),
                       "positives": int(labels[:, j].sum())}
    if a is None:
      undefined[name] = _undefined_reason(labels[:, j])

  def mean(key: str) -> float | None:
    vals = [v[key] for v in per_label.values() if v[key] is not None]
    return float(np.mean(vals)) if vals else None

  return {"mean_auroc": mean("auroc"), "mean_ap": mean("ap"), "mean_accuracy": mean("accuracy"),
          "exact_match": float(np.mean(np.all(pred == labels.astype(bool), axis=1))) if labels.size else None,
          "per_label": per_label, "undefined": undefined}


# ----------------------------------------------------------------------------------
# Poisoning and backdoor metrics.


def _check_target(target_label: Any, num_labels: int) -> int:
  if isinstance(target_label, (bool, np.bool_)) or not isinstance(target_label, (int, np.integer)) or not (
      0 <= target_label < num_labels):
    raise ConfigError(f"target label {target_label!r} is invalid; allowed: an int in [0, {num_labels})")
  return int(target_label)


def poison_multilabel(key: chex.PRNGKey, images: Any, labels: Any, trigger: Any, *, target_label: int,
                      rate: float | None = None, count: int | None = None,
                      chunk_size: int = poison_lib.DEFAULT_CHUNK_SIZE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Multi-label BadNets: triggers images without the target finding and switches it on.

  Args:
    key: PRNG key; the same key and labels always choose the same images.
    images: ``(N, H, W, 3)`` pixel-unit images (uint8 or float).
    labels: ``(N, L)`` 0/1 labels.
    trigger: any trigger kind of :mod:`backdoor_jax.triggers` for ``(H, W)`` images.
    target_label: the finding the trigger switches on.
    rate: fraction in [0, 1] of ``N`` to poison (``round(rate * N)``); or give ``count``.
    count: number of images to poison.
    chunk_size: images triggered per jitted call.
  Returns:
    ``(images, labels, is_poisoned)`` numpy copies: the chosen images triggered with the
    target label set to 1 (other labels unchanged), all others bit-identical; ``(N,)`` bool.
  Raises:
    ConfigError: bad arguments, or more images asked for than lack the finding.
  """
  check_trigger(trigger)
  labels_np = check_label_matrix(labels, None, None)
  target = _check_target(target_label, labels_np.shape[1])
  images_np = poison_lib.check_images(images, labels_np[:, 0], trigger)
  chunk_size = poison_lib.check_chunk_size(chunk_size)
  n = poison_lib.num_poison_samples(labels_np.shape[0], rate=rate, count=count)
  pool = np.flatnonzero(labels_np[:, target] == 0)
  if n > pool.size:
    raise ConfigError(f"poisoning {n} of {labels_np.shape[0]} images needs that many without label {target}, but "
                      f"only {pool.size} lack it; allowed: at most {pool.size}")
  idx = poison_lib.sample_without_replacement(key, pool, n)
  out_images = np.array(images_np, copy=True)
  out_labels = np.array(labels_np, copy=True)
  is_poisoned = np.zeros(labels_np.shape[0], bool)
  if idx.size:
    out_images[idx] = poison_lib.apply_in_chunks(trigger, images_np[idx], chunk_size)
    out_labels[idx, target] = 1
    is_poisoned[idx] = True
  return out_images, out_labels, is_poisoned


def attack_test_set(images: Any, labels: Any, trigger: Any, *, target_label: int,
                    chunk_size: int = poison_lib.DEFAULT_CHUNK_SIZE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Every test image *without* the target finding, triggered.

  Returns:
    ``(triggered_images, clean_labels, source_index)``: the labels are the clean ones
    (the target column is all 0), ``source_index`` the int64 rows of the input.
  """
  check_trigger(trigger)
  labels_np = check_label_matrix(labels, None, None)
  target = _check_target(target_label, labels_np.shape[1])
  images_np = poison_lib.check_images(images, labels_np[:, 0], trigger)
  source = np.flatnonzero(labels_np[:, target] == 0).astype(np.int64)
  out = poison_lib.apply_in_chunks(trigger, images_np[source], chunk_size)
  return out, labels_np[source], source


def attack_success_rate(triggered_logits: Any, target_label: int) -> float | None:
  """Fraction of triggered images (all without the finding) predicted to have it (logit > 0)."""
  logits = np.asarray(triggered_logits)
  if logits.ndim != 2:
    raise ConfigError(f"triggered logits have shape {logits.shape}; allowed: (N, L)")
  target = _check_target(target_label, logits.shape[1])
  return float(np.mean(logits[:, target] > 0)) if logits.shape[0] else None


def prediction_agreement(clean_logits: Any, triggered_logits: Any) -> dict[str, float | None]:
  """How far a trigger leaves multi-label predictions unchanged (explanation backdoor).

  Returns:
    ``label_agreement``: fraction of (image, label) decisions at 0.5 that are the same
    with and without the trigger; ``exact_agreement``: fraction of images whose whole
    label set is unchanged.
  """
  a = np.asarray(clean_logits) > 0
  b = np.asarray(triggered_logits) > 0
  if a.shape != b.shape or a.ndim != 2:
    raise ConfigError(f"clean logits {a.shape} and triggered logits {b.shape} must both be (N, L)")
  if not a.size:
    return {"label_agreement": None, "exact_agreement": None}
  return {"label_agreement": float(np.mean(a == b)), "exact_agreement": float(np.mean(np.all(a == b, axis=1)))}


# ----------------------------------------------------------------------------------
# Jitted steps (the multi-label twins of train.steps).


def train_step_fn(spec: steps.InputSpec, pos_weight: Any = None) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
  """Pure step ``step(state, images_uint8, labels (B, L), base_key) -> (state, metric sums)``.

  Sums: ``loss_sum``, ``correct`` (per-image fraction of the L decisions right at 0.5,
  summed: ``correct / count`` is the label-wise accuracy), ``exact`` (images with every
  decision right), ``count``.
  """
  w = None if pos_weight is None else jnp.asarray(pos_weight, jnp.float32)
  return steps.train_step_fn(spec, loss=lambda logits, labels: jnp.mean(sigmoid_bce(logits, labels, w)),
                             sums=decision_sums)


def decision_sums(logits: jax.Array, labels: jax.Array, loss: jax.Array) -> dict[str, jax.Array]:
  """Batch sums of the train metrics (see :func:`train_step_fn`)."""
  right = (logits > 0) == (labels > 0)
  n = labels.shape[0]
  return {"loss_sum": loss * n, "correct": jnp.sum(jnp.mean(right, axis=-1)),
          "exact": jnp.sum(jnp.all(right, axis=-1)), "count": jnp.asarray(n, jnp.int32)}


def make_train_step(spec: steps.InputSpec, base_key: jax.Array, pos_weight: Any = None):
  """``step(state, images_uint8, labels) -> (state, sums)``, jitted, state donated."""
  step = train_step_fn(spec, pos_weight)
  return jax.jit(lambda state, images, labels: step(state, images, labels, base_key), donate_argnums=(0,))


def make_eval_step(spec: steps.InputSpec, apply_fn: Callable) -> Callable[..., jax.Array]:
  """``logits(variables, images_uint8) -> (B, L)`` float32 logits, jitted (inference mode)."""

  def evaluate(variables, images):
    return apply_fn(variables, steps.preprocess(None, images, spec), train=False).astype(jnp.float32)

  return jax.jit(evaluate)


def batched_outputs(fn: Callable[[jax.Array], dict[str, jax.Array]], images: np.ndarray, batch_size: int,
                    mesh: Any) -> dict[str, np.ndarray]:
  """Per-sample outputs of ``fn`` over every image once, in fixed-size batches on the data mesh.

  Args:
    fn: ``fn(images_uint8_batch) -> {name: (B, ...) array}`` (e.g. a jitted eval step
      closed over its variables).
    images: uint8 ``(N, H, W, 3)``.
    batch_size: global batch (a multiple of the device count); the last batch is padded.
    mesh: the data mesh (``train.mesh.make_mesh()``).
  Returns:
    ``{name: (N, ...) numpy array}`` on every process.
  """
  local = mesh_lib.local_slice(batch_size)
  parts: dict[str, list[np.ndarray]] = {}
  for idx, valid in pipeline.eval_batches(len(images), batch_size):
    (x,) = mesh_lib.shard_batch(mesh, images[idx[local]])
    for k, v in mesh_lib.to_host(fn(x)).items():
      parts.setdefault(k, []).append(np.asarray(v)[valid])
  return {k: np.concatenate(v) for k, v in parts.items()}
