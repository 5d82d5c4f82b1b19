"""Grad-CAM++, per-feature-map Grad-CAM and SimpleGrad as pure, differentiable functions.

All three reuse ``core.activations_and_gradients`` (one forward + one backward pass
through the zero perturbations that zoo models place at their named layers), so they
compose with ``jax.jit``, ``jax.vmap`` and ``jax.grad`` with respect to the parameters
(the explanation backdoor differentiates through them a second time).

Score conventions are Grad-CAM's (``gradcam.py``): the pre-softmax logit of each
sample's target class (or, for ``targets=None``, of its predicted class); maps are
resized bilinearly to the input size and min-max normalised per image.

Layer names are resolved with ``layers.py`` (the one layer API); ``check_channels``
here validates channel indices for this module and ``stimulation.py``.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

from backdoor_jax.errors import ConfigError, check_choice
from backdoor_jax.explain import core
from backdoor_jax.explain import layers as layers_lib
from backdoor_jax.explain import registry
from backdoor_jax.explain.gradcam import CamResult, finish, normalize_maps

REDUCTIONS = ("max_abs", "sum_abs", "l2", "mean_abs")


def check_channels(channels: int | Sequence[int] | None, num_channels: int, layer: str) -> list[int]:
  """Validates channel indices of a layer with ``num_channels`` channels.

  Args:
    channels: an index, a sequence of distinct indices, or None (= all channels).
    num_channels: K of the layer.
    layer: layer name (for the message).
  Returns:
    list of Python ints.
  Raises:
    ConfigError: an index out of [0, K), a repeated index, a non-integer or an empty list.
  """
  if channels is None:
    return list(range(num_channels))
  if isinstance(channels, jax.core.Tracer):
    raise ConfigError("channels must be static Python ints (not traced values)")
  arr = np.asarray(channels)
  if arr.ndim > 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
    raise ConfigError(f"channels must be an int or a non-empty list of ints; got {channels!r}")
  out = [int(c) for c in arr.reshape(-1)]
  for c in out:
    if not 0 <= c < num_channels:
      raise ConfigError(f"channel {c} out of range [0, {num_channels}) for layer {layer!r}")
  if len(set(out)) != len(out):
    raise ConfigError(f"channels must be distinct; got {out}")
  return out


def _wide(x: jax.Array) -> jax.Array:
  """bf16/f16 -> f32 (third powers of gradients overflow half precision); f32/f64 unchanged."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


# ----------------------------------------------------------------------------- Grad-CAM++

def gradcam_pp_weights(activation: jax.Array, gradient: jax.Array, alpha_eps: float = 1e-6) -> jax.Array:
  """Grad-CAM++ channel weights (B, K) from (B, h, w, K) activations and gradients.

  alpha_kij = g_kij^2 / (2 g_kij^2 + (sum_ab A_kab) g_kij^3 + alpha_eps), set to 0 where
  g_kij == 0 or the denominator is exactly 0; w_k = sum_ij alpha_kij ReLU(g_kij).
  Both guards are double-``where`` so the gradient stays finite too.
  """
  chex.assert_rank([activation, gradient], 4)
  chex.assert_equal_shape([activation, gradient])
  a, g = _wide(activation), _wide(gradient)
  g2 = g * g
  total = jnp.sum(a, axis=(1, 2), keepdims=True)
  denom = 2.0 * g2 + total * g2 * g + alpha_eps
  ok = (g != 0) & (denom != 0)
  alpha = jnp.where(ok, g2 / jnp.where(ok, denom, 1.0), 0.0)
  return jnp.sum(alpha * jax.nn.relu(g), axis=(1, 2))


def gradcam_pp_from(activation: jax.Array, gradient: jax.Array, alpha_eps: float = 1e-6) -> jax.Array:
  """Raw Grad-CAM++ map ReLU(sum_k w_k A_k), (B, h, w), from (B, h, w, K) arrays."""
  w = gradcam_pp_weights(activation, gradient, alpha_eps)
  return jax.nn.relu(jnp.einsum("bk,bhwk->bhw", w, _wide(activation)))


