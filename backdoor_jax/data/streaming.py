"""The training feed for datasets that do not fit in host memory: records read on demand.

The in-memory path loads the whole training split (``sources.load_dataset``), poisons it
(``poison.poison_train_set``) and keeps this process's rows (``train.feed.process_data``).
:class:`StreamingData` gives ``train.feed.run_epoch`` the same object interface
(``take(global_idx)``, ``rows``, ``num_examples``, ``num_shards``) without ever holding
the images: a batch's records are read, decoded and resized when the batch is made, and
the poisoning decisions are applied to the rows being poisoned as they are read.

* Records come from a random-access source wrapped in a ``grain.MapDataset``: a split of a
  prepared tfds dataset (``tfds.data_source``, ArrayRecord files) or an image folder
  (``class_name/*.png|jpg|...``, read with PIL). ``take`` decodes a batch's records
  from a pool of threads (PIL and ArrayRecord release the GIL).
* Poisoning decisions are made once, from the labels alone (:func:`make_poison_plan`),
  with the same functions and keys as ``poison_train_set``: the same rows are poisoned,
  relabelled and (WaNet noise mode) cross-warped, and ``take`` returns byte-identical
  batches to the in-memory path. Only the labels of the split are read up front; for tfds
  the image feature is not decoded for that pass where the stored records allow it.
* A process only ever reads the rows of its own shards (``rows``), as ``process_data``
  keeps only those rows in memory.

Not supported in streaming mode (ConfigError): clean-label PGD perturbations
(``poison.adv_eps``), whose surrogate is fitted on the whole in-memory training set.

grain and tensorflow_datasets are imported inside the functions that use them, so the
package imports on machines without them.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
from typing import Any, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from backdoor_jax import poison as poison_lib
from backdoor_jax.data import images as image_lib
from backdoor_jax.data import pipeline
from backdoor_jax.data import tfds_sources
from backdoor_jax.errors import ConfigError, check_choice
from backdoor_jax.triggers.base import apply_trigger, check_trigger

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".ppm", ".bmp", ".gif", ".webp")
STREAM_SOURCES: tuple[str, ...] = ("folder", *tfds_sources.SPECS)
TEST_SPLIT_DIRS = ("test", "val", "validation")
# Images read to estimate a folder dataset's per-channel mean and std.
FOLDER_STATS_SAMPLE = 2048


# ----------------------------------------------------------------------------------
# Record sources: a split as a grain MapDataset of (uint8 image (S, S, 3), int label).


@dataclasses.dataclass(frozen=True, eq=False)
class RecordSource:
  """One split of a dataset, readable record by record.

  Attributes:
    dataset: a ``grain.MapDataset``; ``dataset[record]`` is ``(image uint8 (S, S, 3), label)``.
    records: ``(N,)`` record index of every row (a seeded subset, or all records).
    labels: ``(N,)`` int32 clean label of every row (read once, without the images).
    num_classes: number of classes.
    class_names: one name per class.
    mean: per-channel mean in [0, 1] units.
    std: per-channel standard deviation in [0, 1] units.
    image_size: side of the square images ``dataset`` returns.
  """
  dataset: Any
  records: np.ndarray
  labels: np.ndarray
  num_classes: int
  class_names: tuple[str, ...]
  mean: tuple[float, ...]
  std: tuple[float, ...]
  image_size: int

  def __len__(self) -> int:
    return len(self.records)


@dataclasses.dataclass(frozen=True)
class _DecodeTfds:
  """tfds record (a feature dict) -> (uint8 image at ``size``, label)."""
  image_key: str
  label_key: str
  size: int

  def __call__(self, record: dict[str, Any]) -> tuple[np.ndarray, int]:
    return image_lib.convert_image(np.asarray(record[self.image_key]), self.size), int(record[self.label_key])


@dataclasses.dataclass(frozen=True)
class _ReadFile:
  """(path, label) -> (uint8 image at ``size``, label), decoded with PIL."""
  size: int

  def __call__(self, item: tuple[str, int]) -> tuple[np.ndarray, int]:
    path, label = item
    try:
      with Image.open(path) as image:
        return image_lib.convert_image(image, self.size), int(label)
    except OSError as e:
      raise ConfigError(f"image file {path!r} could not be read: {e}") from None


def _check_image_size(image_size: Any) -> int:
  if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 1:
    raise ConfigError(f"data.image_size={image_size!r} is invalid with data.stream=True; allowed: a positive "
                      "integer (streamed images are resized as they are read)")
  return int(image_size)


def _subset(total: int, limit: int | None, seed: int, labels: np.ndarray | None = None) -> np.ndarray:
  """The rows ``load_dataset`` keeps: stratified when labels are known up front, else uniform."""
  image_lib.check_size_arg("max_train/max_test", limit)
  if limit is None:
    return np.arange(total, dtype=np.int64)
  if labels is not None:
    return np.asarray(image_lib.stratified_subset(labels, limit, seed), np.int64)
  return np.asarray(image_lib.seeded_subset(total, limit, seed), np.int64)


def folder_files(root: str) -> tuple[list[str], np.ndarray, tuple[str, ...]]:
  """Lists an image folder laid out as ``root/<class name>/<image file>``.

  Classes are the sub-folders in sorted order (label = position); files are sorted
  within each class and must end in one of :data:`IMAGE_SUFFIXES`.

  Returns:
    ``(paths, labels int32, class_names)``.

  Raises:
    ConfigError: ``root`` is not a folder, or it has no class folders or no images.
  """
  if not os.path.isdir(root):
    raise ConfigError(f"image folder {root!r} does not exist; allowed: a folder of class_name/*.png|jpg folders")
  class_names = tuple(sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))))
  if not class_names:
    raise ConfigError(f"image folder {root!r} has no class sub-folders; expected {root}/<class name>/*.png|jpg")
  paths, labels = [], []
  for label, name in enumerate(class_names):
    folder = os.path.join(root, name)
    files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_SUFFIXES))
    paths.extend(os.path.join(folder, f) for f in files)
    labels.extend([label] * len(files))
  if not paths:
    raise ConfigError(f"image folder {root!r} has no image files ({', '.join(IMAGE_SUFFIXES)}) in its class folders")
  return paths, np.asarray(labels, np.int32), class_names


def folder_source(root: str, *, image_size: int, max_examples: int | None = None, seed: int = 0,
                  class_names: Sequence[str] | None = None,
                  stats: tuple[tuple[float, ...], tuple[float, ...]] | None = None) -> RecordSource:
  """An image folder (``root/<class>/<file>``) as a :class:`RecordSource`.

  Args:
    root: the split's folder.
    image_size: output side length.
    max_examples: optional stratified seeded subset size (as ``load_dataset`` does).
    seed: seed of the subset.
    class_names: the training split's classes (for a test split); its folders must be
      among them. None: this folder's classes.
    stats: ``(mean, std)`` to use; None estimates them from up to
      :data:`FOLDER_STATS_SAMPLE` seeded images of this split at ``image_size``.
  """
  import grain  # pylint: disable=g-import-not-at-top
  size = _check_image_size(image_size)
  paths, labels, names = folder_files(root)
  if class_names is not None:
    unknown = sorted(set(names) - set(class_names))
    if unknown:
      raise ConfigError(f"image folder {root!r} has classes {unknown[:3]} that the training folder lacks")
    remap = np.asarray([list(class_names).index(n) for n in names], np.int32)
    labels, names = remap[labels], tuple(class_names)
  dataset = grain.MapDataset.source([(p, int(y)) for p, y in zip(paths, labels)]).map(_ReadFile(size))
  rows = _subset(len(paths), max_examples, seed, labels)
  if stats is None:
    stats = _estimate_stats(dataset, rows[image_lib.seeded_subset(len(rows), FOLDER_STATS_SAMPLE, seed)])
  return RecordSource(dataset, rows, labels[rows], len(names), names, tuple(stats[0]), tuple(stats[1]), size)


def _estimate_stats(dataset: Any, records: np.ndarray, chunk: int = 256) -> tuple[tuple[float, ...], ...]:
  """Exact per-channel mean and std of the images of ``records``, read ``chunk`` at a time."""
  weights, means, squares = [], [], []
  for start in range(0, len(records), chunk):
    part = records[start:start + chunk]
    mean, std = image_lib.channel_mean_std(_read_records(dataset, part, image_lib.num_io_threads())[0])
    weights.append(len(part))
    means.append(mean)
    squares.append(np.square(std) + np.square(mean))
  w = np.asarray(weights, np.float64) / np.sum(weights)
  mean = w @ np.asarray(means)
  std = np.sqrt(np.maximum(w @ np.asarray(squares) - np.square(mean), 0.0))
  return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def _read_tfds_labels(source: Any, skip_source: Any, label_key: str, records: np.ndarray,
                      num_threads: int) -> np.ndarray:
  """Labels of ``records``, read through grain with parallel reads.

  ``skip_source`` leaves the image feature encoded (tfds ``SkipDecoding``), so no image is
  decoded. Sources that cannot skip (``tfds.testing.mock_data`` encodes through TensorFlow)
  are read with ``source``, which decodes every image once.
  """
  import grain  # pylint: disable=g-import-not-at-top
  try:
    skip_source[int(records[0])] if len(records) else None  # pylint: disable=expression-not-assigned
    chosen = skip_source
  except Exception as e:  # pylint: disable=broad-except  # any failure: fall back to full decoding
    logging.warning("reading labels decodes every image (the records cannot skip image decoding: %s)", e)
    chosen = source
  ds = grain.MapDataset.source(records.tolist()).map(lambda i: int(chosen[i][label_key]))
  options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=4 * num_threads)
  return np.fromiter(ds.to_iter_dataset(options), np.int64, count=len(records)).astype(np.int32)


def tfds_source(name: str, *, split: str = "train", data_dir: str | None, image_size: int,
                max_examples: int | None = None, seed: int = 0, num_threads: int | None = None) -> RecordSource:
  """A split of a prepared tfds dataset (one of ``tfds_sources.SPECS``) as a :class:`RecordSource`.

  Nothing is downloaded; an unprepared dataset gives ``tfds_sources.check_prepared``'s
  ConfigError. The subset is the one ``load_dataset`` takes (``seeded_subset``).

  Args:
    name: our dataset name (a key of ``tfds_sources.SPECS``).
    split: ``'train'`` or ``'test'`` (mapped to the tfds split names of the spec).
    data_dir: tfds data dir (None: tfds's default).
    image_size: output side length.
    max_examples: optional seeded subset size.
    seed: seed of the subset.
    num_threads: threads reading the labels (default ``images.num_io_threads()``).
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  import grain  # pylint: disable=g-import-not-at-top
  check_choice("streamed tfds dataset", name, tuple(tfds_sources.SPECS))
  check_choice("split", split, ("train", "test"))
  size = _check_image_size(image_size)
  spec = tfds_sources.SPECS[name]
  builder = tfds.builder(spec.tfds_name, data_dir=data_dir)
  tfds_sources.check_prepared(name, spec.tfds_name, builder)
  label_feature = builder.info.features[spec.label_key]
  class_names = tuple(label_feature.names) if label_feature.names else tuple(
      str(i) for i in range(label_feature.num_classes))
  tfds_split = spec.train_split if split == "train" else spec.test_split
  source = tfds.data_source(spec.tfds_name, split=tfds_split, data_dir=data_dir, download=False)
  skip = tfds.data_source(spec.tfds_name, split=tfds_split, data_dir=data_dir, download=False,
                          decoders={spec.image_key: tfds.decode.SkipDecoding()})
  records = _subset(len(source), max_examples, seed)
  labels = _read_tfds_labels(source, skip, spec.label_key, records, num_threads or image_lib.num_io_threads())
  dataset = grain.MapDataset.source(source).map(_DecodeTfds(spec.image_key, spec.label_key, size))
  return RecordSource(dataset, records, labels, len(class_names), class_names, spec.mean, spec.std, size)


def _read_records(dataset: Any, records: np.ndarray, num_threads: int,
                  pool: concurrent.futures.Executor | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Reads ``dataset[r]`` for every record ``r`` into ``(images uint8 (n, S, S, 3), labels int32 (n,))``."""
  if pool is not None and len(records) > 1:
    items = list(pool.map(dataset.__getitem__, records.tolist()))
  elif num_threads > 1 and len(records) > 1:
    with concurrent.futures.ThreadPoolExecutor(num_threads) as local:
      items = list(local.map(dataset.__getitem__, records.tolist()))
  else:
    items = [dataset[int(r)] for r in records]
  if not items:
    raise ValueError("no records to read")
  return np.stack([x for x, _ in items]), np.asarray([y for _, y in items], np.int32)


# ----------------------------------------------------------------------------------
# Poisoning decisions, made once from the labels, applied to rows as they are read.


@chex.dataclass(frozen=True)
class PoisonPlan:
  """Which training rows are poisoned, as ``poison.poison_train_set`` decides.

  Attributes:
    trigger: the trigger (any kind) for the images at the size they are poisoned at.
    noise_key: key of the WaNet noise-mode warps (row ``i`` uses ``fold_in(noise_key, i)``).
    poisoned: sorted int64 rows that get the trigger and their attack label.
    attack_labels: the attack label of each of ``poisoned``.
    cross: sorted int64 rows warped in WaNet noise mode (labels kept); empty otherwise.
  """
  trigger: Any
  noise_key: jax.Array
  poisoned: np.ndarray
  attack_labels: np.ndarray
  cross: np.ndarray


def make_poison_plan(key: chex.PRNGKey, labels: Any, trigger: Any, *, target: int | None, mode: str,
                     num_classes: int, rate: float | None = None, count: int | None = None,
                     cross_ratio: float = 0.0) -> PoisonPlan:
  """The decisions of ``poison.poison_train_set(key, images, labels, trigger, ...)``, from labels only.

  Uses the same functions and keys: ``choose_poison_indices(key, ...)``,
  ``choose_cross_indices(fold_in(key, 1), ...)`` and noise warps keyed by
  ``fold_in(fold_in(key, 2), row)``.

  Raises:
    ConfigError: for bad settings (as ``poison_train_set`` would), or ``cross_ratio``
      without a WaNet trigger.
  """
  check_trigger(trigger)
  labels = np.asarray(labels)
  poisoned = poison_lib.choose_poison_indices(key, labels, rate=rate, target=target, mode=mode,
                                              num_classes=num_classes, count=count)
  if cross_ratio and not trigger.has_cross_mode:
    raise ConfigError(f"cross_ratio {cross_ratio!r} (WaNet noise mode) needs a 'wanet' trigger or another kind "
                      f"with a cross mode; got a {trigger.KIND!r} trigger (set cross_ratio=0)")
  cross = poison_lib.choose_cross_indices(jax.random.fold_in(key, 1), labels.shape[0], poisoned, cross_ratio)
  attack = poison_lib.poison_target_labels(labels[poisoned], mode=mode, target=target, num_classes=num_classes)
  return PoisonPlan(trigger=trigger, noise_key=jax.random.fold_in(key, 2), poisoned=poisoned,
                    attack_labels=np.asarray(attack, np.int32), cross=cross)


_apply_jit = jax.jit(apply_trigger)
_cross_jit = jax.jit(lambda trigger, images, keys: trigger.apply_cross(images, keys))


def _bucket(n: int) -> int:
  """Padded batch length (the next power of two): few shapes, so few compilations."""
  return 1 << max(0, int(n) - 1).bit_length()


def _pad(x: jax.Array | np.ndarray, length: int) -> Any:
  extra = length - x.shape[0]
  if not extra:
    return x
  return jnp.concatenate([x, jnp.repeat(x[:1], extra, axis=0)]) if isinstance(x, jax.Array) else np.concatenate(
      [x, np.zeros((extra,) + x.shape[1:], x.dtype)])


def _member(sorted_rows: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """``(hit, pos)``: which ``rows`` are in ``sorted_rows``, and where."""
  pos = np.searchsorted(sorted_rows, rows)
  hit = pos < len(sorted_rows)
  hit[hit] = sorted_rows[pos[hit]] == rows[hit]
  return hit, pos


def apply_poison_plan(plan: PoisonPlan, rows: np.ndarray, images: np.ndarray,
                      labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Poisons the rows of a batch read from the clean dataset, as ``poison_train_set`` would.

  Args:
    plan: the decisions (:func:`make_poison_plan`).
    rows: ``(B,)`` global rows of the batch.
    images: ``(B, H, W, 3)`` uint8 clean images of those rows (modified copy returned).
    labels: ``(B,)`` clean labels.

  Returns:
    ``(images, labels)`` with the poisoned rows triggered and relabelled and the cross
    rows noise-warped.
  """
  images, labels = np.array(images, copy=True), np.array(labels, copy=True)
  hit, pos = _member(plan.poisoned, rows)
  if hit.any():
    chosen = images[hit]
    m = chosen.shape[0]
    images[hit] = np.asarray(_apply_jit(plan.trigger, _pad(chosen, _bucket(m))))[:m]
    labels[hit] = plan.attack_labels[pos[hit]]
  cross, _ = _member(plan.cross, rows)
  if cross.any():
    chosen = images[cross]
    m = chosen.shape[0]
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(plan.noise_key, jnp.asarray(rows[cross], jnp.uint32))
    images[cross] = np.asarray(_cross_jit(plan.trigger, _pad(chosen, _bucket(m)), _pad(keys, _bucket(m))))[:m]
  return images, labels


# ----------------------------------------------------------------------------------
# The ProcessData-compatible feed.


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
  return np.sort(np.concatenate([pipeline.shard_rows(num_examples, num_shards, s) for s in mine]))


class StreamingData:
  """This process's training rows, read on demand; a drop-in for ``train.feed.ProcessData``.

  Attributes:
    rows: ``(n_local,)`` global rows this process feeds (its shards).
    num_examples: size of the whole training set (all processes).
    num_shards: shards the training set is split into.
    labels: ``(n_local,)`` int32 training labels of ``rows`` (poisoned rows relabelled).
    is_poisoned: ``(n_local,)`` bool, which of ``rows`` carry the trigger.
    num_poisoned: poisoned rows in the whole training set.
    image_shape: ``(H, W, 3)`` of every image ``take`` returns.
    num_classes, class_names, mean, std: from the source.
  """

  def __init__(self, source: RecordSource, plan: PoisonPlan | None = None, *, num_shards: int = 1,
               image_size: int | None = None, num_threads: int | None = None):
    """Args:
      source: the training split (:func:`folder_source`, :func:`tfds_source`).
      plan: the poisoning decisions over ``source.labels`` (None: a clean feed).
      num_shards: ``data.num_shards``.
      image_size: resize to this side after poisoning (``poison.apply_at_size``: the
        source reads at the poisoning size); None keeps ``source.image_size``.
      num_threads: threads decoding a batch (default ``images.num_io_threads()``).
    """
    self.source, self.plan = source, plan
    self.num_examples = len(source)
    self.rows = process_rows(self.num_examples, num_shards)
    self.num_shards = int(num_shards)
    self.image_size = source.image_size if image_size is None else _check_image_size(image_size)
    self.num_threads = num_threads or image_lib.num_io_threads()
    self._position = np.full((self.num_examples,), -1, np.int64)
    self._position[self.rows] = np.arange(len(self.rows))
    self._pool: concurrent.futures.ThreadPoolExecutor | None = None
    labels = source.labels[self.rows].copy()
    self.is_poisoned = np.zeros(len(self.rows), bool)
    if plan is not None:
      hit, pos = _member(plan.poisoned, self.rows)
      labels[hit] = plan.attack_labels[pos[hit]]
      self.is_poisoned = hit
    self.labels = labels
    self.num_poisoned = 0 if plan is None else len(plan.poisoned)
    self.num_classes, self.class_names = source.num_classes, source.class_names
    self.mean, self.std = source.mean, source.std

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return (self.image_size, self.image_size, 3)

  def take(self, global_idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reads, decodes, poisons and resizes the records of global rows this process holds.

    Returns:
      ``(images uint8 (B, S, S, 3), labels int32 (B,))``, byte-identical to the
      in-memory path's rows.

    Raises:
      ValueError: a row belongs to another process's shard (a bug in the caller).
    """
    global_idx = np.asarray(global_idx, np.int64)
    inside = (global_idx >= 0) & (global_idx < self.num_examples)
    pos = np.where(inside, self._position[np.clip(global_idx, 0, max(self.num_examples - 1, 0))], -1)
    if (pos < 0).any():
      raise ValueError(f"process {jax.process_index()} does not hold rows {global_idx[pos < 0][:5].tolist()}")
    if self._pool is None and self.num_threads > 1:
      self._pool = concurrent.futures.ThreadPoolExecutor(self.num_threads, thread_name_prefix="stream-read")
    images, labels = _read_records(self.source.dataset, self.source.records[global_idx], self.num_threads,
                                   self._pool)
    if self.plan is not None:
      images, labels = apply_poison_plan(self.plan, global_idx, images, labels)
    if self.image_size != images.shape[1]:
      images = image_lib.convert_images(images, self.image_size)
    return images, labels

  def close(self) -> None:
    """Stops the decoding threads (a later ``take`` starts them again)."""
    if self._pool is not None:
      self._pool.shutdown(wait=True)
      self._pool = None


# ----------------------------------------------------------------------------------
# What the engine calls.


def open_split(name: str, *, split: str, path: str | None, data_dir: str | None, image_size: int,
               max_examples: int | None, seed: int, class_names: Sequence[str] | None = None,
               stats: tuple[tuple[float, ...], tuple[float, ...]] | None = None) -> RecordSource:
  """A split of a streamable dataset (:data:`STREAM_SOURCES`) as a :class:`RecordSource`.

  ``folder``: ``path`` holds ``train/<class>/*`` and one of ``test/``, ``val/``,
  ``validation/`` laid out the same way. tfds names: read from ``data_dir``.
  """
  check_choice("dataset with data.stream=True", name, STREAM_SOURCES)
  if name != "folder":
    if path:
      raise ConfigError(f"data.path={path!r} is not used by the tfds dataset {name!r}; leave it unset "
                        "(tfds datasets are found through data.data_dir)")
    return tfds_source(name, split=split, data_dir=data_dir, image_size=image_size, max_examples=max_examples,
                       seed=seed)
  if not path:
    raise ConfigError("dataset 'folder' needs data.path: a folder with train/<class>/* and test/<class>/*")
  root = os.path.expanduser(os.fspath(path))
  if split == "train":
    folder = os.path.join(root, "train")
  else:
    found = [os.path.join(root, d) for d in TEST_SPLIT_DIRS if os.path.isdir(os.path.join(root, d))]
    if not found:
      raise ConfigError(f"image folder {root!r} has no test split; allowed: a sub-folder named "
                        f"{' or '.join(TEST_SPLIT_DIRS)}")
    folder = found[0]
  return folder_source(folder, image_size=image_size, max_examples=max_examples, seed=seed,
                       class_names=class_names, stats=stats)


def process_data_from_config(name: str, *, path: str | None, data_dir: str | None, image_size: int,
                             seed: int, max_train: int | None, num_shards: int,
                             trigger: Any | None, poison_key: chex.PRNGKey, target: int | None, mode: str,
                             rate: float | None = None, count: int | None = None, cross_ratio: float = 0.0,
                             apply_at_size: int = 0, adv_eps: float = 0.0,
                             num_threads: int | None = None) -> StreamingData:
  """The streaming twin of ``load_dataset`` + ``poison_train_set`` + ``feed.process_data``.

  Args:
    name: ``data.name``; one of :data:`STREAM_SOURCES`.
    path: ``data.path`` (``folder`` only).
    data_dir: ``data.data_dir`` (tfds only).
    image_size: ``data.image_size`` (required).
    seed: the data seed (the ``max_train`` subset), as given to ``load_dataset``.
    max_train: ``data.max_train`` or None.
    num_shards: ``data.num_shards``.
    trigger: the trigger for ``(S, S)`` images, S = ``apply_at_size or image_size``;
      None: no training poisoning (``poison.phase='test_only'``).
    poison_key: the key given to ``poison_train_set``.
    target, mode, rate, count: the poisoning settings (exactly one of rate and count).
    cross_ratio: WaNet noise mode (``triggers.cross_ratio_from_config``).
    apply_at_size: ``poison.apply_at_size`` (0: poison at ``image_size``).
    adv_eps: ``poison.adv_eps``; must be 0 (clean-label PGD is not streamed).
    num_threads: decoding threads.

  Raises:
    ConfigError: for bad settings, including ``adv_eps`` > 0.
  """
  if adv_eps:
    raise ConfigError(f"poison.adv_eps={adv_eps!r} is not supported with data.stream=True (its surrogate "
                      "is fitted on the whole training set in memory); allowed: 0, or data.stream=False")
  final = _check_image_size(image_size)
  if isinstance(apply_at_size, bool) or not isinstance(apply_at_size, (int, np.integer)) or apply_at_size < 0:
    raise ConfigError(f"poison.apply_at_size={apply_at_size!r} is invalid; allowed: 0 or a side in pixels >= 1")
  source = open_split(name, split="train", path=path, data_dir=data_dir, image_size=apply_at_size or final,
                      max_examples=max_train, seed=seed)
  plan = None
  if trigger is not None:
    plan = make_poison_plan(poison_key, source.labels, trigger, target=target, mode=mode,
                            num_classes=source.num_classes, rate=rate, count=count, cross_ratio=cross_ratio)
  return StreamingData(source, plan, num_shards=num_shards, image_size=final, num_threads=num_threads)


def read_split(source: RecordSource, num_threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """A whole split in memory (for the test split of a streamed run): ``(images, labels)``."""
  return _read_records(source.dataset, source.records, num_threads or image_lib.num_io_threads())

