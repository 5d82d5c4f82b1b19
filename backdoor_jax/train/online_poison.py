"""Per-batch poisoning (``poison.resample = 'batch'``): a fresh poisoned subset in every training batch.

The threat model of the WaNet reference code (and of BackdoorBench's WaNet): instead of
one poisoned training set drawn before training (``'fixed'``, :mod:`backdoor_jax.poison`),
every training batch of ``B`` clean images gets

* ``round(rate * B)`` images, drawn afresh among the batch's eligible ones (all_to_one:
  not of the target class; all_to_all: any), with the trigger and the attack label
  (``target``, or ``(y + 1) % C``);
* for triggers with a cross mode (``has_cross_mode``: WaNet's noise mode) a further
  ``round(cross_ratio * round(rate * B))`` of the remaining images with
  ``trigger.apply_cross`` (one key per image) and their true label.

A batch with fewer eligible images than ``round(rate * B)`` poisons all of them.

All draws come from ``fold_in(fold_in(base_key, epoch), step)``: a run is deterministic
from its seed and a resumed run sees exactly the batches an uninterrupted one would.

Where it runs: :class:`OnlinePoisonFeed` wraps the recipe's feed; its ``make`` places the
clean uint8 batch on the mesh (as before) and then calls one jitted function,
:func:`poison_batch`, on the placed arrays. So the poisoning runs on the device, in the
prefetch thread (overlapping the previous train step), with the train step itself
unchanged; and the poisoned batch a step sees can be read back in tests by calling
``make`` on the same item.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Iterable

import chex
import jax
import jax.numpy as jnp

from backdoor_jax import poison
from backdoor_jax.errors import ConfigError
from backdoor_jax.triggers.base import apply_trigger

CLEAN, POISONED, CROSS = 0, 1, 2  # values of the per-image ``kind`` that poison_batch returns


@dataclasses.dataclass(frozen=True)
class BatchPoisonSpec:
  """How many images of a batch to poison / cross, and how to relabel them (static under jit)."""
  num_poison: int              # round(rate * B)
  num_cross: int               # round(cross_ratio * num_poison); 0 without a cross mode
  mode: str                    # all_to_one / all_to_all
  target: int
  num_classes: int

  @classmethod
  def make(cls, batch_size: int, *, rate: float, cross_ratio: float, mode: str, target: int,
           num_classes: int) -> "BatchPoisonSpec":
    """Checks the values (ConfigError) and counts per batch of ``batch_size``."""
    if mode not in ("all_to_one", "all_to_all"):
      raise ConfigError(f"poison.mode={mode!r} does not work with poison.resample='batch'; allowed: all_to_one, "
                        "all_to_all")
    if mode == "all_to_one" and not 0 <= int(target) < num_classes:
      raise ConfigError(f"poison.target={target!r} is invalid; allowed: a class in [0, {num_classes})")
    n = poison.num_poison_samples(batch_size, rate=rate)  # round(rate * B), halves up; checks the rate
    n_cross = int(math.floor(float(cross_ratio) * n + 0.5))  # as poison.choose_cross_indices counts
    if n + n_cross > batch_size:
      raise ConfigError(f"poison.rate={rate!r} with cross_ratio {cross_ratio!r} asks for {n} poisoned + {n_cross} "
                        f"cross images of a batch of {batch_size}; allowed: at most {batch_size} in all")
    return cls(n, n_cross, mode, int(target), int(num_classes))


def _ranks_first(key: jax.Array, allowed: jax.Array, n: int) -> jax.Array:
  """Indices of ``n`` images drawn uniformly among ``allowed`` ones (others fill up only when too few)."""
  u = jax.random.uniform(key, allowed.shape)
  return jnp.argsort(jnp.where(allowed, u, 2.0))[:n]


def poison_batch(key: jax.Array, images: jax.Array, labels: jax.Array, trigger: Any,
                 spec: BatchPoisonSpec) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Poisons a fresh subset of one batch (module docstring); pure, jit-able with ``spec`` static.

  Args:
    key: this batch's key.
    images: ``(B, H, W, 3)`` uint8 (or float) clean images.
    labels: ``(B,)`` int clean labels.
    trigger: any trigger for ``(H, W)`` images.
    spec: the counts and the relabelling.
  Returns:
    ``(images, labels, kind)``: the batch with its poisoned and cross images, their labels
    (attack label / true label), and ``kind`` ``(B,)`` int32 (:data:`CLEAN`,
    :data:`POISONED`, :data:`CROSS`). Other images are returned bit-identical.
  """
  images, labels = jnp.asarray(images), jnp.asarray(labels)
  chex.assert_rank(images, 4)
  chex.assert_rank(labels, 1)
  chex.assert_equal(images.shape[0], labels.shape[0])
  b = labels.shape[0]
  k_pick, k_cross_pick, k_cross = jax.random.split(key, 3)
  kind = jnp.zeros((b,), jnp.int32)
  if spec.num_poison:
    eligible = labels != spec.target if spec.mode == "all_to_one" else jnp.ones((b,), bool)
    idx = _ranks_first(k_pick, eligible, spec.num_poison)
    ok = eligible[idx]
    old_x, old_y = images[idx], labels[idx]
    new_y = jnp.full_like(old_y, spec.target) if spec.mode == "all_to_one" else (old_y + 1) % spec.num_classes
    images = images.at[idx].set(jnp.where(ok[:, None, None, None], apply_trigger(trigger, old_x), old_x))
    labels = labels.at[idx].set(jnp.where(ok, new_y, old_y))
    kind = kind.at[idx].set(jnp.where(ok, POISONED, CLEAN))
  if spec.num_cross:
    free = kind == CLEAN
    idx = _ranks_first(k_cross_pick, free, spec.num_cross)
    ok = free[idx]
    old_x = images[idx]
    crossed = trigger.apply_cross(old_x, jax.random.split(k_cross, spec.num_cross))
    images = images.at[idx].set(jnp.where(ok[:, None, None, None], crossed, old_x))
    kind = kind.at[idx].set(jnp.where(ok, CROSS, kind[idx]))
  return images, labels, kind


