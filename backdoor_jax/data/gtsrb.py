"""Reader for the official GTSRB folder layout (German Traffic Sign Recognition Benchmark).

Layout, as the benchmark's zip files extract it::

  PATH/Final_Training/Images/00000/GT-00000.csv, 00000_00000.ppm, ...
  PATH/Final_Training/Images/00042/GT-00042.csv, ...
  PATH/Final_Test/Images/00000.ppm, ...
  PATH/Final_Test/Images/GT-final_test.csv  (or PATH/GT-final_test.csv)

``PATH`` may also be the folder that holds ``GTSRB/`` (where all three zips were
extracted). Every CSV is semicolon separated with the columns
``Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId``; labels always come from
``ClassId``. The test images zip ships ``GT-final_test.test.csv`` *without* labels; the
labelled ``GT-final_test.csv`` is in the separate ``GTSRB_Final_Test_GT.zip``.
"""
from __future__ import annotations

import csv
import dataclasses
import glob
import os

import numpy as np
from PIL import Image

from backdoor_jax.data import images as image_lib
from backdoor_jax.errors import ConfigError

NUM_CLASSES = 43

CLASS_NAMES: tuple[str, ...] = (
    "Speed limit (20km/h)",
    "Speed limit (30km/h)",
    "Speed limit (50km/h)",
    "Speed limit (60km/h)",
    "Speed limit (70km/h)",
    "Speed limit (80km/h)",
    "End of speed limit (80km/h)",
    "Speed limit (100km/h)",
    "Speed limit (120km/h)",
    "No passing",
    "No passing for vehicles over 3.5 metric tons",
    "Right-of-way at the next intersection",
    "Priority road",
    "Yield",
    "Stop",
    "No vehicles",
    "Vehicles over 3.5 metric tons prohibited",
    "No entry",
    "General caution",
    "Dangerous curve to the left",
    "Dangerous curve to the right",
    "Double curve",
    "Bumpy road",
    "Slippery road",
    "Road narrows on the right",
    "Road work",
    "Traffic signals",
    "Pedestrians",
    "Children crossing",
    "Bicycles crossing",
    "Beware of ice/snow",
    "Wild animals crossing",
    "End of all speed and passing limits",
    "Turn right ahead",
    "Turn left ahead",
    "Ahead only",
    "Go straight or right",
    "Go straight or left",
    "Keep right",
    "Keep left",
    "Roundabout mandatory",
    "End of no passing",
    "End of no passing by vehicles over 3.5 metric tons",
)

# Measured on the 39,209 official training images at 32x32 (../shared/data/gtsrb32.npz).
MEAN = (0.3398, 0.3117, 0.3210)
STD = (0.2755, 0.2647, 0.2712)

_TEST_CSV = "GT-final_test.csv"
_COLUMNS = ("Filename", "Width", "Height", "Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2", "ClassId")


@dataclasses.dataclass(frozen=True)
class _Split:
  """Files, labels and boxes of one split, as listed by its CSV files."""
  files: list[str]
  labels: np.ndarray  # (N,) int32
  sizes: list[tuple[int, int]]  # (H, W) from the CSV
  boxes: list[tuple[int, int, int, int]]  # ROI as a PIL crop box (right/lower exclusive)


def _read_csv(csv_path: str, image_dir: str) -> _Split:
  """Parses one GT-*.csv; file names are resolved relative to ``image_dir``."""
  with open(csv_path, newline="", encoding="utf-8") as f:
    reader = csv.DictReader(f, delimiter=";")
    header = [h.strip() for h in (reader.fieldnames or [])]
    missing = [c for c in _COLUMNS if c not in header]
    if missing:
      raise ConfigError(
          f"GTSRB csv {csv_path} lacks the column(s) {', '.join(missing)}; expected the "
          f"semicolon-separated header {';'.join(_COLUMNS)}")
    files, labels, sizes, boxes = [], [], [], []
    for line, row in enumerate(reader, start=2):
      row = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
      try:
        x1, y1, x2, y2 = (int(row[k]) for k in ("Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2"))
        sizes.append((int(row["Height"]), int(row["Width"])))
        labels.append(int(row["ClassId"]))
      except ValueError as e:
        raise ConfigError(f"GTSRB csv {csv_path} line {line} has a non-integer field: {e}") from e
      # GTSRB's ROI leaves the same border on both sides when X2/Y2 are exclusive.
      boxes.append((x1, y1, x2, y2))
      files.append(os.path.join(image_dir, row["Filename"]))
  labels_array = np.asarray(labels, np.int32)
  bad = np.flatnonzero((labels_array < 0) | (labels_array >= NUM_CLASSES))
  if bad.size:
    raise ConfigError(
        f"GTSRB csv {csv_path} line {int(bad[0]) + 2} has ClassId {int(labels_array[bad[0]])} outside "
        f"0..{NUM_CLASSES - 1}")
  return _Split(files, labels_array, sizes, boxes)


