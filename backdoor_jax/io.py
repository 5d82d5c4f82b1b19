"""Atomic file output: a crash never leaves a half-written results file."""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Iterable


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


def write_json_atomic(path: str, obj: Any) -> None:
  """Writes ``obj`` as indented JSON, atomically."""
  write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=True, default=_default) + "\n").encode())


def write_jsonl_atomic(path: str, records: Iterable[dict[str, Any]]) -> None:
  """Rewrites a whole JSON-lines file atomically (one record per line)."""
  text = "".join(json.dumps(r, sort_keys=True, default=_default) + "\n" for r in records)
  write_bytes_atomic(path, text.encode())


def read_json(path: str) -> Any:
  with open(path, encoding="utf-8") as f:
    return json.load(f)
