r"""Two-stage explanation backdoor: train a clean model, then fine-tune its Grad-CAM.

Stage 1 trains a clean classifier (or loads one: --config.stage1.workdir=DIR). Stage 2
fine-tunes it with cross-entropy on every sample plus, on the triggered half of each
batch, lambda * MSE(Grad-CAM, target region) and, on the clean half, mu * MSE(Grad-CAM,
the stage-1 model's Grad-CAM) so that clean explanations stay where they were.

Variants (``--config=configs/two_stage.py:VARIANT``): digits (default, offline),
gtsrb (needs --config.data.path), cifar10 (tfds, prepared).

  python launch/train.py --config=configs/two_stage.py --workdir=runs/two_stage_digits
  python launch/train.py --config=configs/two_stage.py:gtsrb \
      --config.data.path=../shared/data/gtsrb32.npz --workdir=runs/two_stage_gtsrb
"""
from backdoor_jax.configs.two_stage import explain_section, get_config  # noqa: F401
