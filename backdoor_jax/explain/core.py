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

from typing import Any, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

from backdoor_jax.errors import ConfigError
from backdoor_jax.explain import layers as layers_lib
from backdoor_jax.explain.layers import ApplyFn, LayerInfo, plain_variables
from backdoor_jax.models.common import INTERMEDIATES, PERTURBATIONS

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


def check_inputs(apply_fn: ApplyFn, variables: Any, images: jax.Array, targets: jax.Array | None) -> LayerInfo:
  """Checks images and (concrete) targets; returns the model's :class:`~layers.LayerInfo` for them.

  Raises:
    ConfigError: images that are not a float (B, H, W, C) batch, or targets of the
      wrong shape or out of range.
  """
  check_images(images)
  info = layers_lib.layer_info(apply_fn, variables, images)
  with jax.ensure_compile_time_eval():  # concrete targets closed over by a jitted caller stay checkable
    check_targets(targets, images.shape[0], info.num_classes)
  return info


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
    shapes: activation shapes (``layers.layer_info(...).shapes``) to skip the abstract evaluation.
    input_gradient: also return d score / d images (SimpleGrad).
  Returns:
    dict with ``logits`` (B, C), ``targets`` (B,), ``activations`` and ``gradients``
    (dicts layer -> (B, h, w, K)), and ``input_gradient`` when asked.
  """
  chex.assert_rank(images, 4)
  if shapes is None:
    shapes = layers_lib.layer_info(apply_fn, variables, images).shapes
  base = plain_variables(variables)
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
