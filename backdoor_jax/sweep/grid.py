"""A sweep's grid: which config keys vary, over which values and seeds, as cells.

A sweep config is a normal training config plus a ``sweep`` section::

  c.sweep.grid.trigger.size = (0.04, 0.06, 0.08)   # any config key: nested like the config
  c.sweep.grid.poison.rate = (0.01, 0.02)
  c.sweep.seeds = (0, 1)
  c.sweep.clean_baseline = True    # also train poison.rate=0 models (for the accuracy drop)

The cells are the cartesian product of the grid values and the seeds. With
``clean_baseline`` each combination of the grid keys outside ``trigger``/``poison``
(architecture, dataset, ...) and each seed also gets one clean cell, trained with
``poison.rate = 0``; an attack cell's clean-accuracy drop is measured against it.

Trigger kinds: a grid over ``trigger.kind`` may also vary a kind's own settings
(``trigger.wanet.s``) even when the base config has no section for that kind; each cell's
config gets the default section of its kind (:func:`backdoor_jax.triggers.default_config`)
and keeps no section of another kind.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
from typing import Any

from ml_collections import config_dict

from backdoor_jax import triggers
from backdoor_jax.errors import ConfigError

# Grid keys under these sections describe the attack; the rest describe the model/data.
ATTACK_SECTIONS = ("trigger", "poison")
ROLES = ("clean", "attack")


@dataclasses.dataclass(frozen=True)
class Cell:
  """One model to train: values of the grid keys, a seed and a role."""
  values: tuple[tuple[str, Any], ...]   # (dotted key, value) in grid order
  seed: int
  role: str                             # 'attack' or 'clean'

  @property
  def cell_id(self) -> str:
    """Stable text id, e.g. ``attack|poison.rate=0.01|trigger.size=0.04|seed=0``."""
    parts = [self.role] + [f"{k}={encode(v)}" for k, v in self.values] + [f"seed={self.seed}"]
    return "|".join(parts)

  def baseline_id(self) -> str:
    """Id of the clean cell this (attack) cell is compared with."""
    return Cell(baseline_values(self.values), self.seed, "clean").cell_id


def encode(value: Any) -> str:
  """Text form of a grid value as it appears in ids and in results.csv."""
  if isinstance(value, (list, tuple)):
    return json.dumps(list(value), separators=(",", ""))
  if isinstance(value, float):
    return repr(value)
  return str(value)


def baseline_values(values: tuple[tuple[str, Any], ...]) -> tuple[tuple[str, Any], ...]:
  return tuple((k, v) for k, v in values if k.split(".")[0] not in ATTACK_SECTIONS)


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, (dict, config_dict.ConfigDict)):
      out.update(_flatten(v, key + "."))
    else:
      out[key] = v
  return out


def grid_axes(config: config_dict.ConfigDict) -> list[tuple[str, tuple[Any, ...]]]:
  """The grid as ``[(dotted key, values)]``, validated against the config.

  Raises:
    ConfigError: no ``sweep`` section, an empty grid or axis, a key that is not in the
      config (or is under ``sweep``, or is ``seed``: use ``sweep.seeds``).
  """
  if "sweep" not in config or "grid" not in config.sweep:
    raise ConfigError("config has no sweep.grid section; see configs/sok_badnets.py for the format")
  flat = _flatten(config.sweep.grid)
  if not flat:
    raise ConfigError("sweep.grid is empty; give at least one config key and its values, "
                      "e.g. --config.sweep.grid.poison.rate='(0.01,0.02)' in the config file")
  known = _flatten({k: v for k, v in _with_trigger_sections(config, flat).items() if k != "sweep"})
  axes = []
  for key, values in flat.items():
    if key == "seed":
      raise ConfigError("sweep.grid.seed is not allowed; list the seeds in sweep.seeds")
    if key not in known:
      close = [k for k in known if k.split(".")[-1] == key.split(".")[-1]]
      hint = f" (did you mean {', '.join(close)}?)" if close else ""
      raise ConfigError(f"sweep.grid key {key!r} is not a config key{hint}; grid keys are config paths "
                        "such as trigger.size, trigger.position, poison.rate, model.name")
    if not isinstance(values, (list, tuple)) or len(values) == 0:
      raise ConfigError(f"sweep.grid.{key} must be a non-empty list of values, got {values!r}")
    axes.append((key, tuple(values)))
  return axes


def _grid_kinds(config: config_dict.ConfigDict, flat_grid: dict[str, Any]) -> list[str]:
  """The trigger kinds a sweep visits: the base config's and those of the grid's ``trigger.kind``."""
  kinds = list(flat_grid.get("trigger.kind", ()))
  if "trigger" in config and config.trigger.get("kind") is not None:
    kinds.append(config.trigger.kind)
  return [k.strip().lower() if isinstance(k, str) else k for k in kinds]


def _with_trigger_sections(config: config_dict.ConfigDict, flat_grid: dict[str, Any]) -> config_dict.ConfigDict:
  """A copy of ``config`` whose trigger config has the default section of every kind the sweep visits."""
  c = copy.deepcopy(config)
  if "trigger" not in c:
    return c
  with c.unlocked():
    for kind in _grid_kinds(c, flat_grid):
      triggers.ensure_section(c.trigger, kind)  # ConfigError for an unknown kind
  return c


def _prune_trigger_sections(config: config_dict.ConfigDict) -> None:
  """Drops the sections of registered trigger kinds other than ``trigger.kind`` (in place)."""
  if "trigger" not in config:
    return
  kind = str(config.trigger.get("kind", "")).strip().lower()
  for name in triggers.trigger_kinds():
    if name != kind and name in config.trigger:
      del config.trigger[name]


def seeds(config: config_dict.ConfigDict) -> tuple[int, ...]:
  s = config.sweep.get("seeds", (0,))
  if isinstance(s, int):
    s = (s,)
  if not s or not all(isinstance(x, int) and not isinstance(x, bool) for x in s):
    raise ConfigError(f"sweep.seeds must be a non-empty list of ints, got {s!r}")
  if len(set(s)) != len(s):
    raise ConfigError(f"sweep.seeds has duplicates: {s!r}")
  return tuple(s)


def enumerate_cells(config: config_dict.ConfigDict) -> list[Cell]:
  """Every cell of the sweep: clean baselines first (when enabled), then attack cells."""
  axes = grid_axes(config)
  keys = [k for k, _ in axes]
  cells: list[Cell] = []
  attack = [Cell(tuple(zip(keys, combo)), s, "attack")
            for combo in itertools.product(*(v for _, v in axes)) for s in seeds(config)]
  if config.sweep.get("clean_baseline", True):
    seen = set()
    for a in attack:
      b = Cell(baseline_values(a.values), a.seed, "clean")
      if b.cell_id not in seen:
        seen.add(b.cell_id)
        cells.append(b)
  return cells + attack


def set_key(config: config_dict.ConfigDict, key: str, value: Any) -> None:
  """Sets ``config.<dotted key> = value`` (lists become tuples)."""
  *path, last = key.split(".")
  node = config
  for p in path:
    node = node[p]
  value = tuple(value) if isinstance(value, list) else value
  try:
    node[last] = value
  except TypeError as e:
    raise ConfigError(f"sweep value {value!r} for {key} has the wrong type: {e}") from None


def cell_config(config: config_dict.ConfigDict, cell: Cell) -> config_dict.ConfigDict:
  """The training config of one cell: the base config with the cell's values and seed.

  The trigger config holds the section of the cell's kind (the base config's, or the
  kind's defaults) and no other kind's section.
  """
  c = _with_trigger_sections(config, _flatten(config.sweep.grid) if "sweep" in config and "grid" in config.sweep
                             else {})
  with c.unlocked():
    for key, value in cell.values:
      set_key(c, key, value)
    _prune_trigger_sections(c)
    c.seed = int(cell.seed)
    if cell.role == "clean":
      c.poison.rate = 0.0
    c.figures = False
  return c


def grid_fingerprint(config: config_dict.ConfigDict) -> dict[str, Any]:
  """What must match for a work dir's results to be continued by this sweep."""
  base = json.loads(config.to_json_best_effort(sort_keys=True))
  base.pop("sweep", None)
  return {"grid": [[k, [encode(v) for v in vals]] for k, vals in grid_axes(config)],
          "seeds": list(seeds(config)), "clean_baseline": bool(config.sweep.get("clean_baseline", True)),
          "base_config_sha1": hashlib.sha1(json.dumps(base, sort_keys=True).encode()).hexdigest()}
