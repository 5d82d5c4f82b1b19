"""Image classification datasets as in-memory uint8 arrays.

:func:`load_dataset` is the one entry point. Every source ends in the same
:class:`ImageDataset`: uint8 ``(N, S, S, 3)`` images at the configured square size
(grey repeated to RGB, bilinear antialiased resize with PIL) and int32 labels.

Sources:
  * ``digits``: scikit-learn's embedded 8x8 digits, the offline default (no files).
  * ``npz``: arrays in a user-given ``.npz`` file.
  * ``gtsrb``: an ``.npz`` file or the official GTSRB folder layout.
  * ``synthetic``: generated in memory from the seed (no files, no network), for
    throughput runs on machines without data: CIFAR-10-sized by default (50,000 train,
    10,000 test, 10 classes; ``max_train``/``max_test`` set the sizes), each class a
    smooth random colour template plus per-image noise, so it is learnable but says
    nothing about accuracy on real images.
  * tfds names (cifar10, cifar100, mnist, fashion_mnist, svhn_cropped, oxford_iiit_pet,
    caltech_birds2011, imagenette): read with ``tfds.data_source`` from a data_dir where
    they were prepared beforehand; nothing is ever downloaded.

Normalisation constants (``mean``/``std``) are the usual published values for the
standard datasets; for ``digits`` and ``npz`` they are computed exactly from the full
training split at native resolution (before any ``max_train`` subset), so a subset or a
different ``image_size`` does not change them.
"""
from __future__ import annotations

import dataclasses
import os
import zipfile
from typing import Any

import numpy as np

from backdoor_jax.data import gtsrb as gtsrb_lib
from backdoor_jax.data import images as image_lib
from backdoor_jax.data import tfds_sources
from backdoor_jax.errors import ConfigError, check_choice

DATASET_NAMES: tuple[str, ...] = ("digits", "npz", "gtsrb", "synthetic", *tfds_sources.SPECS)
SYNTHETIC_SIZES = (50_000, 10_000)  # train / test images of ``synthetic`` when max_* is unset

NPZ_KEYS = ("train_images", "train_labels", "test_images", "test_labels")


@dataclasses.dataclass(frozen=True, eq=False)
class ImageDataset:
  """A labelled image classification dataset held in host memory.

  Attributes:
    name: dataset name (one of :data:`DATASET_NAMES`).
    train_images: uint8 ``(N, H, W, 3)``.
    train_labels: int32 ``(N,)`` in ``[0, num_classes)``.
    test_images: uint8 ``(M, H, W, 3)``.
    test_labels: int32 ``(M,)`` in ``[0, num_classes)``.
    num_classes: number of classes.
    class_names: one name per class.
    mean: per-channel mean, in [0, 1] pixel units.
    std: per-channel standard deviation, in [0, 1] pixel units.
  """
  name: str
  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  num_classes: int
  class_names: tuple[str, ...]
  mean: tuple[float, float, float]
  std: tuple[float, float, float]

  def __post_init__(self):
    for split in ("train", "test"):
      images = getattr(self, f"{split}_images")
      labels = getattr(self, f"{split}_labels")
      if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 or (
          images.shape[-1] != 3):
        raise ValueError(f"{split}_images must be a uint8 (N, H, W, 3) numpy array, got "
                         f"{getattr(images, 'dtype', type(images))} {getattr(images, 'shape', '')}")
      self.check_labels(labels, images.shape[0], f"{split}_labels")
    if self.train_images.shape[1:] != self.test_images.shape[1:]:
      raise ValueError(f"train and test images differ in shape: {self.train_images.shape[1:]} vs "
                       f"{self.test_images.shape[1:]}")
    if len(self.class_names) != self.num_classes:
      raise ValueError(f"{len(self.class_names)} class names for {self.num_classes} classes")
    if len(self.mean) != 3 or len(self.std) != 3:
      raise ValueError(f"mean and std need 3 values each, got {self.mean} and {self.std}")

  def check_labels(self, labels: Any, n: int, what: str) -> None:
    """One split's labels: int32 ``(n,)`` in ``[0, num_classes)`` (multi-label datasets override it)."""
    if not isinstance(labels, np.ndarray) or labels.dtype != np.int32 or labels.shape != (n,):
      raise ValueError(f"{what} must be an int32 ({n},) numpy array, got "
                       f"{getattr(labels, 'dtype', type(labels))} {getattr(labels, 'shape', '')}")
    if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
      raise ValueError(f"{what} must lie in [0, {self.num_classes}), got {labels.min()}..{labels.max()}")

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """``(H, W, 3)`` of every image."""
    return tuple(self.train_images.shape[1:])  # type: ignore[return-value]


