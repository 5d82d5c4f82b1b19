"""The streaming feed gives the same batches as the in-memory path, reading only its own shards."""
from __future__ import annotations

import dataclasses
import io
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from backdoor_jax import poison, triggers
from backdoor_jax.data import images as image_lib
from backdoor_jax.data import load_dataset, pipeline, records, streaming, tfds_sources
from backdoor_jax.errors import ConfigError
from backdoor_jax.train import feed
from backdoor_jax.train import mesh as mesh_lib

tfds = pytest.importorskip("tensorflow_datasets")
pytest.importorskip("grain")

KEY = jax.random.key(7)
BATCH, EPOCHS = 8, 2


class _Spy:
  """Wraps a record dataset and remembers which records were read."""

  def __init__(self, dataset):
    self.dataset, self.seen = dataset, set()

  def __getitem__(self, i):
    self.seen.add(int(i))
    return self.dataset[i]


def _make_trigger(kind: str, size: int):
  if kind == "wanet":
    return triggers.make_wanet_trigger((size, size), jax.random.key(3), k=4, s=1.0)
  if kind == "blend":
    return triggers.make_blend_trigger((size, size), alpha=0.3, key=jax.random.key(4))
  return triggers.make_patch_trigger((size, size), size=3, color=(255, 255, 0))


def _assert_same_feed(reference: feed.ProcessData, stream: streaming.StreamingData, seed: int = 5) -> None:
  """Every batch of a few epochs: the same images and labels, bit for bit."""
  assert stream.num_examples == reference.num_examples and stream.num_shards == reference.num_shards
  np.testing.assert_array_equal(stream.rows, reference.rows)
  np.testing.assert_array_equal(stream.labels, reference.labels)
  local = mesh_lib.local_slice(BATCH)
  for epoch in range(EPOCHS):
    for idx in pipeline.sharded_train_batches(reference.num_examples, BATCH, seed, epoch, reference.num_shards):
      want_x, want_y = reference.take(idx[local])
      got_x, got_y = stream.take(idx[local])
      assert got_x.dtype == np.uint8 and got_x.shape == want_x.shape
      np.testing.assert_array_equal(got_x, want_x)
      np.testing.assert_array_equal(got_y, want_y)


def _check_processes(monkeypatch, reference_images, reference_labels, make_stream, num_shards, is_poisoned):
  """For 1 process (num_shards 1) or 2 simulated processes: same feed, own records only."""
  procs = 1 if num_shards == 1 else 2
  monkeypatch.setattr(jax, "process_count", lambda: procs)
  seen = []
  for p in range(procs):
    monkeypatch.setattr(jax, "process_index", lambda p=p: p)
    reference = feed.process_data(reference_images, reference_labels, num_shards)
    stream = make_stream()
    spy = _Spy(stream.source.dataset)
    stream.source = dataclasses.replace(stream.source, dataset=spy)
    _assert_same_feed(reference, stream)
    np.testing.assert_array_equal(stream.is_poisoned, is_poisoned[stream.rows])
    assert spy.seen <= set(stream.source.records[stream.rows].tolist())  # never another process's records
    stream.close()
    seen.append(spy.seen)
  if procs == 2:
    assert seen[0] and seen[1] and not seen[0] & seen[1]


def _write_dataset(root, n_train=48, n_test=12, hw=(12, 14), classes=3):
  """The same random images as an image folder (PNG) and as an npz file, rows in folder order."""
  rng = np.random.default_rng(0)
  arrays = {}
  for split, n in (("train", n_train), ("test", n_test)):
    labels = np.sort(rng.integers(0, classes, n)).astype(np.int64)  # folder order: class, then file name
    images = rng.integers(0, 256, (n, *hw, 3), dtype=np.uint8)
    for i, (x, y) in enumerate(zip(images, labels)):
      os.makedirs(os.path.join(root, split, f"class_{y}"), exist_ok=True)
      Image.fromarray(x).save(os.path.join(root, split, f"class_{y}", f"{i:04d}.png"))
    arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels
  np.savez(os.path.join(root, "data.npz"), **arrays)
  return os.path.join(root, "data.npz")


@pytest.mark.parametrize("kind, num_shards, cross_ratio, apply_at", [
    ("square", 1, 0.0, 0), ("square", 2, 0.0, 0), ("wanet", 2, 2.0, 0), ("blend", 1, 0.0, 20)])
