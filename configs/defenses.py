r"""Defense settings: one section per defense, plus the shared validation split.

The defaults live in the library (``backdoor_jax/configs/defenses.py``, documented there);
override any of them on the command line.

  python launch/defend.py --workdir=runs/digits --defense=neural_cleanse
  python launch/defend.py --workdir=runs/digits --defense=all --config.neural_cleanse.epochs=10
"""
from backdoor_jax.configs.defenses import get_config  # noqa: F401