def load_dataset(
    name: str,
    *,
    path: str | None = None,
    data_dir: str | None = None,
    image_size: int | None = 32,
    seed: int = 0,
    max_train: int | None = None,
    max_test: int | None = None,
    crop_roi: bool = False,
    num_classes: int | None = None,
) -> ImageDataset:
  """Loads a dataset by name into host memory.

  Args:
    name: one of :data:`DATASET_NAMES`.
    path: for ``npz``: the ``.npz`` file; for ``gtsrb``: an ``.npz`` file or the
      official GTSRB folder. Must be None for the other datasets.
    data_dir: tfds data dir for the tfds datasets (None: tfds's default); ignored by
      the others.
    image_size: side length of the square output images; None keeps the native size.
    seed: seed of the ``digits`` train/test split and of the ``max_*`` subsets.
    max_train: optional size of a deterministic subset of the training split
      (stratified by label where labels are known before decoding, i.e. everything but
      tfds, where it is a seeded uniform choice).
    max_test: the same for the test split.
    crop_roi: ``gtsrb`` folder only: crop each image to its annotated sign box first.
    num_classes: the number of classes the labels must lie in (``data.num_classes``;
      None or 0: the dataset's own). For an npz file without ``class_names`` it
      declares the classes; for every other source it must equal the dataset's.

  Returns:
    The :class:`ImageDataset`.

  Raises:
    ConfigError: bad name, options, missing or malformed files, or a tfds dataset that
      is not prepared in ``data_dir``.
  """
  check_choice("dataset", name, DATASET_NAMES)
  image_lib.check_size_arg("image_size", image_size)
  image_lib.check_size_arg("max_train", max_train)
  image_lib.check_size_arg("max_test", max_test)
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed <= 2 ** 32 - 1:
    raise ConfigError(f"seed must be an integer in 0..{2 ** 32 - 1}, got {seed!r}")
  if path is not None and name not in ("npz", "gtsrb"):
    raise ConfigError(
        f"path={path!r} is only used by the npz and gtsrb datasets; for {name!r} leave it "
        "unset (tfds datasets are found through data_dir)")
  if crop_roi and name != "gtsrb":
    raise ConfigError(f"crop_roi is only supported by the gtsrb folder reader, not {name!r}")
  image_lib.check_size_arg("data.num_classes", num_classes or None)
  ds = _load_by_name(name, path=path, data_dir=data_dir, crop_roi=crop_roi, num_classes=num_classes or None,
                     image_size=image_size, seed=seed, max_train=max_train, max_test=max_test)
  if num_classes and ds.num_classes != num_classes:
    raise ConfigError(f"data.num_classes={num_classes} but dataset {name!r} has {ds.num_classes} classes; "
                      "set 0 to use the dataset's")
  return ds


def _load_by_name(name: str, *, path: str | None, data_dir: str | None, crop_roi: bool, num_classes: int | None,
                  **kwargs) -> ImageDataset:
  """Dispatches to the reader of ``name`` (arguments already validated)."""
  if name == "digits":
    return _load_digits(**kwargs)
  if name == "npz":
    return _load_npz(_require_path(name, path), name="npz", num_classes=num_classes, **kwargs)
  if name == "synthetic":
    return _make_synthetic(**kwargs)
  if name == "gtsrb":
    return _load_gtsrb(_require_path(name, path), crop_roi=crop_roi, **kwargs)
  train_x, train_y, test_x, test_y, class_names = tfds_sources.read_tfds(
      name, data_dir=data_dir, **kwargs)
  spec = tfds_sources.SPECS[name]
  return ImageDataset(name, train_x, train_y, test_x, test_y, len(class_names), class_names,
                      spec.mean, spec.std)


