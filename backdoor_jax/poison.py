"""Dataset poisoning for backdoor attacks, deterministic from a PRNG key.

Training set: ``n`` samples are drawn uniformly without replacement from the eligible
pool and *replace* their clean versions (triggered image, attack label):

* ``'all_to_one'``: every poisoned sample gets label ``target``; the pool is the
  samples whose clean label is not ``target``.
* ``'all_to_all'``: a sample of class ``y`` gets ``(y + 1) % num_classes``; the pool
  is every sample (``target`` is ignored and may be ``None``).

How many: pass either ``rate``, a fraction in ``[0, 1]`` of the training-set size
``N`` (``n = round(rate * N)``, halves rounded up; ``rate=1`` means all of ``N``, not
one sample), or ``count``, an int number of samples. Exactly one of the two.

Test set: every eligible test image (all non-``target`` images for all_to_one, all
images for all_to_all) with the trigger and its attack label. The attack success rate
(ASR) is the fraction of these predicted as their attack label.

Everything here runs on the host before training: inputs may be numpy or jax arrays,
outputs are numpy arrays, images keep their dtype (uint8 stays uint8), and the trigger
is applied in fixed-size jitted chunks so large datasets do not exhaust memory.
Invalid arguments raise :class:`backdoor_jax.errors.ConfigError`.
"""
from __future__ import annotations

import math
import numbers
from typing import Any

import chex
import jax
import numpy as np

from backdoor_jax.errors import ConfigError, check_choice
from backdoor_jax.triggers.patch import Trigger, apply_trigger

POISON_MODES = ("all_to_one", "all_to_all")

DEFAULT_CHUNK_SIZE = 1024

_apply_jit = jax.jit(apply_trigger)


def _is_int(x: Any) -> bool:
  return isinstance(x, numbers.Integral) and not isinstance(x, (bool, np.bool_))


def _check_mode_classes_target(mode: Any, num_classes: Any, target: Any) -> None:
  check_choice("poison mode", mode, POISON_MODES)
  if not _is_int(num_classes) or num_classes < 2:
    raise ConfigError(f"num_classes {num_classes!r} is invalid; allowed: an int >= 2")
  if mode == "all_to_all" and target is None:
    return
  if not _is_int(target) or not 0 <= target < num_classes:
    raise ConfigError(f"poison target {target!r} is invalid; allowed: an int in [0, {num_classes})")


def _check_labels(labels: Any, num_classes: int) -> np.ndarray:
  labels = np.asarray(labels)
  if labels.ndim != 1:
    raise ConfigError(f"labels have shape {labels.shape}; allowed: a 1-D (N,) array of class ids")
  if not np.issubdtype(labels.dtype, np.integer):
    raise ConfigError(f"labels have dtype {labels.dtype}; allowed: an integer dtype")
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ConfigError(f"labels span [{labels.min()}, {labels.max()}]; allowed: "
                      f"[0, {num_classes}) for num_classes={num_classes}")
  return labels


def _eligible(labels: np.ndarray, mode: str, target: int | None) -> np.ndarray:
  if mode == "all_to_one":
    return np.flatnonzero(labels != target)
  return np.arange(labels.shape[0])


def _check_images(images: Any, labels: np.ndarray, trigger: Trigger) -> np.ndarray:
  if not isinstance(trigger, Trigger):
    raise TypeError(f"trigger must be a backdoor_jax.triggers.Trigger; got {type(trigger).__name__}")
  chex.assert_rank([trigger.pattern, trigger.mask], 3)
  images = np.asarray(images)
  hw = tuple(trigger.pattern.shape[:2])
  if images.ndim != 4 or images.shape[1:] != hw + (3,):
    raise ConfigError(f"images of shape {images.shape} do not match a trigger for "
                      f"{hw[0]}x{hw[1]} images; allowed: (N, {hw[0]}, {hw[1]}, 3)")
  if images.shape[0] != labels.shape[0]:
    raise ConfigError(f"got {images.shape[0]} images but {labels.shape[0]} labels; "
                      "they must have the same length")
  return images


def _check_dataset_args(images: Any, labels: Any, trigger: Any, mode: str, num_classes: int, target: int,
                        chunk_size: Any) -> tuple[np.ndarray, np.ndarray, int]:
  """The checks shared by the dataset-level functions; returns (images, labels, chunk_size)."""
  _check_mode_classes_target(mode, num_classes, target)
  labels_np = _check_labels(labels, num_classes)
  return _check_images(images, labels_np, trigger), labels_np, _check_chunk_size(chunk_size)


