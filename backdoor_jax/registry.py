"""Named plug-ins: the one registry type behind trigger kinds, explanation methods,
defenses and training recipes.

Each plug-in family keeps a :class:`Registry` and a small module of its own that says
what an entry is (``triggers.registry``, ``explain.registry``, ``defenses.registry``,
``train.recipes.registry``); this class only holds the names, refuses a second entry of
the same name unless it is replaced on purpose, and gives one-line errors that list the
registered names.
"""
from __future__ import annotations

import types
from typing import Generic, Mapping, TypeVar

from backdoor_jax.errors import ConfigError, check_choice

T = TypeVar("T")


class Registry(Generic[T]):
  """Entries of one plug-in family by name, in registration order.

  Attributes:
    what: how messages name an entry ("trigger kind", "defense", ...).
    entries: a live, read-only view of the entries (later registrations show up).
  """

  def __init__(self, what: str):
    self.what = what
    self._entries: dict[str, T] = {}
    self.entries: Mapping[str, T] = types.MappingProxyType(self._entries)

  def add(self, name: str, entry: T, *, replace: bool = False) -> T:
    """Registers ``entry`` as ``name`` and returns it.

    Raises:
      ConfigError: ``name`` is taken and ``replace`` is False.
    """
    if name in self._entries and not replace:
      raise ConfigError(f"{self.what} {name!r} is already registered; pick another name or pass replace=True")
    self._entries[name] = entry
    return entry

  def get(self, name: str) -> T:
    """The entry ``name``; ConfigError listing the registered names when there is none."""
    check_choice(self.what, name, self._entries)
    return self._entries[name]

  def remove(self, name: str, *, missing_ok: bool = False) -> None:
    """Removes ``name`` (a test's or notebook's own entry)."""
    if missing_ok and name not in self._entries:
      return
    self.get(name)
    del self._entries[name]

  def names(self) -> tuple[str, ...]:
    return tuple(self._entries)

  def __contains__(self, name: object) -> bool:
    return name in self._entries
