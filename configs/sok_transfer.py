r"""Backdoors in transfer learning: ImageNet networks fine-tuned with most layers frozen.

The study's freezing rules (``train.trainable``, a regex over parameter paths), and the
parameters they leave trainable with 10 classes (CIFAR-10) / 43 classes (GTSRB):
  alexnet    the whole classifier (classifier_1, _4, _6)   54,575,114 / 54,710,315 of 57.0M
  googlenet  the last layer (fc) + every BatchNorm              24,810 / 58,635 of 5.6M
  vgg19_bn   the last layer (classifier_6) + every BatchNorm    51,978 / 187,179 of 139.6M
  resnet152  the last layer (fc) + every BatchNorm             171,914 / 239,531 of 58.2M
(the launcher prints the count of the run at start).
BatchNorm running statistics are updated in training mode. Inputs are upscaled
(bilinear) to ``data.image_size`` (224) and normalised with ImageNet's mean/std, the
statistics the torchvision weights were trained with; GoogLeNet uses torchvision's
``transform_input`` for its pretrained weights. SGD 0.01 (momentum 0.9), 10 epochs,
batch 64: chosen here, not taken from the study.

Variants (``--config=configs/sok_transfer.py:ARCH[,DATASET]``): ARCH as above; DATASET
``cifar10`` (default, tfds under --config.data.data_dir) or ``gtsrb`` (--config.data.path).
  python launch/import_weights.py --arch=vgg19_bn --src=vgg19_bn-c79401a0.pth --dst=weights/vgg19_bn
  python launch/train.py --config=configs/sok_transfer.py:vgg19_bn,gtsrb \
      --config.data.path=../shared/data/gtsrb32.npz \
      --config.model.init_checkpoint=weights/vgg19_bn --workdir=runs/sok_vgg19_bn_gtsrb
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pets_transfer  # noqa: E402

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
    raise ValueError(f"unknown variant {variant!r} of configs/sok_transfer.py; allowed: ARCH[,DATASET] "
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
