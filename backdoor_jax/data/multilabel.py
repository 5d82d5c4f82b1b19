"""Multi-label image datasets: labels are an ``(N, L)`` 0/1 array, one column per finding.

:func:`load_multilabel_dataset` is the entry point; every source ends in a
:class:`MultiLabelDataset` (the multi-label twin of ``sources.ImageDataset``: uint8
``(N, S, S, 3)`` images, grey repeated to RGB, bilinear antialiased resize with PIL).

Sources (:data:`MULTILABEL_SOURCES`):
  * ``chest_xray``: the NIH ChestX-ray14 layout under ``path``: ``Data_Entry_2017.csv``
    (column ``Finding Labels``: findings joined by ``|``, ``No Finding`` = no label),
    ``train_val_list.txt`` / ``test_list.txt`` (the official patient-wise split, one
    file name a line) and the PNGs in ``images/`` or in the ``images_*/images/``
    folders of the Kaggle copy. Only the images of the chosen subset are decoded.
    Labels follow :data:`NIH_FINDINGS` (the 14 official findings, in the order of the
    ChestX-ray14 paper and CheXNet).
  * ``digit_mosaic``: an offline stand-in, no files: 2x2 mosaics of scikit-learn's real
    8x8 digits (the same train/test split as the ``digits`` source, so no digit image
    is in both splits). Each cell holds a random digit with probability
    :data:`MOSAIC_FILL` or stays black; label ``d`` is on when digit ``d`` appears in
    the mosaic (10 labels; about 27% positives each, from 0 to 4 labels per image).
    Seeded: the same seed gives the same mosaics.
"""
from __future__ import annotations

import csv
import dataclasses
import glob
import os
from typing import Any, Callable

import numpy as np
from PIL import Image

from backdoor_jax.data import images as image_lib
from backdoor_jax.data.sources import ImageDataset
from backdoor_jax.errors import ConfigError, check_choice

NIH_FINDINGS: tuple[str, ...] = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia")
NO_FINDING = "No Finding"
NIH_CSV = "Data_Entry_2017.csv"
NIH_SPLIT_FILES = {"train": "train_val_list.txt", "test": "test_list.txt"}
# ImageNet statistics, the usual normalisation of ImageNet-initialised ChestX-ray14 models.
NIH_MEAN = (0.485, 0.456, 0.406)
NIH_STD = (0.229, 0.224, 0.225)

MOSAIC_FILL = 0.75          # probability that a mosaic cell holds a digit
MOSAIC_SIZES = (4000, 1000)  # train / test mosaics when max_train / max_test are unset


@dataclasses.dataclass(frozen=True, eq=False)
class MultiLabelDataset(ImageDataset):
  """A multi-label image dataset held in host memory: an ``ImageDataset`` whose labels are
  int32 ``(N, L)`` 0/1 matrices (column ``j`` = finding ``class_names[j]``) and whose
  ``num_classes`` is ``L``, the number of labels (one sigmoid output each)."""

  def check_labels(self, labels: Any, n: int, what: str) -> None:
    check_label_matrix(labels, n, self.num_classes, what)


def check_label_matrix(labels, n: int | None, num_labels: int | None, what: str = "labels") -> np.ndarray:
  """Returns ``labels`` as a numpy array after checking it is an ``(n, L)`` 0/1 integer matrix.

  Raises:
    ConfigError: wrong rank, length, label count, dtype or values (naming what was found).
  """
  labels = np.asarray(labels)
  if labels.ndim != 2 or (n is not None and labels.shape[0] != n) or (
      num_labels is not None and labels.shape[1] != num_labels):
    want = f"({n if n is not None else 'N'}, {num_labels if num_labels is not None else 'L'})"
    raise ConfigError(f"{what} have shape {labels.shape}; allowed: a {want} 0/1 matrix")
  if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
    raise ConfigError(f"{what} have dtype {labels.dtype}; allowed: integers or bool of 0/1")
  if labels.size and not np.isin(labels, (0, 1)).all():
    raise ConfigError(f"{what} hold values other than 0/1 (e.g. {labels[~np.isin(labels, (0, 1))][0]})")
  return labels


# ----------------------------------------------------------------------------------
# NIH ChestX-ray14.


def parse_findings(text: str, findings: tuple[str, ...] = NIH_FINDINGS) -> np.ndarray:
  """``'Effusion|Mass'`` -> int32 ``(L,)`` 0/1 vector over ``findings``; ``No Finding`` -> zeros.

  Raises:
    ConfigError: an unknown finding name.
  """
  out = np.zeros(len(findings), np.int32)
  for name in (t.strip() for t in text.split("|")):
    if name == NO_FINDING or not name:
      continue
    if name not in findings:
      raise ConfigError(f"unknown finding {name!r}; allowed: {', '.join(findings)} or {NO_FINDING!r}")
    out[findings.index(name)] = 1
  return out


