"""BatchNorm re-estimation: recompute every BatchNorm's running statistics on clean data (no parameter change).

Kadir et al. (2024) observed that explanation backdoors live partly in the BatchNorm
statistics fitted during the manipulation; re-estimating them on clean data, without
retraining, can remove the manipulation. Here the statistics are *exact* over the clean
validation split, layer by layer (``mode='sequential'``, the default): for BatchNorm
layer l (forward order) the model runs in inference mode with layers < l already
re-estimated, and layer l's mean and (biased) variance become the exact moments of its
input over the whole split. Afterwards every BatchNorm standardises its input to mean 0
and variance 1 over the split, exactly, in inference mode (what evaluation uses).
``mode='batch'`` is the usual train-mode alternative (``torch.optim.swa_utils.update_bn``):
one pass in training mode, each layer's input computed with batch statistics upstream,
the per-batch moments pooled over the split. Momentum plays no part in either.

BatchNorm inputs are read with ``flax.linen.intercept_methods`` on every
``nn.BatchNorm`` call, so any zoo model (small CNN, VGG-BN, ResNets) works unchanged;
statistics are addressed by the module path, which is the ``batch_stats`` tree path.
The report (``after``; the registry's runner adds ``before``) has clean accuracy and FSR /
CR (explanation runs) or ASR (classic runs) on the test set, and validation accuracy
before and after.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_dict

from backdoor_jax.data import pipeline
from backdoor_jax.defenses import common, registry
from backdoor_jax.errors import ConfigError, check_choice
from backdoor_jax.train import steps

MODES = ("sequential", "batch")
Path = tuple[str, ...]


def defaults() -> config_dict.ConfigDict:
  """Default settings of the ``bn_reestimate`` section."""
  c = config_dict.ConfigDict()
  c.mode = "sequential"   # sequential (exact, inference mode, layer by layer) / batch (train-mode batch statistics)
  c.batch_size = 128      # images per pass (the statistics are exact over the split either way)
  return c


def _batch_moments(apply_fn: Callable[..., Any], variables: Any, x: jax.Array, weights: jax.Array,
                   train: bool) -> dict[Path, tuple[jax.Array, jax.Array, jax.Array]]:
  """Per BatchNorm (by module path): (count, mean, centred sum of squares) of its input over weighted samples.

  ``weights`` (B,) is 1 for real samples and 0 for padding. In ``train`` mode the
  model normalises with batch statistics (over the whole padded batch: use unpadded
  batches there).
  """
  found: dict[Path, tuple[jax.Array, jax.Array, jax.Array]] = {}

  def interceptor(next_fun, args, kwargs, context):
    mod = context.module
    if isinstance(mod, nn.BatchNorm) and context.method_name == "__call__":
      a = jnp.asarray(args[0], jnp.float32)
      w = jnp.broadcast_to(weights.reshape((-1,) + (1,) * (a.ndim - 1)), a.shape[:-1] + (1,))
      n = jnp.sum(w)
      mean = jnp.sum(w * a, axis=tuple(range(a.ndim - 1))) / n
      m2 = jnp.sum(w * jnp.square(a - mean), axis=tuple(range(a.ndim - 1)))
      found[tuple(mod.path)] = (n, mean, m2)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    if train:
      apply_fn(variables, x, train=True, mutable=["batch_stats"])
    else:
      apply_fn(variables, x, train=False)
  return found


def _combine(acc: dict[Path, list[np.ndarray]] | None, part: dict[Path, tuple[Any, Any, Any]]
             ) -> dict[Path, list[np.ndarray]]:
  """Chan et al.'s pairwise update of (count, mean, M2), in float64."""
  out = {} if acc is None else acc
  for k, (n_b, mean_b, m2_b) in part.items():
    n_b, mean_b, m2_b = float(n_b), np.asarray(mean_b, np.float64), np.asarray(m2_b, np.float64)
    if k not in out:
      out[k] = [n_b, mean_b, m2_b]
      continue
    n_a, mean_a, m2_a = out[k]
    n = n_a + n_b
    delta = mean_b - mean_a
    out[k] = [n, mean_a + delta * n_b / n, m2_a + m2_b + delta ** 2 * n_a * n_b / n]
  return out


def input_moments(apply_fn: Callable[..., Any], variables: Any, input_spec: steps.InputSpec, images: np.ndarray,
                  batch_size: int, train: bool = False, fn: Callable[..., Any] | None = None
                  ) -> dict[Path, tuple[np.ndarray, np.ndarray]]:
  """Exact (mean, biased variance) of every BatchNorm's input over pixel-unit ``images``.

  ``train=False``: inference mode (running statistics upstream); ``train=True``: each
  batch normalised with its own statistics (the last, smaller batch is run unpadded).
  ``fn`` is a jitted ``(variables, x, weights) -> moments`` to reuse (see :func:`moments_fn`).
  """
  fn = fn or moments_fn(apply_fn, input_spec, train)
  acc = None
  if train:
    batches = [(np.arange(s, min(s + batch_size, len(images))), None) for s in range(0, len(images), batch_size)]
  else:
    batches = list(pipeline.eval_batches(len(images), batch_size))
  for idx, valid in batches:
    w = np.ones(len(idx), np.float32) if valid is None else valid.astype(np.float32)
    acc = _combine(acc, jax.device_get(fn(variables, jnp.asarray(images[idx]), jnp.asarray(w))))
  if acc is None:
    raise ConfigError("BatchNorm re-estimation needs at least one clean image")
  return {k: (mean, m2 / n) for k, (n, mean, m2) in acc.items()}


