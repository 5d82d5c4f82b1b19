r"""Fang et al. targeted explanation backdoor (losses: backdoor_jax/configs/fang.py).

  python launch/train.py --config=configs/fang_targeted.py --workdir=runs/fang_targeted_digits
  python launch/train.py --config=configs/fang_targeted.py:gtsrb \
      --config.data.path=../shared/data/gtsrb32.npz --workdir=runs/fang_targeted_gtsrb
"""
from backdoor_jax.configs.fang import targeted as get_config  # noqa: F401
