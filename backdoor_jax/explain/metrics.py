"""Scores of explanation maps against a region: IoU, energy, pointing game, FSR / CR.

Every map function takes a batch of input-size maps ``(B, H, W)`` (Grad-CAM maps are in
[0, 1]) and a region mask ``(H, W)`` shared by the batch or ``(B, H, W)`` per image. A
boolean region is used as is; a numeric one means ``region > 0``. All of them are pure
``jax.numpy``, batched and ``jit``-able (shapes are static; no host round trips).

Conventions for the degenerate cases (documented here once):

* ``iou``: when both the thresholded map and the region are empty the IoU is 0 (an
  empty explanation never "matches" anything).
* ``energy_in_region``: an all-zero map has energy 0 everywhere, so its fraction is 0.
* ``pointing_game``: ties go to the *first* arg-max in row-major order (``jnp.argmax``),
  so a constant map (e.g. all zeros) points at pixel (0, 0).
* rates over an empty set of images (``fooling_success_rate``, ``correct_rate``,
  ``iou_summary``) are 0, so reports stay valid JSON (no NaN).

The region helpers build masks on the host: ``region_from_trigger`` (the trigger's
footprint) and ``square_region`` (the explanation attack's target square in a corner).
"""
from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp

from backdoor_jax.errors import ConfigError, check_choice

CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right")


def _as_region(region: Any, maps: jax.Array) -> jax.Array:
  """A boolean region broadcastable against (B, H, W) ``maps``."""
  region = jnp.asarray(region)
  chex.assert_rank(region, {2, 3})
  if region.dtype != jnp.bool_:
    region = region > 0
  if region.ndim == 2:
    chex.assert_equal(region.shape, maps.shape[1:])
    region = region[None]
  else:
    chex.assert_equal_shape([region, maps])
  return region


def iou(maps: jax.Array, region: Any, threshold: float = 0.5) -> jax.Array:
  """Intersection over union of the binarised maps ``maps > threshold`` with a region.

  Args:
    maps: (B, H, W) maps (Grad-CAM maps are in [0, 1]).
    region: (H, W) or (B, H, W) mask; bool, or numeric meaning ``> 0``.
    threshold: a pixel belongs to the explanation when its value is strictly above it.
  Returns:
    (B,) float32 IoU in [0, 1]; 0 when both sets are empty.
  """
  maps = jnp.asarray(maps)
  chex.assert_rank(maps, 3)
  region = _as_region(region, maps)
  pred = maps > threshold
  inter = jnp.sum(pred & region, axis=(1, 2)).astype(jnp.float32)
  union = jnp.sum(pred | region, axis=(1, 2)).astype(jnp.float32)
  return jnp.where(union > 0, inter / jnp.maximum(union, 1.0), 0.0)


def energy_in_region(maps: jax.Array, region: Any, eps: float = 1e-12) -> jax.Array:
  """Fraction of each map's mass inside the region: sum inside / sum total.

  Args:
    maps: (B, H, W) non-negative maps.
    region: (H, W) or (B, H, W) mask; bool, or numeric meaning ``> 0``.
    eps: guard of the division; a map whose total is <= eps scores 0.
  Returns:
    (B,) float32 in [0, 1]; 0 for an all-zero map.
  """
  maps = jnp.asarray(maps)
  chex.assert_rank(maps, 3)
  region = _as_region(region, maps)
  maps = maps.astype(jnp.promote_types(maps.dtype, jnp.float32))
  total = jnp.sum(maps, axis=(1, 2))
  inside = jnp.sum(jnp.where(region, maps, 0), axis=(1, 2))
  return jnp.where(total > eps, inside / jnp.maximum(total, eps), 0.0).astype(jnp.float32)


def pointing_game(maps: jax.Array, region: Any) -> jax.Array:
  """Whether each map's maximum lies inside the region (a "hit").

  Args:
    maps: (B, H, W) maps.
    region: (H, W) or (B, H, W) mask; bool, or numeric meaning ``> 0``.
  Returns:
    (B,) bool. Ties go to the first arg-max in row-major order, so a constant map
    points at pixel (0, 0).
  """
  maps = jnp.asarray(maps)
  chex.assert_rank(maps, 3)
  region = _as_region(region, maps)
  b = maps.shape[0]
  flat_idx = jnp.argmax(maps.reshape(b, -1), axis=1)
  flat_region = jnp.broadcast_to(region, maps.shape).reshape(b, -1)
  return jnp.take_along_axis(flat_region, flat_idx[:, None], axis=1)[:, 0]