def test_folder_stream_matches_in_memory(tmp_path, monkeypatch, kind, num_shards, cross_ratio, apply_at):
  npz = _write_dataset(str(tmp_path))
  size, max_train = 16, 40
  trig = _make_trigger(kind, apply_at or size)
  amount = dict(target=1, mode="all_to_one", num_classes=3, rate=0.25)
  # The in-memory path, as train.loop runs it: load (stratified subset, resize), poison, [resize].
  ds = load_dataset("npz", path=npz, image_size=apply_at or size, seed=3, max_train=max_train)
  x, y, is_p = poison.poison_train_set(KEY, ds.train_images, ds.train_labels, trig, cross_ratio=cross_ratio, **amount)
  if apply_at:
    x = image_lib.convert_images(x, size)
  assert is_p.sum() == 10

  def make_stream():
    return streaming.process_data_from_config(
        "folder", path=str(tmp_path), data_dir=None, image_size=size, seed=3, max_train=max_train,
        num_shards=num_shards, trigger=trig, poison_key=KEY, target=1, mode="all_to_one", rate=0.25,
        cross_ratio=cross_ratio, apply_at_size=apply_at, num_threads=2)

  _check_processes(monkeypatch, x, y, make_stream, num_shards, is_p)
  if cross_ratio:  # the noise-mode rows really were warped (and kept their labels)
    changed = np.any(x != ds.train_images, axis=(1, 2, 3))
    assert (changed & ~is_p).sum() == 20


def test_folder_test_split_and_stats(tmp_path):
  _write_dataset(str(tmp_path))
  train = records.open_split("folder", split="train", path=str(tmp_path), data_dir=None, image_size=12,
                               max_examples=None, seed=0)
  assert train.class_names == ("class_0", "class_1", "class_2") and len(train) == 48
  test = records.open_split("folder", split="test", path=str(tmp_path), data_dir=None, image_size=12,
                              max_examples=None, seed=0, class_names=train.class_names, stats=(train.mean, train.std))
  images, labels = records.read_split(test)
  arrays = np.load(tmp_path / "data.npz")
  np.testing.assert_array_equal(labels, arrays["test_labels"])
  ref = load_dataset("npz", path=str(tmp_path / "data.npz"), image_size=12)
  np.testing.assert_array_equal(images, ref.test_images)
  # The folder's statistics are estimated from its images at image_size (all 48 here: exact).
  want = [ref.train_images[..., c].astype(np.float64).mean() / 255 for c in range(3)]
  np.testing.assert_allclose(train.mean, want, atol=1e-9)


@pytest.mark.parametrize("kind, num_shards, cross_ratio", [("square", 2, 0.0), ("wanet", 1, 1.0)])
def test_mocked_tfds_stream_matches_in_memory(monkeypatch, kind, num_shards, cross_ratio):
  monkeypatch.setattr(tfds_sources, "check_prepared", lambda *args: None)  # mock builders have no files
  size = 16  # cifar10 records are 32x32: both paths resize
  trig = _make_trigger(kind, size)
  amount = dict(target=0, mode="all_to_all", rate=0.2)
  with tfds.testing.mock_data(num_examples=40):
    ds = load_dataset("cifar10", image_size=size, seed=2, max_train=36, max_test=4)
    x, y, is_p = poison.poison_train_set(KEY, ds.train_images, ds.train_labels, trig, num_classes=10,
                                         cross_ratio=cross_ratio, **amount)

    def make_stream():
      return streaming.process_data_from_config(
          "cifar10", path=None, data_dir=None, image_size=size, seed=2, max_train=36, num_shards=num_shards,
          trigger=trig, poison_key=KEY, cross_ratio=cross_ratio, num_threads=2, **amount)

    _check_processes(monkeypatch, x, y, make_stream, num_shards, is_p)


class StreamTestImages(tfds.core.GeneratorBasedBuilder):
  """A real tfds dataset, prepared as ArrayRecord without TensorFlow (the images go in as PNG bytes)."""
  VERSION = tfds.core.Version("1.0.0")
  SHAPE = (20, 24, 3)
  code_path = None  # no checksums file beside this module (finding one needs importlib_resources)

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=self.SHAPE), "label": tfds.features.ClassLabel(num_classes=4)}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(24, 0), "test": self._generate_examples(6, 1)}

  def _generate_examples(self, n, seed):
    images, labels = self.arrays(n, seed)
    for i in range(n):
      buf = io.BytesIO()
      Image.fromarray(images[i]).save(buf, "PNG")
      yield i, {"image": buf.getvalue(), "label": int(labels[i])}

  @classmethod
  def arrays(cls, n, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, *cls.SHAPE), dtype=np.uint8), rng.integers(0, 4, n)


