"""Tests of backdoor_jax.data: dataset sources and the input pipeline (CPU, seconds)."""
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from backdoor_jax import data
from backdoor_jax.data import gtsrb as gtsrb_lib
from backdoor_jax.data import images as image_lib
from backdoor_jax.data import tfds_sources
from backdoor_jax.errors import ConfigError


def _shared_gtsrb_path() -> str:
  folder = os.environ.get("BACKDOOR_JAX_SHARED_DATA") or os.path.join(
      os.path.dirname(__file__), "..", "..", "shared", "data")
  return os.path.join(folder, "gtsrb32.npz")


# ----------------------------------------------------------------------------- digits

@pytest.fixture(scope="module")
def digits():
  return data.load_dataset("digits")


def test_digits_shapes_dtypes_and_range(digits):
  assert digits.name == "digits"
  assert digits.train_images.shape == (1437, 32, 32, 3)
  assert digits.test_images.shape == (360, 32, 32, 3)
  assert digits.train_images.dtype == np.uint8 and digits.test_images.dtype == np.uint8
  assert digits.train_labels.dtype == np.int32 and digits.test_labels.dtype == np.int32
  assert digits.train_images.min() == 0 and digits.train_images.max() == 255
  assert set(np.unique(digits.train_labels)) == set(range(10))
  assert digits.num_classes == 10 and digits.class_names == tuple("0123456789")
  # Grey repeated to RGB.
  np.testing.assert_array_equal(digits.train_images[..., 0], digits.train_images[..., 2])
  assert digits.image_shape == (32, 32, 3)
  assert digits.mean[0] == digits.mean[2] and 0.2 < digits.mean[0] < 0.4
  assert 0.3 < digits.std[0] < 0.5


def test_digits_split_is_stratified(digits):
  train_counts = np.bincount(digits.train_labels, minlength=10)
  test_counts = np.bincount(digits.test_labels, minlength=10)
  totals = train_counts + test_counts
  assert np.all(np.abs(test_counts - 0.2 * totals) <= 1.0)


def test_digits_native_size_matches_sklearn():
  from sklearn.datasets import load_digits
  ds = data.load_dataset("digits", image_size=None)
  assert ds.train_images.shape[1:] == (8, 8, 3)
  raw = load_digits()
  scaled = np.round(raw.images * 255 / 16).astype(np.uint8)
  # Every train image is one of the sklearn images with the same label.
  index = {img.tobytes(): set() for img in scaled}
  for img, label in zip(scaled, raw.target):
    index[img.tobytes()].add(int(label))
  for img, label in zip(ds.train_images[:50, ..., 0], ds.train_labels[:50]):
    assert int(label) in index[img.tobytes()]


def test_digits_deterministic_and_seeded(digits):
  again = data.load_dataset("digits")
  np.testing.assert_array_equal(digits.train_images, again.train_images)
  np.testing.assert_array_equal(digits.test_labels, again.test_labels)
  other = data.load_dataset("digits", seed=1)
  assert not np.array_equal(digits.test_labels, other.test_labels)


def test_digits_subsets_are_stratified_and_deterministic():
  a = data.load_dataset("digits", image_size=16, max_train=100, max_test=30)
  b = data.load_dataset("digits", image_size=16, max_train=100, max_test=30)
  assert a.train_images.shape == (100, 16, 16, 3) and a.test_images.shape == (30, 16, 16, 3)
  np.testing.assert_array_equal(a.train_images, b.train_images)
  np.testing.assert_array_equal(a.train_labels, b.train_labels)
  assert np.all(np.abs(np.bincount(a.train_labels, minlength=10) - 10) <= 1)
  assert np.all(np.abs(np.bincount(a.test_labels, minlength=10) - 3) <= 1)