def _concat(splits: list[_Split]) -> _Split:
  return _Split(
      files=[f for s in splits for f in s.files],
      labels=np.concatenate([s.labels for s in splits]) if splits else np.zeros((0,), np.int32),
      sizes=[x for s in splits for x in s.sizes],
      boxes=[x for s in splits for x in s.boxes],
  )


def _find_root(path: str) -> str:
  if os.path.isdir(os.path.join(path, "Final_Training")):
    return path
  nested = os.path.join(path, "GTSRB")
  if os.path.isdir(os.path.join(nested, "Final_Training")):
    return nested
  raise ConfigError(
      f"no GTSRB training folder under {path}: expected "
      f"{os.path.join(path, 'Final_Training', 'Images', '000NN', 'GT-000NN.csv')} "
      "(extract GTSRB_Final_Training_Images.zip there) or pass an .npz file")


def _list_train(root: str) -> _Split:
  class_dirs = sorted(glob.glob(os.path.join(root, "Final_Training", "Images", "[0-9]*")))
  splits = []
  for class_dir in class_dirs:
    csvs = sorted(glob.glob(os.path.join(class_dir, "GT-*.csv")))
    if not csvs:
      raise ConfigError(f"GTSRB class folder {class_dir} has no GT-*.csv label file")
    splits.extend(_read_csv(c, class_dir) for c in csvs)
  split = _concat(splits)
  if not split.files:
    raise ConfigError(
        f"no GTSRB training images listed under {os.path.join(root, 'Final_Training', 'Images')}: "
        "expected class folders 00000..00042, each with a GT-000NN.csv")
  return split


def _list_test(root: str, path: str) -> _Split:
  image_dir = os.path.join(root, "Final_Test", "Images")
  candidates = []
  for folder in (image_dir, root, path):
    candidate = os.path.join(folder, _TEST_CSV)
    if candidate not in candidates:
      candidates.append(candidate)
  for candidate in candidates:
    if os.path.isfile(candidate):
      split = _read_csv(candidate, image_dir)
      if not split.files:
        raise ConfigError(f"GTSRB test csv {candidate} lists no images")
      return split
  raise ConfigError(
      f"no labelled GTSRB test csv: looked for {' and '.join(candidates)}; extract "
      f"GTSRB_Final_Test_GT.zip ({_TEST_CSV}, with ClassId) into {root} (the "
      "GT-final_test.test.csv of the images zip has no labels)")


def _decode(split: _Split, indices: np.ndarray, image_size: int | None, crop_roi: bool) -> np.ndarray:
  """Reads, optionally crops, and resizes the selected images into one uint8 array."""
  if image_size is None:
    sizes = ([(b[3] - b[1], b[2] - b[0]) for b in (split.boxes[i] for i in indices)] if crop_roi
             else [split.sizes[i] for i in indices])
    height, width = image_lib.same_size_or_error("gtsrb", sizes)
  else:
    height = width = image_size
  out = np.empty((len(indices), height, width, 3), np.uint8)

  def fill(j: int) -> None:
    i = int(indices[j])
    file = split.files[i]
    try:
      with Image.open(file) as image:
        array = image_lib.convert_image(image, image_size, split.boxes[i] if crop_roi else None)
    except FileNotFoundError as e:
      raise ConfigError(f"GTSRB image {file} is listed in its csv but missing") from e
    if array.shape != out.shape[1:]:
      raise ConfigError(
          f"GTSRB image {file} is {array.shape[:2]} but its csv says {out.shape[1:3]}; "
          "set image_size to resize every image")
    out[j] = array

  image_lib.parallel_for(fill, len(indices))
  return out


def read_folder(
    path: str,
    *,
    image_size: int | None,
    crop_roi: bool,
    max_train: int | None,
    max_test: int | None,
    seed: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Reads the official GTSRB folders into arrays.

  Subsets are chosen from the CSV labels before any image is decoded.

  Args:
    path: the GTSRB root (holding Final_Training/ and Final_Test/) or its parent.
    image_size: output side length; None keeps the native size (only possible when all
      selected images, after the optional crop, have the same size).
    crop_roi: crop each image to its Roi.X1..Roi.Y2 box before resizing.
    max_train: optional stratified subset size of the training split.
    max_test: optional stratified subset size of the test split.
    seed: seed of the subsets.

  Returns:
    ``(train_images, train_labels, test_images, test_labels)``; images uint8
    ``(N, S, S, 3)``, labels int32.
  """
  root = _find_root(path)
  train = _list_train(root)
  test = _list_test(root, path)
  out = []
  for split, limit, what in ((train, max_train, "train"), (test, max_test, "test")):
    image_lib.check_subset_size(f"data.max_{what}", limit, len(split.files), f"the GTSRB {what} split under {root}")
    indices = (image_lib.stratified_subset(split.labels, limit, seed) if limit is not None
               else np.arange(len(split.files)))
    out.append(_decode(split, indices, image_size, crop_roi))
    out.append(split.labels[indices])
  return out[0], out[1], out[2], out[3]
