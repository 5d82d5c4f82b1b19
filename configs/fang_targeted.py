r"""Fang et al. targeted explanation backdoor (see fang_common.py for the losses).

  python launch/train.py --config=configs/fang_targeted.py --workdir=runs/fang_targeted_digits
  python launch/train.py --config=configs/fang_targeted.py:gtsrb \
      --config.data.path=../shared/data/gtsrb32.npz --workdir=runs/fang_targeted_gtsrb
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fang_common  # noqa: E402


def get_config(variant: str = "digits"):
  return fang_common.fang_config(variant, "targeted")
