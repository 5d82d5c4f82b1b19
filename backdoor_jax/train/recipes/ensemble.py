"""Many backdoored models trained at once: one jit-compiled, vmapped step over a stack.

A sweep over trigger size x position x colour x rate x seed trains hundreds of models
that share an architecture, a dataset and a training recipe and differ only in their
poisoned data and seed. Here K such models ("members") are stacked into one train
state whose leaves carry a leading member axis, and one step

    jax.vmap(step)(stacked_state, images (K, B, H, W, 3), labels (K, B), step_keys (K,))

updates all of them, each on its own poisoned batch (on a CPU, where XLA's grouped
convolutions are slow, the default runs one compiled single-model step per member
instead; see :func:`make_ensemble_step`). Every member draws exactly what a
single run of its config draws (init from its seed, its own epoch shuffles and
augmentation keys), so a member ends where the ``badnets`` recipe run on the same config
would, up to floating-point reassociation (tested).

Memory: the clean training images are held once; each member keeps only its labels and
the rows its poisoning changed (a few per cent for BadNets), which are patched into the
gathered batch on the host.

When the member count is a multiple of the device count, members are split over the
devices (no collectives: members are independent); otherwise the stack lives on the
first device. Multi-host sweeps are not supported (run one sweep per host).
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P
from ml_collections import config_dict

from backdoor_jax import evaluate, experiment
from backdoor_jax.data import pipeline
from backdoor_jax.errors import ConfigError, check_choice
from backdoor_jax.train import engine
from backdoor_jax.train import mesh as mesh_lib
from backdoor_jax.train import optim, state as state_lib, steps
from backdoor_jax.train.recipes import badnets

# Config sections that may differ between the members of one ensemble.
MEMBER_KEYS = ("trigger", "poison", "seed", "sweep")


def shared_signature(config: config_dict.ConfigDict) -> str:
  """JSON of every config value members must share (all but ``MEMBER_KEYS``)."""
  d = json.loads(config.to_json_best_effort(sort_keys=True))
  return json.dumps({k: v for k, v in d.items() if k not in MEMBER_KEYS}, sort_keys=True)


@dataclasses.dataclass
class _Member:
  """One member's data, stored as a diff against the shared clean training set."""
  exp: experiment.Experiment          # train_images dropped; dataset shared with member 0
  labels: np.ndarray             # (N,) int32 training labels after poisoning
  changed: np.ndarray            # (P,) rows whose image differs from the clean set
  changed_images: np.ndarray     # (P, H, W, 3) their poisoned images
  num_poisoned: int


def _build_member(config: config_dict.ConfigDict, dataset: Any | None) -> _Member:
  exp = experiment.build_experiment(config)
  if dataset is not None:
    if (exp.dataset.train_images.shape != dataset.train_images.shape
        or not np.array_equal(exp.dataset.train_labels, dataset.train_labels)):
      raise ConfigError("ensemble members loaded different datasets; members may differ only in "
                        f"{', '.join(MEMBER_KEYS)}")
    exp = dataclasses.replace(exp, dataset=dataset)
  clean = exp.dataset.train_images
  diff = np.any(exp.train_images.reshape(len(clean), -1) != clean.reshape(len(clean), -1), axis=1)
  diff |= np.asarray(exp.is_poisoned, bool)
  changed = np.flatnonzero(diff)
  member = _Member(exp=exp, labels=np.asarray(exp.train_labels, np.int32), changed=changed,
                   changed_images=np.ascontiguousarray(exp.train_images[changed]),
                   num_poisoned=int(np.asarray(exp.is_poisoned).sum()))
  member.exp = dataclasses.replace(exp, train_images=None)
  return member


class _BatchGatherer:
  """Builds the (K, B, H, W, 3) batch of every member from the shared clean images."""

  def __init__(self, clean: np.ndarray, members: Sequence[_Member]):
    self.clean = clean
    self.labels = np.stack([m.labels for m in members])                 # (K, N)
    self.slot = np.full((len(members), len(clean)), -1, np.int64)        # row -> bank index
    banks, offset = [], 0
    for k, m in enumerate(members):
      self.slot[k, m.changed] = offset + np.arange(len(m.changed))
      banks.append(m.changed_images)
      offset += len(m.changed)
    self.bank = np.concatenate(banks) if offset else np.zeros((0,) + clean.shape[1:], clean.dtype)

  def __call__(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    k = np.arange(idx.shape[0])[:, None]
    images = self.clean[idx]                                             # (K, B, H, W, 3)
    slot = self.slot[k, idx]
    hit = slot >= 0
    if hit.any():
      images[hit] = self.bank[slot[hit]]
    return images, self.labels[k, idx]


def _stack(trees: Sequence[Any]) -> Any:
  return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *trees)


