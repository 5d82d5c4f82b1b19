"""The training feed for datasets that do not fit in host memory: records read on demand.

The in-memory path loads the whole training split (``sources.load_dataset``), poisons it
(``poison.poison_train_set``) and keeps this process's rows (``train.feed.process_data``).
:class:`StreamingData` gives ``train.feed.run_epoch`` the same object interface
(``take(global_idx)``, ``rows``, ``num_examples``, ``num_shards``) without ever holding
the images: a batch's records are read, decoded and resized when the batch is made, and
the poisoning decisions are applied to the rows being poisoned as they are read.

* Records come from a random-access source (``data.records``) wrapped in a ``grain.MapDataset``: a split of a
  prepared tfds dataset (``tfds.data_source``, ArrayRecord files) or an image folder
  (``class_name/*.png|jpg|...``, read with PIL). ``take`` decodes a batch's records
  from a pool of threads (PIL and ArrayRecord release the GIL).
* Poisoning decisions are made once, from the labels alone (:func:`make_poison_plan`),
  with the same functions and keys as ``poison_train_set``: the same rows are poisoned,
  relabelled and (WaNet noise mode) cross-warped, and ``take`` returns byte-identical
  batches to the in-memory path. Only the labels of the split are read up front; for tfds
  the image feature is not decoded for that pass where the stored records allow it.
* A process only ever reads the rows of its own shards (``rows``), as ``process_data``
  keeps only those rows in memory.

Not supported in streaming mode (ConfigError): clean-label PGD perturbations
(``poison.adv_eps``), whose surrogate is fitted on the whole in-memory training set.

grain and tensorflow_datasets are imported inside the functions that use them, so the
package imports on machines without them.
"""
from __future__ import annotations

import concurrent.futures
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

from backdoor_jax import poison as poison_lib
from backdoor_jax.data import images as image_lib
from backdoor_jax.data import pipeline
from backdoor_jax.data.records import RecordSource, check_image_size, open_split, read_records
from backdoor_jax.errors import ConfigError
from backdoor_jax.triggers.base import apply_trigger, check_trigger

# ----------------------------------------------------------------------------------
# Poisoning decisions, made once from the labels, applied to rows as they are read.


@chex.dataclass(frozen=True)
class PoisonPlan:
  """Which training rows are poisoned, as ``poison.poison_train_set`` decides.

  Attributes:
    trigger: the trigger (any kind) for the images at the size they are poisoned at.
    noise_key: key of the WaNet noise-mode warps (row ``i`` uses ``fold_in(noise_key, i)``).
    poisoned: sorted int64 rows that get the trigger and their attack label.
    attack_labels: the attack label of each of ``poisoned``.
    cross: sorted int64 rows warped in WaNet noise mode (labels kept); empty otherwise.
  """
  trigger: Any
  noise_key: jax.Array
  poisoned: np.ndarray
  attack_labels: np.ndarray
  cross: np.ndarray


def make_poison_plan(key: chex.PRNGKey, labels: Any, trigger: Any, *, target: int | None, mode: str,
                     num_classes: int, rate: float | None = None, count: int | None = None,
                     cross_ratio: float = 0.0) -> PoisonPlan:
  """The decisions of ``poison.poison_train_set(key, images, labels, trigger, ...)``, from labels only.

  Uses the same functions and keys: ``choose_poison_indices(key, ...)``,
  ``choose_cross_indices(fold_in(key, 1), ...)`` and noise warps keyed by
  ``fold_in(fold_in(key, 2), row)``.

  Raises:
    ConfigError: for bad settings (as ``poison_train_set`` would), or ``cross_ratio``
      without a WaNet trigger.
  """
  check_trigger(trigger)
  labels = np.asarray(labels)
  poisoned = poison_lib.choose_poison_indices(key, labels, rate=rate, target=target, mode=mode,
                                              num_classes=num_classes, count=count)
  if cross_ratio and not trigger.has_cross_mode:
    raise ConfigError(f"cross_ratio {cross_ratio!r} (WaNet noise mode) needs a 'wanet' trigger or another kind "
                      f"with a cross mode; got a {trigger.KIND!r} trigger (set cross_ratio=0)")
  cross = poison_lib.choose_cross_indices(jax.random.fold_in(key, 1), labels.shape[0], poisoned, cross_ratio)
  attack = poison_lib.poison_target_labels(labels[poisoned], mode=mode, target=target, num_classes=num_classes)
  return PoisonPlan(trigger=trigger, noise_key=jax.random.fold_in(key, 2), poisoned=poisoned,
                    attack_labels=np.asarray(attack, np.int32), cross=cross)


