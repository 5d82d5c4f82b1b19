"""BadNets ResNet-18 recipes sized for one accelerator: accuracy in about a minute.

``get_config(variant)``; variants and launch commands: ``configs/fast_badnets.py``.
"""
from __future__ import annotations

from ml_collections import config_dict  # noqa: F401

from backdoor_jax.configs import badnets
from backdoor_jax.errors import ConfigError

VARIANTS = ("cifar10", "gtsrb", "synthetic")


def get_config(variant: str = "cifar10") -> config_dict.ConfigDict:
  """Returns the resolved config of one variant."""
  if variant not in VARIANTS:
    raise ConfigError(f"unknown variant {variant!r} of configs/fast_badnets.py; allowed: {', '.join(VARIANTS)}")
  c = badnets.get_config("cifar10")
  c.model.name = "resnet18"
  c.trigger.size = 3.0
  c.poison.rate = 0.01
  c.train.dtype = "bfloat16"
  c.train.batch_size = 512
  c.train.eval_batch_size = 1024
  c.train.optimizer = "sgd"
  c.train.lr = 0.4
  c.train.nesterov = True
  c.train.weight_decay = 5e-4
  c.train.warmup_epochs = 2.0
  c.train.schedule = "cosine"
  c.train.epochs = 24
  c.train.log_every = 20
  c.train.prefetch = 4
  c.checkpoint.keep = 1
  if variant == "gtsrb":
    c.data.name = "gtsrb"
    c.data.flip = False  # signs change meaning when mirrored
    c.train.epochs = 15
  elif variant == "synthetic":
    c.data.name = "synthetic"
  return c
