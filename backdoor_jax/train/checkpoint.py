"""Orbax checkpoints of the train state plus a JSON record of the run so far.

A checkpoint is numbered by the number of completed epochs. Orbax writes each one to a
temporary folder and renames it when complete, so a run killed mid-save leaves the
previous checkpoint intact and a rerun resumes from it. The same holds when a save
fails (disk full, folder turned read-only): :meth:`Checkpointer.save` then raises a
ConfigError saying so and naming the checkpoint that is still intact.
"""
from __future__ import annotations

import errno
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from backdoor_jax.errors import ConfigError


def _with_sharding(leaf: Any) -> jax.ShapeDtypeStruct:
  struct = ocp.utils.to_shape_dtype_struct(leaf)
  if getattr(struct, "sharding", None) is None:
    struct = jax.ShapeDtypeStruct(struct.shape, struct.dtype,
                                  sharding=jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
  return struct


def _os_error(e: BaseException | None) -> OSError | None:
  """The OSError in ``e``'s chain of causes (or ``e`` itself), if any."""
  seen = 0
  while e is not None and seen < 20:
    if isinstance(e, OSError) and e.errno is not None:
      return e
    e = e.__cause__ or e.__context__
    seen += 1
  return None


class Checkpointer:
  """Saves and restores ``(state pytree, json metadata)`` pairs under ``workdir/checkpoints``."""

  def __init__(self, workdir: str, keep: int = 2):
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
      raise ConfigError(f"checkpoint.keep={keep!r} is invalid; allowed: an integer >= 1 (the newest checkpoint "
                        "is always kept)")
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=False))

  def latest(self) -> int | None:
    """Number of the newest complete checkpoint, or None."""
    return self._manager.latest_step()

  def save(self, number: int, tree: Any, meta: dict[str, Any]) -> None:
    """Saves checkpoint ``number``.

    Raises:
      ConfigError: the write failed with an OS error (disk full, not writable); the
        message names the newest checkpoint that is still intact.
    """
    try:
      self._manager.save(number, args=ocp.args.Composite(state=ocp.args.StandardSave(tree),
                                                         meta=ocp.args.JsonSave(meta)), force=True)
      self._manager.wait_until_finished()
    except Exception as e:  # orbax wraps OS errors of its writer threads in other types
      os_error = _os_error(e)
      if os_error is None:
        raise
      self._manager.reload()
      previous = self._manager.latest_step()
      kept = (f"the previous checkpoint {os.path.join(self.directory, str(previous))} is intact and a rerun "
              "resumes from it" if previous is not None else "no earlier checkpoint exists")
      reason = ("the disk is full" if os_error.errno == errno.ENOSPC else
                f"the folder is not writable ({os_error.strerror or os_error})")
      raise ConfigError(f"cannot save checkpoint {number} in {self.directory}: {reason}; {kept}") from None

  def restore(self, number: int, like: Any) -> tuple[Any, dict[str, Any]]:
    """Restores checkpoint ``number`` into the structure (and shardings) of ``like``.

    Leaves of ``like`` without a sharding (e.g. from ``jax.eval_shape``) are restored
    onto this process's first device, whatever topology the checkpoint was saved from
    (a multi-host run can be analysed on one machine).
    """
    abstract = jax.tree_util.tree_map(_with_sharding, like)
    try:
      out = self._manager.restore(number, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                  meta=ocp.args.JsonRestore()))
    except Exception as e:  # orbax raises many types for truncated / foreign files
      raise ConfigError(
          f"checkpoint {os.path.join(self.directory, str(number))} cannot be restored "
          f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); it is corrupted or from another "
          f"model. Delete that folder to fall back to an older checkpoint, or use a new --workdir.") from None
    return out["state"], dict(out["meta"])

  def restore_meta(self, number: int) -> dict[str, Any]:
    """Only the JSON metadata of checkpoint ``number``."""
    try:
      out = self._manager.restore(number, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    except Exception as e:
      raise ConfigError(f"checkpoint {os.path.join(self.directory, str(number))} has no readable metadata "
                        f"({type(e).__name__}); it is corrupted or not a backdoor-jax checkpoint") from None
    return dict(out["meta"])

  def close(self) -> None:
    self._manager.close()
