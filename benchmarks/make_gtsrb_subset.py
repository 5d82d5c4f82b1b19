r"""Writes a seeded, class-stratified subset of gtsrb32.npz small enough to copy along.

Accelerator machines may have no network and accept only small uploads; the accuracy
runs (configs/fast_badnets.py:gtsrb) read this file instead of the full 160 MB one.

  python benchmarks/make_gtsrb_subset.py --src=../shared/data/gtsrb32.npz \
      --out=gtsrb32_subset.npz --train=12000 --test=4000
"""
import os

import numpy as np
from absl import app, flags

from backdoor_jax.data import load_dataset

_SRC = flags.DEFINE_string("src", None, "The full GTSRB npz (train_images, train_labels, test_images, test_labels).")
_OUT = flags.DEFINE_string("out", None, "Output .npz (compressed).")
_TRAIN = flags.DEFINE_integer("train", 12000, "Training images kept (stratified by class).")
_TEST = flags.DEFINE_integer("test", 4000, "Test images kept (stratified by class).")
_SEED = flags.DEFINE_integer("seed", 0, "Subset seed.")
flags.mark_flags_as_required(["src", "out"])


def main(argv):
  del argv
  ds = load_dataset("npz", path=_SRC.value, image_size=None, seed=_SEED.value, max_train=_TRAIN.value,
                    max_test=_TEST.value)
  arrays = {"train_images": ds.train_images, "train_labels": ds.train_labels,
            "test_images": ds.test_images, "test_labels": ds.test_labels}
  tmp = _OUT.value + ".tmp.npz"
  np.savez_compressed(tmp, **arrays)
  os.replace(tmp, _OUT.value)  # atomic: a killed run leaves no half-written file
  print(f"{_OUT.value}: {len(ds.train_labels)} train / {len(ds.test_labels)} test images, "
        f"{os.path.getsize(_OUT.value) / 2**20:.1f} MiB")


if __name__ == "__main__":
  app.run(main)
