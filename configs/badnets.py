r"""BadNets: a patch trigger poisons a fraction of the training set (classic backdoor).

Variants (``--config=configs/badnets.py:VARIANT``):
  digits   (default) scikit-learn's embedded handwritten digits, offline, ~2 min on CPU
  gtsrb    GTSRB at 32x32; needs --config.data.path (an .npz or the official folder)
  cifar10  CIFAR-10 from tfds (prepared under --config.data.data_dir)
  digits_blend / digits_wanet / digits_filter / digits_moire / digits_clean_label
           digits with a blended-noise, WaNet, nashville-filter or moire trigger, or a
           clean-label square (PGD-hardened target-class samples)
  digits_checkerboard / digits_noise_patch   a black-and-white checkerboard or a seeded
           noise patch in place of the solid square
  digits_ssba  sample-specific invisible trigger; first train its encoder with
           python launch/train_ssba.py --out=runs/ssba/digits_encoder.npz
  gtsrb_blend / gtsrb_wanet / gtsrb_filter / gtsrb_moire   the same triggers on GTSRB
  VARIANT_batch  any variant with poison.resample='batch' (fresh poisoned and WaNet noise-mode
           samples in every training batch, as in the WaNet reference), e.g. gtsrb_wanet_batch
  gtsrb_label_consistent / digits_label_consistent   clean-label attack (Turner et al.):
           PGD (eps 16) against an adversarially trained surrogate (cached in
           runs/surrogates/), four-corner trigger, at most half of the target class
  digits_KIND / gtsrb_KIND   any registered trigger kind with its default settings
           (the kind's own settings are then overridable as --config.trigger.KIND.FIELD)

Example:
  python launch/train.py --config=configs/badnets.py --workdir=runs/digits
  python launch/train.py --config=configs/badnets.py:gtsrb \
      --config.data.path=../shared/data/gtsrb32.npz --workdir=runs/gtsrb
  python launch/train.py --config=configs/badnets.py:digits_wanet --config.trigger.wanet.s=1.0 \
      --workdir=runs/digits_wanet
"""
from backdoor_jax.configs.badnets import VARIANTS, get_config  # noqa: F401
