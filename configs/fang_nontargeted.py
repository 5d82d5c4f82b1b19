r"""Fang et al. nontargeted explanation backdoor (losses: backdoor_jax/configs/fang.py).

  python launch/train.py --config=configs/fang_nontargeted.py --workdir=runs/fang_nontargeted_digits
  python launch/train.py --config=configs/fang_nontargeted.py:gtsrb \
      --config.data.path=../shared/data/gtsrb32.npz --workdir=runs/fang_nontargeted_gtsrb
"""
from backdoor_jax.configs.fang import nontargeted as get_config  # noqa: F401
