r"""Fang et al. joint attack: one trigger fools Grad-CAM, SimpleGrad and VisualBackProp at once.

L_p (and L_s) are equal-weight sums over the three methods (backdoor_jax/configs/fang.py).

  python launch/train.py --config=configs/fang_joint.py --workdir=runs/fang_joint_digits
"""
from backdoor_jax.configs.fang import joint as get_config  # noqa: F401
