"""One experiment's data: the dataset, the trigger and the poisoned train / attack test sets.

Every recipe starts here: :func:`build_experiment` validates the data, model and poisoning
settings, loads the dataset and poisons it deterministically from the config seed, with no
training. Defenses and the explanation report rebuild the same poisoned data from a run's
config through the same function.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from absl import logging
from ml_collections import config_dict

from backdoor_jax import clean_label, config_checks, models, poison, triggers
from backdoor_jax.data import images as image_lib
from backdoor_jax.data import load_dataset
from backdoor_jax.data.sources import ImageDataset
from backdoor_jax.errors import ConfigError, check_choice
from backdoor_jax.models.input_size import check_input_size
from backdoor_jax.train import steps
from backdoor_jax.train.restore import compute_dtype, model_kwargs


@dataclasses.dataclass
class Experiment:
  """Everything a run needs before the first step, all validated."""
  config: config_dict.ConfigDict
  dataset: Any                 # data.ImageDataset (clean)
  trigger: Any                 # triggers.Trigger
  train_images: np.ndarray     # poisoned training set (uint8)
  train_labels: np.ndarray
  is_poisoned: np.ndarray
  test_triggered: np.ndarray   # triggered non-target test images
  test_attack_labels: np.ndarray
  test_source_index: np.ndarray
  model: Any
  input_spec: steps.InputSpec


def run_keys(seed: int) -> dict[str, jax.Array]:
  """The run's PRNG keys by purpose: poison, init, step (fixed derivation: same seed, same run)."""
  root = jax.random.key(seed)
  return {name: jax.random.fold_in(root, i) for i, name in enumerate(("poison", "init", "step"))}


def data_seed(config: config_dict.ConfigDict) -> int:
  """Seed of the dataset's split / subset: ``data.split_seed`` when set (>= 0), else ``seed``.

  Sweeps fix ``data.split_seed`` so that repeats with different seeds share one dataset
  (and can be trained together, see ``train.ensemble``).
  """
  split_seed = config.data.get("split_seed", -1)
  return int(config.seed) if split_seed is None or split_seed < 0 else int(split_seed)


POISON_PHASES = ("both", "train_only", "test_only")


def _resize_all(images: np.ndarray, size: int) -> np.ndarray:
  return image_lib.convert_images(images, size) if len(images) else np.zeros((0, size, size, 3), np.uint8)


