"""Feeding the train step: this process's rows, prefetched batches, and one epoch loop.

Both trainers (``train.loop`` and ``train.explain_loop``) run their epochs through
:func:`run_epoch`, which

* takes this process's block of every global index batch
  (``pipeline.sharded_train_batches``) and gathers those rows from :class:`ProcessData`,
  the part of the training set this process holds;
* gathers and places the next batches on the mesh in a background thread
  (``prefetch`` batches ahead), and measures how long the step loop waits for them;
* accumulates the step's metrics on the device: nothing is copied to the host inside
  the loop. The host may run at most ``max_in_flight`` steps ahead of the device, and
  the progress bar shows the metrics of the newest step known to be finished, which
  costs no stall.
"""
from __future__ import annotations

import collections
import dataclasses
import queue
import threading
import time
from typing import Any, Callable, Iterable, Iterator

import jax
import numpy as np
from jax.sharding import Mesh
from tqdm import tqdm

from backdoor_jax.data import pipeline
from backdoor_jax.errors import ConfigError
from backdoor_jax.train import mesh as mesh_lib


@dataclasses.dataclass
class ProcessData:
  """The training rows this process holds, addressable by global row index.

  Attributes:
    images: (n_local, H, W, C) uint8 rows, in increasing global order.
    labels: (n_local,) int labels.
    rows: (n_local,) global indices of those rows.
    num_examples: size of the whole training set (all processes).
    num_shards: shards the training set is split into (``data.num_shards``).
  """
  images: np.ndarray
  labels: np.ndarray
  rows: np.ndarray
  num_examples: int
  num_shards: int

  def __post_init__(self):
    self._position = np.full((self.num_examples,), -1, np.int64)
    self._position[self.rows] = np.arange(len(self.rows))

  def take(self, global_idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels of global rows this process holds.

    Raises:
      ValueError: a row belongs to another process's shard (a bug in the caller).
    """
    pos = self._position[global_idx]
    if (pos < 0).any():
      raise ValueError(f"process {jax.process_index()} does not hold rows {global_idx[pos < 0][:5].tolist()}")
    return self.images[pos], self.labels[pos]


def process_data(images: np.ndarray, labels: np.ndarray, num_shards: int = 1) -> ProcessData:
  """Keeps the shards of the training set that this process feeds.

  With ``num_shards == 1`` every process holds every row and feeds its block of each
  global batch. With ``num_shards = k * process_count`` process ``p`` holds shards
  ``p*k .. p*k + k - 1`` only (``1/process_count`` of the rows), and those are exactly
  the rows of its block of every batch of ``pipeline.sharded_train_batches``.

  Raises:
    ConfigError: ``num_shards`` is not 1 or a multiple of the process count.
  """
  n, procs = len(labels), jax.process_count()
  if isinstance(num_shards, bool) or not isinstance(num_shards, (int, np.integer)) or num_shards < 1:
    raise ConfigError(f"data.num_shards={num_shards!r} is invalid; allowed: an integer >= 1")
  if num_shards > 1 and num_shards % procs:
    raise ConfigError(f"data.num_shards={num_shards} must be 1 or a multiple of the process count {procs}")
  if num_shards == 1:
    rows = np.arange(n, dtype=np.int64)
    return ProcessData(images, labels, rows, n, 1)
  k = num_shards // procs
  mine = range(jax.process_index() * k, (jax.process_index() + 1) * k)
  rows = np.sort(np.concatenate([pipeline.shard_rows(n, num_shards, s) for s in mine]))
  return ProcessData(np.ascontiguousarray(images[rows]), np.asarray(labels)[rows], rows, n, num_shards)


_DONE = object()


class Prefetcher:
  """Iterates over placed batches, preparing up to ``depth`` of them in a background thread.

  ``depth == 0`` prepares each batch in the calling thread. ``wait_seconds`` is the time
  the consumer spent waiting for a batch (with no prefetching: the time spent making it).
  """

  def __init__(self, items: Iterable[Any], make: Callable[[Any], Any], depth: int = 2):
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
      raise ConfigError(f"train.prefetch={depth!r} is invalid; allowed: an integer >= 0 (0 = no prefetching)")
    self.wait_seconds = 0.0
    self._items, self._make, self._depth = iter(items), make, depth
    if depth:
      self._queue: queue.Queue = queue.Queue(maxsize=depth)
      self._stop = threading.Event()
      self._thread = threading.Thread(target=self._fill, daemon=True, name="batch-prefetch")
      self._thread.start()

  def _fill(self) -> None:
    try:
      for item in self._items:
        if self._stop.is_set():
          return
        self._queue.put(("ok", self._make(item)))
      self._queue.put(("ok", _DONE))
    except BaseException as e:  # pylint: disable=broad-except  # re-raised in the consumer
      self._queue.put(("error", e))

  def __iter__(self) -> Iterator[Any]:
    return self

  def __next__(self) -> Any:
    t0 = time.perf_counter()
    try:
      if not self._depth:
        return self._make(next(self._items))
      kind, value = self._queue.get()
    finally:
      self.wait_seconds += time.perf_counter() - t0
    if kind == "error":
      raise value
    if value is _DONE:
      raise StopIteration
    return value

  def close(self) -> None:
    """Stops the background thread (it may be blocked on a full queue)."""
    if self._depth:
      self._stop.set()
      while self._thread.is_alive():
        try:
          self._queue.get(timeout=0.05)
        except queue.Empty:
          pass


@dataclasses.dataclass
class EpochStats:
  """What one epoch measured (host values)."""
  sums: dict[str, float]       # the step metrics summed over the epoch
  seconds: float               # wall time of the epoch's step loop
  data_wait_seconds: float     # of which the loop waited for input batches
  steps: int

  @property
  def data_wait_fraction(self) -> float:
    return self.data_wait_seconds / self.seconds if self.seconds > 0 else 0.0


def run_epoch(step: Callable[..., tuple[Any, dict[str, jax.Array]]], state: Any, data: ProcessData, mesh: Mesh,
              *, batch_size: int, seed: int, epoch: int, desc: str = "",
              log_every: int = 10, postfix: Callable[[dict[str, float]], dict[str, str]] | None = None,
              prefetch: int = 2, max_in_flight: int = 2) -> tuple[Any, EpochStats]:
  """Runs one epoch of ``state, metrics = step(state, images, labels)``.

  Args:
    step: a jitted step whose metrics are device scalars including ``count``.
    state: the (replicated) train state; donated to ``step``.
    data: this process's rows (:func:`process_data`).
    mesh: the data mesh the batches are placed on.
    batch_size: global batch size.
    seed, epoch: select the shuffle (``pipeline.sharded_train_batches``).
    desc: progress-bar label.
    log_every: steps between progress-bar updates.
    postfix: host metric sums -> progress-bar fields.
    prefetch: batches prepared ahead in a background thread (0: none).
    max_in_flight: steps the host may dispatch before the device finished them.

  Returns:
    The new state and the epoch's :class:`EpochStats`.
  """
  steps_per_epoch = pipeline.num_sharded_train_steps(data.num_examples, batch_size, data.num_shards)
  local = mesh_lib.local_slice(batch_size)
  block_each_step = jax.default_backend() == "cpu" and jax.device_count() > 1  # NOTES.md: CPU collective hang
  max_in_flight = 1 if block_each_step else max(1, max_in_flight)

  def make(idx: np.ndarray) -> tuple[jax.Array, jax.Array]:
    return mesh_lib.shard_batch(mesh, *data.take(idx[local]))

  batches = Prefetcher(pipeline.sharded_train_batches(data.num_examples, batch_size, seed, epoch, data.num_shards),
                       make, prefetch)
  bar = tqdm(total=steps_per_epoch, desc=desc, unit="step", disable=jax.process_index() != 0,
             dynamic_ncols=True, leave=True)
  sums, finished, in_flight = None, None, collections.deque()
  t0 = time.perf_counter()
  try:
    for i, (x, y) in enumerate(batches):
      state, m = step(state, x, y)
      sums = m if sums is None else jax.tree_util.tree_map(lambda a, b: a + b, sums, m)
      in_flight.append(sums)
      while len(in_flight) >= max_in_flight + (0 if block_each_step else 1):
        finished = jax.block_until_ready(in_flight.popleft())  # an older step: the device is still busy
      if (i + 1) % log_every == 0 or i + 1 == steps_per_epoch:
        if finished is not None and postfix is not None:
          bar.set_postfix(postfix(jax.device_get(finished)))
        bar.update((i + 1) - bar.n)
  finally:
    batches.close()
    bar.close()
  if sums is None:
    raise ConfigError(f"epoch {epoch + 1} has no training step (batch {batch_size}, {data.num_examples} samples)")
  host = {k: float(v) for k, v in jax.device_get(sums).items()}
  seconds = time.perf_counter() - t0
  return state, EpochStats(host, seconds, batches.wait_seconds, steps_per_epoch)
