"""Defenses by name: each declares its run function, its config section and its summary row.

A defense is a :class:`Defense`; it joins the registry with :func:`register` (or the
:func:`defense` decorator on its run function), at the bottom of the file that
defines it. The built-in ones register themselves when ``backdoor_jax.defenses`` is
imported; a user-defined one registers the same way from any module, and
``defenses.defend_run`` / ``defend_all`` then run it (``docs/extending.md`` has a
worked example).

* ``run(ctx, out_dir) -> record``: ``ctx`` is a ``common.DefenseContext`` (the loaded
  run, its data, a clean validation split, jitted model helpers); the settings are
  ``ctx.config[section]``; the record (a JSON-ready dict) becomes
  ``WORKDIR/defenses/NAME/report.json`` with the shared facts added, and figures may be
  written into ``out_dir``.
* ``summary(record) -> dict``: the defense's part of its row in ``summary.md``:
  ``verdict`` (a short sentence), optionally ``detection_rate`` and
  ``false_positive_rate``, and ``after``: the test-set evaluation of the defended model
  (``common.evaluate``), or None when the defense does not change the model.
* ``defaults() -> ConfigDict``: the section's default settings, used when a config has
  no such section (the built-in sections are in ``backdoor_jax/configs/defenses.py``).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, KeysView, Mapping

from ml_collections import config_dict

from backdoor_jax.errors import ConfigError
from backdoor_jax.registry import Registry

RunFn = Callable[..., dict[str, Any]]
SummaryFn = Callable[[dict[str, Any]], dict[str, Any]]


@dataclasses.dataclass(frozen=True)
class Defense:
  """A defense.

  Attributes:
    name: registry name (``--defense=NAME``; reports go to ``WORKDIR/defenses/NAME``).
    run: ``run(ctx, out_dir) -> record``.
    summary: ``summary(record) -> {'verdict', ['detection_rate', 'false_positive_rate'], 'after'}``.
    section: the config section holding its settings (default: ``name``).
    defaults: ``() -> ConfigDict`` of the section's defaults, or None.
  """
  name: str
  run: RunFn
  summary: SummaryFn
  section: str = ""
  defaults: Callable[[], config_dict.ConfigDict] | None = None

  def __post_init__(self):
    if not isinstance(self.name, str) or not self.name.isidentifier():
      raise ConfigError(f"defense name {self.name!r} is invalid; allowed: a Python identifier")
    if not self.section:
      object.__setattr__(self, "section", self.name)
    for what in ("run", "summary"):
      if not callable(getattr(self, what)):
        raise ConfigError(f"defense {self.name!r}: {what} must be callable")
    if self.defaults is not None and not callable(self.defaults):
      raise ConfigError(f"defense {self.name!r}: defaults must be callable (returning a ConfigDict) or None")


_REGISTRY: Registry[Defense] = Registry("defense")
# Live, read-only views (registration order): a defense registered later shows up in them.
DEFENSES: Mapping[str, Defense] = _REGISTRY.entries
NAMES: KeysView[str] = DEFENSES.keys()


def register(d: Defense, *, replace: bool = False) -> Defense:
  """Adds ``d`` to the registry and returns it.

  Raises:
    ConfigError: the name is taken (pass ``replace=True`` to override it on purpose),
      or it is the reserved name ``all``.
  """
  if not isinstance(d, Defense):
    raise ConfigError(f"register takes a defenses.registry.Defense; got {type(d).__name__}")
  if d.name == "all":
    raise ConfigError("defense name 'all' is reserved (it runs every defense)")
  return _REGISTRY.add(d.name, d, replace=replace)


def defense(name: str, *, summary: SummaryFn, section: str = "",
            defaults: Callable[[], config_dict.ConfigDict] | None = None,
            replace: bool = False) -> Callable[[RunFn], RunFn]:
  """Decorator form of :func:`register` for a run function (returned unchanged)."""
  def deco(run: RunFn) -> RunFn:
    register(Defense(name, run, summary, section, defaults), replace=replace)
    return run
  return deco


def unregister(name: str) -> None:
  """Removes a defense (e.g. a test's own); unknown names raise ConfigError."""
  _REGISTRY.remove(name)


def get(name: str) -> Defense:
  """The registered defense ``name``.

  Raises:
    ConfigError: unknown name (lists the registered ones).
  """
  return _REGISTRY.get(name)


def with_sections(config: config_dict.ConfigDict, names: Any) -> config_dict.ConfigDict:
  """``config``, plus the default section of each defense in ``names`` it lacks (a copy if any is added).

  Raises:
    ConfigError: a defense whose section is missing and that declares no defaults.
  """
  missing = [get(n) for n in names if get(n).section not in config]
  if not missing:
    return config
  out = config_dict.ConfigDict(config.to_dict())  # unlocked copy; the caller's config is left alone
  for d in missing:
    if d.defaults is None:
      raise ConfigError(f"the defenses config has no section {d.section!r} for defense {d.name!r}; add one")
    out[d.section] = d.defaults()
  return out
