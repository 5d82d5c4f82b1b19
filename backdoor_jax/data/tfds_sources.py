"""Datasets read from tensorflow-datasets (tfds) with ``tfds.data_source``.

``tfds.data_source`` gives random access to a prepared dataset without TensorFlow, as
long as it was prepared in a random-access file format (ArrayRecord). Preparing needs
TensorFlow and a network, so it is never done here: a dataset that is not prepared
gives a ConfigError with the exact command to run elsewhere.

Each record is decoded and resized on the host straight into a preallocated uint8
array, from several threads.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np

from backdoor_jax.data import images as image_lib
from backdoor_jax.errors import ConfigError

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class TfdsSpec:
  """How one of our dataset names maps onto tfds.

  Attributes:
    tfds_name: tfds name, with ``/config`` where the dataset has configs.
    train_split: tfds split used as our training set.
    test_split: tfds split used as our test set.
    image_key: feature holding the image.
    label_key: feature holding the class id.
    mean: per-channel mean in [0, 1] units (for 3 channels after grey -> RGB).
    std: per-channel standard deviation in [0, 1] units.
  """
  tfds_name: str
  train_split: str
  test_split: str
  mean: tuple[float, float, float]
  std: tuple[float, float, float]
  image_key: str = "image"
  label_key: str = "label"


SPECS: dict[str, TfdsSpec] = {
    "cifar10": TfdsSpec("cifar10", "train", "test",
                        (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": TfdsSpec("cifar100", "train", "test",
                         (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "mnist": TfdsSpec("mnist", "train", "test", (0.1307,) * 3, (0.3081,) * 3),
    "fashion_mnist": TfdsSpec("fashion_mnist", "train", "test", (0.2860,) * 3, (0.3530,) * 3),
    "svhn_cropped": TfdsSpec("svhn_cropped", "train", "test",
                             (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
    "oxford_iiit_pet": TfdsSpec("oxford_iiit_pet", "train", "test", _IMAGENET_MEAN, _IMAGENET_STD),
    "caltech_birds2011": TfdsSpec("caltech_birds2011", "train", "test",
                                  _IMAGENET_MEAN, _IMAGENET_STD),
    "imagenette": TfdsSpec("imagenette/320px-v2", "train", "validation",
                           _IMAGENET_MEAN, _IMAGENET_STD),
}


def _prepare_command(tfds_name: str, data_dir: str) -> str:
  return (
      "pip install 'backdoor-jax[tf]' && python -c \"import tensorflow_datasets as tfds; "
      f"tfds.builder('{tfds_name}', data_dir='{data_dir}', file_format='array_record')"
      ".download_and_prepare()\"")


def check_prepared(name: str, tfds_name: str, builder: Any) -> None:
  """Raises ConfigError, with the command that fixes it, unless ``builder`` can be read.

  Looks only at files already on disk (``builder.is_prepared()`` and the prepared
  dataset's file formats); nothing is downloaded.

  Args:
    name: our dataset name (for the message).
    tfds_name: the tfds name (with config) used in the suggested command.
    builder: the ``tfds.core.DatasetBuilder``.
  """
  from tensorflow_datasets.core import file_adapters  # pylint: disable=g-import-not-at-top
  root = str(builder.data_dir_root)
  if not builder.is_prepared():
    raise ConfigError(
        f"dataset {name!r} is not prepared under {root}; on a machine with network run: "
        f"{_prepare_command(tfds_name, root)} "
        f"then copy {root} here if needed and pass --config.data.data_dir={root}")
  formats = set(builder.info.available_file_formats())
  if not formats & set(file_adapters.FileFormat.with_random_access()):
    found = ", ".join(sorted(f.value for f in formats)) or "unknown"
    raise ConfigError(
        f"dataset {name!r} is prepared under {root} as {found}, which tfds.data_source cannot "
        "read without TensorFlow; prepare it again into an empty data_dir with "
        f"file_format='array_record': {_prepare_command(tfds_name, '<NEW_DIR>')}")


def _read_split(
    name: str,
    source: Any,
    spec: TfdsSpec,
    indices: np.ndarray,
    image_size: int | None,
    native_shape: tuple[int | None, ...],
) -> tuple[np.ndarray, np.ndarray]:
  """Decodes the records at ``indices`` into uint8 images ``(n, S, S, 3)`` and int32 labels."""
  n = len(indices)
  if image_size is None:
    if native_shape[0] is None or native_shape[1] is None:
      raise ConfigError(
          f"dataset {name!r} has images of different sizes, so image_size=None cannot "
          "stack them; set image_size (e.g. 32 or 224)")
    height, width = native_shape[0], native_shape[1]
  else:
    height = width = image_size
  images = np.empty((n, height, width, 3), np.uint8)
  labels = np.empty((n,), np.int32)
  log_every = max(1, n // 10)

  def fill(j: int) -> None:
    record = source[int(indices[j])]
    images[j] = image_lib.convert_image(np.asarray(record[spec.image_key]), image_size)
    labels[j] = int(record[spec.label_key])
    if n >= 10_000 and j % log_every == 0:
      logging.info("decoding %s: record %d of %d", name, j, n)

  image_lib.parallel_for(fill, n)
  return images, labels


def read_tfds(
    name: str,
    *,
    data_dir: str | None,
    image_size: int | None,
    max_train: int | None,
    max_test: int | None,
    seed: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, tuple[str, ...]]:
  """Reads a prepared tfds dataset into arrays, without TensorFlow and without downloading.

  Args:
    name: one of :data:`SPECS`.
    data_dir: tfds data dir; None uses tfds's default (``$TFDS_DATA_DIR`` or
      ``~/tensorflow_datasets``).
    image_size: output side length; None keeps the native size (fixed-size datasets only).
    max_train: optional subset size of the train split (seeded uniform choice, made
      before decoding, since labels are only known after reading a record).
    max_test: the same for the test split.
    seed: seed of the subsets.

  Returns:
    ``(train_images, train_labels, test_images, test_labels, class_names)``.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  spec = SPECS[name]
  builder = tfds.builder(spec.tfds_name, data_dir=data_dir)
  check_prepared(name, spec.tfds_name, builder)
  features = builder.info.features
  native_shape = tuple(features[spec.image_key].shape)
  label_feature = features[spec.label_key]
  class_names = tuple(label_feature.names) if label_feature.names else tuple(
      str(i) for i in range(label_feature.num_classes))
  out = []
  for split, limit in ((spec.train_split, max_train), (spec.test_split, max_test)):
    source = tfds.data_source(spec.tfds_name, split=split, data_dir=data_dir, download=False)
    total = len(source)
    image_lib.check_subset_size("data.max_train" if split == spec.train_split else "data.max_test", limit, total,
                                f"split {split!r} of tfds dataset {name!r}")
    indices = image_lib.seeded_subset(total, limit, seed) if limit is not None else np.arange(total)
    out.extend(_read_split(name, source, spec, indices, image_size, native_shape))
  return out[0], out[1], out[2], out[3], class_names