def _unstack(tree: Any, k: int) -> Any:
  return jax.tree_util.tree_map(lambda x: x[k], tree)


def _member_sharding(num_members: int) -> NamedSharding | None:
  mesh = mesh_lib.make_mesh(jax.local_devices())
  if mesh.devices.size > 1 and num_members % mesh.devices.size == 0:
    return NamedSharding(mesh, P(mesh_lib.DATA_AXIS))
  return None


def _put(tree: Any, sharding: NamedSharding | None) -> Any:
  return jax.device_put(tree, sharding) if sharding is not None else jax.device_put(tree, jax.local_devices()[0])


STRATEGIES = ("auto", "vmap", "sequential")


def make_ensemble_step(spec: steps.InputSpec, strategy: str = "auto"):
  """``step(stacked_state, images (K,B,H,W,3), labels (K,B), keys (K,))`` -> (state, metrics).

  ``'vmap'`` batches the K members into one jitted computation (their convolutions
  become grouped convolutions): the fast path on GPUs and TPUs. ``'sequential'`` runs
  one compiled single-member step K times, reading and writing member ``k`` of the
  donated stack in place; on a CPU, where grouped convolutions are slower than K
  plain ones (``benchmarks/ensemble_throughput.py``), this is the faster choice.
  ``'auto'`` picks ``'sequential'`` on CPU and ``'vmap'`` elsewhere. All give the
  same numbers up to float reassociation.
  """
  check_choice("sweep.strategy", strategy, STRATEGIES)
  if strategy == "auto":
    strategy = "sequential" if jax.default_backend() == "cpu" else "vmap"
  one = steps.train_step_fn(spec)
  if strategy == "vmap":
    return jax.jit(jax.vmap(one), donate_argnums=(0,))

  def member_step(stacked, k, images, labels, key):
    state, metrics = one(jax.tree_util.tree_map(lambda a: a[k], stacked), images, labels, key)
    return jax.tree_util.tree_map(lambda full, new: full.at[k].set(new), stacked, state), metrics

  member_step = jax.jit(member_step, donate_argnums=(0,))

  def step(stacked, images, labels, keys):
    metrics = []
    for k in range(images.shape[0]):
      stacked, m = member_step(stacked, k, images[k], labels[k], keys[k])
      metrics.append(m)
    return stacked, jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *metrics)

  return step


def _evaluate_members(eval_fn, variables: Any, image_sets: Sequence[np.ndarray], label_sets: Sequence[np.ndarray],
                      batch_size: int, sharding: NamedSharding | None) -> list[dict[str, Any]]:
  """Accuracy and predictions of each member on its own (images, labels) set."""
  k_members = len(image_sets)
  n_max = max(len(l) for l in label_sets)
  correct, nonfinite = np.zeros(k_members, np.int64), np.zeros(k_members, np.int64)
  preds = [[] for _ in range(k_members)]
  for start in range(0, n_max, batch_size):
    xs, ys, vs = [], [], []
    for images, labels in zip(image_sets, label_sets):
      idx = np.arange(start, start + batch_size)
      valid = idx < len(labels)
      idx = np.where(valid, idx, 0)
      if len(labels):
        xs.append(images[idx]); ys.append(labels[idx])
      else:
        xs.append(np.zeros((batch_size,) + image_sets[0].shape[1:], np.uint8)); ys.append(np.zeros(batch_size, np.int32))
      vs.append(valid & (len(labels) > 0))
    x, y, v = (_put(np.stack(a), sharding) for a in (xs, ys, vs))
    out = jax.device_get(eval_fn(variables, x, y, v))
    correct += np.asarray(out["correct"])
    nonfinite += np.asarray(out["nonfinite"])
    for k in range(k_members):
      preds[k].append(np.asarray(out["predictions"][k])[np.asarray(vs[k])])
  results = []
  for k, labels in enumerate(label_sets):
    n = len(labels)
    r = {"accuracy": float(correct[k]) / n if n and not nonfinite[k] else None, "count": n,
         "predictions": np.concatenate(preds[k]).astype(np.int32)}
    if not n or nonfinite[k]:  # never a rate over nothing, nor one from NaN logits (argmax -> class 0)
      r["reason"] = (f"{nonfinite[k]} of {n} samples have non-finite logits" if n else evaluate.EMPTY_SET)
    results.append(r)
  return results


