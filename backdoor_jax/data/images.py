"""Host-side image helpers shared by the dataset readers (numpy + PIL, no JAX).

Every reader turns its records into the same thing: a uint8 ``(N, S, S, 3)`` array at
the configured square size. The helpers here do the per-image conversion (channels,
optional crop box, bilinear resize with antialiasing), fill preallocated arrays from
several threads (PIL decodes and resizes outside the GIL), pick deterministic subsets
and compute per-channel statistics.
"""
from __future__ import annotations

import concurrent.futures
import os
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from backdoor_jax.errors import ConfigError

# Below this many items a thread pool costs more than it saves.
_MIN_ITEMS_FOR_THREADS = 256


def num_io_threads() -> int:
  """Threads used to decode and resize images on the host."""
  return max(1, min(8, os.cpu_count() or 1))


def parallel_for(fn: Callable[[int], None], n: int, num_threads: int | None = None) -> None:
  """Calls ``fn(i)`` for ``i`` in ``range(n)``, split into contiguous blocks over threads.

  ``fn`` writes its result somewhere itself (typically row ``i`` of a preallocated
  array), so nothing is collected. The first exception raised by any block is re-raised.

  Args:
    fn: the per-item function.
    n: number of items.
    num_threads: threads to use; defaults to :func:`num_io_threads`.
  """
  num_threads = num_threads or num_io_threads()
  if n < _MIN_ITEMS_FOR_THREADS or num_threads == 1:
    for i in range(n):
      fn(i)
    return

  def run_block(start: int, stop: int) -> None:
    for i in range(start, stop):
      fn(i)

  bounds = np.linspace(0, n, num_threads + 1).astype(int)
  with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
    futures = [pool.submit(run_block, int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]
    for future in futures:
      future.result()


def to_pil(image: np.ndarray) -> Image.Image:
  """Wraps one uint8 ``(H, W)``, ``(H, W, 1)``, ``(H, W, 3)`` or ``(H, W, 4)`` array as a PIL image."""
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  return Image.fromarray(np.ascontiguousarray(image))


def convert_image(
    image: Image.Image | np.ndarray,
    size: int | None,
    box: tuple[int, int, int, int] | None = None,
) -> np.ndarray:
  """Converts one image to uint8 ``(S, S, 3)`` RGB.

  Args:
    image: a PIL image (any mode) or a uint8 array ``(H, W[, C])`` with C in {1, 3, 4}.
    size: output side length; None keeps the (cropped) native size.
    box: optional crop box ``(left, upper, right, lower)``, right/lower exclusive,
      applied before resizing and clipped to the image.

  Returns:
    uint8 array ``(S, S, 3)`` (or ``(H, W, 3)`` when ``size`` is None).
  """
  if isinstance(image, np.ndarray):
    if box is None and image.ndim == 3 and image.shape[-1] == 3 and (
        size is None or image.shape[:2] == (size, size)):
      return image  # already what we want; skip PIL entirely
    image = to_pil(image)
  if box is not None:
    width, height = image.size
    left, upper, right, lower = box
    image = image.crop((max(0, left), max(0, upper), min(width, right), min(height, lower)))
  grey = image.mode in ("L", "1", "I", "I;16", "F")
  image = image.convert("L" if grey else "RGB")
  if size is not None and image.size != (size, size):
    # Pillow's BILINEAR resize widens its kernel when shrinking, i.e. it antialiases.
    image = image.resize((size, size), Image.Resampling.BILINEAR)
  array = np.asarray(image, dtype=np.uint8)
  if grey:
    array = np.repeat(array[..., None], 3, axis=-1)
  return array


def convert_images(images: np.ndarray, size: int | None) -> np.ndarray:
  """Converts a stack of images to uint8 ``(N, S, S, 3)`` RGB (grey is repeated).

  Args:
    images: uint8 ``(N, H, W)`` or ``(N, H, W, C)`` with C in {1, 3, 4} (alpha dropped).
    size: output side length; None keeps ``(H, W)``.

  Returns:
    uint8 array ``(N, S, S, 3)``.
  """
  if images.ndim == 3:
    images = images[..., None]
  n, h, w, c = images.shape
  if size is None or (h, w) == (size, size):
    if c == 3:
      return images
    if c == 1:
      return np.repeat(images, 3, axis=-1)
    return np.ascontiguousarray(images[..., :3])
  out = np.empty((n, size, size, 3), np.uint8)

  def fill(i: int) -> None:
    out[i] = convert_image(images[i], size)

  parallel_for(fill, n)
  return out


def stratified_subset(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
  """Picks ``n`` indices with the class proportions of ``labels``, deterministically.

  Each class gets ``floor(n * count / total)`` samples; the remaining slots go to the
  classes with the largest fractional remainders (ties broken by a seeded shuffle).
  Within a class the samples are a seeded random choice.

  Args:
    labels: integer labels ``(N,)``.
    n: subset size; ``n >= N`` returns every index.
    seed: seed of the random choices.

  Returns:
    sorted int64 indices ``(min(n, N),)``.
  """
  labels = np.asarray(labels)
  total = labels.shape[0]
  if n >= total:
    return np.arange(total)
  rng = np.random.default_rng([seed, 0x5B5E7])
  classes, counts = np.unique(labels, return_counts=True)
  quota = counts * (n / total)
  take = np.floor(quota).astype(int)
  order = rng.permutation(len(classes))
  # Largest remainder first; the seeded permutation breaks ties.
  by_remainder = order[np.argsort(-(quota - take)[order], kind="stable")]
  take[by_remainder[: n - take.sum()]] += 1
  chosen = [rng.choice(np.flatnonzero(labels == cls), size=k, replace=False)
            for cls, k in zip(classes, take) if k]
  return np.sort(np.concatenate(chosen)) if chosen else np.zeros((0,), np.int64)


def seeded_subset(total: int, n: int, seed: int) -> np.ndarray:
  """Picks ``min(n, total)`` sorted indices of ``range(total)`` uniformly at random."""
  if n >= total:
    return np.arange(total)
  rng = np.random.default_rng([seed, 0x5E7])
  return np.sort(rng.choice(total, size=n, replace=False))


def channel_mean_std(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Exact per-channel mean and standard deviation of uint8 images, in [0, 1] units.

  Uses a 256-bin histogram per channel, so it is fast and needs no float copy.

  Args:
    images: uint8 ``(..., C)``.

  Returns:
    ``(mean, std)``, each a tuple of C floats.
  """
  if images.dtype != np.uint8:
    raise TypeError(f"channel_mean_std expects uint8 images, got {images.dtype}")
  values = np.arange(256, dtype=np.float64) / 255.0
  means, stds = [], []
  for c in range(images.shape[-1]):
    hist = np.bincount(images[..., c].ravel(), minlength=256).astype(np.float64)
    p = hist / hist.sum()
    mean = float(p @ values)
    var = float(p @ (values - mean) ** 2)
    means.append(mean)
    stds.append(float(np.sqrt(var)))
  return tuple(means), tuple(stds)


def check_size_arg(what: str, value: int | None, allow_none: bool = True) -> None:
  """Raises ConfigError unless ``value`` is a positive int (or None when allowed)."""
  if value is None and allow_none:
    return
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    allowed = "a positive integer or None" if allow_none else "a positive integer"
    raise ConfigError(f"{what} must be {allowed}, got {value!r}")


def check_subset_size(what: str, limit: int | None, available: int, where: str) -> None:
  """Raises ConfigError when a requested subset (``max_train``/``max_test``) exceeds the split.

  Args:
    what: the option's name, e.g. ``data.max_train``.
    limit: the requested size (None = all).
    available: how many samples the split has.
    where: the split, e.g. ``"the training split of npz file x.npz"``.
  """
  if limit is not None and limit > available:
    raise ConfigError(f"{what}={limit} but {where} has only {available} images; allowed: 1..{available} "
                      "(or 0 for all)")


def same_size_or_error(dataset: str, sizes: Sequence[tuple[int, int]]) -> tuple[int, int]:
  """Returns the common ``(H, W)`` of ``sizes`` or raises ConfigError asking for image_size."""
  unique = sorted(set(sizes))
  if len(unique) != 1:
    raise ConfigError(
        f"dataset {dataset!r} has images of different sizes (e.g. {unique[0]} and "
        f"{unique[-1]}), so image_size=None cannot stack them; set image_size (e.g. 32)")
  return unique[0]
