r"""Beyond patches: WaNet, blended, photo-filter and Moire triggers across rates and seeds.

The sweep companion of ``sok_badnets.py`` for the triggers that have no size or
position: each is trained at several poisoning rates and seeds next to a clean baseline
per seed, so the table compares ASR and clean-accuracy drop across trigger kinds.
(SSBA needs a trained encoder first: add ``ssba`` to ``sweep.grid.trigger.kind`` and
set ``--config.trigger.ssba.path`` to the file ``launch/train_ssba.py`` wrote.) Each
kind's own settings are overridable, e.g. ``--config.trigger.wanet.s=1.0``.

Variants (``--config=configs/sok_advanced.py:VARIANT``):
  digits  4 kinds x rates 5/10% on the embedded digits (offline; CPU minutes)
  gtsrb   4 kinds x rates 5/10% x 2 seeds, small CNN, GTSRB; needs --config.data.path

Example:
  python launch/sweep.py --config=configs/sok_advanced.py:digits --workdir=runs/sok_advanced
"""
from backdoor_jax.configs.sok_advanced import KINDS, get_config  # noqa: F401
