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
from backdoor_jax.configs.fast_badnets import VARIANTS, get_config  # noqa: F401
