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
from backdoor_jax.configs.sok_transfer import ARCHS, DATASETS, TRAINABLE, get_config  # noqa: F401
