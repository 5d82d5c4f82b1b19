"""Atomic file output: a crash never leaves a half-written results file.

Every JSON file the project writes is strict JSON: a non-finite number (NaN, +-inf, from
numpy or Python) is written as ``null`` with a warning naming its key, never as the
``NaN``/``Infinity`` tokens that strict parsers reject. Work dirs are checked for being
writable before a run starts (:func:`check_workdir_writable`).
"""
from __future__ import annotations

import errno
import json
import math
import os
import tempfile
from typing import Any, Iterable

import numpy as np
from absl import logging

from backdoor_jax.errors import ConfigError

# A run needs room for at least one more checkpoint; below this many free bytes we refuse.
MIN_FREE_BYTES = 64 * 2 ** 20


def write_bytes_atomic(path: str, data: bytes) -> None:
  """Writes ``data`` to ``path`` via a temporary file in the same folder and a rename."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".")
  try:
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give results the usual permissions
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def _default(obj: Any) -> Any:
  if hasattr(obj, "tolist"):
    return obj.tolist()
  if isinstance(obj, tuple):
    return list(obj)
  raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def finite_json(obj: Any, where: str = "", _found: list[str] | None = None) -> Any:
  """``obj`` with every non-finite float (Python or numpy, also inside arrays) replaced by None.

  Logs one warning naming the keys (``where`` prefixes them, e.g. the file name).
  """
  top = _found is None
  found: list[str] = [] if top else _found
  if isinstance(obj, dict):
    out: Any = {k: finite_json(v, f"{where}.{k}" if where else str(k), found) for k, v in obj.items()}
  elif isinstance(obj, (list, tuple)):
    out = [finite_json(v, f"{where}[{i}]", found) for i, v in enumerate(obj)]
  elif isinstance(obj, (np.ndarray, np.generic)):
    out = finite_json(obj.tolist(), where, found)
  elif isinstance(obj, float) and not math.isfinite(obj):
    found.append(where or "(value)")
    out = None
  else:
    out = obj
  if top and found:
    logging.warning("non-finite value(s) written as null: %s", ", ".join(found[:10]))
  return out


def dumps_strict(obj: Any, where: str = "", **kwargs: Any) -> str:
  """``json.dumps`` that never emits NaN/Infinity (see :func:`finite_json`)."""
  return json.dumps(finite_json(obj, where), allow_nan=False, default=_default, **kwargs)


def write_json_atomic(path: str, obj: Any) -> None:
  """Writes ``obj`` as indented strict JSON (non-finite numbers become null), atomically."""
  name = os.path.basename(path)
  write_bytes_atomic(path, (dumps_strict(obj, name, indent=2, sort_keys=True) + "\n").encode())


def write_jsonl_atomic(path: str, records: Iterable[dict[str, Any]]) -> None:
  """Rewrites a whole JSON-lines file atomically (one strict-JSON record per line)."""
  name = os.path.basename(path)
  text = "".join(dumps_strict(r, f"{name}:{i + 1}", sort_keys=True) + "\n" for i, r in enumerate(records))
  write_bytes_atomic(path, text.encode())


def _existing_ancestor(path: str) -> str:
  while not os.path.exists(path):
    parent = os.path.dirname(path)
    if parent == path:
      break
    path = parent
  return path


def check_workdir_writable(path: str, *, create: bool = True, min_free_bytes: int = MIN_FREE_BYTES) -> None:
  """Refuses a work dir that is not a folder, cannot be created or written, or has no space.

  Args:
    path: the work dir.
    create: make the folder when missing; False: check, without creating anything,
      the nearest existing folder above it (where it would be created).
    min_free_bytes: refuse when the file system has less free space than this.

  Raises:
    ConfigError: one line naming the folder and the reason.
  """
  path = os.path.abspath(os.path.expanduser(path))
  if os.path.exists(path) and not os.path.isdir(path):
    raise ConfigError(f"work dir {path} is not a folder (a file of that name exists); pass a folder path")
  if not os.path.exists(path):
    ancestor = _existing_ancestor(path)
    if not os.path.isdir(ancestor):
      raise ConfigError(f"work dir {path} cannot be created: {ancestor} is a file, not a folder")
    if create:
      try:
        os.makedirs(path, exist_ok=True)
      except OSError as e:
        raise ConfigError(f"work dir {path} cannot be created: {e.strerror or e}") from None
  probe_dir = path if os.path.isdir(path) else _existing_ancestor(path)
  try:
    stats = os.statvfs(probe_dir)
    free = stats.f_bavail * stats.f_frsize
  except (OSError, AttributeError):  # no statvfs (Windows) or an odd file system: rely on the test write
    free = None
  if free is not None and free < min_free_bytes:
    raise ConfigError(f"disk full: {free / 2 ** 20:.1f} MiB free on the file system of work dir {path} "
                      f"(need at least {min_free_bytes / 2 ** 20:.0f} MiB); free space or use another --workdir")
  try:
    fd, probe = tempfile.mkstemp(dir=probe_dir, prefix=".write_test.")
    try:
      os.write(fd, b"0" * 4096)
      os.fsync(fd)
    finally:
      os.close(fd)
      os.unlink(probe)
  except OSError as e:
    if e.errno == errno.ENOSPC:
      raise ConfigError(f"disk full: cannot write to work dir {path}; free space or use another --workdir") from None
    where = path if probe_dir == path else f"{path} (in {probe_dir})"
    raise ConfigError(f"work dir {where} is not writable ({e.strerror or e}); use another --workdir") from None


def read_json(path: str) -> Any:
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def read_json_or_error(path: str, what: str = "file") -> Any:
  """:func:`read_json`, with a missing, unreadable or corrupted file as one ConfigError naming it."""
  try:
    return read_json(path)
  except FileNotFoundError:
    raise ConfigError(f"{what} {path} does not exist") from None
  except json.JSONDecodeError as e:
    raise ConfigError(f"{what} {path} is corrupted (not valid JSON: {e.msg} at line {e.lineno}); "
                      "restore it or retrain into a new --workdir") from None
  except (OSError, UnicodeDecodeError) as e:
    raise ConfigError(f"{what} {path} cannot be read ({getattr(e, 'strerror', None) or e})") from None
