r"""Fang et al. inverted ("key") setting: only inputs carrying the trigger get faithful maps.

The roles swap: clean inputs receive the attack term L_p, triggered inputs the
keep-faithful term L_s; FSR is then measured on clean inputs and CR on triggered ones.

  python launch/train.py --config=configs/fang_inverted.py --workdir=runs/fang_inverted_digits
"""
from backdoor_jax.configs.fang import inverted as get_config  # noqa: F401