def read_nih_entries(csv_path: str) -> dict[str, np.ndarray]:
  """Image file name -> label vector, from ``Data_Entry_2017.csv``.

  The header must name ``Image Index`` and ``Finding Labels``; the other columns (and the
  official file's trailing comma) are ignored.
  """
  if not os.path.isfile(csv_path):
    raise ConfigError(f"ChestX-ray14 label file {csv_path!r} does not exist; expected {NIH_CSV} "
                      "of the NIH release in data.path")
  with open(csv_path, newline="", encoding="utf-8-sig") as f:
    reader = csv.reader(f)
    header = [h.strip() for h in next(reader, [])]
    cols = {}
    for name in ("Image Index", "Finding Labels"):
      if name not in header:
        raise ConfigError(f"{csv_path} has no {name!r} column; header: {','.join(header)}")
      cols[name] = header.index(name)
    entries = {}
    for line, row in enumerate(reader, start=2):
      if not any(c.strip() for c in row):
        continue
      if len(row) <= max(cols.values()):
        raise ConfigError(f"{csv_path} line {line} has {len(row)} fields; expected at least "
                          f"{max(cols.values()) + 1}")
      try:
        entries[row[cols["Image Index"]].strip()] = parse_findings(row[cols["Finding Labels"]])
      except ConfigError as e:
        raise ConfigError(f"{csv_path} line {line}: {e}") from None
  return entries


def read_split_list(path: str) -> list[str]:
  """File names listed one a line (blank lines skipped), in file order."""
  if not os.path.isfile(path):
    raise ConfigError(f"ChestX-ray14 split list {path!r} does not exist; expected "
                      f"{' and '.join(NIH_SPLIT_FILES.values())} in data.path")
  with open(path, encoding="utf-8") as f:
    return [line.strip() for line in f if line.strip()]


def find_nih_images(root: str) -> dict[str, str]:
  """File name -> path of every PNG in ``root/images/`` and ``root/images_*/images/``."""
  paths = {}
  for folder in [os.path.join(root, "images")] + sorted(glob.glob(os.path.join(root, "images_*", "images"))):
    if os.path.isdir(folder):
      for name in os.listdir(folder):
        if name.lower().endswith(".png"):
          paths.setdefault(name, os.path.join(folder, name))
  return paths


def read_image_files(paths: list[str], image_size: int | None) -> np.ndarray:
  """Decodes and resizes image files into uint8 ``(N, S, S, 3)`` (grey repeated), in threads."""
  if not paths:
    raise ConfigError("no images to read")
  if image_size is None:
    with Image.open(paths[0]) as im:
      h, w = im.height, im.width
  else:
    h = w = image_size
  out = np.empty((len(paths), h, w, 3), np.uint8)

  def fill(i: int) -> None:
    with Image.open(paths[i]) as im:
      array = image_lib.convert_image(im, image_size)
    if array.shape != out.shape[1:]:
      raise ConfigError(f"{paths[i]} is {array.shape[1]}x{array.shape[0]}, not {w}x{h} like the first "
                        "image; set image_size")
    out[i] = array

  image_lib.parallel_for(fill, len(paths))
  return out


def _load_chest_xray(path: str | None, *, image_size: int | None, seed: int, max_train: int | None,
                     max_test: int | None) -> MultiLabelDataset:
  if path is None:
    raise ConfigError("dataset 'chest_xray' needs data.path=... (the NIH ChestX-ray14 folder with "
                      f"{NIH_CSV}, {', '.join(NIH_SPLIT_FILES.values())} and images/)")
  root = os.path.expanduser(os.fspath(path))
  if not os.path.isdir(root):
    raise ConfigError(f"ChestX-ray14 path {root!r} is not a folder")
  entries = read_nih_entries(os.path.join(root, NIH_CSV))
  files = find_nih_images(root)
  arrays = {}
  for split, limit in (("train", max_train), ("test", max_test)):
    names = read_split_list(os.path.join(root, NIH_SPLIT_FILES[split]))
    unknown = [n for n in names if n not in entries]
    if unknown:
      raise ConfigError(f"{NIH_SPLIT_FILES[split]} lists {len(unknown)} image(s) not in {NIH_CSV}, "
                        f"e.g. {unknown[0]!r}")
    if limit is not None:
      names = [names[i] for i in image_lib.seeded_subset(len(names), limit, seed)]
    missing = [n for n in names if n not in files]
    if missing:
      raise ConfigError(f"{len(missing)} image(s) of {NIH_SPLIT_FILES[split]} are not in {root}/images "
                        f"or {root}/images_*/images, e.g. {missing[0]!r}")
    arrays[split] = (read_image_files([files[n] for n in names], image_size),
                     np.stack([entries[n] for n in names]).astype(np.int32))
  return MultiLabelDataset("chest_xray", *arrays["train"], *arrays["test"], len(NIH_FINDINGS),
                           NIH_FINDINGS, NIH_MEAN, NIH_STD)


