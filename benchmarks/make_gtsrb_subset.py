r"""A seeded, class-stratified subset of gtsrb32.npz small enough to travel with a GPU run.

Accelerator machines may have no network and accept only small uploads; the accuracy
runs (``configs/fast_badnets.py:gtsrb``) read this file instead of the full 120 MB one.
``python -m benchmarks gtsrb-subset --src=../shared/data/gtsrb32.npz --out=gtsrb32_subset.npz``.
"""
from __future__ import annotations

import os

import numpy as np


def write_subset(src: str, out: str, train: int, test: int, seed: int = 0) -> str:
  """Writes ``out`` (compressed npz: train/test images and labels) atomically; returns a summary line."""
  from backdoor_jax.data import load_dataset

  ds = load_dataset("npz", path=src, image_size=None, seed=seed, max_train=train, max_test=test)
  arrays = {"train_images": ds.train_images, "train_labels": ds.train_labels,
            "test_images": ds.test_images, "test_labels": ds.test_labels}
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  tmp = out + ".tmp.npz"
  np.savez_compressed(tmp, **arrays)
  os.replace(tmp, out)  # atomic: a killed run leaves no half-written file
  return (f"{out}: {len(ds.train_labels)} train / {len(ds.test_labels)} test images, "
          f"{os.path.getsize(out) / 2**20:.1f} MiB")
