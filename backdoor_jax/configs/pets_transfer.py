"""BadNets on Oxford-IIIT Pets by transfer learning from an ImageNet ResNet-50.

``get_config(variant)``; variants and launch commands: ``configs/pets_transfer.py``.
"""
from __future__ import annotations

from ml_collections import config_dict  # noqa: F401

from backdoor_jax.configs import badnets
from backdoor_jax.errors import ConfigError

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
    raise ConfigError(f"unknown variant {variant!r} of configs/pets_transfer.py; allowed: {', '.join(VARIANTS)}")
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
