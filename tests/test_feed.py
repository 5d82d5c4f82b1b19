"""Sharded batches, per-process rows, prefetching, the epoch loop and bfloat16 training."""
from __future__ import annotations

import json
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from backdoor_jax.data import pipeline
from backdoor_jax.errors import ConfigError
from backdoor_jax import experiment
from backdoor_jax.train import feed
from backdoor_jax.train.recipes import badnets
from backdoor_jax.train import mesh as mesh_lib
from tests.helpers import tiny_config


def test_one_shard_is_the_plain_shuffle():
  a = list(pipeline.sharded_train_batches(103, 10, seed=3, epoch=2, num_shards=1))
  b = list(pipeline.train_batches(103, 10, seed=3, epoch=2))
  assert len(a) == len(b) == 10
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)


def test_sharded_batches_take_equal_blocks_from_each_shard():
  n, bs, k = 103, 12, 4
  batches = list(pipeline.sharded_train_batches(n, bs, seed=0, epoch=0, num_shards=k))
  assert len(batches) == pipeline.num_sharded_train_steps(n, bs, k) == (n // k) // (bs // k) == 8
  seen = np.concatenate(batches)
  assert len(np.unique(seen)) == len(seen)  # no row twice in an epoch
  for b in batches:
    assert b.shape == (bs,)
    for s in range(k):  # block s of every batch comes from shard s
      np.testing.assert_array_equal(b[s * 3:(s + 1) * 3] % k, s)
  other = np.concatenate(list(pipeline.sharded_train_batches(n, bs, seed=0, epoch=1, num_shards=k)))
  assert not np.array_equal(seen, other)  # a new shuffle every epoch
  again = np.concatenate(list(pipeline.sharded_train_batches(n, bs, seed=0, epoch=0, num_shards=k)))
  np.testing.assert_array_equal(seen, again)


@pytest.mark.parametrize("n, bs, k, needle", [(100, 10, 3, "multiple of data.num_shards=3"),
                                              (10, 12, 4, "leaves 2 training samples per shard")])
def test_bad_shard_settings(n, bs, k, needle):
  with pytest.raises(ConfigError, match=needle):
    pipeline.num_sharded_train_steps(n, bs, k)


def test_each_process_holds_only_its_shards(monkeypatch):
  n, bs, k = 50, 8, 4
  images = np.arange(n, dtype=np.uint8)[:, None, None, None] * np.ones((1, 2, 2, 3), np.uint8)
  labels = np.arange(n) % 7
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  held = []
  for p in (0, 1):
    monkeypatch.setattr(jax, "process_index", lambda p=p: p)
    d = feed.process_data(images, labels, num_shards=k)
    assert len(d.rows) == 2 * (n // k) and d.images.shape[0] == len(d.rows)
    np.testing.assert_array_equal(np.unique(d.rows % k), [2 * p, 2 * p + 1])
    for b in pipeline.sharded_train_batches(n, bs, seed=1, epoch=0, num_shards=k):
      x, y = d.take(b[mesh_lib.local_slice(bs)])  # its block of every batch is in its own rows
      np.testing.assert_array_equal(x[:, 0, 0, 0], b[mesh_lib.local_slice(bs)])
      np.testing.assert_array_equal(y, labels[b[mesh_lib.local_slice(bs)]])
    with pytest.raises(ValueError, match="does not hold rows"):
      d.take(np.array([2 if p == 0 else 0]))  # a row of the other process's shards
    held.append(set(d.rows.tolist()))
  assert not held[0] & held[1]
  with pytest.raises(ConfigError, match="data.num_shards=3 must be 1 or a multiple of the process count 2"):
    feed.process_data(images, labels, num_shards=3)
  one = feed.process_data(images, labels, num_shards=1)  # unsharded: every process holds everything
  assert len(one.rows) == n


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_prefetcher_keeps_order_and_counts_waiting(depth):
  def slow(i):
    time.sleep(0.02)
    return i * 10
  p = feed.Prefetcher(range(6), slow, depth)
  assert list(p) == [0, 10, 20, 30, 40, 50]
  assert p.wait_seconds > 0.01  # the consumer never does the work itself, but waits for the first batch


def test_prefetcher_reraises_and_stops():
  def bad(i):
    if i == 2:
      raise RuntimeError("broken batch 2")
    return i
  p = feed.Prefetcher(range(5), bad, 2)
  with pytest.raises(RuntimeError, match="broken batch 2"):
    list(p)
  p = feed.Prefetcher(range(10**6), lambda i: i, 2)  # abandoned early: the thread must end
  assert next(p) == 0
  p.close()
  assert not any(t.name == "batch-prefetch" and t.is_alive() for t in threading.enumerate())
  with pytest.raises(ConfigError, match="train.prefetch=-1"):
    feed.Prefetcher(range(3), lambda i: i, -1)


def test_run_epoch_sums_metrics_on_device():
  n, bs = 40, 8
  images = np.random.default_rng(0).integers(0, 255, (n, 4, 4, 3), dtype=np.uint8)
  labels = np.arange(n) % 3
  data = feed.process_data(images, labels)
  mesh = mesh_lib.make_mesh()

  @jax.jit
  def step(total, x, y):
    s = jnp.sum(x.astype(jnp.float32))
    return total + s, {"pixels": s, "label_sum": jnp.sum(y), "count": jnp.asarray(y.shape[0])}

  total, stats = feed.run_epoch(step, jnp.zeros(()), feed.ArrayFeed(data, mesh, bs, seed=0), 0,
                                postfix=lambda s: {"n": str(s["count"])}, log_every=2, prefetch=2)
  assert stats.steps == 5 and stats.sums["count"] == n
  assert stats.sums["label_sum"] == labels.sum()
  np.testing.assert_allclose(stats.sums["pixels"], images.astype(np.float64).sum(), rtol=1e-6)
  np.testing.assert_allclose(float(total), stats.sums["pixels"], rtol=1e-6)
  assert 0 <= stats.data_wait_fraction <= 1


def test_bfloat16_training_keeps_float32_params(tmp_path):
  losses = {}
  for dtype in ("float32", "bfloat16"):
    c = tiny_config(**{"train.dtype": dtype, "train.epochs": 1, "data.num_shards": 2})
    badnets.train(c, str(tmp_path / dtype))
    record = json.loads((tmp_path / dtype / "metrics.jsonl").read_text().splitlines()[-1])
    losses[dtype] = record["train_loss"]
    assert 0 <= record["data_wait_fraction"] < 1
  # bfloat16 compute changes the numbers a little, not the training.
  assert 0 < abs(losses["bfloat16"] - losses["float32"]) < 0.05, losses
  from backdoor_jax.train import restore
  run = restore.load_run(str(tmp_path / "bfloat16"))
  assert {x.dtype for x in jax.tree_util.tree_leaves(run.variables)} == {jnp.dtype(jnp.float32)}
  with pytest.raises(ConfigError, match="train.dtype"):
    experiment.build_experiment(tiny_config(**{"train.dtype": "float64"}))
