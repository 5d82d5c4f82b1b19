"""What every absl launcher shares: quiet library logs, one-line errors, flag parsing.

A launcher ends in ``cli.run_app(main)`` instead of ``app.run(main)``. Then every bad
command line stops with exactly one ``error:`` line on stderr and exit code 2, never a
traceback: an unknown flag or config key (naming the nearest valid one), a missing or
failing config file, a value of the wrong type, a stray positional argument, and any
config value that :mod:`backdoor_jax.config_checks` refuses (NaN, seeds out of range,
``epochs=0``, negative clipping, ...). All of that happens before any data is loaded.
"""
from __future__ import annotations

import difflib
import importlib.util
import logging as logging_std
import os
import re
import sys
from typing import Any, Callable, Sequence

from absl import logging

EXIT_BAD_INPUT = 2


class _QuietLibraries(logging_std.Filter):
  """Drops the INFO chatter of orbax's checkpoint internals; keeps warnings and our own lines."""

  def filter(self, record: logging_std.LogRecord) -> bool:
    return record.levelno >= logging_std.WARNING or "orbax" not in record.pathname


def quiet_library_logs() -> None:
  logging.get_absl_handler().addFilter(_QuietLibraries())


def exit_with_error(message: str) -> None:
  """Prints ``error: message`` (one line) on stderr and exits with code 2."""
  print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
  sys.exit(EXIT_BAD_INPUT)


def run_or_exit(fn: Callable[[], Any]) -> Any:
  """Runs ``fn``; a ConfigError (bad user input) becomes one ``error:`` line and exit code 2."""
  from backdoor_jax.errors import ConfigError
  try:
    return fn()
  except ConfigError as e:
    logging.error("%s", e)
    exit_with_error(str(e))


def _or_exit(fn: Callable[[], Any]) -> Any:
  """Like :func:`run_or_exit`, without the log record (logging is not set up while parsing flags)."""
  from backdoor_jax.errors import ConfigError
  try:
    return fn()
  except ConfigError as e:
    exit_with_error(str(e))


def _first_line(e: BaseException) -> str:
  text = str(e).strip()
  if isinstance(e, KeyError) and len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":  # the key's repr
    text = text[1:-1].replace("\\n", "\n")
  return text.splitlines()[0][:300] if text else type(e).__name__


def _config_flag_names() -> list[str]:
  from absl import flags
  from ml_collections.config_flags import config_flags  # the module: is_config_flag is not re-exported
  return [name for name, flag in flags.FLAGS._flags().items()  # pylint: disable=protected-access
          if config_flags.is_config_flag(flag) and name == flag.name]


def _config_file_arg(argv: Sequence[str], name: str) -> str | None:
  """The ``--NAME=path[:variant]`` value on the command line (last one wins), or None."""
  found = None
  for i, arg in enumerate(argv):
    m = re.match(rf"^--?{re.escape(name)}(=(.*))?$", arg)
    if m:
      found = m.group(2) if m.group(1) else (argv[i + 1] if i + 1 < len(argv) else "")
  return found


def _overrides(argv: Sequence[str], name: str) -> list[str]:
  """Dotted keys of the ``--NAME.key=value`` overrides on the command line."""
  keys = []
  for arg in argv:
    m = re.match(rf"^--?(no)?{re.escape(name)}\.([^=]+)", arg)
    if m:
      keys.append(m.group(2))
  return keys