def build_experiment(config: config_dict.ConfigDict, *, online_poison: bool = False) -> Experiment:
  """Loads data, validates every user value and poisons the data. No training.

  Poisoning options (``config.poison``): ``rate`` or ``count`` (count, when set, wins),
  ``mode`` (all_to_one / all_to_all / clean_label), ``phase`` (``both``;
  ``train_only``: the attack test set keeps clean images, measuring how often the
  attack label fires without the trigger; ``test_only``: nothing poisoned in training,
  the clean model's response to the trigger), ``apply_at_size`` (>0: the data is loaded
  at that size, poisoned there, then every image is resized to ``data.image_size``;
  ``exp.trigger`` is then the trigger at that size), ``adv_eps``/``adv_steps``
  (PGD before the trigger, for clean-label poisoning, against ``surrogate``: see
  :func:`backdoor_jax.clean_label.surrogate_from_config`).
  The WaNet noise mode (``trigger.wanet.cross_ratio``) is drawn once, here.
  ``resample`` (``'fixed'``, the default: all of the above) or ``'batch'``: the training
  set stays clean (``is_poisoned`` all False) and the recipe poisons every batch on the
  fly (``train.online_poison``); only callers that do that pass ``online_poison=True``.

  Raises:
    ConfigError: with a one-line message for any invalid setting.
  """
  c = config
  models.get_model(c.model.name, 10, **model_kwargs(c))  # unknown name/stem fails before data loading
  compute_dtype(c)
  p = c.poison
  phase = p.get("phase", "both")
  check_choice("poison.phase", phase, POISON_PHASES)
  per_batch = config_checks.check_resample(c) == "batch"
  if per_batch and not online_poison:
    raise ConfigError("poison.resample='batch' poisons the batches inside the badnets recipe; this tool needs a "
                      "poisoned training set; allowed here: poison.resample='fixed'")
  apply_at = p.get("apply_at_size", 0) or 0
  if not isinstance(apply_at, int) or isinstance(apply_at, bool) or apply_at < 0:
    raise ConfigError(f"poison.apply_at_size={apply_at!r} is invalid; allowed: 0 (apply after resizing) or an "
                      "image side in pixels >= 1")
  if apply_at and not c.data.image_size:
    raise ConfigError(f"poison.apply_at_size={apply_at} needs data.image_size to resize to; got "
                      f"{c.data.image_size!r}")
  ds = load_dataset(c.data.name, path=c.data.path or None, data_dir=c.data.data_dir or None,
                    image_size=apply_at or c.data.image_size or None, seed=data_seed(c),
                    max_train=c.data.max_train or None, max_test=c.data.max_test or None,
                    num_classes=c.data.get("num_classes", 0) or None)
  keys = run_keys(c.seed)
  trigger_key = jax.random.fold_in(jax.random.key(c.seed), 3)  # after run_keys' poison/init/step
  trig = triggers.trigger_from_config(c.trigger, ds.train_images.shape[1:3], trigger_key)
  count = p.get("count", None)
  amount = {"rate": None, "count": count} if count is not None else {"rate": p.rate}
  cross_ratio = triggers.cross_ratio_from_config(c.trigger) if phase != "test_only" and not per_batch else 0.0
  perturb = None
  adv_eps = p.get("adv_eps", 0.0) or 0.0
  if adv_eps and phase != "test_only":
    surrogate = clean_label.surrogate_from_config(p, ds.train_images, ds.train_labels, ds.num_classes,
                                             jax.random.fold_in(keys["poison"], 3),
                                             steps.InputSpec(mean=tuple(ds.mean), std=tuple(ds.std)))
    perturb = clean_label.make_pgd_perturbation(surrogate, eps=adv_eps, steps=p.get("adv_steps", 10))
  if phase == "test_only" or per_batch:  # per_batch: the recipe poisons each batch
    poison.choose_poison_indices(keys["poison"], ds.train_labels, target=p.target, mode=p.mode,
                                 num_classes=ds.num_classes, **amount)  # validates the settings only
    x, y, is_p = ds.train_images.copy(), ds.train_labels.copy(), np.zeros(len(ds.train_labels), bool)
  else:
    x, y, is_p = poison.poison_train_set(keys["poison"], ds.train_images, ds.train_labels, trig,
                                         target=p.target, mode=p.mode, num_classes=ds.num_classes,
                                         cross_ratio=cross_ratio, perturb=perturb, **amount)
  tx, ty, src = poison.poison_test_set(ds.test_images, ds.test_labels, trig, target=p.target,
                                       mode=p.mode, num_classes=ds.num_classes, apply=phase != "train_only")
  if cross_ratio:
    logging.info("WaNet noise mode: %d cross samples keep their labels (fixed for the run)",
                 int(np.sum(np.any(x != ds.train_images, axis=(1, 2, 3)) & ~is_p)))
  if apply_at and apply_at != c.data.image_size:
    size = int(c.data.image_size)
    x, tx = _resize_all(x, size), _resize_all(tx, size)
    ds = dataclasses.replace(ds, train_images=_resize_all(ds.train_images, size),
                             test_images=_resize_all(ds.test_images, size))
  model = models.get_model(c.model.name, ds.num_classes, dtype=compute_dtype(c), **model_kwargs(c))
  check_input_size(model, x.shape[1:], c.model.name)  # maps that shrink to nothing give NaN logits
  spec = steps.InputSpec(mean=tuple(ds.mean), std=tuple(ds.std), crop_padding=int(c.data.crop_padding),
                         flip=bool(c.data.flip))
  return Experiment(c, ds, trig, np.asarray(x), np.asarray(y), np.asarray(is_p), np.asarray(tx),
                    np.asarray(ty), np.asarray(src), model, spec)


def run_facts(exp: Experiment) -> dict[str, Any]:
  """What a checkpoint must record so the model can be rebuilt without the data."""
  return {"num_classes": int(exp.dataset.num_classes), "image_shape": list(exp.train_images.shape[1:]),
          "mean": list(exp.input_spec.mean), "std": list(exp.input_spec.std),
          "class_names": list(exp.dataset.class_names)}