def _check_chunk_size(chunk_size: Any) -> int:
  if not _is_int(chunk_size) or chunk_size < 1:
    raise ConfigError(f"chunk_size {chunk_size!r} is invalid; allowed: an int >= 1")
  return int(chunk_size)


def _apply_in_chunks(trigger: Trigger, images: np.ndarray, chunk_size: int) -> np.ndarray:
  """Triggers ``images`` (numpy, ``(M, H, W, 3)``) chunk by chunk; returns numpy.

  Every chunk is padded to the same length so the jitted function compiles once.
  """
  m = images.shape[0]
  out = np.empty_like(images)
  if m == 0:
    return out
  chunk = min(chunk_size, m)
  for start in range(0, m, chunk):
    part = images[start:start + chunk]
    k = part.shape[0]
    if k < chunk:
      part = np.concatenate([part, np.zeros((chunk - k,) + part.shape[1:], part.dtype)])
    out[start:start + k] = np.asarray(_apply_jit(trigger, part))[:k]
  return out


def poison_target_labels(labels: Any, *, mode: str, target: int | None, num_classes: int) -> np.ndarray:
  """Attack labels for clean ``labels``.

  Args:
    labels: ``(N,)`` ints in ``[0, num_classes)``.
    mode: one of :data:`POISON_MODES`.
    target: the target class for ``'all_to_one'``; ignored (may be ``None``) for
      ``'all_to_all'``.
    num_classes: number of classes ``C`` (>= 2).
  Returns:
    ``(N,)`` numpy array, same dtype as ``labels``: all ``target`` (all_to_one) or
    ``(y + 1) % C`` (all_to_all).
  Raises:
    ConfigError: for an unknown mode, a bad ``num_classes``/``target`` or bad labels.
  """
  _check_mode_classes_target(mode, num_classes, target)
  labels = _check_labels(labels, num_classes)
  if mode == "all_to_one":
    return np.full_like(labels, target)
  return ((labels + 1) % num_classes).astype(labels.dtype)


def num_poison_samples(n_total: int, *, rate: Any = None, count: Any = None) -> int:
  """Number of samples to poison from exactly one of ``rate`` and ``count``.

  Args:
    n_total: training-set size ``N``.
    rate: fraction in ``[0, 1]`` of ``N``; ``n = round(rate * N)`` with halves up.
    count: number of samples, an int ``>= 0``.
  Returns:
    ``n`` (not yet checked against the eligible pool).
  Raises:
    ConfigError: if both or neither are given, or the given one is invalid.
  """
  if (rate is None) == (count is None):
    raise ConfigError(f"give exactly one of poison rate and count; got rate={rate!r}, count={count!r}")
  if count is not None:
    if not _is_int(count) or count < 0:
      raise ConfigError(f"poison count {count!r} is invalid; allowed: an int >= 0")
    return int(count)
  if (isinstance(rate, (bool, np.bool_)) or not isinstance(rate, numbers.Real)
      or not math.isfinite(float(rate)) or not 0 <= rate <= 1):
    raise ConfigError(f"poison rate {rate!r} is invalid; allowed: a fraction in [0, 1] of the "
                      "training set (use count= for a number of samples)")
  return int(math.floor(float(rate) * n_total + 0.5))


def choose_poison_indices(key: chex.PRNGKey,
                          labels: Any,
                          *,
                          rate: float | None = None,
                          target: int | None,
                          mode: str,
                          num_classes: int,
                          count: int | None = None) -> np.ndarray:
  """Chooses which training samples to poison, uniformly among the eligible ones.

  Args:
    key: JAX PRNG key; the same key (and labels) always gives the same indices.
    labels: ``(N,)`` clean training labels.
    rate: fraction in ``[0, 1]`` of ``N`` (see module docstring). Give this or ``count``.
    target: target class (all_to_one); ignored for all_to_all (may be ``None``).
    mode: one of :data:`POISON_MODES`.
    num_classes: number of classes.
    count: number of samples to poison, instead of ``rate``.
  Returns:
    Sorted, unique ``int64`` indices into ``labels``, of length ``n``.
  Raises:
    ConfigError: for bad arguments, or ``n`` larger than the eligible pool.
  """
  _check_mode_classes_target(mode, num_classes, target)
  labels = _check_labels(labels, num_classes)
  n_total = labels.shape[0]
  n = num_poison_samples(n_total, rate=rate, count=count)
  pool = _eligible(labels, mode, target)
  if n > pool.shape[0]:
    asked = f"rate {rate!r}" if count is None else f"count {count!r}"
    why = (f"mode 'all_to_one' excludes the {n_total - pool.shape[0]} samples of target class {target}"
           if mode == "all_to_one" else f"mode {mode!r}")
    raise ConfigError(f"poison {asked} asks for {n} of {n_total} training samples but only "
                      f"{pool.shape[0]} are eligible ({why}); allowed: at most {pool.shape[0]}")
  if n == 0:
    return np.zeros((0,), np.int64)
  perm = np.asarray(jax.random.permutation(key, pool.shape[0]))
  return np.sort(pool[perm[:n]]).astype(np.int64)


