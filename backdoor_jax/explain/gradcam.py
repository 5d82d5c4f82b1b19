"""Grad-CAM (and its raw, per-layer and all-layer forms) as pure, differentiable functions.

Conventions (those of the widely used reference libraries, so numbers compare):
weights w_k = spatial mean of dScore/dA_k with Score the pre-softmax logit of the target
class of *each sample*; raw map = ReLU(sum_k w_k A_k) at layer resolution; the map is
then resized bilinearly (half-pixel centres) to the input size and normalised per image
to [0, 1] by (m - min) / (max - min + eps).
"""
from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from backdoor_jax.explain import core
from backdoor_jax.explain import layers as layers_lib
from backdoor_jax.explain import registry


class CamResult(NamedTuple):
  """One layer's maps. raw: (B, h, w) at layer resolution; maps: (B, H, W) in [0, 1]."""
  raw: jax.Array
  maps: jax.Array


def normalize_maps(maps: jax.Array, eps: float = 1e-8) -> jax.Array:
  """Per-image min-max normalisation of (B, H, W) maps to [0, 1]; all-equal maps -> 0."""
  lo = jnp.min(maps, axis=(1, 2), keepdims=True)
  hi = jnp.max(maps, axis=(1, 2), keepdims=True)
  return (maps - lo) / (hi - lo + eps)


def upsample(maps: jax.Array, size: tuple[int, int]) -> jax.Array:
  """Bilinear resize of (B, h, w) maps to (B, *size) (half-pixel centres, edge clamp)."""
  if maps.shape[1:] == tuple(size):
    return maps
  return jax.image.resize(maps, (maps.shape[0],) + tuple(size), method="bilinear", antialias=False)


def cam_from(activation: jax.Array, gradient: jax.Array) -> jax.Array:
  """Raw Grad-CAM ReLU(sum_k mean_hw(dS/dA_k) A_k) from (B, h, w, K) arrays."""
  weights = jnp.mean(gradient, axis=(1, 2), keepdims=True)
  return jax.nn.relu(jnp.sum(weights * activation, axis=-1))


def finish(raw: jax.Array, size: tuple[int, int], eps: float = 1e-8) -> CamResult:
  """Upsamples and normalises raw maps."""
  raw = raw.astype(jnp.promote_types(raw.dtype, jnp.float32))  # bf16 -> f32; f64 stays
  return CamResult(raw=raw, maps=normalize_maps(upsample(raw, size), eps))


def gradcam(apply_fn: core.ApplyFn, variables: Any, images: jax.Array, targets: jax.Array | None = None,
            layers: str | Sequence[str] = "all", *, eps: float = 1e-8) -> dict[str, CamResult]:
  """Grad-CAM at one, several or ``'all'`` spatial layers in one forward + backward pass.

  Args:
    apply_fn: ``model.apply`` of a zoo model.
    variables: model variables (params, batch_stats); BatchNorm in inference mode.
    images: (B, H, W, C) normalised float inputs.
    targets: (B,) class ids, or None for each sample's predicted class.
    layers: a layer name, a list of names, or ``'all'``.
    eps: normalisation epsilon.
  Returns:
    dict layer -> CamResult(raw (B, h, w), maps (B, H, W) in [0, 1]).
  Raises:
    ConfigError: unknown layer (lists the valid ones), bad images or targets.
  """
  info = core.check_inputs(apply_fn, variables, images, targets)
  names = layers_lib.resolve_layers(info, layers, "Grad-CAM")
  out = core.activations_and_gradients(apply_fn, variables, images, targets, names, info.shapes)
  size = images.shape[1:3]
  return {n: finish(cam_from(out["activations"][n], out["gradients"][n]), size, eps) for n in names}


def gradcam_maps(apply_fn: core.ApplyFn, variables: Any, images: jax.Array, targets: jax.Array | None,
                 layer: str, *, eps: float = 1e-8) -> jax.Array:
  """Normalised input-size Grad-CAM maps (B, H, W) at one layer (the training-loss form)."""
  return gradcam(apply_fn, variables, images, targets, layer, eps=eps)[layer].maps


def _gradcam_all_layers(apply_fn: core.ApplyFn, variables: Any, images: jax.Array, targets: jax.Array | None,
                        layers: Sequence[str]) -> dict[str, jax.Array]:
  return {n: r.maps for n, r in gradcam(apply_fn, variables, images, targets, list(layers)).items()}


registry.register(registry.Method("gradcam", gradcam_maps, takes_layer=True, gradient="layer",
                                  all_layers=_gradcam_all_layers))
