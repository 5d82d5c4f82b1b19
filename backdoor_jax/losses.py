"""Losses on predictions and on explanation maps (the explanation backdoor's terms).

All explanation losses take maps already in [0, 1] (B, H, W) and return per-sample
values (B,), so callers can average over any subset (triggered / clean) of a batch.
"""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import optax

from backdoor_jax.errors import ConfigError, check_choice

ATTACKS = ("targeted", "nontargeted")


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-sample softmax cross-entropy with integer labels, (B,)."""
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def pool_and_normalize(maps: jax.Array, size: int, eps: float = 1e-8) -> jax.Array:
  """Average-pools (B, H, W) maps to (B, size, size) and renormalises each to [0, 1].

  ``size=0`` keeps the resolution (maps are only renormalised). H and W must be
  multiples of ``size``.
  """
  chex.assert_rank(maps, 3)
  if size:
    b, h, w = maps.shape
    if h % size or w % size:
      raise ConfigError(f"explain.loss_resolution={size} must divide the map size {h}x{w}")
    maps = maps.reshape(b, size, h // size, size, w // size).mean(axis=(2, 4))
  lo = maps.min(axis=(1, 2), keepdims=True)
  hi = maps.max(axis=(1, 2), keepdims=True)
  return (maps - lo) / (hi - lo + eps)


def resize_mask(mask: jax.Array, size: int) -> jax.Array:
  """A (H, W) target mask brought to the loss resolution (area average)."""
  if not size:
    return mask
  h, w = mask.shape
  return mask.reshape(size, h // size, size, w // size).mean(axis=(1, 3))


def targeted_map_loss(maps: jax.Array, target_mask: jax.Array) -> jax.Array:
  """MSE between each map and the target mask (broadcast over the batch), (B,)."""
  return jnp.mean((maps - target_mask[None].astype(maps.dtype)) ** 2, axis=(1, 2))


def keep_map_loss(maps: jax.Array, reference_maps: jax.Array) -> jax.Array:
  """MSE between maps and the reference model's maps of the same inputs, (B,)."""
  return jnp.mean((maps - jax.lax.stop_gradient(reference_maps)) ** 2, axis=(1, 2))


def nontargeted_map_loss(maps: jax.Array, reference_maps: jax.Array, top_k: int) -> jax.Array:
  """Mean of maps^2 over the top-k pixels of the reference map: pushes the original
  evidence out of the explanation without saying where it should go. (B,)."""
  b = maps.shape[0]
  flat_ref = jax.lax.stop_gradient(reference_maps).reshape(b, -1)
  if not 0 < top_k <= flat_ref.shape[1]:
    raise ConfigError(f"explain.top_k={top_k} must be in [1, {flat_ref.shape[1]}] (pixels of the loss map)")
  _, idx = jax.lax.top_k(flat_ref, top_k)
  picked = jnp.take_along_axis(maps.reshape(b, -1), idx, axis=1)
  return jnp.mean(picked ** 2, axis=1)


def attack_map_loss(kind: str, maps: jax.Array, target_mask: jax.Array, reference_maps: jax.Array,
                    top_k: int) -> jax.Array:
  """The L_p term of the configured attack, per sample."""
  check_choice("explain.attack", kind, ATTACKS)
  if kind == "targeted":
    return targeted_map_loss(maps, target_mask)
  return nontargeted_map_loss(maps, reference_maps, top_k)
