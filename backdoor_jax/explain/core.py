"""Activations and class-score gradients at named layers, in one forward + one backward.

Every zoo model marks its named layers with ``expose`` (see ``models/common.py``): a
zero perturbation added to the activation and a ``sow`` of it. The gradient of the
summed per-sample target logits with respect to those zero perturbations is, sample by
sample, d score_b / d A_b at every requested layer, and the sown values are A. Nothing
here splits a model by hand, and everything is a pure function of the variables, so it
composes with ``jax.grad`` (the explanation backdoor differentiates through it again),
``jax.vmap`` and ``jax.jit``.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

from backdoor_jax.errors import ConfigError
from backdoor_jax.models.common import INTERMEDIATES, PERTURBATIONS

ApplyFn = Callable[..., Any]


def layer_shapes(apply_fn: ApplyFn, variables: Any, images: jax.Array) -> dict[str, tuple[int, ...]]:
  """Shapes of every exposed activation for this input, in forward order (no compute).

  ``jax.eval_shape`` hands dicts back with sorted keys (VGG's ``features_10`` would come
  before ``features_2``), so the execution order is read inside the trace, where the
  sown collection still has insertion order.
  """
  order: list[str] = []

  def run(v, x):
    inter = apply_fn(v, x, train=False, mutable=[INTERMEDIATES])[1][INTERMEDIATES]
    order.extend(inter.keys())
    return inter

  inter = jax.eval_shape(run, _plain(variables), images)
  return {k: tuple(inter[k][0].shape) for k in dict.fromkeys(order)}


def _plain(variables: Any) -> dict[str, Any]:
  return {k: v for k, v in variables.items() if k not in (PERTURBATIONS, INTERMEDIATES)}


def resolve_layers(apply_fn: ApplyFn, variables: Any, images: jax.Array,
                   layers: str | Sequence[str]) -> tuple[list[str], dict[str, tuple[int, ...]]]:
  """Validates layer names; ``'all'`` means every exposed spatial (rank-4) layer in order.

  Raises:
    ConfigError: naming an unknown layer and listing the valid ones.
  """
  shapes = layer_shapes(apply_fn, variables, images)
  spatial = [k for k, s in shapes.items() if len(s) == 4]
  if isinstance(layers, str):
    layers = spatial if layers == "all" else [layers]
  layers = list(layers)
  for name in layers:
    if name not in spatial:
      raise ConfigError(f"unknown layer {name!r} for Grad-CAM; valid (spatial) layers: {', '.join(spatial)}")
  return layers, shapes


def check_images(images: jax.Array) -> None:
  """Model inputs: float (B, H, W, C) arrays, already normalised."""
  if getattr(images, "ndim", None) != 4:
    raise ConfigError(f"images must be a (B, H, W, C) batch; got shape {getattr(images, 'shape', None)}")
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise ConfigError(f"images must be normalised float model inputs; got dtype {images.dtype} "
                      "(use data.pipeline.normalize on uint8 pixels first)")


def check_targets(targets: jax.Array | None, batch: int, num_classes: int) -> None:
  """Host-side check of class ids (skipped for traced values)."""
  if targets is None or isinstance(targets, jax.core.Tracer):
    return
  t = np.asarray(targets)  # numpy: inside a jit trace, jnp reductions of a constant would be traced
  if t.shape != (batch,):
    raise ConfigError(f"targets must have shape ({batch},); got {t.shape}")
  lo, hi = int(t.min()), int(t.max())
  if lo < 0 or hi >= num_classes:
    raise ConfigError(f"target class {lo if lo < 0 else hi} out of range [0, {num_classes})")


def select_scores(logits: jax.Array, targets: jax.Array | None) -> tuple[jax.Array, jax.Array]:
  """Per-sample pre-softmax logit of the target (or, for None, the predicted) class."""
  if targets is None:
    targets = jnp.argmax(jax.lax.stop_gradient(logits), axis=-1)
  targets = jnp.asarray(targets, jnp.int32)
  return jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0], targets


def activations_and_gradients(apply_fn: ApplyFn, variables: Any, images: jax.Array,
                              targets: jax.Array | None, layers: Sequence[str],
                              shapes: dict[str, tuple[int, ...]] | None = None,
                              input_gradient: bool = False) -> dict[str, Any]:
  """A_l and dScore/dA_l for each layer in ``layers``, one forward and one backward pass.

  Args:
    apply_fn: ``model.apply``.
    variables: ``{'params', 'batch_stats'?}``; BatchNorm runs in inference mode.
    images: (B, H, W, C) normalised model inputs.
    targets: (B,) class ids, or None for each sample's predicted class.
    layers: names from the model's ``layer_names``.
    shapes: activation shapes (from ``layer_shapes``) to skip the abstract evaluation.
    input_gradient: also return d score / d images (SimpleGrad).
  Returns:
    dict with ``logits`` (B, C), ``targets`` (B,), ``activations`` and ``gradients``
    (dicts layer -> (B, h, w, K)), and ``input_gradient`` when asked.
  """
  chex.assert_rank(images, 4)
  if shapes is None:
    shapes = layer_shapes(apply_fn, variables, images)
  base = _plain(variables)
  zeros = {name: jnp.zeros(shapes[name], images.dtype if shapes[name] else jnp.float32) for name in layers}

  def score(perturbations, x):
    logits, state = apply_fn({**base, PERTURBATIONS: perturbations}, x, train=False, mutable=[INTERMEDIATES])
    s, t = select_scores(logits, targets)
    acts = {name: state[INTERMEDIATES][name][0] for name in layers}
    return jnp.sum(s), (logits, t, acts)

  argnums = (0, 1) if input_gradient else 0
  grads, (logits, t, acts) = jax.grad(score, argnums=argnums, has_aux=True)(zeros, images)
  out = {"logits": logits, "targets": t, "activations": acts}
  if input_gradient:
    out["gradients"], out["input_gradient"] = grads
  else:
    out["gradients"] = grads
  return out