@dataclasses.dataclass
class _EnsembleFeed:
  """Every member's own shuffle of the shared training set, gathered into (K, B, ...) batches."""
  gather: _BatchGatherer
  seeds: list[int]
  n_train: int
  batch_size: int
  sharding: NamedSharding | None

  @property
  def steps_per_epoch(self) -> int:
    return pipeline.num_train_steps(self.n_train, self.batch_size)

  def items(self, epoch: int):
    orders = [pipeline.train_batches(self.n_train, self.batch_size, s, epoch) for s in self.seeds]
    for _ in range(self.steps_per_epoch):
      yield np.stack([next(o) for o in orders])

  def make(self, idx: np.ndarray) -> tuple[jax.Array, jax.Array]:
    images, labels = self.gather(idx)
    return _put(images, self.sharding), _put(labels, self.sharding)


def train_ensemble(configs: Sequence[config_dict.ConfigDict], workdir: str | None = None,
                   progress: bool = True, return_variables: bool = False,
                   member_errors: str = "raise") -> Any:
  """Trains one model per config together (see :func:`make_ensemble_step`) and evaluates each.

  The strategy comes from ``sweep.strategy`` of the first config when present
  (default ``'auto'``).

  Args:
    configs: BadNets configs (``recipe`` 'badnets') that agree on everything but
      ``trigger``, ``poison``, ``seed`` and ``sweep``.
    workdir: where the stacked checkpoint (one per epoch) and ``metrics.jsonl`` go; a
      rerun on the same folder with the same members resumes. None: no checkpoints.
    progress: show a progress bar.
    member_errors: 'raise' (default) stops on the first member whose config is invalid;
      'record' trains the others and returns ``{"error": message}`` for that member
      (sweeps use it so one bad cell does not stop a group).
    return_variables: also return the stacked variables (leading member axis; see
      :func:`member_variables`).
  Returns:
    One results record per config, in order: ``clean_accuracy``, ``attack_success_rate``,
    ``robust_accuracy``, ``attack_success_rate_visible``, ``weak_trigger_fraction``,
    ``num_poisoned``, ``train_seconds`` (the ensemble's, shared by all members),
    ``ensemble_size``; with ``return_variables``, the pair ``(results, stacked_variables)``.
  Raises:
    ConfigError: no configs, configs that differ in shared keys, or an invalid config.
  """
  if not configs:
    raise ConfigError("train_ensemble needs at least one config")
  sigs = [shared_signature(c) for c in configs]
  if len(set(sigs)) > 1:
    a, b = json.loads(sigs[0]), json.loads(next(s for s in sigs if s != sigs[0]))
    diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    raise ConfigError(f"ensemble members differ in {', '.join(diff)}; members may differ only in "
                      f"{', '.join(MEMBER_KEYS)}")
  if any(c.get("recipe", "badnets") != "badnets" for c in configs):
    raise ConfigError("train_ensemble trains BadNets-style recipes only (config.recipe='badnets')")
  check_choice("member_errors", member_errors, ("raise", "record"))
  all_configs = list(configs)
  members: list[_Member] = []
  errors: dict[int, str] = {}
  for k, cfg in enumerate(all_configs):
    try:
      members.append(_build_member(cfg, members[0].exp.dataset if members else None))
    except ConfigError as e:
      if member_errors == "raise":
        raise
      errors[k] = f"ConfigError: {e}"
  if errors:
    logging.warning("%d of %d ensemble members have invalid configs: %s", len(errors), len(all_configs),
                    "; ".join(errors.values())[:500])
  if not members:
    return [{"error": errors[k]} for k in range(len(all_configs))]
  configs = [cfg for k, cfg in enumerate(all_configs) if k not in errors]
  c = configs[0]
  dataset = members[0].exp.dataset
  k_members, n_train = len(members), len(dataset.train_labels)
  if n_train < c.train.batch_size:
    raise ConfigError(f"train.batch_size={c.train.batch_size} exceeds the {n_train} training samples")
  run = engine.RunSpec.from_config(c, workdir, keep=1, progress=progress, config_json=None, figures=False,
                                   name=f"ensemble of {k_members}")
  sharding = _member_sharding(k_members)
  batches = _EnsembleFeed(_BatchGatherer(dataset.train_images, members), [int(cfg.seed) for cfg in configs],
                          n_train, int(c.train.batch_size), sharding)

  keys = [experiment.run_keys(int(cfg.seed)) for cfg in configs]  # the same keys a single run uses
  starts = [badnets.initial_variables(m.exp, kk["init"]) for m, kk in zip(members, keys)]  # transfer included
  spec = starts[0][0]
  tx, _ = optim.make_optimizer(c.train, batches.steps_per_epoch, starts[0][1]["params"])
  model = members[0].exp.model  # one module for all: the stacked state has one apply_fn
  state = _stack([state_lib.create_train_state(model, tx, None, None, variables=v) for _, v in starts])
  step_keys = jnp.stack([kk["step"] for kk in keys])
  state, step_keys = _put(state, sharding), _put(step_keys, sharding)
  names = [json.dumps({s: json.loads(cfg.to_json_best_effort(sort_keys=True))[s] for s in MEMBER_KEYS if s in cfg},
                      sort_keys=True) for cfg in configs]

  def check_meta(meta):
    if meta.get("members") != names or meta.get("shared") != sigs[0]:
      raise ConfigError(f"{workdir} holds an ensemble checkpoint of other members; use a new folder")

  step = make_ensemble_step(spec, c.get("sweep", {}).get("strategy", "auto"))
  logging.info("ensemble of %d x %s on %s: %d train images, %d steps/epoch, %d epochs",
               k_members, c.model.name, c.data.name, n_train, batches.steps_per_epoch, c.train.epochs)
  eval_fn = jax.jit(jax.vmap(steps.make_eval_step(spec, model.apply), in_axes=(0, 0, 0, 0)))
  bs = int(c.train.eval_batch_size)

  def finish(state, history):
    variables = state.variables
    clean = _evaluate_members(eval_fn, variables, [dataset.test_images] * k_members,
                              [dataset.test_labels] * k_members, bs, sharding)
    attack = _evaluate_members(eval_fn, variables, [m.exp.test_triggered for m in members],
                               [m.exp.test_attack_labels for m in members], bs, sharding)
    rows = []
    for k, m in enumerate(members):
      weak = experiment.weak_trigger_mask(m.exp)
      hit = attack[k]["predictions"] == m.exp.test_attack_labels
      rows.append({
          **badnets.classifier_metrics(m.exp, clean[k], attack[k]),
          "attack_success_rate_visible": float(hit[~weak].mean()) if (~weak).any() else None,
          "weak_trigger_fraction": float(weak.mean()) if len(weak) else 0.0,
          "num_poisoned": m.num_poisoned, "num_train": n_train, "num_test": clean[k]["count"],
          "num_attack_test": attack[k]["count"], "ensemble_size": k_members,
          "final_train_loss": history[-1]["train_loss"][k] if history else None})
    return {"members": rows}

  task = engine.Task(
      state=state, step=lambda st, x, y: step(st, x, y, step_keys), feed=batches, finish=finish,
      meta={"members": names, "shared": sigs[0]}, check_meta=check_meta,
      postfix=lambda s: {"loss": f"{float(np.mean(s['loss_sum'] / s['count'])):.4f}"},
      describe=lambda r: f"{k_members} models  mean loss {float(np.mean(r['train_loss'])):.4f}")
  state, out = engine.fit(task, run)
  for row in out["members"]:
    row.update(train_seconds=out["train_seconds"], epochs=out["epochs"])
  it = iter(out["members"])
  results = [{"error": errors[k]} if k in errors else next(it) for k in range(len(all_configs))]
  return (results, jax.device_get(state.variables)) if return_variables else results


def member_variables(stacked_variables: Any, k: int) -> Any:
  """The variables of member ``k`` of a stacked ensemble (for explanation or export)."""
  return _unstack(stacked_variables, k)
