r"""BadNets trigger-characteristics study: size x position x colour x rate x model x seed.

The grid of a published systematic study of BadNets triggers (trigger side 4/6/8% of
the image side, five positions, black/white/green (102,179,92), poisoning rates
0.5/1/1.5/2%, several architectures, five repeats), trained K models at a time.

Variants (``--config=configs/sok_badnets.py:VARIANT``):
  digits         a 2x2x2 grid on the embedded digits (offline, a few minutes on CPU)
  gtsrb_reduced  sizes 4/6/8% x 2 positions x rates 1/2% x 2 seeds (+2 clean), narrow
                 small CNN, 8 epochs on a 5k-image GTSRB subset (CPU-sized); needs
                 --config.data.path
  gtsrb_patterns white square vs checkerboard vs seeded noise patch (4 px) x 2 corners
                 at 5% poisoning (+1 clean), same narrow CNN and subset; needs --config.data.path
  gtsrb_full     the study's full grid on GTSRB (3 x 5 x 3 x 4 x 4 architectures x 5
                 seeds = 3,600 models); needs --config.data.path and an accelerator

Example:
  python launch/sweep.py --config=configs/sok_badnets.py:gtsrb_reduced \
      --config.data.path=../shared/data/gtsrb32.npz --workdir=runs/sok_gtsrb
"""
from backdoor_jax.configs.sok_badnets import add_sweep_section, get_config  # noqa: F401
