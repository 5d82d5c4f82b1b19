r"""BadNets ResNet-18 recipes sized for one accelerator: accuracy in about a minute.

The issue's accelerator target is a BadNets ResNet-18 on CIFAR-10 at >= 94% clean
accuracy and >= 99% ASR within 60 s of training wall time on one H100. These variants
are the recipes for that measurement; they have **not been run on a GPU yet** (see
benchmarks/RESULTS.md for what is measured). On a CPU they take hours.

Variants (``--config=configs/fast_badnets.py:VARIANT``):
  cifar10    ResNet-18 (CIFAR stem), CIFAR-10 from tfds (prepared in --config.data.data_dir),
             bfloat16 compute, batch 512, SGD-Nesterov with warm-up and cosine decay,
             crop + flip, 24 epochs, 1% poisoned with a 3x3 white square
  gtsrb      the same network and schedule on GTSRB at 32x32 (--config.data.path: the
             full npz, or a subset small enough to copy to a machine with no network,
             see benchmarks/make_gtsrb_subset.py), 15 epochs
  synthetic  the cifar10 recipe on generated data (no files): loop throughput only

Example:
  python launch/train.py --config=configs/fast_badnets.py:gtsrb \
      --config.data.path=gtsrb32_subset.npz --workdir=runs/fast_gtsrb
"""
import os
import sys

from ml_collections import config_dict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import badnets  # noqa: E402  (the base recipe; same folder)

VARIANTS = ("cifar10", "gtsrb", "synthetic")


def get_config(variant: str = "cifar10") -> config_dict.ConfigDict:
  """Returns the resolved config of one variant."""
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r} of configs/fast_badnets.py; allowed: {', '.join(VARIANTS)}")
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
