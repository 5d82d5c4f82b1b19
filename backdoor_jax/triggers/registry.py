"""The trigger registry: each kind declares its name, its config section and its builder.

A trigger config (``c.trigger``) holds::

  kind                            the kind used: a registered name (:func:`trigger_kinds`)
  size, position, color, margin   patch settings shared by the kinds that place or colour
                                  something (patches, ``blend`` with region 'patch', moire lines)
  seed                            random patterns: -1 = from the run's key, >= 0 fixes them
  <kind>                          the kind's own section, e.g. ``trigger.wanet.k``; only kinds
                                  with settings of their own have one

A config names only the kinds it uses. The chosen kind's section must be there (the error
says how to add it: ``c.trigger.wanet = triggers.default_config('wanet')``); missing fields
of a section take the kind's defaults. Sections of *other* registered kinds are ignored
(a sweep over ``trigger.kind`` carries one per kind it visits); any other key, in the
config or in the section, is rejected as a typo.

Adding a kind is one module that builds the trigger and registers itself::

  @register_trigger("mykind", defaults={"strength": 0.5})
  def build(args: TriggerArgs) -> MyTrigger:
    return MyTrigger(...)   # args.image_hw, args.key, args.options["strength"], args.size, ...

Modules inside ``backdoor_jax/triggers/`` are imported (and so registered) with the
package; a kind defined elsewhere is registered when its module is imported.
"""
from __future__ import annotations

import dataclasses
import re
import types
from typing import Any, Callable, Mapping, NamedTuple

import chex
import jax
from ml_collections import config_dict

from backdoor_jax.errors import ConfigError
from backdoor_jax.registry import Registry
from backdoor_jax.triggers.base import cfg_get, cfg_keys, check_image_hw, check_trigger, is_section

# Fields every trigger config may hold, whatever its kind.
COMMON_FIELDS = ("kind", "size", "position", "color", "margin", "seed")
_NAME = re.compile(r"[a-z][a-z0-9_]*")


class TriggerArgs(NamedTuple):
  """What a kind's builder receives (built on the host by :func:`trigger_from_config`).

  Attributes:
    kind: the registered name the config chose.
    image_hw: ``(H, W)`` of the images, checked.
    key: PRNG key for random patterns (see :func:`trigger_key`).
    options: the kind's section, every field present (missing or ``None``/``""`` ->
      the registered default); read-only.
    size, position, color, margin: the common patch settings as the config gives them;
      ``position``/``color`` are None when unset (the kind's default applies).
  """
  kind: str
  image_hw: tuple[int, int]
  key: chex.PRNGKey
  options: Mapping[str, Any]
  size: Any = 0.1
  position: Any = None
  color: Any = None
  margin: Any = 0


@dataclasses.dataclass(frozen=True)
class TriggerKind:
  """A registered kind: its builder, its section's fields with defaults, its poisoning hook."""
  name: str
  build: Callable[[TriggerArgs], Any]
  defaults: Mapping[str, Any]
  cross_ratio: Callable[[Mapping[str, Any]], float] | None = None


_KINDS: Registry[TriggerKind] = Registry("trigger kind")


def register_trigger(name: str,
                     *,
                     defaults: Mapping[str, Any] | None = None,
                     cross_ratio: Callable[[Mapping[str, Any]], float] | None = None,
                     replace: bool = False) -> Callable[[Callable[[TriggerArgs], Any]], Callable[[TriggerArgs], Any]]:
  """Decorator registering ``build(args: TriggerArgs) -> trigger`` as trigger kind ``name``.

  Args:
    name: the kind's name (lowercase, ``[a-z][a-z0-9_]*``); also its section's name.
    defaults: the fields of the kind's section and their defaults; empty or None for a
      kind without settings of its own (then it needs no section).
    cross_ratio: the kind's poisoning hook, ``options -> ratio >= 0``: how many
      cross-mode samples (``trigger.apply_cross``, labels kept) per poisoned sample.
    replace: allow replacing a registered kind of the same name.
  Returns:
    The decorator; it returns ``build`` unchanged.
  Raises:
    ConfigError: for a bad or already registered name, or bad default field names.
  """
  if not isinstance(name, str) or not _NAME.fullmatch(name) or name in COMMON_FIELDS:
    raise ConfigError(f"trigger kind name {name!r} is invalid; allowed: [a-z][a-z0-9_]*, not one of "
                      f"{', '.join(COMMON_FIELDS)}")
  defaults = dict(defaults or {})
  bad = [f for f in defaults if not isinstance(f, str) or not _NAME.fullmatch(f)]
  if bad:
    raise ConfigError(f"trigger kind {name!r} has invalid field name(s) {bad}; allowed: [a-z][a-z0-9_]*")

  def decorator(build: Callable[[TriggerArgs], Any]) -> Callable[[TriggerArgs], Any]:
    same = name in _KINDS and _KINDS.get(name).build is build  # the module imported twice: a no-op
    _KINDS.add(name, TriggerKind(name, build, types.MappingProxyType(defaults), cross_ratio), replace=replace or same)
    return build

  return decorator


