"""Input pipeline: host-side batching of indices, device-side augmentation and normalisation.

The host side only produces *index* arrays; callers gather images, labels and any extra
per-sample arrays (poison flags, masks) with them, so every array stays aligned. The
device side is pure ``jnp`` and jit-able. Nothing here places data on devices; the
trainer does that through its mesh.

Typical use::

  for idx in train_batches(n, batch_size, seed, epoch):
    x, y = ds.train_images[idx], ds.train_labels[idx]
    ...  # put on the mesh, then inside the jitted step:
    x = normalize(augment(key, x, crop_padding=4, flip=True), ds.mean, ds.std)
"""
from __future__ import annotations

from typing import Iterator, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

from backdoor_jax.data.sources import DATASET_NAMES
from backdoor_jax.errors import ConfigError, check_choice

# Datasets whose meaning changes under a horizontal flip (digits, text, signs).
_NO_FLIP = frozenset({"digits", "gtsrb", "svhn_cropped", "mnist", "npz"})
# Separates the shuffle streams from other users of the same integer seed.
_SHUFFLE_STREAM = 0x5AFF1E

PADDING_MODES = ("constant", "reflect")


def _check_int(what: str, value, minimum: int) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise ConfigError(f"{what} must be an integer >= {minimum}, got {value!r}")


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  """Deterministic shuffle of ``range(num_examples)`` for one epoch.

  The order depends only on ``(seed, epoch)``, not on what ran before, so a run resumed
  at epoch ``e`` sees exactly the order an uninterrupted run would.

  Args:
    num_examples: dataset size.
    seed: non-negative run seed.
    epoch: non-negative epoch number.

  Returns:
    int64 permutation ``(num_examples,)``.
  """
  _check_int("num_examples", num_examples, 0)
  _check_int("seed", seed, 0)
  _check_int("epoch", epoch, 0)
  rng = np.random.default_rng([_SHUFFLE_STREAM, int(seed), int(epoch)])
  return rng.permutation(int(num_examples))


