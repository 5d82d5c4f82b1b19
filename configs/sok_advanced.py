r"""Beyond patches: WaNet, blended, photo-filter and Moire triggers across rates and seeds.

The sweep companion of ``sok_badnets.py`` for the triggers that have no size or
position: each is trained at several poisoning rates and seeds next to a clean baseline
per seed, so the table compares ASR and clean-accuracy drop across trigger kinds.
(SSBA needs a trained encoder first: add ``ssba`` to ``sweep.grid.trigger.kind`` and
set ``--config.trigger.ssba_path`` to the file ``launch/train_ssba.py`` wrote.)

Variants (``--config=configs/sok_advanced.py:VARIANT``):
  digits  4 kinds x rates 5/10% on the embedded digits (offline; CPU minutes)
  gtsrb   4 kinds x rates 5/10% x 2 seeds, small CNN, GTSRB; needs --config.data.path

Example:
  python launch/sweep.py --config=configs/sok_advanced.py:digits --workdir=runs/sok_advanced
"""
import os
import sys

from ml_collections import config_dict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import badnets  # noqa: E402
from sok_badnets import add_sweep_section  # noqa: E402

KINDS = ("blend", "wanet", "filter", "moire")


def get_config(variant: str = "digits") -> config_dict.ConfigDict:
  """Returns the sweep config of one variant."""
  if variant not in ("digits", "gtsrb"):
    raise ValueError(f"unknown variant {variant!r} of configs/sok_advanced.py; allowed: digits, gtsrb")
  c = badnets.get_config(variant)
  add_sweep_section(c)
  c.sweep.grid.trigger = config_dict.ConfigDict({"kind": KINDS})
  c.sweep.grid.poison = config_dict.ConfigDict({"rate": (0.05, 0.1)})
  if variant == "digits":
    c.train.epochs = 8
  else:
    c.train.epochs = 10
    c.sweep.seeds = (0, 1)
    c.sweep.models_per_step = 9
  return c