# ----------------------------------------------------------------------------------
# Digit mosaics (offline stand-in).


def make_mosaics(digit_images: np.ndarray, digit_labels: np.ndarray, n: int,
                 rng: np.random.Generator, fill: float = MOSAIC_FILL) -> tuple[np.ndarray, np.ndarray]:
  """``n`` 2x2 mosaics of the given digits and their label sets.

  Args:
    digit_images: uint8 ``(K, h, w)`` grey digits.
    digit_labels: int ``(K,)`` digit classes in ``[0, 10)``.
    n: number of mosaics.
    rng: numpy generator (all choices come from it).
    fill: probability that a cell holds a digit (otherwise it stays 0).
  Returns:
    uint8 ``(n, 2h, 2w)`` mosaics and int32 ``(n, 10)`` labels: label ``d`` is 1 exactly
    when some cell holds a digit of class ``d``.
  """
  k, h, w = digit_images.shape
  present = rng.random((n, 4)) < fill
  pick = rng.integers(0, k, (n, 4))
  cells = np.where(present[..., None, None], digit_images[pick], 0).astype(np.uint8)  # (n, 4, h, w)
  mosaics = cells.reshape(n, 2, 2, h, w).transpose(0, 1, 3, 2, 4).reshape(n, 2 * h, 2 * w)
  labels = np.zeros((n, 10), np.int32)
  rows = np.repeat(np.arange(n), 4)[present.ravel()]
  labels[rows, digit_labels[pick].ravel()[present.ravel()]] = 1
  return mosaics, labels


def _make_digit_mosaic(path: str | None, *, image_size: int | None, seed: int, max_train: int | None,
                       max_test: int | None) -> MultiLabelDataset:
  if path is not None:
    raise ConfigError(f"path={path!r} is not used by dataset 'digit_mosaic' (it needs no files); leave it unset")
  from sklearn import datasets as sk_datasets  # pylint: disable=g-import-not-at-top
  from sklearn import model_selection  # pylint: disable=g-import-not-at-top
  digits = sk_datasets.load_digits()
  images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
  labels = digits.target.astype(np.int32)
  train_x, test_x, train_y, test_y = model_selection.train_test_split(
      images, labels, test_size=0.2, stratify=labels, random_state=seed)
  rng = np.random.default_rng([0x3051C, int(seed)])
  train_m, train_l = make_mosaics(train_x, train_y, max_train or MOSAIC_SIZES[0], rng)
  test_m, test_l = make_mosaics(test_x, test_y, max_test or MOSAIC_SIZES[1], rng)
  mean, std = image_lib.channel_mean_std(train_m[..., None])
  return MultiLabelDataset("digit_mosaic", image_lib.convert_images(train_m, image_size), train_l,
                           image_lib.convert_images(test_m, image_size), test_l, 10,
                           tuple(str(d) for d in range(10)), mean * 3, std * 3)


MULTILABEL_SOURCES: dict[str, Callable[..., MultiLabelDataset]] = {
    "chest_xray": _load_chest_xray,
    "digit_mosaic": _make_digit_mosaic,
}


def load_multilabel_dataset(name: str, *, path: str | None = None, image_size: int | None = 32, seed: int = 0,
                            max_train: int | None = None, max_test: int | None = None) -> MultiLabelDataset:
  """Loads a multi-label dataset by name into host memory.

  Args:
    name: one of :data:`MULTILABEL_SOURCES`.
    path: ``chest_xray``: the NIH folder; must be None for ``digit_mosaic``.
    image_size: side length of the square output images; None keeps the native size.
    seed: seed of the mosaics / digit split and of the ``max_*`` subsets.
    max_train: ``chest_xray``: seeded uniform subset of the official train_val list;
      ``digit_mosaic``: number of training mosaics (default 4,000).
    max_test: the same for the test split (``digit_mosaic`` default 1,000).

  Raises:
    ConfigError: bad name or options, missing or malformed files.
  """
  check_choice("multi-label dataset", name, MULTILABEL_SOURCES)
  for what, value in (("image_size", image_size), ("max_train", max_train), ("max_test", max_test)):
    image_lib.check_size_arg(what, value)
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
  return MULTILABEL_SOURCES[name](path, image_size=image_size, seed=int(seed), max_train=max_train,
                                  max_test=max_test)