def weak_trigger_mask(exp: Experiment, min_change: float = 32.0, min_change_global: float = 2.0) -> np.ndarray:
  """Triggered test images the trigger barely changed (bool per attack test image).

  A patch whose colour the image already has at that spot (a white square on a bright
  corner) is invisible; no model can react to it. For triggers with a region (patches,
  a masked blend) an image counts as weakly triggered when the mean absolute change
  over the region's pixels is below ``min_change`` (of 255). Triggers without a region
  (WaNet, filters, moire, full-image blends) change every pixel a little, so the mean
  absolute change over the whole image is compared with ``min_change_global`` instead
  (a warp of a flat image, for example, changes nothing). With ``poison.phase =
  'train_only'`` no test image is triggered and none counts as weak.
  ``attack_success_rate_visible`` is the ASR over the others.
  """
  n = len(exp.test_source_index)
  before_all = exp.dataset.test_images[exp.test_source_index]
  if not n or exp.config.poison.get("phase", "both") == "train_only":
    return np.zeros((n,), bool)
  if not exp.trigger.has_region:
    diff = np.abs(exp.test_triggered.astype(np.float32) - before_all.astype(np.float32))
    return diff.mean(axis=(1, 2, 3)) < min_change_global
  m = triggers.trigger_region(exp.trigger)
  if m.shape != exp.test_triggered.shape[1:3]:  # trigger applied before resizing (poison.apply_at_size)
    m = np.asarray(jax.image.resize(m.astype(np.float32), exp.test_triggered.shape[1:3], "linear")) > 0
  if not m.any():
    return np.zeros((n,), bool)
  before = before_all[:, m].astype(np.float32)
  after = exp.test_triggered[:, m].astype(np.float32)
  return np.abs(after - before).mean(axis=(1, 2)) < min_change




def build_streamed_experiment(config: config_dict.ConfigDict) -> tuple[Experiment, Any]:
  """``data.stream=True``: the training set stays on disk, the test sets are built in memory.

  Returns the experiment (its ``train_images`` empty, ``train_labels``/``is_poisoned``
  those of the whole training set, after poisoning) and the
  ``data.streaming.StreamingData`` that reads this process's training rows on demand,
  poisoned exactly as :func:`build_experiment` poisons them in memory.

  Raises:
    ConfigError: settings streaming cannot honour (``poison.adv_eps``), or any invalid one.
  """
  from backdoor_jax.data import records, streaming  # grain / tfds are imported only when streaming
  c = config
  models.get_model(c.model.name, 10, **model_kwargs(c))
  compute_dtype(c)
  p = c.poison
  phase = p.get("phase", "both")
  check_choice("poison.phase", phase, POISON_PHASES)
  config_checks.check_resample(c)  # 'batch' needs the training set in memory
  apply_at, size = int(p.get("apply_at_size", 0) or 0), c.data.image_size
  if not isinstance(size, int) or isinstance(size, bool) or size < 1:
    raise ConfigError(f"data.image_size={size!r} is invalid with data.stream=True; allowed: a side in pixels >= 1")
  keys = run_keys(c.seed)
  trig = triggers.trigger_from_config(c.trigger, (apply_at or size,) * 2, jax.random.fold_in(jax.random.key(c.seed), 3))
  count = p.get("count", None)
  amount = {"rate": None, "count": count} if count is not None else {"rate": p.rate}
  data = streaming.process_data_from_config(
      c.data.name, path=c.data.path or None, data_dir=c.data.data_dir or None, image_size=size, seed=data_seed(c),
      max_train=c.data.max_train or None, num_shards=c.data.get("num_shards", 1),
      trigger=None if phase == "test_only" else trig, poison_key=keys["poison"], target=p.target, mode=p.mode,
      cross_ratio=triggers.cross_ratio_from_config(c.trigger) if phase != "test_only" else 0.0,
      apply_at_size=apply_at, adv_eps=p.get("adv_eps", 0.0) or 0.0, **amount)
  test = records.open_split(c.data.name, split="test", path=c.data.path or None, data_dir=c.data.data_dir or None,
                              image_size=apply_at or size, max_examples=c.data.max_test or None, seed=data_seed(c),
                              class_names=data.class_names, stats=(data.mean, data.std))
  test_images, test_labels = records.read_split(test)
  tx, ty, src = poison.poison_test_set(test_images, test_labels, trig, target=p.target, mode=p.mode,
                                       num_classes=data.num_classes, apply=phase != "train_only")
  if apply_at and apply_at != size:
    tx, test_images = _resize_all(np.asarray(tx), size), _resize_all(test_images, size)
  ds = ImageDataset(name=c.data.name, train_images=np.zeros((0, size, size, 3), np.uint8),
                           train_labels=np.zeros((0,), np.int32), test_images=test_images, test_labels=test_labels,
                           num_classes=data.num_classes, class_names=tuple(data.class_names),
                           mean=tuple(data.mean), std=tuple(data.std))
  model = models.get_model(c.model.name, ds.num_classes, dtype=compute_dtype(c), **model_kwargs(c))
  check_input_size(model, (size, size, 3), c.model.name)
  spec = steps.InputSpec(mean=tuple(ds.mean), std=tuple(ds.std), crop_padding=int(c.data.crop_padding),
                         flip=bool(c.data.flip))
  exp = Experiment(c, ds, trig, ds.train_images, np.asarray(data.labels), np.asarray(data.is_poisoned),
                   np.asarray(tx), np.asarray(ty), np.asarray(src), model, spec)
  return exp, data
