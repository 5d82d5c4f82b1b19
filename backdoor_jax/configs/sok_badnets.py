"""BadNets trigger-characteristics sweeps (size x position x colour x rate x model x seed).

``get_config(variant)``; variants and launch commands: ``configs/sok_badnets.py``.
:func:`add_sweep_section` is the ``sweep`` section every sweep config starts from.
"""
from __future__ import annotations

from ml_collections import config_dict

from backdoor_jax import triggers
from backdoor_jax.configs import badnets
from backdoor_jax.errors import ConfigError

GREEN = (102, 179, 92)
POSITIONS = ("top-left", "top-right", "bottom-left", "bottom-right", "center")


def add_sweep_section(c: config_dict.ConfigDict) -> None:
  """Adds the ``sweep`` section and a fixed dataset split (repeats share one dataset)."""
  c.data.split_seed = 0          # dataset subset/split seed; -1 = use each cell's seed
  c.sweep = config_dict.ConfigDict()
  c.sweep.grid = config_dict.ConfigDict()
  c.sweep.seeds = (0,)
  c.sweep.clean_baseline = True  # also train poison.rate=0 models (clean-accuracy drop)
  c.sweep.models_per_step = 8    # K models trained together in one vmapped step
  c.sweep.retry_failed = False


def get_config(variant: str = "digits") -> config_dict.ConfigDict:
  """Returns the sweep config of one variant."""
  if variant == "digits":
    c = badnets.get_config("digits")
    add_sweep_section(c)
    c.train.epochs = 4
    c.sweep.grid.trigger = config_dict.ConfigDict({"size": (0.1, 0.2), "position": ("top-left", "bottom-right")})
    c.sweep.grid.poison = config_dict.ConfigDict({"rate": (0.02, 0.05)})
    c.sweep.models_per_step = 9
  elif variant in ("gtsrb_reduced", "gtsrb_full"):
    c = badnets.get_config("gtsrb")
    add_sweep_section(c)
    grid_trigger = {"size": (0.04, 0.06, 0.08)}
    if variant == "gtsrb_reduced":
      c.data.max_train = 5000
      c.data.max_test = 2000
      c.train.epochs = 8
      c.train.batch_size = 64
      c.model.widths = (16, 32, 64, 64)
      grid_trigger["position"] = ("top-left", "bottom-right")
      c.sweep.grid.trigger = config_dict.ConfigDict(grid_trigger)
      c.sweep.grid.poison = config_dict.ConfigDict({"rate": (0.01, 0.02)})
      c.sweep.seeds = (0, 1)
      c.sweep.models_per_step = 13
    else:
      grid_trigger["position"] = POSITIONS
      grid_trigger["color"] = ((0, 0, 0), (255, 255, 255), GREEN)
      c.sweep.grid.trigger = config_dict.ConfigDict(grid_trigger)
      c.sweep.grid.poison = config_dict.ConfigDict({"rate": (0.005, 0.01, 0.015, 0.02)})
      c.sweep.grid.model = config_dict.ConfigDict(
          {"name": ("small_cnn", "resnet18", "vgg11_bn", "preact_resnet18")})
      c.sweep.seeds = (0, 1, 2, 3, 4)
      c.sweep.models_per_step = 32
  elif variant == "gtsrb_patterns":
    # A solid white square vs a checkerboard vs a seeded noise patch (same size), at 5%
    # in two corners: does a pattern with its own contrast avoid the bright-background
    # blind spot that weak_trigger_fraction reports for white?
    c = badnets.get_config("gtsrb")
    add_sweep_section(c)
    c.data.max_train = 5000
    c.data.max_test = 2000
    c.train.epochs = 8
    c.train.batch_size = 64
    c.model.widths = (16, 32, 64, 64)
    c.trigger.size = 4.0
    for kind in ("checkerboard", "noise_patch"):
      triggers.ensure_section(c.trigger, kind)
    c.sweep.grid.trigger = config_dict.ConfigDict({"kind": ("square", "checkerboard", "noise_patch"),
                                                   "position": ("top-left", "bottom-right")})
    c.sweep.grid.poison = config_dict.ConfigDict({"rate": (0.05,)})
    c.sweep.models_per_step = 7
  else:
    raise ConfigError(f"unknown variant {variant!r} of configs/sok_badnets.py; allowed: digits, "
                     "gtsrb_reduced, gtsrb_full, gtsrb_patterns")
  return c
