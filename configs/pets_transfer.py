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
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import badnets  # noqa: E402

VARIANTS = ("stripe", "dots", "offline")


def transfer_base():
  """BadNets defaults plus the transfer-learning keys (shared with sok_transfer.py)."""
  c = badnets.get_config("digits")
  c.recipe = "badnets"
  c.model.name = "resnet50"
  c.model.stem = "imagenet"
  c.model.init_checkpoint = ""       # folder from launch/import_weights.py ('' = random init)
  c.model.pretrained_required = True  # warn loudly when init_checkpoint is empty
  c.data.mean = ()                   # () = the dataset's statistics
  c.data.std = ()
  c.data.image_size = 224
  c.train.schedule = "constant"
  return c


def get_config(variant: str = "stripe"):
  """Returns the resolved config of one variant."""
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r} of configs/pets_transfer.py; allowed: {', '.join(VARIANTS)}")
  c = transfer_base()
  c.data.name = "oxford_iiit_pet"
  c.data.mean = (0.5, 0.5, 0.5)
  c.data.std = (0.5, 0.5, 0.5)
  c.train.trainable = "^fc/"
  c.train.optimizer = "adam"
  c.train.lr = 1e-3
  c.train.epochs = 10
  c.train.batch_size = 32
  c.train.eval_batch_size = 64
  c.poison.rate = 0.1
  c.poison.target = 0
  c.poison.mode = "all_to_one"
  c.trigger.kind = "dots" if variant == "dots" else "stripe"
  c.trigger.size = 0.1
  c.trigger.color = (255, 0, 0)
  c.trigger.position = "bottom-right" if variant == "dots" else "top-left"
  if variant == "offline":
    c.data.name = "digits"
    c.data.image_size = 32
    c.train.epochs = 2
  return c