def gradcam_pp(apply_fn: core.ApplyFn, variables: Any, images: jax.Array, targets: jax.Array | None = None,
               layers: str | Sequence[str] = "all", *, eps: float = 1e-8,
               alpha_eps: float = 1e-6) -> dict[str, CamResult]:
  """Grad-CAM++ (Chattopadhay et al., 2018) at one, several or all spatial layers.

  Closed form of the paper (eq. 19) as the reference libraries implement it, with
  g = dScore/dA at the layer::

    alpha_kij = g_kij^2 / (2 g_kij^2 + (sum_ab A_kab) g_kij^3)   (0 where g_kij == 0)
    w_k       = sum_ij alpha_kij ReLU(g_kij)
    raw       = ReLU(sum_k w_k A_k)

  The paper derives the second and third derivatives from an *exponential* of the
  score, for which they are powers of the first derivative; like pytorch-grad-cam and
  the paper's own code, the gradients of the pre-softmax logit stand in for that score
  (no extra backward passes). Note that the sum in the denominator is over the
  activations only: g_kij^3 is taken at the position being weighted.

  Args:
    apply_fn: ``model.apply`` of a zoo model.
    variables: model variables (params, batch_stats); BatchNorm in inference mode.
    images: (B, H, W, C) normalised float inputs.
    targets: (B,) class ids, or None for each sample's predicted class.
    layers: a layer name, a list of names, or ``'all'`` (every spatial layer, forward order).
    eps: epsilon of the final per-image min-max normalisation (as Grad-CAM's).
    alpha_eps: added to the alpha denominator (pytorch-grad-cam uses 1e-6); alphas at
      zero gradients or exactly-zero denominators are 0 whatever its value.
  Returns:
    dict layer -> CamResult(raw (B, h, w), maps (B, H, W) in [0, 1]), in forward order
    (a ``jax.jit``-ed caller gets it back key-sorted: JAX rebuilds output dicts that way).
  Raises:
    ConfigError: unknown layer (lists the valid ones), bad images or targets.
  """
  info = core.check_inputs(apply_fn, variables, images, targets)
  names = layers_lib.resolve_layers(info, layers, "Grad-CAM++")
  out = core.activations_and_gradients(apply_fn, variables, images, targets, names, info.shapes)
  size = images.shape[1:3]
  return {n: finish(gradcam_pp_from(out["activations"][n], out["gradients"][n], alpha_eps), size, eps)
          for n in names}


# ------------------------------------------------------------------ per-feature-map Grad-CAM

class FeatureMapCams(NamedTuple):
  """Per-channel Grad-CAM maps of one layer.

  Attributes:
    raw: (B, K, h, w) ReLU(w_k A_k) (or w_k A_k with ``rectify=False``) at layer resolution.
    maps: (B, K, H, W) input-size maps, min-max normalised per image and per channel.
    weights: (B, K) Grad-CAM weights w_k = mean_ij dScore/dA_kij of the chosen channels.
  """
  raw: jax.Array
  maps: jax.Array
  weights: jax.Array


def feature_map_cams(apply_fn: core.ApplyFn, variables: Any, images: jax.Array, targets: jax.Array | None,
                     layer: str, channels: int | Sequence[int] | None = None, *, rectify: bool = True,
                     eps: float = 1e-8) -> FeatureMapCams:
  """Grad-CAM split into the contribution of each feature map: ReLU(w_k A_k).

  Summing the un-rectified maps w_k A_k over all k gives Grad-CAM's map before its ReLU.

  Args:
    apply_fn: ``model.apply`` of a zoo model.
    variables: model variables.
    images: (B, H, W, C) normalised float inputs.
    targets: (B,) class ids, or None for each sample's predicted class.
    layer: one spatial layer name.
    channels: channel indices k (in the given order), or None for all channels.
    rectify: apply the ReLU to each w_k A_k (False: signed contributions).
    eps: normalisation epsilon.
  Returns:
    FeatureMapCams(raw (B, K', h, w), maps (B, K', H, W), weights (B, K')), K' = len(channels).
  Raises:
    ConfigError: unknown layer, channel out of range, bad images or targets.
  """
  info = core.check_inputs(apply_fn, variables, images, targets)
  if not isinstance(layer, str):
    raise ConfigError(f"feature_map_cams takes one layer name; got {layer!r}")
  (name,) = layers_lib.resolve_layers(info, layer, "feature-map Grad-CAM")
  chans = check_channels(channels, info.shapes[name][-1], name)
  out = core.activations_and_gradients(apply_fn, variables, images, targets, [name], info.shapes)
  idx = jnp.asarray(chans, jnp.int32)
  a = jnp.take(_wide(out["activations"][name]), idx, axis=-1)
  w = jnp.mean(jnp.take(_wide(out["gradients"][name]), idx, axis=-1), axis=(1, 2))  # (B, K')
  raw = jnp.einsum("bk,bhwk->bkhw", w, a)
  if rectify:
    raw = jax.nn.relu(raw)
  b, k, h, wd = raw.shape
  res = finish(raw.reshape(b * k, h, wd), images.shape[1:3], eps)
  return FeatureMapCams(raw=raw, maps=res.maps.reshape((b, k) + res.maps.shape[1:]), weights=w)