def test_stratified_subset_properties():
  labels = np.repeat(np.arange(4), [50, 30, 15, 5])
  idx = image_lib.stratified_subset(labels, 20, seed=3)
  assert len(idx) == 20 and len(set(idx.tolist())) == 20 and np.all(np.diff(idx) > 0)
  np.testing.assert_array_equal(np.bincount(labels[idx]), [10, 6, 3, 1])
  np.testing.assert_array_equal(idx, image_lib.stratified_subset(labels, 20, seed=3))
  assert not np.array_equal(idx, image_lib.stratified_subset(labels, 20, seed=4))
  np.testing.assert_array_equal(image_lib.stratified_subset(labels, 1000, 0), np.arange(100))


@pytest.mark.parametrize("kwargs, match", [
    (dict(image_size=0), "image_size"),
    (dict(image_size=2.5), "image_size"),
    (dict(max_train=0), "max_train"),
    (dict(max_test=-3), "max_test"),
    (dict(seed=-1), "seed"),
    (dict(path="/tmp/x.npz"), "only used by the npz and gtsrb"),
    (dict(crop_roi=True), "crop_roi"),
])
def test_bad_options(kwargs, match):
  with pytest.raises(ConfigError, match=match):
    data.load_dataset("digits", **kwargs)


def test_unknown_dataset_lists_names():
  with pytest.raises(ConfigError) as info:
    data.load_dataset("cifar11")
  message = str(info.value)
  assert "'cifar11'" in message
  for name in data.DATASET_NAMES:
    assert name in message


def test_dataset_names():
  for name in ("digits", "npz", "gtsrb", "cifar10", "cifar100", "mnist", "fashion_mnist",
               "svhn_cropped", "oxford_iiit_pet", "caltech_birds2011", "imagenette"):
    assert name in data.DATASET_NAMES


# ----------------------------------------------------------------------------- npz

def _npz_arrays(rng, n_train=40, n_test=20, hw=(8, 8), classes=5):
  return dict(
      train_images=rng.integers(0, 256, (n_train, *hw, 3), dtype=np.uint8),
      train_labels=(np.arange(n_train) % classes).astype(np.int64),
      test_images=rng.integers(0, 256, (n_test, *hw, 3), dtype=np.uint8),
      test_labels=(np.arange(n_test) % classes).astype(np.int64),
  )


def test_npz_round_trip(tmp_path):
  arrays = _npz_arrays(np.random.default_rng(0))
  path = tmp_path / "d.npz"
  np.savez(path, **arrays)
  ds = data.load_dataset("npz", path=str(path), image_size=None)
  assert ds.name == "npz" and ds.num_classes == 5 and ds.class_names == ("0", "1", "2", "3", "4")
  for key in ("train_images", "test_images"):
    np.testing.assert_array_equal(getattr(ds, key), arrays[key])
  for key in ("train_labels", "test_labels"):
    assert getattr(ds, key).dtype == np.int32
    np.testing.assert_array_equal(getattr(ds, key), arrays[key])
  x = arrays["train_images"].astype(np.float64) / 255
  np.testing.assert_allclose(ds.mean, x.mean((0, 1, 2)), atol=1e-9)
  np.testing.assert_allclose(ds.std, x.std((0, 1, 2)), atol=1e-9)

  resized = data.load_dataset("npz", path=str(path), image_size=12, max_train=10, max_test=5)
  assert resized.train_images.shape == (10, 12, 12, 3)
  assert resized.test_images.shape == (5, 12, 12, 3)
  assert resized.mean == ds.mean  # statistics come from the full train split
  np.testing.assert_array_equal(np.bincount(resized.train_labels), [2] * 5)


def test_npz_grey_and_class_names(tmp_path):
  rng = np.random.default_rng(1)
  arrays = _npz_arrays(rng, classes=3)
  arrays["train_images"] = arrays["train_images"][..., 0]  # (N, H, W)
  arrays["test_images"] = arrays["test_images"][..., :1]  # (N, H, W, 1)
  arrays["class_names"] = np.array(["cat", "dog", "eel", "fox"])
  path = tmp_path / "grey.npz"
  np.savez(path, **arrays)
  ds = data.load_dataset("npz", path=str(path), image_size=None)
  assert ds.num_classes == 4 and ds.class_names == ("cat", "dog", "eel", "fox")
  assert ds.train_images.shape == (40, 8, 8, 3) and ds.test_images.shape == (20, 8, 8, 3)
  for c in range(3):
    np.testing.assert_array_equal(ds.train_images[..., c], arrays["train_images"])
    np.testing.assert_array_equal(ds.test_images[..., c], arrays["test_images"][..., 0])


