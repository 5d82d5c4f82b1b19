r"""Fang et al. joint attack: one trigger fools Grad-CAM, SimpleGrad and VisualBackProp at once.

L_p (and L_s) are equal-weight sums over the three methods (fang_common.py).

  python launch/train.py --config=configs/fang_joint.py --workdir=runs/fang_joint_digits
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fang_common  # noqa: E402


def get_config(variant: str = "digits"):
  c = fang_common.fang_config(variant, "targeted", joint=True)
  # SimpleGrad differentiates the scores with respect to the input, through every
  # BatchNorm: with batch statistics (bn_mode='train') each sample's map would pick up
  # the other samples' scores, so BatchNorm runs on running statistics here.
  c.explain.bn_mode = "frozen"
  return c