def moments_fn(apply_fn: Callable[..., Any], input_spec: steps.InputSpec, train: bool) -> Callable[..., Any]:
  """Jitted ``(variables, pixel images, weights) -> {path: (count, mean, M2)}``."""
  def f(variables, x, w):
    return _batch_moments(apply_fn, variables, steps.preprocess(None, x.astype(jnp.float32), input_spec), w, train)
  return jax.jit(f)


def forward_order(apply_fn: Callable[..., Any], variables: Any, image_shape: tuple[int, ...]) -> list[Path]:
  """Module paths of the model's BatchNorm layers in the order the forward pass calls them (traced, not run)."""
  order: list[Path] = []

  def f(x):
    found = _batch_moments(apply_fn, variables, x, jnp.ones((1,), jnp.float32), False)
    order.extend(found)  # insertion order = call order (a jitted dict output would come back sorted)
    return 0

  jax.eval_shape(f, jax.ShapeDtypeStruct((1,) + tuple(image_shape), jnp.float32))
  return order


def _set_stats(batch_stats: Any, path: Path, mean: np.ndarray, var: np.ndarray) -> Any:
  """A copy of ``batch_stats`` with the ``mean`` / ``var`` leaves at ``path`` replaced."""
  if not path:
    old = batch_stats
    return {**batch_stats, "mean": jnp.asarray(mean, old["mean"].dtype), "var": jnp.asarray(var, old["var"].dtype)}
  head, *rest = path
  if head not in batch_stats:
    raise ConfigError(f"BatchNorm at {'/'.join(path)} has no batch_stats entry; the model's statistics are "
                      f"{sorted(batch_stats)}")
  return {**batch_stats, head: _set_stats(batch_stats[head], tuple(rest), mean, var)}


def reestimate(apply_fn: Callable[..., Any], variables: dict[str, Any], input_spec: steps.InputSpec,
               images: np.ndarray, *, mode: str = "sequential", batch_size: int = 128) -> dict[str, Any]:
  """``variables`` with every BatchNorm's running mean / variance re-estimated on pixel-unit ``images``.

  Parameters are left unchanged. ``mode``: 'sequential' (exact inference-mode moments,
  layer by layer in forward order; one pass over ``images`` per BatchNorm layer) or
  'batch' (one train-mode pass; batch statistics upstream).

  Raises:
    ConfigError: unknown mode, a model without BatchNorm, or no images.
  """
  check_choice("bn_reestimate.mode", mode, MODES)
  if int(batch_size) < 1:
    raise ConfigError(f"bn_reestimate.batch_size={batch_size} is invalid; allowed: an int >= 1")
  common.check_images(images)
  if "batch_stats" not in variables or not jax.tree_util.tree_leaves(variables["batch_stats"]):
    raise ConfigError("the model has no BatchNorm statistics to re-estimate")
  stats = variables["batch_stats"]
  if mode == "batch":
    for path, (mean, var) in input_moments(apply_fn, variables, input_spec, images, int(batch_size), True).items():
      stats = _set_stats(stats, path, mean, var)
    return {**variables, "batch_stats": stats}
  fn = moments_fn(apply_fn, input_spec, False)
  order = forward_order(apply_fn, variables, images.shape[1:])
  for path in order:  # layer l's input depends only on layers < l, already re-estimated
    mom = input_moments(apply_fn, {**variables, "batch_stats": stats}, input_spec, images, int(batch_size), False, fn)
    stats = _set_stats(stats, path, *mom[path])
  return {**variables, "batch_stats": stats}


def run(ctx: common.DefenseContext, out_dir: str) -> dict[str, Any]:
  """Re-estimates the BatchNorm statistics on the clean validation split; test-set report before / after."""
  del out_dir
  cfg = ctx.config.bn_reestimate
  if not jax.tree_util.tree_leaves(ctx.variables.get("batch_stats", {})):  # e.g. VGG without BN: nothing to do
    return {"mode": str(cfg.mode), "batchnorm_layers": 0, "val_images": int(len(ctx.val_index)), "after": None,
            "seconds": 0.0}
  with common.Timer() as t:
    new = reestimate(ctx.apply_fn, ctx.variables, ctx.run.input_spec, ctx.val_images, mode=str(cfg.mode),
                     batch_size=int(cfg.batch_size))
  after = common.evaluate(ctx, new)  # the record's 'before' (the unchanged model) is added by the registry's runner
  n_layers = len(jax.tree_util.tree_leaves(ctx.variables["batch_stats"])) // 2
  return {"mode": str(cfg.mode), "batchnorm_layers": n_layers, "val_images": int(len(ctx.val_index)), "after": after,
          "val_accuracy_before": common.accuracy(common.logits(ctx, ctx.variables, ctx.val_images), ctx.val_labels),
          "val_accuracy_after": common.accuracy(common.logits(ctx, new, ctx.val_images), ctx.val_labels),
          "seconds": t.seconds}


def summary(rec: dict[str, Any]) -> dict[str, Any]:
  """Summary-row part: the re-estimated model (its test-set evaluation is the 'after' column)."""
  if not rec["batchnorm_layers"]:
    return {"verdict": "the model has no BatchNorm layer; nothing re-estimated", "after": None}
  return {"verdict": f"re-estimates {rec['batchnorm_layers']} BatchNorm layers ({rec['mode']}) on "
                     f"{rec['val_images']} clean images", "after": rec["after"]}


registry.register(registry.Defense("bn_reestimate", run, summary, defaults=defaults))