def test_resize_constant_image_keeps_value():
  images = np.full((2, 10, 14, 3), 77, np.uint8)
  out = image_lib.convert_images(images, 6)
  assert out.shape == (2, 6, 6, 3)
  assert np.all(out == 77)


def _malformed(arrays, rng):
  """(name, arrays, expected message fragment) for each malformed npz."""
  def with_(**changes):
    out = {k: v for k, v in arrays.items()}
    for k, v in changes.items():
      if v is None:
        out.pop(k)
      else:
        out[k] = v
    return out
  return [
      ("missing_key", with_(test_labels=None), "lacks the array"),
      ("float_images", with_(train_images=arrays["train_images"] / 255.0), "uint8"),
      ("bad_ndim", with_(train_images=arrays["train_images"][:, 0, 0]), "expected"),
      ("bad_channels", with_(test_images=np.zeros((20, 8, 8, 2), np.uint8)), "expected"),
      ("float_labels", with_(train_labels=arrays["train_labels"].astype(float)), "integers"),
      ("label_count", with_(train_labels=arrays["train_labels"][:-1]), "to match"),
      ("negative_label", with_(test_labels=-arrays["test_labels"] - 1), "negative"),
      ("shape_mismatch", with_(test_images=rng.integers(0, 255, (20, 9, 8, 3), dtype=np.uint8)),
       "same"),
      ("short_class_names", with_(class_names=np.array(["a", "b"])), "class_names"),
      ("numeric_class_names", with_(class_names=np.arange(5)), "string"),
      ("object_array", with_(class_names=np.array([1, "a", None], dtype=object)), "Python objects"),
      ("empty", with_(train_images=np.zeros((0, 8, 8, 3), np.uint8),
                      train_labels=np.zeros((0,), np.int32)), "N > 0"),
      ("stray_label", with_(test_labels=np.where(np.arange(20) == 7, 999, arrays["test_labels"])),
       r"label 999 \(at test_labels\[7\]\) implies 1000 classes but 995 of them have no training image"),
      ("label_beyond_names", with_(class_names=np.array(list("abcde")),
                                   train_labels=np.where(np.arange(40) == 3, 5, arrays["train_labels"])),
       r"label 5 at train_labels\[3\], outside the 5 classes declared by its class_names"),
  ]


@pytest.mark.parametrize("case", range(14))
def test_npz_malformed(tmp_path, case):
  rng = np.random.default_rng(2)
  name, arrays, match = _malformed(_npz_arrays(rng), rng)[case]
  path = tmp_path / f"{name}.npz"
  np.savez(path, **arrays)
  with pytest.raises(ConfigError, match=match):
    data.load_dataset("npz", path=str(path))


def test_npz_bad_files(tmp_path):
  with pytest.raises(ConfigError, match="needs path"):
    data.load_dataset("npz")
  with pytest.raises(ConfigError, match="does not exist"):
    data.load_dataset("npz", path=str(tmp_path / "nope.npz"))
  text = tmp_path / "text.npz"
  text.write_text("not an archive")
  with pytest.raises(ConfigError, match="not an .npz archive") as e:
    data.load_dataset("npz", path=str(text))
  assert "pickle" not in str(e.value)
  single = tmp_path / "single.npy"
  np.save(single, np.zeros((3, 4, 4, 3), np.uint8))
  with pytest.raises(ConfigError, match="single .npy array"):
    data.load_dataset("npz", path=str(single))
  with pytest.raises(ConfigError, match="is a folder, not an .npz file"):
    data.load_dataset("npz", path=str(tmp_path))
  broken = tmp_path / "broken.npz"
  broken.write_bytes(b"PK\x03\x04" + b"\x00" * 40)
  with pytest.raises(ConfigError, match="damaged") as e:
    data.load_dataset("npz", path=str(broken))
  assert "pickle" not in str(e.value)