# ---------------------------------------------------------------------------- SimpleGrad

def reduce_channels(grad: jax.Array, reduce: str = "max_abs") -> jax.Array:
  """(B, H, W, C) -> (B, H, W): ``max_abs`` | ``sum_abs`` | ``mean_abs`` | ``l2`` over C.

  ``l2`` uses a guarded square root, so its derivative at an all-zero pixel is 0, not NaN.
  """
  check_choice("reduce", reduce, REDUCTIONS)
  if reduce == "max_abs":
    return jnp.max(jnp.abs(grad), axis=-1)
  if reduce == "sum_abs":
    return jnp.sum(jnp.abs(grad), axis=-1)
  if reduce == "mean_abs":
    return jnp.mean(jnp.abs(grad), axis=-1)
  sq = jnp.sum(grad * grad, axis=-1)
  pos = sq > 0
  return jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0)


def simple_grad(apply_fn: core.ApplyFn, variables: Any, images: jax.Array, targets: jax.Array | None = None,
                reduce: str = "max_abs", *, eps: float = 1e-8) -> CamResult:
  """SimpleGrad / vanilla saliency: |dScore/dInput| reduced over colour channels.

  Args:
    apply_fn: ``model.apply``.
    variables: model variables.
    images: (B, H, W, C) normalised float inputs (the gradient is w.r.t. these).
    targets: (B,) class ids, or None for each sample's predicted class.
    reduce: ``'max_abs'`` (default: max over channels of the absolute value),
      ``'sum_abs'``, ``'mean_abs'`` or ``'l2'`` (Euclidean norm over channels).
    eps: normalisation epsilon.
  Returns:
    CamResult(raw (B, H, W) reduced gradient, maps (B, H, W) min-max normalised per image).
  Raises:
    ConfigError: bad reduce name, images or targets.
  """
  check_choice("reduce", reduce, REDUCTIONS)
  core.check_inputs(apply_fn, variables, images, targets)
  out = core.activations_and_gradients(apply_fn, variables, images, targets, [], shapes={}, input_gradient=True)
  raw = reduce_channels(_wide(out["input_gradient"]), reduce)
  return CamResult(raw=raw, maps=normalize_maps(raw, eps))


def _gradcam_pp_maps(apply_fn: core.ApplyFn, variables: Any, images: jax.Array, targets: jax.Array | None,
                     layer: str) -> jax.Array:
  return gradcam_pp(apply_fn, variables, images, targets, layer)[layer].maps


def _gradcam_pp_all_layers(apply_fn: core.ApplyFn, variables: Any, images: jax.Array, targets: jax.Array | None,
                           layers: Sequence[str]) -> dict[str, jax.Array]:
  return {n: r.maps for n, r in gradcam_pp(apply_fn, variables, images, targets, list(layers)).items()}


def _simple_grad_maps(apply_fn: core.ApplyFn, variables: Any, images: jax.Array, targets: jax.Array | None,
                      layer: str | None) -> jax.Array:
  del layer  # explains the input
  return simple_grad(apply_fn, variables, images, targets).maps


registry.register(registry.Method("gradcam_pp", _gradcam_pp_maps, takes_layer=True, gradient="layer",
                                  all_layers=_gradcam_pp_all_layers))
registry.register(registry.Method("simple_grad", _simple_grad_maps, takes_layer=False, gradient="input"))
