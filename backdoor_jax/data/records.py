"""A dataset split read record by record: an image folder or a prepared tfds dataset.

A :class:`RecordSource` is a ``grain.MapDataset`` of ``(uint8 image (S, S, 3), label)``
plus the split's labels (read once, without decoding images where the records allow),
its classes and its normalisation statistics. ``data.streaming`` builds the streamed
training feed on it; :func:`read_split` loads a whole split (a streamed run's test set).
grain and tensorflow_datasets are imported inside the functions that use them.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
from typing import Any, Sequence

import numpy as np
from PIL import Image

from backdoor_jax.data import images as image_lib
from backdoor_jax.data import tfds_sources
from backdoor_jax.errors import ConfigError, check_choice

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


def check_image_size(image_size: Any) -> int:
  """``data.image_size`` as a positive int (streamed images are resized as they are read)."""
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
  size = check_image_size(image_size)
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
    mean, std = image_lib.channel_mean_std(read_records(dataset, part, image_lib.num_io_threads())[0])
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
  size = check_image_size(image_size)
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


def read_records(dataset: Any, records: np.ndarray, num_threads: int,
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


def read_split(source: RecordSource, num_threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """A whole split in memory (for the test split of a streamed run): ``(images, labels)``."""
  return read_records(source.dataset, source.records, num_threads or image_lib.num_io_threads())

