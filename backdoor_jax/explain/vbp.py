"""VisualBackProp (Bojarski et al., 2016/2018) as a pure, differentiable function.

Algorithm, for exposed spatial levels l_1 (shallowest) .. l_n (deepest) in forward order:

  1. average every level's feature maps over channels: m_l (B, h_l, w_l);
  2. mask <- m_n; for l = n-1 .. 1: mask <- up(mask, size of l) * m_l  (pointwise);
  3. mask <- up(mask, input size); normalise per image to [0, 1].

``up`` is the paper's transposed convolution with an all-ones kernel (bias 0). The paper
uses the kernel size and stride of the layer that produced the deeper map; the zoo's
levels can be several layers apart, so here they are chosen from the resolution ratio
r = (h_l / h_deeper, w_l / w_deeper):

  * r = 1: identity;
  * integer r: kernel = stride = r, no padding, no cropping. Each deeper pixel is
    spread uniformly over the r x r block it summarises, so the output is exactly
    h_deeper * r = h_l and is block replication (nearest-neighbour upsampling).
    Overlapping kernels (e.g. 3 with stride 2, as for a 3x3/2 conv) would add the
    contributions of two neighbours on every other row and column, a checkerboard
    the pointwise products then amplify, and need cropping; a 2x2/2 pool, the most
    common reduction in the zoo, has exactly the non-overlapping footprint;
  * otherwise (non-integer or < 1 in either axis): bilinear resize (``gradcam.upsample``).

The zoo exposes post-ReLU (or max-pool) maps at every level except PreAct-ResNet's
``stem`` and ``layer1``-``layer3`` (raw residual sums); those are used as they are.

Numerics: each m_l is divided by its per-image max |m_l| (when non-zero) before the
product. A positive per-image factor cancels in the final min-max normalisation, so
the mask is unchanged, but products over ~20 levels (VGG-19) no longer underflow.

No gradients are needed (one forward pass), and the result is differentiable with
respect to the parameters, so it can sit inside a training loss.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp

from backdoor_jax.explain import core
from backdoor_jax.explain.gradcam import normalize_maps, upsample
from backdoor_jax.explain import layers as layers_lib
from backdoor_jax.explain import registry
from backdoor_jax.models.common import INTERMEDIATES


def ones_transposed_conv(maps: jax.Array, factor: tuple[int, int]) -> jax.Array:
  """Transposed convolution of (B, h, w) maps with an all-ones kernel, kernel = stride = factor.

  Args:
    maps: (B, h, w) array.
    factor: (fh, fw) positive integers.
  Returns:
    (B, h * fh, w * fw) array; every input value fills its fh x fw output block.
  """
  fh, fw = int(factor[0]), int(factor[1])
  if (fh, fw) == (1, 1):
    return maps
  kernel = jnp.ones((fh, fw, 1, 1), maps.dtype)
  out = jax.lax.conv_transpose(maps[..., None], kernel, strides=(fh, fw), padding="VALID",
                               dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return out[..., 0]


def upsample_to(maps: jax.Array, size: tuple[int, int]) -> jax.Array:
  """VBP's level-to-level upsampling: all-ones transposed conv for integer ratios, else bilinear."""
  h, w = maps.shape[1:3]
  big_h, big_w = int(size[0]), int(size[1])
  if big_h % h == 0 and big_w % w == 0:
    return ones_transposed_conv(maps, (big_h // h, big_w // w))
  return upsample(maps, (big_h, big_w))


def _unit_scale(m: jax.Array) -> jax.Array:
  """Divides each (h, w) map by its max |value| (maps that are all zero stay zero)."""
  top = jnp.max(jnp.abs(m), axis=(1, 2), keepdims=True)
  pos = top > 0
  return m / jnp.where(pos, top, 1.0)


def visual_backprop(apply_fn: core.ApplyFn, variables: Any, images: jax.Array,
                    layers: str | Sequence[str] | None = None, *, eps: float = 1e-8) -> jax.Array:
  """VisualBackProp masks.

  Args:
    apply_fn: ``model.apply`` of a zoo model.
    variables: model variables; BatchNorm in inference mode.
    images: (B, H, W, C) normalised float inputs.
    layers: spatial levels to use (any order; they are taken in the model's forward
      order), or None / ``'all'`` for every exposed spatial layer.
    eps: epsilon of the final per-image min-max normalisation.
  Returns:
    (B, H, W) masks in [0, 1] (float32, or float64 under x64 with float64 inputs).
  Raises:
    ConfigError: unknown layer (lists the valid ones) or bad images.
  """
  core.check_images(images)
  info = layers_lib.layer_info(apply_fn, variables, images)
  chosen = set(layers_lib.resolve_layers(info, "all" if layers is None else layers, "VisualBackProp"))
  names = [n for n in info.order if n in chosen]
  _, state = apply_fn(layers_lib.plain_variables(variables), images, train=False, mutable=[INTERMEDIATES])
  mask = None
  for name in reversed(names):
    act = state[INTERMEDIATES][name][0]
    level = _unit_scale(jnp.mean(act.astype(jnp.promote_types(act.dtype, jnp.float32)), axis=-1))
    mask = level if mask is None else upsample_to(mask, level.shape[1:3]) * level
  mask = upsample_to(mask, images.shape[1:3])
  return normalize_maps(mask, eps)


def _vbp_maps(apply_fn: core.ApplyFn, variables: Any, images: jax.Array, targets: jax.Array | None,
              layer: str | None) -> jax.Array:
  del targets, layer  # class-agnostic, every spatial layer
  return visual_backprop(apply_fn, variables, images)


registry.register(registry.Method("vbp", _vbp_maps, takes_layer=False, gradient="none"))