def _require_path(name: str, path: str | None) -> str:
  if path is None:
    what = ("an .npz file with train_images, train_labels, test_images, test_labels"
            if name == "npz" else "an .npz file like shared/data/gtsrb32.npz or the extracted "
            "official GTSRB folder")
    raise ConfigError(f"dataset {name!r} needs path=... ({what})")
  return os.path.expanduser(os.fspath(path))


def _subset_and_resize(images: np.ndarray, labels: np.ndarray, limit: int | None,
                       image_size: int | None, seed: int, split: str = "train",
                       source: str = "the dataset") -> tuple[np.ndarray, np.ndarray]:
  """Stratified subset (when ``limit`` is set), then conversion to RGB at ``image_size``."""
  if limit is not None:
    image_lib.check_subset_size(f"data.max_{split}", limit, len(labels), f"the {split} split of {source}")
    keep = image_lib.stratified_subset(labels, limit, seed)
    images, labels = images[keep], labels[keep]
  return image_lib.convert_images(images, image_size), np.asarray(labels, np.int32)


def _load_digits(*, image_size: int | None, seed: int, max_train: int | None,
                 max_test: int | None) -> ImageDataset:
  """scikit-learn's 1,797 8x8 digits, 80/20 stratified split, scaled to uint8 0..255."""
  from sklearn import datasets as sk_datasets  # pylint: disable=g-import-not-at-top
  from sklearn import model_selection  # pylint: disable=g-import-not-at-top
  digits = sk_datasets.load_digits()
  images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # (1797, 8, 8), 0..16
  labels = digits.target.astype(np.int32)
  train_x, test_x, train_y, test_y = model_selection.train_test_split(
      images, labels, test_size=0.2, stratify=labels, random_state=seed)
  mean, std = image_lib.channel_mean_std(train_x[..., None])
  train_x, train_y = _subset_and_resize(train_x, train_y, max_train, image_size, seed, "train", "digits")
  test_x, test_y = _subset_and_resize(test_x, test_y, max_test, image_size, seed, "test", "digits")
  return ImageDataset("digits", train_x, train_y, test_x, test_y, 10,
                      tuple(str(d) for d in range(10)), mean * 3, std * 3)