def test_prepared_tfds_reads_labels_without_decoding_images(tmp_path, monkeypatch, caplog):
  data_dir = str(tmp_path / "tfds")
  StreamTestImages(data_dir=data_dir, file_format="array_record").download_and_prepare()
  monkeypatch.setitem(tfds_sources.SPECS, "stream_test", tfds_sources.TfdsSpec(
      "stream_test_images", "train", "test", (0.5,) * 3, (0.25,) * 3))
  monkeypatch.setattr(records, "STREAM_SOURCES", (*records.STREAM_SOURCES, "stream_test"))
  decoded = []
  original = tfds.features.Image.decode_example_np
  monkeypatch.setattr(tfds.features.Image, "decode_example_np", lambda self, b: decoded.append(1) or original(self, b))
  trig = _make_trigger("square", 16)
  with caplog.at_level(logging.WARNING):
    stream = streaming.process_data_from_config(
        "stream_test", path=None, data_dir=data_dir, image_size=16, seed=0, max_train=None, num_shards=1,
        trigger=trig, poison_key=KEY, target=2, mode="all_to_one", count=5, num_threads=2)
  assert "decodes every image" not in caplog.text and not decoded  # labels only: no image decoded
  stream.take(np.arange(3))
  assert len(decoded) == 3  # (the spy does see decoding)
  source = tfds.data_source("stream_test_images", split="train", data_dir=data_dir)  # decoded, in file order
  images = np.stack([source[i]["image"] for i in range(len(source))])
  labels = np.asarray([source[i]["label"] for i in range(len(source))])
  made = StreamTestImages.arrays(24, 0)[0]  # preparing shuffled the records: the same set, another order
  assert sorted(map(bytes, images)) == sorted(map(bytes, made))
  x, y, _ = poison.poison_train_set(KEY, image_lib.convert_images(images, 16), labels.astype(np.int32), trig,
                                    target=2, mode="all_to_one", num_classes=4, count=5)
  _assert_same_feed(feed.process_data(x, y), stream)
  assert stream.class_names == ("0", "1", "2", "3") and stream.mean == (0.5,) * 3


def test_run_epoch_over_the_stream(tmp_path):
  _write_dataset(str(tmp_path))
  trig = _make_trigger("square", 12)
  stream = streaming.process_data_from_config(
      "folder", path=str(tmp_path), data_dir=None, image_size=12, seed=0, max_train=None, num_shards=2,
      trigger=trig, poison_key=KEY, target=0, mode="all_to_one", rate=0.1, num_threads=2)
  memory = feed.process_data(*records.read_split(stream.source), num_shards=2)
  x, y, _ = poison.poison_train_set(KEY, memory.images, memory.labels, trig, target=0, mode="all_to_one",
                                    num_classes=3, rate=0.1)
  memory = feed.process_data(x, y, num_shards=2)

  @jax.jit
  def step(total, xb, yb):
    s = jnp.sum(xb.astype(jnp.float32) * jnp.arange(1, xb.shape[0] + 1)[:, None, None, None])  # order matters
    return total + s, {"loss_sum": s, "label_sum": jnp.sum(yb), "count": jnp.asarray(yb.shape[0])}

  mesh = mesh_lib.make_mesh()
  sums = []
  for data in (stream, memory):
    batches = feed.ArrayFeed(data, mesh, batch_size=BATCH, seed=1)
    total, stats = feed.run_epoch(step, jnp.zeros(()), batches, 0, prefetch=2, progress=False)
    sums.append((float(total), stats.sums))
  assert sums[0] == sums[1] and sums[0][1]["count"] == 48
  stream.close()


def test_streaming_refuses_what_it_cannot_do(tmp_path):
  _write_dataset(str(tmp_path))
  kw = dict(path=str(tmp_path), data_dir=None, seed=0, max_train=None, num_shards=1, poison_key=KEY, target=0,
            mode="all_to_one", rate=0.1)
  trig = _make_trigger("square", 12)
  with pytest.raises(ConfigError, match="adv_eps=8"):
    streaming.process_data_from_config("folder", image_size=12, trigger=trig, adv_eps=8, **kw)
  with pytest.raises(ConfigError, match="needs a 'wanet' trigger"):
    streaming.process_data_from_config("folder", image_size=12, trigger=trig, cross_ratio=2.0, **kw)
  with pytest.raises(ConfigError, match="data.image_size=None"):
    streaming.process_data_from_config("folder", image_size=None, trigger=trig, **kw)
  with pytest.raises(ConfigError, match="unknown dataset with data.stream=True 'digits'"):
    streaming.process_data_from_config("digits", image_size=12, trigger=trig, **kw)
  with pytest.raises(ConfigError, match="does not exist"):
    records.folder_source(str(tmp_path / "nowhere"), image_size=12)
  stream = streaming.process_data_from_config("folder", image_size=12, trigger=None, **kw)  # clean feed
  assert not stream.is_poisoned.any() and stream.num_poisoned == 0
  with pytest.raises(ValueError, match="does not hold rows"):
    stream.take(np.array([0, 48]))


def test_badnets_recipe_trains_from_a_streamed_folder(tmp_path):
  """data.stream=True end to end through the engine: the poisoned count and split match the in-memory rules."""
  from backdoor_jax.train.recipes import badnets
  from tests.helpers import tiny_config
  _write_dataset(tmp_path / "data", n_train=64, n_test=16, hw=(16, 16))
  c = tiny_config(**{"data.name": "folder", "data.path": str(tmp_path / "data"), "data.image_size": 16,
                     "data.max_train": 0, "data.max_test": 0, "train.epochs": 1, "train.batch_size": 16,
                     "trigger.size": 3.0, "poison.rate": 0.25})
  with c.unlocked():
    c.data.stream = True
  res = badnets.train(c, str(tmp_path / "run"))
  assert res["num_train"] == 64 and res["num_poisoned"] == 16 and res["num_test"] == 16
  assert 0 <= res["clean_accuracy"] <= 1 and (tmp_path / "run" / "checkpoints" / "1").exists()