def test_npz_num_classes_and_subset_sizes(tmp_path):
  arrays = _npz_arrays(np.random.default_rng(3))  # 5 classes, 40 train, 20 test
  arrays["test_labels"][0] = 7  # classes 5 and 6 have no image at all
  path = tmp_path / "d.npz"
  np.savez(path, **arrays)
  with pytest.raises(ConfigError, match="implies 8 classes"):
    data.load_dataset("npz", path=str(path), image_size=None)
  ds = data.load_dataset("npz", path=str(path), image_size=None, num_classes=8)  # declared: accepted
  assert ds.num_classes == 8 and ds.test_labels[0] == 7
  with pytest.raises(ConfigError, match=r"label 7 at test_labels\[0\], outside the 6 classes declared by "
                                        r"data.num_classes=6"):
    data.load_dataset("npz", path=str(path), image_size=None, num_classes=6)
  with pytest.raises(ConfigError, match="data.num_classes=3 but dataset 'digits' has 10 classes"):
    data.load_dataset("digits", image_size=8, num_classes=3)
  with pytest.raises(ConfigError, match=r"data.max_train=41 but the train split of .* has only 40 images"):
    data.load_dataset("npz", path=str(path), image_size=None, num_classes=8, max_train=41)
  with pytest.raises(ConfigError, match=r"data.max_test=361 but the test split of digits has only 360"):
    data.load_dataset("digits", image_size=8, max_test=361)
  assert len(data.load_dataset("npz", path=str(path), image_size=None, num_classes=8, max_train=40).train_labels) == 40


def test_image_dataset_validates():
  x = np.zeros((2, 4, 4, 3), np.uint8)
  y = np.zeros((2,), np.int32)
  args = ("t", x, y, x, y, 1, ("a",), (0.5,) * 3, (0.2,) * 3)
  data.ImageDataset(*args)
  with pytest.raises(ValueError, match="uint8"):
    data.ImageDataset("t", x.astype(np.float32), *args[2:])
  with pytest.raises(ValueError, match="int32"):
    data.ImageDataset("t", x, y.astype(np.int64), *args[3:])
  with pytest.raises(ValueError, match="lie in"):
    data.ImageDataset("t", x, y + 1, *args[3:])
  with pytest.raises(ValueError, match="class names"):
    data.ImageDataset(*args[:6], ("a", "b"), *args[7:])


# ----------------------------------------------------------------------------- gtsrb

_CSV_HEADER = "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId\n"


def _write_ppm(path, width, height, border, inner, box):
  """An image of colour ``border`` with the box ``(x1, y1, x2, y2)`` (exclusive) in ``inner``."""
  array = np.empty((height, width, 3), np.uint8)
  array[:] = border
  x1, y1, x2, y2 = box
  array[y1:y2, x1:x2] = inner
  Image.fromarray(array).save(path, format="PPM")


