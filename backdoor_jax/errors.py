"""One exception type for bad user input, so launchers can print it as one line."""


class ConfigError(ValueError):
  """A user-supplied value is invalid; the message names the value and what is allowed."""


def check_choice(what: str, value, allowed) -> None:
  """Raises ConfigError unless ``value`` is one of ``allowed``."""
  allowed = tuple(allowed)
  if value not in allowed:
    raise ConfigError(f"unknown {what} {value!r}; allowed: {', '.join(map(str, allowed))}")