def poison_train_set(key: chex.PRNGKey,
                     images: Any,
                     labels: Any,
                     trigger: Trigger,
                     *,
                     rate: float | None = None,
                     target: int | None,
                     mode: str,
                     num_classes: int,
                     count: int | None = None,
                     chunk_size: int = DEFAULT_CHUNK_SIZE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Returns a poisoned copy of a training set (inputs are not modified).

  Args:
    key: JAX PRNG key (see :func:`choose_poison_indices`).
    images: ``(N, H, W, 3)`` pixel-unit images (uint8 or float), numpy or jax.
    labels: ``(N,)`` clean labels.
    trigger: a :class:`~backdoor_jax.triggers.Trigger` for ``(H, W)`` images.
    rate: fraction in ``[0, 1]`` of ``N`` to poison; give this or ``count``.
    target: target class (all_to_one); ignored for all_to_all.
    mode: one of :data:`POISON_MODES`.
    num_classes: number of classes.
    count: number of samples to poison, instead of ``rate``.
    chunk_size: images triggered per jitted call.
  Returns:
    ``(images, labels, is_poisoned)`` as numpy arrays: images with the input dtype,
    labels with the input dtype, and an ``(N,)`` bool mask. Non-poisoned samples are
    bit-identical to the input.
  Raises:
    ConfigError: for bad arguments or shapes.
  """
  images_np, labels_np, chunk_size = _check_dataset_args(images, labels, trigger, mode, num_classes, target,
                                                         chunk_size)
  idx = choose_poison_indices(key, labels_np, rate=rate, target=target, mode=mode,
                              num_classes=num_classes, count=count)
  out_images = np.array(images_np, copy=True)
  out_labels = np.array(labels_np, copy=True)
  is_poisoned = np.zeros(labels_np.shape[0], bool)
  if idx.size:
    out_images[idx] = _apply_in_chunks(trigger, images_np[idx], chunk_size)
    out_labels[idx] = poison_target_labels(labels_np[idx], mode=mode, target=target,
                                           num_classes=num_classes)
    is_poisoned[idx] = True
  return out_images, out_labels, is_poisoned


def poison_test_set(images: Any,
                    labels: Any,
                    trigger: Trigger,
                    *,
                    target: int | None,
                    mode: str,
                    num_classes: int,
                    chunk_size: int = DEFAULT_CHUNK_SIZE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Builds the triggered test set used to measure the attack success rate.

  Args:
    images: ``(N, H, W, 3)`` clean test images, numpy or jax.
    labels: ``(N,)`` clean test labels.
    trigger: the attack's trigger.
    target: target class (all_to_one); ignored for all_to_all.
    mode: one of :data:`POISON_MODES`.
    num_classes: number of classes.
    chunk_size: images triggered per jitted call.
  Returns:
    ``(images, attack_labels, source_index)`` as numpy arrays: the triggered images
    (input dtype) of every non-target test sample (all_to_one) or every test sample
    (all_to_all), their attack labels, and their ``int64`` indices into the input.
  Raises:
    ConfigError: for bad arguments or shapes.
  """
  images_np, labels_np, chunk_size = _check_dataset_args(images, labels, trigger, mode, num_classes, target,
                                                         chunk_size)
  source = _eligible(labels_np, mode, target).astype(np.int64)
  out_images = _apply_in_chunks(trigger, images_np[source], chunk_size)
  attack = poison_target_labels(labels_np[source], mode=mode, target=target, num_classes=num_classes)
  return out_images, attack, source