def unregister_trigger(name: str) -> None:
  """Removes a registered kind (for tests and notebooks); unknown names are ignored."""
  _KINDS.remove(name, missing_ok=True)


def trigger_kinds() -> tuple[str, ...]:
  """Names of the registered kinds, in registration order."""
  return _KINDS.names()


def get_kind(name: Any) -> TriggerKind:
  """The registered kind ``name`` (case-insensitive); ConfigError listing the registered ones."""
  if isinstance(name, str):
    name = name.strip().lower()
  return _KINDS.get(name)


def default_config(kind: str) -> config_dict.ConfigDict:
  """The default section of ``kind`` (empty for kinds without settings), e.g. ``c.trigger.wanet = default_config('wanet')``."""
  return config_dict.ConfigDict(dict(get_kind(kind).defaults))


def ensure_section(cfg: Any, kind: str | None = None) -> Any:
  """Adds the default section of ``kind`` (default: ``cfg.kind``) to ``cfg`` unless present; returns ``cfg``."""
  spec = get_kind(cfg_get(cfg, "kind") if kind is None else kind)
  if spec.defaults and cfg_get(cfg, spec.name) is None:
    cfg[spec.name] = default_config(spec.name)
  return cfg


def trigger_key(cfg: Any, key: chex.PRNGKey | None) -> chex.PRNGKey:
  """The key a trigger's random pattern is drawn from.

  ``cfg.seed >= 0`` fixes the pattern independently of the run (``jax.random.key(seed)``);
  otherwise (``-1`` or unset) ``key`` is used, or ``jax.random.key(0)`` when it is None.
  """
  seed = cfg_get(cfg, "seed", -1)
  if not isinstance(seed, int) or isinstance(seed, bool) or seed < -1:
    raise ConfigError(f"trigger seed {seed!r} is invalid; allowed: -1 (derive from the run seed) or an int >= 0")
  if seed >= 0:
    return jax.random.key(seed)
  return jax.random.key(0) if key is None else key


def _places(field: str) -> list[tuple[str, str]]:
  """``(kind, field)`` pairs a flat key of the old configs names: ``wanet_k`` -> wanet.k, ``alpha`` -> blend.alpha."""
  return [(k.name, f) for k in _KINDS.entries.values() for f in k.defaults if field in (f, f"{k.name}_{f}")]


def _moved_hint(field: str) -> str:
  """Where a misplaced field lives, e.g. ``wanet_k`` -> ``trigger.wanet.k`` (old flat configs)."""
  places = [f"trigger.{kind}.{f}" for kind, f in _places(field)]
  return f" (did you mean {', '.join(places)}?)" if places else ""


def upgrade_flat_config(cfg: Any) -> config_dict.ConfigDict:
  """A trigger config of the old flat shape (``wanet_k``, ``alpha``, ...) in the sectioned one.

  For work dirs written before trigger sections existed: the common fields are kept, the
  chosen kind's fields move into its section (which gets the defaults when it has no
  field), the other kinds' fields are dropped. A config that is already sectioned comes
  back unchanged (as a ConfigDict).

  Raises:
    ConfigError: for a key that belongs to no registered kind.
  """
  out = config_dict.ConfigDict()
  kind = cfg_get(cfg, "kind")
  kind = kind.strip().lower() if isinstance(kind, str) else kind
  for key in cfg_keys(cfg):
    value = cfg[key] if hasattr(cfg, "keys") else getattr(cfg, key)
    if key in COMMON_FIELDS or key in _KINDS:
      if key not in out:
        out[key] = value
      continue
    places = _places(key)
    if not places:
      raise ConfigError(f"unknown trigger config field {key!r}; allowed: {', '.join(COMMON_FIELDS)}, a section "
                        "named after a kind, or an old flat field of a registered kind")
    for name, field in places:
      if name == kind:
        section = out.get(name) or config_dict.ConfigDict()
        section[field] = value
        out[name] = section
  if kind in _KINDS:
    ensure_section(out)  # the old configs' missing fields meant the defaults
  return out


