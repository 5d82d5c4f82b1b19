"""What every absl launcher shares: quiet library logs and one-line errors."""
from __future__ import annotations

import logging as logging_std
import sys
from typing import Any, Callable

from absl import logging


class _QuietLibraries(logging_std.Filter):
  """Drops the INFO chatter of orbax's checkpoint internals; keeps warnings and our own lines."""

  def filter(self, record: logging_std.LogRecord) -> bool:
    return record.levelno >= logging_std.WARNING or "orbax" not in record.pathname


def quiet_library_logs() -> None:
  logging.get_absl_handler().addFilter(_QuietLibraries())


def run_or_exit(fn: Callable[[], Any]) -> Any:
  """Runs ``fn``; a ConfigError (bad user input) becomes one ``error:`` line and exit code 2."""
  from backdoor_jax.errors import ConfigError
  try:
    return fn()
  except ConfigError as e:
    logging.error("%s", e)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