_apply_jit = jax.jit(apply_trigger)
_cross_jit = jax.jit(lambda trigger, images, keys: trigger.apply_cross(images, keys))


def _bucket(n: int) -> int:
  """Padded batch length (the next power of two): few shapes, so few compilations."""
  return 1 << max(0, int(n) - 1).bit_length()


def _pad(x: jax.Array | np.ndarray, length: int) -> Any:
  extra = length - x.shape[0]
  if not extra:
    return x
  return jnp.concatenate([x, jnp.repeat(x[:1], extra, axis=0)]) if isinstance(x, jax.Array) else np.concatenate(
      [x, np.zeros((extra,) + x.shape[1:], x.dtype)])


def _member(sorted_rows: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """``(hit, pos)``: which ``rows`` are in ``sorted_rows``, and where."""
  pos = np.searchsorted(sorted_rows, rows)
  hit = pos < len(sorted_rows)
  hit[hit] = sorted_rows[pos[hit]] == rows[hit]
  return hit, pos


def apply_poison_plan(plan: PoisonPlan, rows: np.ndarray, images: np.ndarray,
                      labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Poisons the rows of a batch read from the clean dataset, as ``poison_train_set`` would.

  Args:
    plan: the decisions (:func:`make_poison_plan`).
    rows: ``(B,)`` global rows of the batch.
    images: ``(B, H, W, 3)`` uint8 clean images of those rows (modified copy returned).
    labels: ``(B,)`` clean labels.

  Returns:
    ``(images, labels)`` with the poisoned rows triggered and relabelled and the cross
    rows noise-warped.
  """
  images, labels = np.array(images, copy=True), np.array(labels, copy=True)
  hit, pos = _member(plan.poisoned, rows)
  if hit.any():
    chosen = images[hit]
    m = chosen.shape[0]
    images[hit] = np.asarray(_apply_jit(plan.trigger, _pad(chosen, _bucket(m))))[:m]
    labels[hit] = plan.attack_labels[pos[hit]]
  cross, _ = _member(plan.cross, rows)
  if cross.any():
    chosen = images[cross]
    m = chosen.shape[0]
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(plan.noise_key, jnp.asarray(rows[cross], jnp.uint32))
    images[cross] = np.asarray(_cross_jit(plan.trigger, _pad(chosen, _bucket(m)), _pad(keys, _bucket(m))))[:m]
  return images, labels


# ----------------------------------------------------------------------------------
# The ProcessData-compatible feed.


class StreamingData:
  """This process's training rows, read on demand; a drop-in for ``train.feed.ProcessData``.

  Attributes:
    rows: ``(n_local,)`` global rows this process feeds (its shards).
    num_examples: size of the whole training set (all processes).
    num_shards: shards the training set is split into.
    labels: ``(n_local,)`` int32 training labels of ``rows`` (poisoned rows relabelled).
    is_poisoned: ``(n_local,)`` bool, which of ``rows`` carry the trigger.
    num_poisoned: poisoned rows in the whole training set.
    image_shape: ``(H, W, 3)`` of every image ``take`` returns.
    num_classes, class_names, mean, std: from the source.
  """

  def __init__(self, source: RecordSource, plan: PoisonPlan | None = None, *, num_shards: int = 1,
               image_size: int | None = None, num_threads: int | None = None):
    """Args:
      source: the training split (:func:`folder_source`, :func:`tfds_source`).
      plan: the poisoning decisions over ``source.labels`` (None: a clean feed).
      num_shards: ``data.num_shards``.
      image_size: resize to this side after poisoning (``poison.apply_at_size``: the
        source reads at the poisoning size); None keeps ``source.image_size``.
      num_threads: threads decoding a batch (default ``images.num_io_threads()``).
    """
    self.source, self.plan = source, plan
    self.num_examples = len(source)
    self.rows = pipeline.process_rows(self.num_examples, num_shards)
    self.num_shards = int(num_shards)
    self.image_size = source.image_size if image_size is None else check_image_size(image_size)
    self.num_threads = num_threads or image_lib.num_io_threads()
    self._position = np.full((self.num_examples,), -1, np.int64)
    self._position[self.rows] = np.arange(len(self.rows))
    self._pool: concurrent.futures.ThreadPoolExecutor | None = None
    labels = source.labels[self.rows].copy()
    self.is_poisoned = np.zeros(len(self.rows), bool)
    if plan is not None:
      hit, pos = _member(plan.poisoned, self.rows)
      labels[hit] = plan.attack_labels[pos[hit]]
      self.is_poisoned = hit
    self.labels = labels
    self.num_poisoned = 0 if plan is None else len(plan.poisoned)
    self.num_classes, self.class_names = source.num_classes, source.class_names
    self.mean, self.std = source.mean, source.std

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return (self.image_size, self.image_size, 3)

  def take(self, global_idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reads, decodes, poisons and resizes the records of global rows this process holds.

    Returns:
      ``(images uint8 (B, S, S, 3), labels int32 (B,))``, byte-identical to the
      in-memory path's rows.

    Raises:
      ValueError: a row belongs to another process's shard (a bug in the caller).
    """
    global_idx = np.asarray(global_idx, np.int64)
    inside = (global_idx >= 0) & (global_idx < self.num_examples)
    pos = np.where(inside, self._position[np.clip(global_idx, 0, max(self.num_examples - 1, 0))], -1)
    if (pos < 0).any():
      raise ValueError(f"process {jax.process_index()} does not hold rows {global_idx[pos < 0][:5].tolist()}")
    if self._pool is None and self.num_threads > 1:
      self._pool = concurrent.futures.ThreadPoolExecutor(self.num_threads, thread_name_prefix="stream-read")
    images, labels = read_records(self.source.dataset, self.source.records[global_idx], self.num_threads,
                                   self._pool)
    if self.plan is not None:
      images, labels = apply_poison_plan(self.plan, global_idx, images, labels)
    if self.image_size != images.shape[1]:
      images = image_lib.convert_images(images, self.image_size)
    return images, labels

  def close(self) -> None:
    """Stops the decoding threads (a later ``take`` starts them again)."""
    if self._pool is not None:
      self._pool.shutdown(wait=True)
      self._pool = None


# ----------------------------------------------------------------------------------
# What the engine calls.


def process_data_from_config(name: str, *, path: str | None, data_dir: str | None, image_size: int,
                             seed: int, max_train: int | None, num_shards: int,
                             trigger: Any | None, poison_key: chex.PRNGKey, target: int | None, mode: str,
                             rate: float | None = None, count: int | None = None, cross_ratio: float = 0.0,
                             apply_at_size: int = 0, adv_eps: float = 0.0,
                             num_threads: int | None = None) -> StreamingData:
  """The streaming twin of ``load_dataset`` + ``poison_train_set`` + ``feed.process_data``.

  Args:
    name: ``data.name``; one of :data:`STREAM_SOURCES`.
    path: ``data.path`` (``folder`` only).
    data_dir: ``data.data_dir`` (tfds only).
    image_size: ``data.image_size`` (required).
    seed: the data seed (the ``max_train`` subset), as given to ``load_dataset``.
    max_train: ``data.max_train`` or None.
    num_shards: ``data.num_shards``.
    trigger: the trigger for ``(S, S)`` images, S = ``apply_at_size or image_size``;
      None: no training poisoning (``poison.phase='test_only'``).
    poison_key: the key given to ``poison_train_set``.
    target, mode, rate, count: the poisoning settings (exactly one of rate and count).
    cross_ratio: WaNet noise mode (``triggers.cross_ratio_from_config``).
    apply_at_size: ``poison.apply_at_size`` (0: poison at ``image_size``).
    adv_eps: ``poison.adv_eps``; must be 0 (clean-label PGD is not streamed).
    num_threads: decoding threads.

  Raises:
    ConfigError: for bad settings, including ``adv_eps`` > 0.
  """
  if adv_eps:
    raise ConfigError(f"poison.adv_eps={adv_eps!r} is not supported with data.stream=True (its surrogate "
                      "is fitted on the whole training set in memory); allowed: 0, or data.stream=False")
  final = check_image_size(image_size)
  if isinstance(apply_at_size, bool) or not isinstance(apply_at_size, (int, np.integer)) or apply_at_size < 0:
    raise ConfigError(f"poison.apply_at_size={apply_at_size!r} is invalid; allowed: 0 or a side in pixels >= 1")
  source = open_split(name, split="train", path=path, data_dir=data_dir, image_size=apply_at_size or final,
                      max_examples=max_train, seed=seed)
  plan = None
  if trigger is not None:
    plan = make_poison_plan(poison_key, source.labels, trigger, target=target, mode=mode,
                            num_classes=source.num_classes, rate=rate, count=count, cross_ratio=cross_ratio)
  return StreamingData(source, plan, num_shards=num_shards, image_size=final, num_threads=num_threads)
