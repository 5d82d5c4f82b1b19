"""Feeding the train step: this process's rows, prefetched batches, and one epoch loop.

The engine (``train.engine``) runs every recipe's epochs through :func:`run_epoch`, which

* reads the epoch's batches from a :class:`Feed`; :class:`ArrayFeed` takes this process's
  block of every global index batch (``pipeline.sharded_train_batches``) and gathers those
  rows from :class:`ProcessData`, the part of the training set this process holds;
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
from typing import Any, Callable, Iterable, Iterator, Protocol

import jax
import jax.numpy as jnp
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
  n = len(labels)
  rows = pipeline.process_rows(n, num_shards)
  if num_shards == 1:
    return ProcessData(images, labels, rows, n, 1)
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
  sums: dict[str, Any]         # the step metrics summed over the epoch (arrays for stacked models)
  seconds: float               # wall time of the epoch's step loop
  data_wait_seconds: float     # of which the loop waited for input batches
  steps: int                   # steps run (fewer than the epoch's when it stopped early)
  first_nonfinite_step: int | None = None  # 1-based step of the epoch whose loss was NaN/inf

  @property
  def data_wait_fraction(self) -> float:
    return self.data_wait_seconds / self.seconds if self.seconds > 0 else 0.0


class Feed(Protocol):
  """Where a recipe's batches come from: index items per epoch, and how one item is placed."""
  steps_per_epoch: int

  def items(self, epoch: int) -> Iterable[Any]:
    """This epoch's batch descriptions (e.g. global index arrays), in order."""

  def make(self, item: Any) -> tuple[Any, ...]:
    """The step's batch arguments for one item, placed on the devices."""


@dataclasses.dataclass
class ArrayFeed:
  """Seeded shuffled batches of a :class:`ProcessData` (in memory or streamed), on a data mesh."""
  data: Any                    # ProcessData, or anything with take / num_examples / num_shards
  mesh: Mesh
  batch_size: int
  seed: int

  @property
  def steps_per_epoch(self) -> int:
    return pipeline.num_sharded_train_steps(self.data.num_examples, self.batch_size, self.data.num_shards)

  def items(self, epoch: int) -> Iterable[np.ndarray]:
    return pipeline.sharded_train_batches(self.data.num_examples, self.batch_size, self.seed, epoch,
                                          self.data.num_shards)

  def make(self, idx: np.ndarray) -> tuple[jax.Array, jax.Array]:
    return mesh_lib.shard_batch(self.mesh, *self.data.take(idx[mesh_lib.local_slice(self.batch_size)]))


_NO_STEP = np.iinfo(np.int32).max


@jax.jit
def _accumulate(sums: Any, metrics: dict[str, jax.Array], first_bad: jax.Array, i: jax.Array):
  """Adds a step's metrics to the running sums and remembers the first step with a non-finite loss."""
  sums = jax.tree_util.tree_map(lambda a, b: a + b, sums, metrics)
  return sums, jnp.where(_nonfinite(metrics) & (first_bad == _NO_STEP), i, first_bad)


def _nonfinite(metrics: dict[str, jax.Array]) -> jax.Array:
  """Whether a step's loss (``loss_sum``, when the step reports one) is NaN or inf."""
  return ~jnp.all(jnp.isfinite(metrics["loss_sum"])) if "loss_sum" in metrics else jnp.asarray(False)


def run_epoch(step: Callable[..., tuple[Any, dict[str, jax.Array]]], state: Any, feed: Feed, epoch: int, *,
              desc: str = "", log_every: int = 10, postfix: Callable[[dict[str, Any]], dict[str, str]] | None = None,
              prefetch: int = 2, max_in_flight: int = 2, progress: bool = True) -> tuple[Any, EpochStats]:
  """Runs one epoch of ``state, metrics = step(state, *feed.make(item))``.

  Args:
    step: a jitted step whose metrics are device arrays including ``count`` and
      ``loss_sum`` (a scalar, or one per stacked model).
    state: the train state; donated to ``step``.
    feed: the batches (:class:`ArrayFeed`, or a recipe's own).
    epoch: selects the shuffle.
    desc: progress-bar label.
    log_every: steps between progress-bar updates (and non-finite checks).
    postfix: host metric sums -> progress-bar fields.
    prefetch: batches prepared ahead in a background thread (0: none).
    max_in_flight: steps the host may dispatch before the device finished them.
    progress: show the progress bar (process 0 only).

  Returns:
    The new state and the epoch's :class:`EpochStats`. A non-finite loss stops the epoch
    at the next progress check; ``first_nonfinite_step`` then names the first bad step.
  """
  steps_per_epoch = feed.steps_per_epoch
  block_each_step = jax.default_backend() == "cpu" and jax.device_count() > 1  # NOTES.md: CPU collective hang
  max_in_flight = 1 if block_each_step else max(1, max_in_flight)
  batches = Prefetcher(feed.items(epoch), feed.make, prefetch)
  bar = tqdm(total=steps_per_epoch, desc=desc, unit="step", disable=not progress or jax.process_index() != 0,
             dynamic_ncols=True, leave=True)
  sums, first_bad, finished, in_flight = None, jnp.asarray(_NO_STEP, jnp.int32), None, collections.deque()
  steps_run = 0
  t0 = time.perf_counter()
  try:
    for i, batch in enumerate(batches):
      state, m = step(state, *batch)
      steps_run = i + 1
      if sums is None:
        sums, first_bad = m, jnp.where(_nonfinite(m), 1, first_bad)
      else:
        sums, first_bad = _accumulate(sums, m, first_bad, jnp.asarray(i + 1, jnp.int32))
      in_flight.append((sums, first_bad))
      while len(in_flight) >= max_in_flight + (0 if block_each_step else 1):
        finished = jax.block_until_ready(in_flight.popleft())  # an older step: the device is still busy
      if (i + 1) % log_every == 0 or i + 1 == steps_per_epoch:
        if finished is not None:
          if int(finished[1]) != _NO_STEP:
            break
          if postfix is not None:
            bar.set_postfix(postfix(jax.device_get(finished[0])))
        bar.update((i + 1) - bar.n)
  finally:
    batches.close()
    bar.close()
  if sums is None:
    raise ConfigError(f"epoch {epoch + 1} has no training step ({steps_per_epoch} steps per epoch)")
  host = jax.device_get(sums)
  host = {k: (float(v) if np.ndim(v) == 0 else np.asarray(v, np.float64)) for k, v in host.items()}
  bad = int(first_bad)
  seconds = time.perf_counter() - t0
  return state, EpochStats(host, seconds, batches.wait_seconds, steps_run, None if bad == _NO_STEP else bad)