def _fake_gtsrb(root, test_csv_at_root=False, same_size=False):
  """Writes a tiny GTSRB layout; returns expected (train_labels, test_labels, inner colours)."""
  train_labels, test_labels, colours = [], [], {}
  # Folder 00001 deliberately lists ClassId 7: labels must come from the CSV.
  for folder, class_id, count in (("00000", 0, 3), ("00001", 7, 2), ("00002", 42, 4)):
    image_dir = root / "Final_Training" / "Images" / folder
    image_dir.mkdir(parents=True)
    lines = [_CSV_HEADER]
    for k in range(count):
      name = f"{folder}_{k:05d}.ppm"
      w, h = (12, 12) if same_size else (10 + 2 * k, 12 + k)
      box = (2, 3, w - 2, h - 2)
      inner = (class_id * 5, 100 + k, 200)
      _write_ppm(image_dir / name, w, h, (0, 0, 0), inner, box)
      lines.append(f"{name};{w};{h};{box[0]};{box[1]};{box[2]};{box[3]};{class_id}\n")
      train_labels.append(class_id)
      colours[("train", len(train_labels) - 1)] = inner
    (image_dir / f"GT-{folder}.csv").write_text("".join(lines))
  test_dir = root / "Final_Test" / "Images"
  test_dir.mkdir(parents=True)
  lines = [_CSV_HEADER]
  for k, class_id in enumerate((7, 0, 42, 42, 3)):
    name = f"{k:05d}.ppm"
    w, h = (12, 12) if same_size else (14, 11 + k)
    box = (3, 2, w - 3, h - 2)
    inner = (10 * k, 20, 30)
    _write_ppm(test_dir / name, w, h, (255, 255, 255), inner, box)
    lines.append(f"{name};{w};{h};{box[0]};{box[1]};{box[2]};{box[3]};{class_id}\n")
    test_labels.append(class_id)
    colours[("test", k)] = inner
  # The images zip's unlabelled csv, which the reader must not use.
  (test_dir / "GT-final_test.test.csv").write_text("Filename;Width\n00000.ppm;14\n")
  csv_dir = root if test_csv_at_root else test_dir
  (csv_dir / "GT-final_test.csv").write_text("".join(lines))
  return np.array(train_labels), np.array(test_labels), colours


@pytest.mark.parametrize("test_csv_at_root", [False, True])
def test_gtsrb_folder_reader(tmp_path, test_csv_at_root):
  train_labels, test_labels, colours = _fake_gtsrb(tmp_path, test_csv_at_root)
  ds = data.load_dataset("gtsrb", path=str(tmp_path), image_size=16)
  assert ds.name == "gtsrb" and ds.num_classes == 43 and ds.class_names[14] == "Stop"
  assert ds.train_images.shape == (9, 16, 16, 3) and ds.test_images.shape == (5, 16, 16, 3)
  np.testing.assert_array_equal(ds.train_labels, train_labels)
  np.testing.assert_array_equal(ds.test_labels, test_labels)
  # Without cropping the (black / white) border is still there.
  assert np.all(ds.train_images[:, 0, 0] == 0) and np.all(ds.test_images[:, 0, 0] == 255)
  cropped = data.load_dataset("gtsrb", path=str(tmp_path), image_size=8, crop_roi=True)
  for (split, i), inner in colours.items():
    image = getattr(cropped, f"{split}_images")[i]
    np.testing.assert_array_equal(image, np.broadcast_to(np.array(inner, np.uint8), (8, 8, 3)))


def test_gtsrb_folder_parent_subset_and_native_size(tmp_path):
  train_labels, _, _ = _fake_gtsrb(tmp_path / "GTSRB", same_size=True)
  ds = data.load_dataset("gtsrb", path=str(tmp_path), image_size=None, max_train=3, max_test=2)
  assert ds.train_images.shape == (3, 12, 12, 3) and ds.test_images.shape == (2, 12, 12, 3)
  assert set(ds.train_labels.tolist()) <= set(train_labels.tolist())
  assert len(set(ds.train_labels.tolist())) == 3  # one per class (stratified)


def test_gtsrb_folder_errors(tmp_path):
  with pytest.raises(ConfigError, match="needs path"):
    data.load_dataset("gtsrb")
  with pytest.raises(ConfigError, match="no GTSRB training folder"):
    data.load_dataset("gtsrb", path=str(tmp_path))
  _fake_gtsrb(tmp_path)
  with pytest.raises(ConfigError, match="different sizes"):
    data.load_dataset("gtsrb", path=str(tmp_path), image_size=None)
  (tmp_path / "Final_Test" / "Images" / "GT-final_test.csv").unlink()
  with pytest.raises(ConfigError, match="GTSRB_Final_Test_GT.zip"):
    data.load_dataset("gtsrb", path=str(tmp_path))
  with pytest.raises(ConfigError, match="does not exist"):
    data.load_dataset("gtsrb", path=str(tmp_path / "missing.npz"))