def load_config_file(spec: str, what: str = "--config") -> Any:
  """Loads ``path[:variant]`` like ml_collections does; any failure is one ConfigError.

  Raises:
    ConfigError: the file does not exist, or importing it / calling ``get_config``
      raised (the message keeps that exception's first line).
  """
  from backdoor_jax.errors import ConfigError
  path, _, variant = spec.partition(":")
  if not path:
    raise ConfigError(f"{what} is empty; pass a config file such as configs/badnets.py[:variant]")
  if not os.path.isfile(path):
    hint = "it is a folder" if os.path.isdir(path) else "no such file"
    raise ConfigError(f"config file {path!r} ({what}) cannot be read: {hint}")
  try:
    module_spec = importlib.util.spec_from_file_location("_backdoor_jax_config_check", path)
    if module_spec is None:
      raise ConfigError(f"config file {path!r} ({what}) is not a Python file; pass a .py config such as "
                        "configs/badnets.py")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
      raise ConfigError(f"config file {path!r} ({what}) defines no get_config()")
    return module.get_config(*([variant] if variant else []))
  except ConfigError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (any bug or refusal in a user's config file)
    raise ConfigError(f"config file {spec!r} ({what}) failed: {type(e).__name__}: {_first_line(e)}") from None


def _known_keys(config: Any) -> list[str]:
  from backdoor_jax import config_checks
  leaves = [k for k, _ in config_checks.flatten(config)]
  sections = {".".join(k.split(".")[:i]) for k in leaves for i in range(1, k.count(".") + 1)}
  return sorted(set(leaves) | sections)


def unknown_key_message(key: str, config: Any, flag: str = "config") -> str | None:
  """A one-line message when the dotted ``key`` is not in ``config`` (None when it is)."""
  known = _known_keys(config)
  if key in known:
    return None
  near = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
  if not near:  # compare the last part only: 'lrr' vs every '*.lr'
    last = key.rsplit(".", 1)[-1]
    by_last = {k.rsplit(".", 1)[-1]: k for k in known}
    near = [by_last[m] for m in difflib.get_close_matches(last, list(by_last), n=1, cutoff=0.6)]
  top = sorted({k.split(".")[0] for k in known})
  hint = f"; nearest valid key: {near[0]}" if near else f"; top-level keys: {', '.join(top[:16])}"
  return f"unknown config key {key!r} (--{flag}.{key}){hint}"


def describe_flag_error(error: BaseException, argv: Sequence[str],
                        default_configs: dict[str, str] | None = None) -> str:
  """Turns a flag-parsing exception into one line, diagnosing config files and keys first."""
  from absl import flags
  from backdoor_jax.errors import ConfigError
  names = list(flags.FLAGS._flags())  # pylint: disable=protected-access
  for name in _config_flag_names():
    spec = _config_file_arg(argv, name) or (default_configs or {}).get(name)
    if spec is None:
      continue
    try:
      config = load_config_file(spec, f"--{name}")
    except ConfigError as e:
      return str(e)
    for key in _overrides(argv, name):
      message = unknown_key_message(key, config, name)
      if message:
        return message
    names += [f"{name}.{k}" for k in _known_keys(config)]
  text = _first_line(error)
  m = re.search(r"Unknown command line flag '([^']+)'", text)
  if m:
    near = difflib.get_close_matches(m.group(1), names, n=1, cutoff=0.6)
    near = near or [n for n in names if n.endswith("." + m.group(1))][:1]
    return f"unknown flag --{m.group(1)}" + (f"; did you mean --{near[0]}?" if near else "")
  if isinstance(error, flags.Error):
    return text
  return f"bad command line ({type(error).__name__}): {text}"


def parse_flags_or_exit(argv: Sequence[str], check: Callable[[Any], None] | None = None,
                        default_configs: dict[str, str] | None = None) -> list[str]:
  """absl flag parsing where every failure is one ``error:`` line (exit code 2).

  After parsing, ``check`` (default :func:`config_checks.check_config`) runs on every
  config flag's value.
  """
  from absl import flags
  from ml_collections import config_dict
  from backdoor_jax import config_checks
  try:
    args = flags.FLAGS(list(argv))
  except Exception as e:  # pylint: disable=broad-except  (absl and ml_collections raise many types)
    exit_with_error(describe_flag_error(e, argv, default_configs))
  if len(args) > 1:
    exit_with_error(f"unexpected argument {args[1]!r}; every option is a --flag=value")
  check = config_checks.check_config if check is None else check
  for name in _config_flag_names():
    value = flags.FLAGS[name].value
    if value is None:
      continue
    if not isinstance(value, config_dict.ConfigDict):  # ml_collections defers a missing file's error
      spec = _config_file_arg(argv, name) or (default_configs or {}).get(name, "")
      _or_exit(lambda spec=spec, name=name: load_config_file(spec, f"--{name}"))
      exit_with_error(f"--{name}={spec} did not give a ConfigDict (got {type(value).__name__})")
    _or_exit(lambda value=value: check(value))
  return args


def run_app(main: Callable[[list[str]], Any], *, argv: Sequence[str] | None = None,
            default_config: str | None = None, check: Callable[[Any], None] | None = None,
            workdir_flag: str | None = None, workdir_must_exist: bool = False) -> None:
  """``app.run(main)`` with one-line errors for bad command lines.

  Args:
    main: the launcher's ``main(argv)``.
    argv: the command line (default ``sys.argv``).
    default_config: config file used when ``--config`` is absent. Use this instead of a
      default in ``DEFINE_config_file``, which would load the file (and fail with a
      traceback on a bad override) while the module is still being imported.
    check: run on the parsed config (default ``config_checks.check_config``).
    workdir_flag: a flag naming a folder the launcher writes into; it is checked with
      :func:`io.check_workdir_writable` (not a folder, read-only, full disk) right
      after parsing, before any data is loaded. Nothing is created: a missing folder
      is checked through the folder it would be created in.
    workdir_must_exist: the folder is an existing run (``explain.py``, ``defend.py``):
      when it is missing, the launcher reports that itself.
  """
  from absl import app
  argv = list(sys.argv if argv is None else argv)
  defaults = {}
  if default_config is not None:
    defaults["config"] = default_config
    if _config_file_arg(argv[1:], "config") is None:
      argv.insert(1, f"--config={default_config}")  # before any --config.key override
  sys.argv = argv  # ml_collections reads the --config.key overrides from sys.argv

  def parse(a: list[str]) -> list[str]:
    args = parse_flags_or_exit(a, check, defaults)
    if workdir_flag is not None:
      from absl import flags
      from backdoor_jax import io
      path = flags.FLAGS[workdir_flag].value
      if path and (os.path.exists(path) or not workdir_must_exist):
        _or_exit(lambda: io.check_workdir_writable(path, create=False))
    return args

  app.run(main, argv=argv, flags_parser=parse)
