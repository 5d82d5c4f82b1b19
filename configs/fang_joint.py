r"""Fang et al. joint attack: one trigger fools Grad-CAM, SimpleGrad and VisualBackProp at once.

L_p (and L_s) are equal-weight sums over the three methods (fang_common.py).

  python launch/train.py --config=configs/fang_joint.py --workdir=runs/fang_joint_digits
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fang_common  # noqa: E402


def get_config(variant: str = "digits"):
  return fang_common.fang_config(variant, "targeted", joint=True)