def test_gtsrb_missing_image(tmp_path):
  _fake_gtsrb(tmp_path)
  (tmp_path / "Final_Training" / "Images" / "00001" / "00001_00000.ppm").unlink()
  with pytest.raises(ConfigError, match="missing"):
    data.load_dataset("gtsrb", path=str(tmp_path))


def test_gtsrb_from_small_npz(tmp_path):
  arrays = _npz_arrays(np.random.default_rng(3), classes=43, n_train=86, n_test=43)
  np.savez(tmp_path / "g.npz", **arrays)
  ds = data.load_dataset("gtsrb", path=str(tmp_path / "g.npz"), image_size=None)
  assert ds.class_names == gtsrb_lib.CLASS_NAMES and ds.mean == gtsrb_lib.MEAN
  arrays["train_labels"][0] = 43
  np.savez(tmp_path / "bad.npz", **arrays)
  with pytest.raises(ConfigError, match="label 43"):
    data.load_dataset("gtsrb", path=str(tmp_path / "bad.npz"))
  with pytest.raises(ConfigError, match="crop_roi"):
    data.load_dataset("gtsrb", path=str(tmp_path / "g.npz"), crop_roi=True)


@pytest.mark.skipif(not os.path.isfile(_shared_gtsrb_path()),
                    reason="shared/data/gtsrb32.npz not present (set BACKDOOR_JAX_SHARED_DATA)")
def test_shared_gtsrb32():
  ds = data.load_dataset("gtsrb", path=_shared_gtsrb_path())
  assert ds.train_images.shape == (39209, 32, 32, 3) and ds.train_images.dtype == np.uint8
  assert ds.test_images.shape == (12630, 32, 32, 3) and ds.test_images.dtype == np.uint8
  assert ds.train_labels.shape == (39209,) and ds.test_labels.shape == (12630,)
  assert ds.train_labels.min() == 0 and ds.train_labels.max() == 42
  assert ds.num_classes == 43 and len(ds.class_names) == 43
  small = data.load_dataset("gtsrb", path=_shared_gtsrb_path(), max_train=430, max_test=100)
  assert small.train_images.shape == (430, 32, 32, 3) and small.test_images.shape == (100, 32, 32, 3)
  assert set(small.train_labels.tolist()) == set(range(43))


# ----------------------------------------------------------------------------- tfds

@pytest.fixture
def mock_tfds(monkeypatch):
  """tfds.testing.mock_data random records; its builders have no files, so skip that check."""
  import tensorflow_datasets as tfds
  monkeypatch.setattr(tfds_sources, "check_prepared", lambda *args: None)
  with tfds.testing.mock_data(num_examples=12):
    yield


def test_tfds_cifar10_mock(mock_tfds, tmp_path):
  ds = data.load_dataset("cifar10", data_dir=str(tmp_path), image_size=None)
  assert ds.name == "cifar10"
  assert ds.train_images.shape == (12, 32, 32, 3) and ds.train_images.dtype == np.uint8
  assert ds.test_images.shape == (12, 32, 32, 3) and ds.test_labels.dtype == np.int32
  assert ds.num_classes == 10 and len(ds.class_names) == 10  # names come with prepared data
  assert ds.mean == tfds_sources.SPECS["cifar10"].mean
  small = data.load_dataset("cifar10", data_dir=str(tmp_path), image_size=16, max_train=5)
  assert small.train_images.shape == (5, 16, 16, 3) and small.test_images.shape == (12, 16, 16, 3)


