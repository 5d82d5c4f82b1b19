"""Backdoors in transfer learning: ImageNet networks fine-tuned with most layers frozen.

``get_config(variant)``; variants and launch commands: ``configs/sok_transfer.py``.
"""
from __future__ import annotations

from ml_collections import config_dict  # noqa: F401

from backdoor_jax.configs import pets_transfer
from backdoor_jax.errors import ConfigError

ARCHS = ("alexnet", "googlenet", "vgg19_bn", "resnet152")
DATASETS = ("cifar10", "gtsrb")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# VGG-19-BN's torchvision indices of its BatchNorm layers (each conv at i has its BN at i + 1).
_VGG19_BN = (1, 4, 8, 11, 15, 18, 21, 24, 28, 31, 34, 37, 41, 44, 47, 50)

TRAINABLE = {
    "alexnet": r"^classifier_",
    "googlenet": r"_bn/|^fc/",
    "vgg19_bn": r"^(features_(" + "|".join(map(str, _VGG19_BN)) + r")|classifier_6)/",
    "resnet152": r"(^|/)(bn\d|downsample_bn)/|^fc/",
}


def get_config(variant: str = "resnet152"):
  """Returns the resolved config of ``ARCH[,DATASET]``."""
  arch, _, dataset = variant.partition(",")
  dataset = dataset or "cifar10"
  if arch not in ARCHS or dataset not in DATASETS:
    raise ConfigError(f"unknown variant {variant!r} of configs/sok_transfer.py; allowed: ARCH[,DATASET] "
                     f"with ARCH in {', '.join(ARCHS)} and DATASET in {', '.join(DATASETS)}")
  c = pets_transfer.transfer_base()
  c.model.name = arch
  if arch == "googlenet":
    c.model.transform_input = True
  c.data.name = dataset
  c.data.image_size = 224
  c.data.mean = IMAGENET_MEAN
  c.data.std = IMAGENET_STD
  c.trigger.kind = "square"
  c.trigger.size = 0.1
  c.train.trainable = TRAINABLE[arch]
  c.train.optimizer = "sgd"
  c.train.lr = 0.01
  c.train.momentum = 0.9
  c.train.epochs = 10
  c.train.batch_size = 64
  c.train.eval_batch_size = 128
  return c