def num_train_steps(num_examples: int, batch_size: int, drop_remainder: bool = True) -> int:
  """Number of batches :func:`train_batches` yields per epoch.

  Args:
    num_examples: dataset size.
    batch_size: examples per batch.
    drop_remainder: whether the last partial batch is dropped.

  Returns:
    steps per epoch (at least 1).

  Raises:
    ConfigError: the epoch would have no step (``batch_size > num_examples`` with
      ``drop_remainder``) or an argument is not a positive integer.
  """
  _check_int("num_examples", num_examples, 1)
  _check_int("batch_size", batch_size, 1)
  if drop_remainder:
    if batch_size > num_examples:
      raise ConfigError(
          f"batch_size {batch_size} is larger than the {num_examples} training examples, so "
          "an epoch has no full batch; lower batch_size or use more data")
    return num_examples // batch_size
  return -(-num_examples // batch_size)


def train_batches(
    num_examples: int,
    batch_size: int,
    seed: int,
    epoch: int,
    drop_remainder: bool = True,
) -> Iterator[np.ndarray]:
  """Yields the shuffled index batches of one training epoch.

  Args:
    num_examples: dataset size.
    batch_size: examples per batch.
    seed: run seed.
    epoch: epoch number (selects the shuffle, see :func:`epoch_permutation`).
    drop_remainder: drop the last partial batch (keeps shapes static under jit).

  Yields:
    int64 index arrays ``(batch_size,)`` (the last one shorter when not dropping).
  """
  steps = num_train_steps(num_examples, batch_size, drop_remainder)
  order = epoch_permutation(num_examples, seed, epoch)
  for step in range(steps):
    yield order[step * batch_size:(step + 1) * batch_size]


def check_num_shards(num_shards: int, batch_size: int, num_examples: int) -> None:
  """Raises ConfigError unless ``num_shards`` splits the data and every batch evenly."""
  _check_int("data.num_shards", num_shards, 1)
  if batch_size % num_shards:
    raise ConfigError(f"train.batch_size={batch_size} must be a multiple of data.num_shards={num_shards} "
                      "(each batch takes the same number of samples from every shard)")
  if num_examples // num_shards < batch_size // num_shards:
    raise ConfigError(f"data.num_shards={num_shards} leaves {num_examples // num_shards} training samples per "
                      f"shard, fewer than the {batch_size // num_shards} each batch takes from a shard")


def shard_rows(num_examples: int, num_shards: int, shard: int) -> np.ndarray:
  """The training-set rows of one shard: every ``num_shards``-th row from ``shard`` on.

  Every shard keeps ``num_examples // num_shards`` rows (the few left over are unused),
  so all shards give the same number of batches.
  """
  per = num_examples // num_shards
  return np.arange(shard, per * num_shards, num_shards, dtype=np.int64)


def num_sharded_train_steps(num_examples: int, batch_size: int, num_shards: int = 1) -> int:
  """Steps per epoch of :func:`sharded_train_batches` (``num_train_steps`` when unsharded)."""
  if num_shards == 1:
    return num_train_steps(num_examples, batch_size)
  check_num_shards(num_shards, batch_size, num_examples)
  return (num_examples // num_shards) // (batch_size // num_shards)


def sharded_train_batches(num_examples: int, batch_size: int, seed: int, epoch: int,
                          num_shards: int = 1) -> Iterator[np.ndarray]:
  """Global index batches of one epoch when the training set is split into shards.

  ``num_shards == 1`` is exactly :func:`train_batches`. Otherwise each shard (see
  :func:`shard_rows`) is shuffled on its own, from ``(seed, epoch, shard)``, and a
  global batch is the concatenation, in shard order, of ``batch_size // num_shards``
  rows from every shard. A process that owns a contiguous block of shards therefore
  feeds a contiguous block of every global batch, and needs only those shards' rows
  in memory; the batches do not depend on how many processes there are.

  Yields:
    int64 index arrays ``(batch_size,)`` into the full training set.
  """
  if num_shards == 1:
    yield from train_batches(num_examples, batch_size, seed, epoch)
    return
  steps = num_sharded_train_steps(num_examples, batch_size, num_shards)
  per_shard = batch_size // num_shards
  orders = []
  for s in range(num_shards):
    rows = shard_rows(num_examples, num_shards, s)
    rng = np.random.default_rng([_SHUFFLE_STREAM, int(seed), int(epoch), num_shards, s])
    orders.append(rows[rng.permutation(len(rows))])
  for step in range(steps):
    yield np.concatenate([o[step * per_shard:(step + 1) * per_shard] for o in orders])


def eval_batches(num_examples: int, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Yields fixed-size index batches that visit every example exactly once, in order.

  The last batch is padded with index 0 and a False mask, so every batch has the same
  shape; weight per-example metrics with the mask.

  Args:
    num_examples: dataset size (0 yields nothing).
    batch_size: examples per batch.

  Yields:
    ``(indices, mask)``: int64 ``(batch_size,)`` and bool ``(batch_size,)``.
  """
  _check_int("num_examples", num_examples, 0)
  _check_int("batch_size", batch_size, 1)
  for start in range(0, num_examples, batch_size):
    stop = min(start + batch_size, num_examples)
    indices = np.zeros((batch_size,), np.int64)
    indices[:stop - start] = np.arange(start, stop)
    mask = np.zeros((batch_size,), bool)
    mask[:stop - start] = True
    yield indices, mask


def normalize(images: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
  """Maps pixel values in 0..255 to ``(x / 255 - mean) / std`` as float32.

  Args:
    images: ``(..., C)`` uint8 (or float in 0..255 pixel units).
    mean: C per-channel means in [0, 1] units (e.g. ``ImageDataset.mean``).
    std: C per-channel standard deviations in [0, 1] units.

  Returns:
    float32 array of the same shape.
  """
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  chex.assert_rank([mean, std], 1)
  chex.assert_axis_dimension(images, -1, mean.shape[0])
  chex.assert_equal_shape([mean, std])
  x = jnp.asarray(images).astype(jnp.float32) / 255.0
  return (x - mean) / std


def augment(
    key: jax.Array,
    images: jax.Array,
    *,
    crop_padding: int = 0,
    flip: bool = False,
    padding_mode: str = "constant",
) -> jax.Array:
  """Per-sample random crop (after padding) and random horizontal flip.

  Each image is padded by ``crop_padding`` pixels on every side, then an ``H x W``
  window at a uniformly random offset in ``[0, 2 * crop_padding]`` (per axis) is cut
  out; then, if ``flip``, it is mirrored left-right with probability 1/2. With
  ``crop_padding=0`` and ``flip=False`` the input is returned unchanged.

  Args:
    key: PRNG key.
    images: ``(B, H, W, C)``, any dtype (kept).
    crop_padding: padding in pixels (static).
    flip: whether to apply random horizontal flips (static).
    padding_mode: ``'constant'`` (zeros) or ``'reflect'`` (static).

  Returns:
    augmented images, same shape and dtype.
  """
  chex.assert_rank(images, 4)
  _check_int("crop_padding", crop_padding, 0)
  check_choice("padding_mode", padding_mode, PADDING_MODES)
  if crop_padding == 0 and not flip:
    return images
  batch, height, width, channels = images.shape
  crop_key, flip_key = jax.random.split(key)
  out = images
  if crop_padding:
    pad = int(crop_padding)
    if padding_mode == "reflect" and pad >= min(height, width):
      raise ConfigError(
          f"crop_padding {pad} with padding_mode='reflect' needs images larger than {pad} "
          f"pixels, got {height}x{width}; lower crop_padding or use 'constant'")
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode=padding_mode)
    offsets = jax.random.randint(crop_key, (batch, 2), 0, 2 * pad + 1)

    def crop(image: jax.Array, offset: jax.Array) -> jax.Array:
      return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (height, width, channels))

    out = jax.vmap(crop)(padded, offsets)
  if flip:
    mirror = jax.random.bernoulli(flip_key, 0.5, (batch,))
    out = jnp.where(mirror[:, None, None, None], out[:, :, ::-1, :], out)
  chex.assert_equal_shape([out, images])
  chex.assert_type(out, images.dtype)
  return out


def default_flip(dataset_name: str) -> bool:
  """Whether random horizontal flips are a sensible default augmentation for a dataset.

  False where a mirror image means something else or nothing (digits, traffic signs,
  house numbers) and for ``npz`` (unknown content: decide in the config); True for the
  natural-image datasets.

  Args:
    dataset_name: one of ``backdoor_jax.data.DATASET_NAMES``.

  Returns:
    the default of the ``flip`` argument of :func:`augment`.
  """
  check_choice("dataset", dataset_name, DATASET_NAMES)
  return dataset_name not in _NO_FLIP


def process_rows(num_examples: int, num_shards: int) -> np.ndarray:
  """The global training rows this process feeds (``train.feed.process_data``'s ``rows``).

  All rows when ``num_shards == 1``; otherwise the rows of shards ``p*k .. p*k + k - 1``
  (``k = num_shards // process_count``, ``p`` this process), sorted.

  Raises:
    ConfigError: ``num_shards`` is not 1 or a multiple of the process count.
  """
  procs = jax.process_count()
  if isinstance(num_shards, bool) or not isinstance(num_shards, (int, np.integer)) or num_shards < 1:
    raise ConfigError(f"data.num_shards={num_shards!r} is invalid; allowed: an integer >= 1")
  if num_shards > 1 and num_shards % procs:
    raise ConfigError(f"data.num_shards={num_shards} must be 1 or a multiple of the process count {procs}")
  if num_shards == 1:
    return np.arange(num_examples, dtype=np.int64)
  k = num_shards // procs
  mine = range(jax.process_index() * k, (jax.process_index() + 1) * k)
  return np.sort(np.concatenate([shard_rows(num_examples, num_shards, s) for s in mine]))