def test_tfds_grey_and_variable_size_mock(mock_tfds, tmp_path):
  ds = data.load_dataset("mnist", data_dir=str(tmp_path))
  assert ds.train_images.shape == (12, 32, 32, 3)
  np.testing.assert_array_equal(ds.train_images[..., 0], ds.train_images[..., 1])
  pets = data.load_dataset("oxford_iiit_pet", data_dir=str(tmp_path), image_size=24, max_test=4)
  assert pets.train_images.shape == (12, 24, 24, 3) and pets.test_images.shape == (4, 24, 24, 3)
  assert pets.num_classes == 37
  with pytest.raises(ConfigError, match="different sizes"):
    data.load_dataset("imagenette", data_dir=str(tmp_path), image_size=None)


def test_tfds_not_prepared(tmp_path):
  with pytest.raises(ConfigError) as info:
    data.load_dataset("cifar10", data_dir=str(tmp_path))
  message = str(info.value)
  assert "'cifar10' is not prepared under " + str(tmp_path) in message
  assert "download_and_prepare()" in message and "file_format='array_record'" in message
  assert f"--config.data.data_dir={tmp_path}" in message
  assert os.listdir(tmp_path) == []  # nothing downloaded or created


def test_tfds_prepared_without_random_access(tmp_path):
  import tensorflow_datasets as tfds
  builder = tfds.builder("mnist", data_dir=str(tmp_path))
  os.makedirs(builder.data_dir)
  builder.info.write_to_directory(builder.data_dir)  # looks prepared, as tfrecord
  with pytest.raises(ConfigError, match="array_record"):
    data.load_dataset("mnist", data_dir=str(tmp_path))


# ----------------------------------------------------------------------------- pipeline

def test_epoch_permutation():
  p = data.epoch_permutation(100, seed=0, epoch=3)
  np.testing.assert_array_equal(np.sort(p), np.arange(100))
  np.testing.assert_array_equal(p, data.epoch_permutation(100, seed=0, epoch=3))
  assert not np.array_equal(p, data.epoch_permutation(100, seed=0, epoch=4))
  assert not np.array_equal(p, data.epoch_permutation(100, seed=1, epoch=3))
  with pytest.raises(ConfigError, match="seed"):
    data.epoch_permutation(10, seed=-1, epoch=0)


def test_train_batches():
  batches = list(data.train_batches(103, 10, seed=5, epoch=2))
  assert len(batches) == data.num_train_steps(103, 10) == 10
  assert all(b.shape == (10,) for b in batches)
  flat = np.concatenate(batches)
  assert len(np.unique(flat)) == 100
  np.testing.assert_array_equal(flat, data.epoch_permutation(103, 5, 2)[:100])
  full = list(data.train_batches(103, 10, seed=5, epoch=2, drop_remainder=False))
  assert len(full) == data.num_train_steps(103, 10, drop_remainder=False) == 11
  assert full[-1].shape == (3,)
  np.testing.assert_array_equal(np.sort(np.concatenate(full)), np.arange(103))
  with pytest.raises(ConfigError, match="batch_size 20 is larger"):
    data.num_train_steps(10, 20)
  with pytest.raises(ConfigError, match="batch_size"):
    list(data.train_batches(10, 0, 0, 0))


@pytest.mark.parametrize("n, batch", [(25, 8), (24, 8), (3, 8), (0, 4)])
def test_eval_batches(n, batch):
  batches = list(data.eval_batches(n, batch))
  assert len(batches) == -(-n // batch)
  seen = []
  for indices, mask in batches:
    assert indices.shape == (batch,) and mask.shape == (batch,) and mask.dtype == bool
    assert np.all(indices[~mask] == 0)
    seen.extend(indices[mask].tolist())
  assert seen == list(range(n))


def test_normalize_known_answer():
  images = np.array([[[[0, 255, 51]]]], np.uint8)
  out = jax.jit(data.normalize)(images, (0.5, 0.5, 0.5), (0.25, 0.5, 0.25))
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out[0, 0, 0], [-2.0, 1.0, -1.2], rtol=1e-6)
  with pytest.raises(AssertionError):
    data.normalize(np.zeros((1, 2, 2, 1), np.uint8), (0.5,) * 3, (0.5,) * 3)


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_augment_identity(dtype):
  images = jnp.asarray(np.random.default_rng(0).integers(0, 255, (4, 6, 6, 3)), dtype)
  out = data.augment(jax.random.key(0), images)
  assert out.dtype == images.dtype
  np.testing.assert_array_equal(out, images)