def _make_synthetic(*, image_size: int | None, seed: int, max_train: int | None,
                    max_test: int | None) -> ImageDataset:
  """Seeded class templates (8x8 colour noise, upsampled) plus per-image Gaussian noise."""
  size = image_size or 32
  rng = np.random.default_rng([0x5E7, int(seed)])
  n_classes = 10
  coarse = rng.uniform(40, 215, (n_classes, 8, 8, 3)).astype(np.float32)
  reps = -(-size // 8)
  templates = np.repeat(np.repeat(coarse, reps, axis=1), reps, axis=2)[:, :size, :size]

  def split(n: int) -> tuple[np.ndarray, np.ndarray]:
    labels = (np.arange(n) % n_classes).astype(np.int32)
    rng.shuffle(labels)
    out = np.empty((n, size, size, 3), np.uint8)
    for start in range(0, n, 4096):  # bounded float32 scratch memory
      y = labels[start:start + 4096]
      x = templates[y] + rng.normal(0, 40, (len(y), size, size, 3)).astype(np.float32)
      out[start:start + 4096] = np.clip(x, 0, 255).astype(np.uint8)
    return out, labels

  train_x, train_y = split(max_train or SYNTHETIC_SIZES[0])
  test_x, test_y = split(max_test or SYNTHETIC_SIZES[1])
  mean, std = image_lib.channel_mean_std(train_x[:4096])
  return ImageDataset("synthetic", train_x, train_y, test_x, test_y, n_classes,
                      tuple(f"class_{i}" for i in range(n_classes)), mean, std)


def _read_npz(path: str) -> dict[str, np.ndarray]:
  """Reads and validates the arrays of an npz dataset file (no resizing yet)."""
  save_hint = f"save the dataset with np.savez(path, {'=..., '.join(NPZ_KEYS)}=...)"
  if os.path.isdir(path):
    raise ConfigError(f"npz dataset path {path!r} is a folder, not an .npz file; {save_hint}")
  if not os.path.isfile(path):
    raise ConfigError(f"npz dataset file {path!r} does not exist")
  try:
    with open(path, "rb") as f:
      magic = f.read(6)
  except OSError as e:
    raise ConfigError(f"npz dataset file {path!r} cannot be read ({e.strerror or e})") from None
  if magic.startswith(b"\x93NUMPY"):
    raise ConfigError(f"{path} holds a single .npy array, not an .npz archive; {save_hint}")
  if not magic.startswith(b"PK"):
    kind = "an empty file" if not magic else f"a file starting with {magic!r}"
    raise ConfigError(f"{path} is not an .npz archive (a zip file written by np.savez): it is {kind}; {save_hint}")
  try:
    archive = np.load(path, allow_pickle=False)
  except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:  # a damaged zip
    raise ConfigError(f"{path} is a damaged .npz (zip) archive ({type(e).__name__}); {save_hint}") from None
  with archive:
    keys = set(archive.files)
    missing = [k for k in NPZ_KEYS if k not in keys]
    if missing:
      raise ConfigError(
          f"npz file {path} lacks the array(s) {', '.join(missing)}; it has "
          f"{', '.join(sorted(keys)) or 'none'}; required: {', '.join(NPZ_KEYS)}")
    arrays = {}
    for k in (*NPZ_KEYS, "class_names"):
      if k not in keys:
        continue
      try:
        arrays[k] = archive[k]
      except ValueError:  # an object array: pickled Python objects, never loaded (unsafe)
        raise ConfigError(f"array {k!r} of npz file {path} holds Python objects, which are never loaded (that "
                          "would run code from the file); store plain numeric or string arrays") from None
      except (OSError, EOFError, zipfile.BadZipFile) as e:
        raise ConfigError(f"array {k!r} of npz file {path} is damaged ({type(e).__name__})") from None

  shapes = {}
  for split in ("train", "test"):
    images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
    if images.dtype != np.uint8:
      raise ConfigError(
          f"npz {split}_images has dtype {images.dtype}; expected uint8 0..255 (convert "
          "floats in [0, 1] with (x * 255).round().astype(np.uint8))")
    if images.ndim == 3:
      images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3, 4) or images.shape[0] == 0:
      raise ConfigError(
          f"npz {split}_images has shape {arrays[f'{split}_images'].shape}; expected "
          "(N, H, W, 3), (N, H, W, 1) or (N, H, W) with N > 0")
    if not np.issubdtype(labels.dtype, np.integer):
      raise ConfigError(f"npz {split}_labels has dtype {labels.dtype}; expected integers")
    if labels.shape != (images.shape[0],):
      raise ConfigError(
          f"npz {split}_labels has shape {labels.shape}; expected ({images.shape[0]},) to "
          f"match {split}_images")
    if labels.min() < 0:
      raise ConfigError(f"npz {split}_labels has a negative label {int(labels.min())}")
    arrays[f"{split}_images"] = images
    shapes[split] = images.shape[1:]
  if shapes["train"] != shapes["test"]:
    raise ConfigError(
        f"npz train_images are {shapes['train']} per image but test_images are "
        f"{shapes['test']}; both splits need the same (H, W, C)")
  if "class_names" in arrays:
    names = arrays["class_names"]
    if names.ndim != 1 or names.dtype.kind not in "US":
      raise ConfigError(
          f"npz class_names has dtype {names.dtype} and shape {names.shape}; expected a 1-D "
          "string array (np.array(['cat', 'dog']))")
  return arrays


