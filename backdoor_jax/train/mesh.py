"""Device mesh and data placement for data-parallel training.

One code path for 1 device, N local devices and several hosts: the train step is a
``jax.jit`` whose inputs carry ``NamedSharding``s on a 1-D ``data`` mesh axis. XLA then
inserts the gradient all-reduce itself, and the loss is the mean over the *global* batch,
so there is no pmap-style ``pmean`` to get wrong (see NOTES.md, gradient scaling).
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from backdoor_jax.errors import ConfigError

DATA_AXIS = "data"


def make_mesh(devices: list[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh over all (global) devices, axis name ``data``."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def check_global_batch(batch_size: int, mesh: Mesh, what: str = "train.batch_size") -> None:
  """Raises ConfigError unless the global batch splits evenly over devices and hosts."""
  n = mesh.devices.size
  if batch_size <= 0 or batch_size % n:
    raise ConfigError(f"{what}={batch_size} must be a positive multiple of the device count {n}")
  if batch_size % jax.process_count():
    raise ConfigError(f"{what}={batch_size} must be a multiple of the process count {jax.process_count()}")


def local_slice(global_batch: int) -> slice:
  """The rows of a global batch that this process feeds."""
  per = global_batch // jax.process_count()
  return slice(jax.process_index() * per, (jax.process_index() + 1) * per)


def shard_batch(mesh: Mesh, *arrays: np.ndarray) -> tuple[jax.Array, ...]:
  """Places this process's rows of a global batch onto the mesh, split along ``data``.

  Each argument holds the process-local rows (on one host: the whole batch).
  """
  sharding = batch_sharding(mesh)
  return tuple(jax.make_array_from_process_local_data(sharding, np.asarray(a)) for a in arrays)


def replicate(mesh: Mesh, tree: Any) -> Any:
  """Puts a pytree (train state, trigger) on every device of the mesh."""
  return jax.device_put(tree, replicated(mesh))


def to_host(tree: Any) -> Any:
  """Global arrays as numpy, complete on every process.

  On one process this is ``jax.device_get``. With several, a batch-sharded array holds
  only this host's rows locally; those are all-gathered (a collective: every process
  must call this at the same point). Replicated arrays are read locally.
  """
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils

  def one(x):
    if not isinstance(x, jax.Array) or x.is_fully_replicated:
      return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))

  return jax.tree_util.tree_map(one, tree)
