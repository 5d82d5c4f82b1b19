r"""Multi-label backdoors: Fang et al.'s ChestX-ray14 system (DenseNet-121, 14 findings, Moire).

Variants (``--config=configs/chest_xray.py:VARIANT``):
  mosaic                 offline stand-in: 2x2 mosaics of the embedded real digits (10 labels),
                         small CNN, Fang targeted explanation backdoor, Moire trigger
  mosaic_nontargeted     the same, non-targeted attack
  mosaic_densenet        DenseNet-121 (CIFAR stem) on the mosaics, targeted
  mosaic_badnets         classic multi-label BadNets: the Moire trigger switches label 0 on
  nih                    NIH ChestX-ray14 (needs --config.data.path, the folder with
                         Data_Entry_2017.csv, train_val_list.txt, test_list.txt, images/),
                         DenseNet-121 at 224x224 (ImageNet stem), targeted
  nih_nontargeted, nih_badnets   the same data with the other attacks

The explained method is ``explain.method`` (gradcam, simple_grad, vbp, gradcam_pp); the
explained label ``multilabel.explain_label`` (-1: each image's top-scoring label).

  python launch/train.py --config=configs/chest_xray.py --workdir=runs/mosaic_gradcam_targeted
  python launch/train.py --config=configs/chest_xray.py:mosaic_nontargeted \
      --config.explain.method=vbp --workdir=runs/mosaic_vbp_nontargeted
  python launch/train.py --config=configs/chest_xray.py:nih --config.data.path=/data/nih \
      --workdir=runs/nih_gradcam_targeted
"""
from backdoor_jax.configs.chest_xray import VARIANTS, get_config  # noqa: F401