def test_augment_flip_known_answer():
  images = jnp.asarray(np.random.default_rng(1).integers(0, 255, (32, 5, 7, 3)), jnp.uint8)
  aug = jax.jit(functools.partial(data.augment, flip=True))
  out = np.asarray(aug(jax.random.key(3), images))
  assert out.dtype == np.uint8
  flipped = [np.array_equal(o, x[:, ::-1]) for o, x in zip(out, np.asarray(images))]
  same = [np.array_equal(o, x) for o, x in zip(out, np.asarray(images))]
  assert all(f or s for f, s in zip(flipped, same))
  assert 0 < sum(flipped) < 32  # per-sample decisions
  np.testing.assert_array_equal(out, aug(jax.random.key(3), images))


@pytest.mark.parametrize("mode, dtype", [("constant", np.uint8), ("reflect", np.float32)])
def test_augment_crop_known_answer(mode, dtype):
  pad = 2
  images = np.random.default_rng(2).integers(1, 255, (16, 6, 5, 3)).astype(dtype)
  aug = jax.jit(functools.partial(data.augment, crop_padding=pad, padding_mode=mode))
  out = np.asarray(aug(jax.random.key(7), jnp.asarray(images)))
  assert out.shape == images.shape and out.dtype == dtype
  padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode=mode)
  offsets = []
  for o, p in zip(out, padded):
    hits = [(dy, dx) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
            if np.array_equal(o, p[dy:dy + 6, dx:dx + 5])]
    assert hits, "output is not a window of the padded image"
    offsets.append(hits[0])
  assert len(set(offsets)) > 1  # per-sample offsets


def test_augment_bad_args():
  images = jnp.zeros((2, 4, 4, 3), jnp.uint8)
  with pytest.raises(ConfigError, match="padding_mode"):
    data.augment(jax.random.key(0), images, crop_padding=1, padding_mode="wrap")
  with pytest.raises(ConfigError, match="reflect"):
    data.augment(jax.random.key(0), images, crop_padding=4, padding_mode="reflect")
  with pytest.raises(AssertionError):
    data.augment(jax.random.key(0), images[0], flip=True)


def test_default_flip():
  for name in ("digits", "gtsrb", "svhn_cropped", "mnist"):
    assert not data.default_flip(name)
  for name in ("cifar10", "cifar100", "oxford_iiit_pet", "caltech_birds2011", "imagenette"):
    assert data.default_flip(name)
  with pytest.raises(ConfigError):
    data.default_flip("cifar11")


def test_synthetic_dataset_is_seeded_balanced_and_learnable():
  from backdoor_jax.data import load_dataset
  a = load_dataset("synthetic", image_size=16, seed=3, max_train=200, max_test=100)
  b = load_dataset("synthetic", image_size=16, seed=3, max_train=200, max_test=100)
  c = load_dataset("synthetic", image_size=16, seed=4, max_train=200, max_test=100)
  assert a.train_images.shape == (200, 16, 16, 3) and a.test_images.shape == (100, 16, 16, 3)
  np.testing.assert_array_equal(a.train_images, b.train_images)
  assert not np.array_equal(a.train_images, c.train_images)
  np.testing.assert_array_equal(np.bincount(a.train_labels), [20] * 10)
  # Class means of the training split classify the test split: the labels carry signal.
  means = np.stack([a.train_images[a.train_labels == k].astype(np.float32).mean(0) for k in range(10)])
  d = ((a.test_images[:, None].astype(np.float32) - means[None]) ** 2).sum(axis=(2, 3, 4))
  assert (d.argmin(1) == a.test_labels).mean() > 0.9
  full = load_dataset("synthetic", image_size=8, seed=0)
  assert (len(full.train_labels), len(full.test_labels)) == (50_000, 10_000)
