"""Beyond patches: WaNet, blended, photo-filter and Moire triggers across rates and seeds.

``get_config(variant)``; variants and launch commands: ``configs/sok_advanced.py``.
"""
from __future__ import annotations

from ml_collections import config_dict

from backdoor_jax import triggers
from backdoor_jax.configs import badnets
from backdoor_jax.configs.sok_badnets import add_sweep_section
from backdoor_jax.errors import ConfigError

KINDS = ("blend", "wanet", "filter", "moire")


def get_config(variant: str = "digits") -> config_dict.ConfigDict:
  """Returns the sweep config of one variant."""
  if variant not in ("digits", "gtsrb"):
    raise ConfigError(f"unknown variant {variant!r} of configs/sok_advanced.py; allowed: digits, gtsrb")
  c = badnets.get_config(variant)
  add_sweep_section(c)
  for kind in KINDS + ("ssba",):  # each kind's section, so --config.trigger.KIND.FIELD works (cells keep their own)
    triggers.ensure_section(c.trigger, kind)
  c.sweep.grid.trigger = config_dict.ConfigDict({"kind": KINDS})
  c.sweep.grid.poison = config_dict.ConfigDict({"rate": (0.05, 0.1)})
  if variant == "digits":
    c.train.epochs = 8
  else:
    c.train.epochs = 10
    c.sweep.seeds = (0, 1)
    c.sweep.models_per_step = 9
  return c
