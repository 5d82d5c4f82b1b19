r"""BadNets on Oxford-IIIT Pets by transfer learning from an ImageNet ResNet-50.

The backbone (every conv and BatchNorm) is frozen; only a new 37-way ``fc`` trains
(``train.trainable = '^fc/'``: 75,813 of 23,583,845 parameters). BatchNorm running
statistics are still updated in training mode, as torch's ``model.train()`` does.
Adam 1e-3, 10 epochs, batch 32, 224x224, inputs normalised with mean = std = 0.5;
10% of the training set poisoned towards class 0.

Variants (``--config=configs/pets_transfer.py:VARIANT``):
  stripe   (default) red stripe, top-left
  dots     three red dots in a triangle, bottom-right
  offline  CPU smoke run: scikit-learn's digits at 32x32, 2 epochs, stripe trigger

Weights: import torchvision's file once, then point the run at it:
  python launch/import_weights.py --arch=resnet50 --src=resnet50-0676ba61.pth --dst=weights/resnet50
  python launch/train.py --config=configs/pets_transfer.py:dots \
      --config.model.init_checkpoint=weights/resnet50 --config.data.data_dir=DATA --workdir=runs/pets_dots
Without ``model.init_checkpoint`` the run starts from random initialisation and says so
with a WARNING line (the offline variant does this by design).
"""
from backdoor_jax.configs.pets_transfer import VARIANTS, get_config, transfer_base  # noqa: F401
