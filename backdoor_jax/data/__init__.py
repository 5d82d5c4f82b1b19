"""Datasets (uint8 host arrays from tfds, GTSRB folders, npz files, scikit-learn digits)
and the input pipeline (index batching on the host, augment/normalise on the device)."""
from backdoor_jax.data.pipeline import augment
from backdoor_jax.data.pipeline import default_flip
from backdoor_jax.data.pipeline import epoch_permutation
from backdoor_jax.data.pipeline import eval_batches
from backdoor_jax.data.pipeline import normalize
from backdoor_jax.data.pipeline import num_train_steps
from backdoor_jax.data.pipeline import train_batches
from backdoor_jax.data.sources import DATASET_NAMES
from backdoor_jax.data.sources import ImageDataset
from backdoor_jax.data.sources import load_dataset

__all__ = [
    "DATASET_NAMES",
    "ImageDataset",
    "augment",
    "default_flip",
    "epoch_permutation",
    "eval_batches",
    "load_dataset",
    "normalize",
    "num_train_steps",
    "train_batches",
]