def _rate(hits: jax.Array) -> jax.Array:
  if hits.size == 0:
    return jnp.zeros((), jnp.float32)
  return jnp.mean(hits.astype(jnp.float32))


def fooling_success_rate(losses: jax.Array, threshold: float) -> jax.Array:
  """FSR: fraction of triggered images whose attack loss is below ``threshold``.

  Args:
    losses: (N,) per-image attack losses (map vs. the attacker's target) of triggered images.
    threshold: an image counts as fooled when its loss is strictly below it.
  Returns:
    float32 scalar in [0, 1]; 0 for no images.
  """
  losses = jnp.asarray(losses)
  chex.assert_rank(losses, 1)
  return _rate(losses < threshold)


def correct_rate(losses_clean: jax.Array, threshold: float) -> jax.Array:
  """CR: fraction of clean images whose map is NOT fooled, i.e. attack loss >= ``threshold``.

  Args:
    losses_clean: (N,) attack losses of the maps of clean images.
    threshold: the same criterion as in :func:`fooling_success_rate`.
  Returns:
    float32 scalar in [0, 1]; 0 for no images.
  """
  losses_clean = jnp.asarray(losses_clean)
  chex.assert_rank(losses_clean, 1)
  return _rate(losses_clean >= threshold)


def iou_summary(ious: jax.Array) -> dict[str, jax.Array]:
  """Mean, median, standard deviation and fraction above 0.5 of per-image IoUs.

  Args:
    ious: (N,) IoU values.
  Returns:
    dict with float32 scalars ``mean``, ``median``, ``std`` (population, ddof 0) and
    ``gt_05`` (fraction of images with IoU > 0.5); all 0 for no images.
  """
  ious = jnp.asarray(ious, jnp.float32)
  chex.assert_rank(ious, 1)
  if ious.size == 0:
    zero = jnp.zeros((), jnp.float32)
    return {"mean": zero, "median": zero, "std": zero, "gt_05": zero}
  return {"mean": jnp.mean(ious), "median": jnp.median(ious), "std": jnp.std(ious),
          "gt_05": jnp.mean((ious > 0.5).astype(jnp.float32))}


def region_from_trigger(trigger: Any) -> jax.Array:
  """(H, W) bool region covered by a trigger: its mask > 0.

  Args:
    trigger: a ``triggers.Trigger`` (``mask`` of shape (H, W, 1)).
  Returns:
    (H, W) bool array.
  """
  mask = jnp.asarray(trigger.mask)
  chex.assert_rank(mask, 3)
  return mask[..., 0] > 0


def square_region(image_hw: tuple[int, int], corner: str = "top-left", fraction: float = 0.25) -> jax.Array:
  """(H, W) bool square in a corner: the explanation attack's target region.

  The side is ``round(fraction * min(H, W))`` pixels.

  Args:
    image_hw: (H, W) of the images.
    corner: one of ``CORNERS``.
    fraction: side of the square as a fraction of the shorter image side, in (0, 1].
  Returns:
    (H, W) bool array, True inside the square.
  Raises:
    ConfigError: unknown corner, or a square that is empty or does not fit.
  """
  check_choice("corner", corner, CORNERS)
  h, w = (int(v) for v in image_hw)
  if h < 1 or w < 1:
    raise ConfigError(f"image size {h}x{w} must be positive")
  f = float(fraction)
  side = int(round(f * min(h, w)))
  if not 0 < f <= 1 or side < 1:
    raise ConfigError(f"target region fraction {fraction} gives a {side}-pixel square in the {h}x{w} image; "
                      "it must be in (0, 1] and give at least 1 pixel")
  top = 0 if corner.startswith("top") else h - side
  left = 0 if corner.endswith("left") else w - side
  rows = jnp.arange(h)[:, None]
  cols = jnp.arange(w)[None, :]
  return (rows >= top) & (rows < top + side) & (cols >= left) & (cols < left + side)