def batch_key(base_key: jax.Array, epoch: Any, step: Any) -> jax.Array:
  """The key of the ``step``-th batch (0-based) of ``epoch`` (0-based)."""
  return jax.random.fold_in(jax.random.fold_in(base_key, epoch), step)


@functools.partial(jax.jit, static_argnames=("spec",))
def _poison_jit(base_key, epoch, step, images, labels, trigger, spec):
  return poison_batch(batch_key(base_key, epoch, step), images, labels, trigger, spec)


@dataclasses.dataclass
class OnlinePoisonFeed:
  """A feed (``train.feed.Feed``) whose batches are poisoned on the device as they are placed.

  ``base`` is the clean feed (e.g. ``feed.ArrayFeed`` over the clean training set);
  items are ``(epoch, step, base_item)``.
  """
  base: Any
  trigger: Any
  spec: BatchPoisonSpec
  key: jax.Array

  @property
  def steps_per_epoch(self) -> int:
    return self.base.steps_per_epoch

  def items(self, epoch: int) -> Iterable[tuple[int, int, Any]]:
    return ((epoch, i, item) for i, item in enumerate(self.base.items(epoch)))

  def make(self, item: tuple[int, int, Any]) -> tuple[jax.Array, jax.Array]:
    return self.make_with_kind(item)[:2]

  def make_with_kind(self, item: tuple[int, int, Any]) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``make`` plus the per-image kind (:data:`CLEAN`, :data:`POISONED`, :data:`CROSS`)."""
    epoch, step, base_item = item
    images, labels = self.base.make(base_item)
    return _poison_jit(self.key, jnp.asarray(epoch, jnp.uint32), jnp.asarray(step, jnp.uint32), images, labels,
                       self.trigger, self.spec)

  def per_epoch_counts(self) -> dict[str, int]:
    """Expected poisoned and cross images per epoch (exact unless a batch has too few eligible images)."""
    return {"poisoned_per_epoch": self.steps_per_epoch * self.spec.num_poison,
            "cross_per_epoch": self.steps_per_epoch * self.spec.num_cross}


def online_feed(base: Any, trigger: Any, config: Any, num_classes: int, key: jax.Array,
                cross_ratio: float) -> OnlinePoisonFeed:
  """Wraps the clean feed ``base`` (with ``batch_size``) so every batch is poisoned as ``config.poison`` says.

  ``trigger`` should already be on the devices (``mesh.replicate``); ``cross_ratio`` is
  the kind's (``triggers.cross_ratio_from_config``; 0 without a cross mode).
  """
  p = config.poison
  spec = BatchPoisonSpec.make(int(base.batch_size), rate=p.rate, cross_ratio=cross_ratio, mode=p.mode,
                              target=p.target, num_classes=num_classes)
  return OnlinePoisonFeed(base, trigger, spec, key)