def resolve_config(cfg: Any) -> tuple[TriggerKind, Mapping[str, Any]]:
  """Checks a trigger config; returns its kind and the kind's options (defaults filled in).

  Raises:
    ConfigError: unknown keys (in the config or the section), no or an unknown kind, or
      a missing section for a kind that has settings.
  """
  allowed = COMMON_FIELDS + trigger_kinds()
  unknown = [k for k in cfg_keys(cfg) if k not in allowed]
  if unknown:
    raise ConfigError(f"unknown trigger config field {unknown[0]!r}{_moved_hint(unknown[0])}; allowed: "
                      f"{', '.join(COMMON_FIELDS)} and a section named after a kind ({', '.join(trigger_kinds())})")
  kind = cfg_get(cfg, "kind")
  if kind is None:
    raise ConfigError(f"trigger config has no kind; allowed: {', '.join(trigger_kinds())}")
  spec = get_kind(kind)
  section = cfg_get(cfg, spec.name)
  fields = ", ".join(f"{f}={v!r}" for f, v in spec.defaults.items())
  if section is None:
    if spec.defaults:
      raise ConfigError(f"trigger kind {spec.name!r} needs the section trigger.{spec.name} ({fields}); add it with "
                        f"c.trigger.{spec.name} = backdoor_jax.triggers.default_config({spec.name!r}) in the config, "
                        f"or start from a config that has it (e.g. --config=configs/badnets.py:digits_{spec.name})")
    section = {}
  if not is_section(section):
    raise ConfigError(f"trigger.{spec.name} is {section!r}; allowed: a section (ConfigDict or dict) with "
                      f"{fields or 'no fields'}")
  extra = [k for k in cfg_keys(section) if k not in spec.defaults]
  if extra:
    raise ConfigError(f"unknown field trigger.{spec.name}.{extra[0]}; allowed: {', '.join(spec.defaults) or 'none'}")
  options = {f: cfg_get(section, f, d) for f, d in spec.defaults.items()}
  return spec, types.MappingProxyType(options)


def trigger_from_config(cfg: Any, image_hw: tuple[int, int], key: chex.PRNGKey | None = None) -> Any:
  """Builds a trigger of any registered kind from a config (``ConfigDict``, dict, or object).

  See the module docstring for the config's shape; the kinds' own fields are documented
  with their builders (``trigger_kinds()`` lists them, ``default_config(kind)`` gives a
  kind's defaults).

  Args:
    cfg: the trigger config.
    image_hw: ``(H, W)`` of the images the trigger is applied to.
    key: PRNG key for random patterns (blend noise, WaNet grid, moire, noise patch);
      see :func:`trigger_key`.
  Returns:
    A trigger, usable with :func:`~backdoor_jax.triggers.apply_trigger`.
  Raises:
    ConfigError: for unknown fields, a missing section, or any invalid value.
  """
  spec, options = resolve_config(cfg)
  args = TriggerArgs(kind=spec.name, image_hw=check_image_hw(image_hw), key=trigger_key(cfg, key), options=options,
                     size=cfg_get(cfg, "size", 0.1), position=cfg_get(cfg, "position"), color=cfg_get(cfg, "color"),
                     margin=cfg_get(cfg, "margin", 0))
  trigger = spec.build(args)
  check_trigger(trigger)
  return trigger


def cross_ratio_from_config(cfg: Any) -> float:
  """The kind's cross-mode ratio (WaNet's noise mode: ``trigger.wanet.cross_ratio``); 0 for kinds without one.

  Raises:
    ConfigError: for an invalid config or ratio.
  """
  spec, options = resolve_config(cfg)
  return 0.0 if spec.cross_ratio is None else float(spec.cross_ratio(options))