def _inferred_num_classes(arrays: dict[str, np.ndarray], path: str) -> int:
  """``max label + 1`` when every class up to it has a training image; else ConfigError."""
  train, test = arrays["train_labels"], arrays["test_labels"]
  num = int(max(train.max(), test.max())) + 1
  present = np.zeros(num, bool)
  present[train] = True
  if not present.all():
    top_split, labels = ("train", train) if train.max() + 1 == num else ("test", test)
    at = int(np.argmax(labels))
    raise ConfigError(
        f"{path}: label {num - 1} (at {top_split}_labels[{at}]) implies {num} classes but "
        f"{int((~present).sum())} of them have no training image (e.g. class {int(np.argmin(present))}); "
        "labels must be 0..C-1: relabel, add a class_names array, or set data.num_classes")
  return num


def _load_npz(
    path: str,
    *,
    name: str,
    image_size: int | None,
    seed: int,
    max_train: int | None,
    max_test: int | None,
    class_names: tuple[str, ...] | None = None,
    num_classes: int | None = None,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
) -> ImageDataset:
  """Loads an npz dataset file; ``class_names``/``mean``/``std`` override the file's.

  The number of classes comes from ``class_names`` (argument, else the file's), else
  ``num_classes``, else the labels: then every class 0..max label must have a
  training image, so one stray label (999 in a 10-class file) is refused rather than
  silently making a 1000-class model.
  """
  arrays = _read_npz(path)
  if class_names is not None:
    declared = f"dataset {name!r}"
  elif "class_names" in arrays:
    names = arrays["class_names"]
    class_names = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
    declared = "its class_names"
  elif num_classes is not None:
    class_names = tuple(str(i) for i in range(num_classes))
    declared = f"data.num_classes={num_classes}"
  else:
    class_names = tuple(str(i) for i in range(_inferred_num_classes(arrays, path)))
    declared = "its labels"
  if num_classes is not None and num_classes != len(class_names):
    raise ConfigError(f"data.num_classes={num_classes} but {path} has {len(class_names)} classes ({declared}); "
                      "set 0 to use the file's")
  for split in ("train", "test"):
    labels = arrays[f"{split}_labels"]
    bad = np.flatnonzero(labels >= len(class_names))
    if bad.size:
      raise ConfigError(
          f"{path} has label {int(labels[bad[0]])} at {split}_labels[{int(bad[0])}], outside the "
          f"{len(class_names)} classes declared by {declared} (labels 0..{len(class_names) - 1})")
  if mean is None or std is None:
    mean, std = image_lib.channel_mean_std(image_lib.convert_images(arrays["train_images"], None))
  train_x, train_y = _subset_and_resize(
      arrays["train_images"], arrays["train_labels"], max_train, image_size, seed, "train", path)
  test_x, test_y = _subset_and_resize(
      arrays["test_images"], arrays["test_labels"], max_test, image_size, seed, "test", path)
  return ImageDataset(name, train_x, train_y, test_x, test_y, len(class_names),
                      tuple(class_names), tuple(mean), tuple(std))


def _load_gtsrb(path: str, *, crop_roi: bool, image_size: int | None, seed: int,
                max_train: int | None, max_test: int | None) -> ImageDataset:
  """GTSRB from an .npz file (e.g. shared/data/gtsrb32.npz) or the official folders."""
  if os.path.isdir(path):
    train_x, train_y, test_x, test_y = gtsrb_lib.read_folder(
        path, image_size=image_size, crop_roi=crop_roi, max_train=max_train,
        max_test=max_test, seed=seed)
    return ImageDataset("gtsrb", train_x, train_y, test_x, test_y, gtsrb_lib.NUM_CLASSES,
                        gtsrb_lib.CLASS_NAMES, gtsrb_lib.MEAN, gtsrb_lib.STD)
  if crop_roi:
    raise ConfigError(
        f"crop_roi needs the GTSRB folder (with its csv boxes), but path {path!r} is not a "
        "folder; drop crop_roi or pass the folder")
  if not os.path.exists(path):
    raise ConfigError(f"gtsrb path {path!r} does not exist; pass an .npz file or the GTSRB folder")
  return _load_npz(path, name="gtsrb", image_size=image_size, seed=seed, max_train=max_train,
                   max_test=max_test, class_names=gtsrb_lib.CLASS_NAMES,
                   mean=gtsrb_lib.MEAN, std=gtsrb_lib.STD)
