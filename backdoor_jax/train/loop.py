"""The BadNets training run: config in, trained backdoored model and reports out.

Stages (each a plain function a notebook can call):
  build_experiment   validate the config, load data, build + apply the trigger
  train_and_evaluate train with checkpoints / resume, evaluate every epoch, write reports
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import numpy as np
from absl import logging
from ml_collections import config_dict

from backdoor_jax import evaluate, figures, io, models, poison, triggers
from backdoor_jax.data import images as image_lib
from backdoor_jax.data import load_dataset, pipeline
from backdoor_jax.errors import ConfigError, check_choice
from backdoor_jax.train import checkpoint as ckpt_lib
from backdoor_jax.train import mesh as mesh_lib
from backdoor_jax.train import init_weights, optim, state as state_lib, steps
from backdoor_jax.train import feed
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


def _keys(seed: int) -> dict[str, jax.Array]:
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


def build_experiment(config: config_dict.ConfigDict) -> Experiment:
  """Loads data, validates every user value and poisons the data. No training.

  Poisoning options (``config.poison``): ``rate`` or ``count`` (count, when set, wins),
  ``mode`` (all_to_one / all_to_all / clean_label), ``phase`` (``both``;
  ``train_only``: the attack test set keeps clean images, measuring how often the
  attack label fires without the trigger; ``test_only``: nothing poisoned in training,
  the clean model's response to the trigger), ``apply_at_size`` (>0: the data is loaded
  at that size, poisoned there, then every image is resized to ``data.image_size``;
  ``exp.trigger`` is then the trigger at that size), ``adv_eps``/``adv_steps``
  (PGD against a linear surrogate before the trigger, for clean-label poisoning).
  The WaNet noise mode (``trigger.wanet_cross_ratio``) is drawn once, here.

  Raises:
    ConfigError: with a one-line message for any invalid setting.
  """
  c = config
  models.get_model(c.model.name, 10, **model_kwargs(c))  # unknown name/stem fails before data loading
  compute_dtype(c)
  p = c.poison
  phase = p.get("phase", "both")
  check_choice("poison.phase", phase, POISON_PHASES)
  apply_at = p.get("apply_at_size", 0) or 0
  if not isinstance(apply_at, int) or isinstance(apply_at, bool) or apply_at < 0:
    raise ConfigError(f"poison.apply_at_size={apply_at!r} is invalid; allowed: 0 (apply after resizing) or an "
                      "image side in pixels >= 1")
  if apply_at and not c.data.image_size:
    raise ConfigError(f"poison.apply_at_size={apply_at} needs data.image_size to resize to; got "
                      f"{c.data.image_size!r}")
  ds = load_dataset(c.data.name, path=c.data.path or None, data_dir=c.data.data_dir or None,
                    image_size=apply_at or c.data.image_size or None, seed=data_seed(c),
                    max_train=c.data.max_train or None, max_test=c.data.max_test or None)
  keys = _keys(c.seed)
  trigger_key = jax.random.fold_in(jax.random.key(c.seed), 3)  # after _keys' poison/init/step
  trig = triggers.trigger_from_config(c.trigger, ds.train_images.shape[1:3], trigger_key)
  count = p.get("count", None)
  amount = {"rate": None, "count": count} if count is not None else {"rate": p.rate}
  cross_ratio = triggers.cross_ratio_from_config(c.trigger) if phase != "test_only" else 0.0
  perturb = None
  adv_eps = p.get("adv_eps", 0.0) or 0.0
  if adv_eps and phase != "test_only":
    surrogate = poison.fit_linear_surrogate(ds.train_images, ds.train_labels, ds.num_classes,
                                            jax.random.fold_in(keys["poison"], 3))
    perturb = poison.make_pgd_perturbation(surrogate, eps=adv_eps, steps=p.get("adv_steps", 10))
  if phase == "test_only":
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
  spec = steps.InputSpec(mean=tuple(ds.mean), std=tuple(ds.std), crop_padding=int(c.data.crop_padding),
                         flip=bool(c.data.flip))
  return Experiment(c, ds, trig, np.asarray(x), np.asarray(y), np.asarray(is_p), np.asarray(tx),
                    np.asarray(ty), np.asarray(src), model, spec)


def run_facts(exp: Experiment) -> dict[str, Any]:
  """What a checkpoint must record so the model can be rebuilt without the data."""
  return {"num_classes": int(exp.dataset.num_classes), "image_shape": list(exp.train_images.shape[1:]),
          "mean": list(exp.input_spec.mean), "std": list(exp.input_spec.std),
          "class_names": list(exp.dataset.class_names)}


def _config_json(config: config_dict.ConfigDict) -> dict[str, Any]:
  return json.loads(config.to_json_best_effort(sort_keys=True))


def _check_workdir(workdir: str, config: config_dict.ConfigDict, has_checkpoint: bool) -> None:
  """Refuses to resume a work dir whose checkpoint belongs to a different config."""
  path = os.path.join(workdir, "config.json")
  if not (has_checkpoint and os.path.exists(path)):
    return
  old, new = io.read_json(path), _config_json(config)
  if old != new:
    flat = lambda d, p="": {k2: v2 for k, v in d.items() for k2, v2 in (flat(v, f"{p}{k}.").items() if isinstance(v, dict) else [(f"{p}{k}", v)])}
    fo, fn = flat(old), flat(new)
    diff = sorted(k for k in set(fo) | set(fn) if fo.get(k) != fn.get(k))
    raise ConfigError(f"work dir {workdir} holds a checkpoint of a different config (differs in: "
                      f"{', '.join(diff[:8])}); use a new --workdir, or delete {workdir} to start fresh")


def train_and_evaluate(config: config_dict.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains a (backdoored) classifier as configured and writes its reports to ``workdir``.

  Writes config.json, metrics.jsonl (one record per epoch), results.json, checkpoints/
  and figures/. Rerunning on the same ``workdir`` resumes from the newest checkpoint.

  Returns:
    The final results record.
  """
  c = config
  workdir = os.path.abspath(workdir)
  is_main = jax.process_index() == 0
  exp = build_experiment(c)
  exp.input_spec = init_weights.input_normalisation(c, exp.input_spec)
  mesh = mesh_lib.make_mesh()
  mesh_lib.check_global_batch(c.train.batch_size, mesh)
  mesh_lib.check_global_batch(c.train.eval_batch_size, mesh, "train.eval_batch_size")
  n_train = len(exp.train_labels)
  if n_train < c.train.batch_size:
    raise ConfigError(f"train.batch_size={c.train.batch_size} exceeds the {n_train} training samples")
  n_poisoned = int(exp.is_poisoned.sum())
  data = feed.process_data(exp.train_images, exp.train_labels, c.data.get("num_shards", 1))  # this process's rows
  steps_per_epoch = pipeline.num_sharded_train_steps(n_train, c.train.batch_size, data.num_shards)
  if len(data.rows) < n_train:  # the other processes' shards are not kept in memory
    exp = dataclasses.replace(exp, train_images=data.images, train_labels=data.labels,
                              is_poisoned=exp.is_poisoned[data.rows])

  keys = _keys(c.seed)
  image_shape = (1,) + data.images.shape[1:]
  init_vars = models.init_variables(exp.model, keys["init"], image_shape)
  init_vars = init_weights.initial_variables(c, init_vars)  # model.init_checkpoint, or a loud warning
  tx, schedule = optim.make_optimizer(c.train, steps_per_epoch, init_vars["params"])
  state = state_lib.create_train_state(exp.model, tx, keys["init"], image_shape, variables=init_vars)
  state = mesh_lib.replicate(mesh, state)

  ckpt = ckpt_lib.Checkpointer(workdir, keep=c.checkpoint.keep)
  start_epoch, history, train_seconds = 0, [], 0.0
  latest = ckpt.latest()
  _check_workdir(workdir, c, latest is not None)
  if latest is not None:
    tree, meta = ckpt.restore(latest, state_lib.checkpoint_tree(state))
    state = state_lib.from_checkpoint_tree(state, tree)
    start_epoch, history, train_seconds = meta["epoch"], meta["history"], meta["train_seconds"]
    logging.info("resumed from %s (epoch %d of %d)", ckpt.directory, start_epoch, c.train.epochs)
  if is_main:
    io.write_json_atomic(os.path.join(workdir, "config.json"), _config_json(c))

  n_params = models.count_params(state.params)
  n_train_params = init_weights.log_trainable(state.params, c.train.trainable)
  logging.info("%s on %s: %d train (%d poisoned), %d test, %d classes; %s params (%s trainable); "
               "devices: %d x %s", c.model.name, c.data.name, n_train, n_poisoned,
               len(exp.dataset.test_labels), exp.dataset.num_classes, f"{n_params:,}", f"{n_train_params:,}",
               jax.device_count(), jax.devices()[0].platform)

  train_step = steps.make_train_step(exp.input_spec, keys["step"])
  eval_step = steps.make_eval_step(exp.input_spec, exp.model.apply)

  def run_eval(variables):
    clean = evaluate.evaluate_classifier(eval_step, variables, exp.dataset.test_images, exp.dataset.test_labels,
                                         c.train.eval_batch_size, mesh)
    attack = evaluate.evaluate_classifier(eval_step, variables, exp.test_triggered, exp.test_attack_labels,
                                          c.train.eval_batch_size, mesh)
    return clean, attack

  for epoch in range(start_epoch, c.train.epochs):
    state, ep = feed.run_epoch(
        train_step, state, data, mesh, batch_size=c.train.batch_size, seed=c.seed, epoch=epoch,
        desc=f"epoch {epoch + 1}/{c.train.epochs}", log_every=c.train.log_every,
        postfix=lambda s: {"loss": f"{s['loss_sum'] / s['count']:.4f}", "acc": f"{s['correct'] / s['count']:.3f}"},
        prefetch=c.train.get("prefetch", 2))
    s, epoch_seconds = ep.sums, ep.seconds
    train_seconds += epoch_seconds
    clean, attack = run_eval(state.variables)
    record = {"epoch": epoch + 1, "step": int(jax.device_get(state.step)),
              "train_loss": float(s["loss_sum"] / s["count"]), "train_accuracy": float(s["correct"] / s["count"]),
              "clean_accuracy": clean["accuracy"], "attack_success_rate": attack["accuracy"],
              "images_per_second": float(s["count"] / epoch_seconds),
              "data_wait_fraction": ep.data_wait_fraction,
              "learning_rate": float(schedule(int(jax.device_get(state.step)) - 1)),
              "epoch_seconds": epoch_seconds}
    history.append(record)
    eta = (c.train.epochs - epoch - 1) * epoch_seconds
    logging.info("epoch %d/%d  loss %.4f  train acc %.4f  clean acc %.4f  ASR %.4f  %.0f img/s  "
                 "waiting for data %.1f%%  ETA %.0fs", epoch + 1, c.train.epochs, record["train_loss"],
                 record["train_accuracy"], record["clean_accuracy"], record["attack_success_rate"],
                 record["images_per_second"], 100 * ep.data_wait_fraction, eta)
    ckpt.save(epoch + 1, state_lib.checkpoint_tree(state),
              {"epoch": epoch + 1, "history": history, "train_seconds": train_seconds, **run_facts(exp)})
    if is_main:
      io.write_jsonl_atomic(os.path.join(workdir, "metrics.jsonl"), history)

  clean, attack = run_eval(state.variables)
  weak = weak_trigger_mask(exp)
  results = {"clean_accuracy": clean["accuracy"], "clean_top5_accuracy": clean["top5_accuracy"],
             "attack_success_rate": attack["accuracy"], "num_poisoned": n_poisoned,
             "weak_trigger_fraction": float(weak.mean()) if len(weak) else 0.0,
             "attack_success_rate_visible": (float((attack["predictions"] == exp.test_attack_labels)[~weak].mean())
                                             if len(attack["predictions"]) and (~weak).any() else None),
             "num_train": n_train, "num_test": clean["count"], "num_attack_test": attack["count"],
             "train_seconds": train_seconds, "epochs": c.train.epochs, "num_params": n_params,
             "num_trainable_params": n_train_params, "devices": jax.device_count(),
             "platform": jax.devices()[0].platform}
  if is_main:
    io.write_jsonl_atomic(os.path.join(workdir, "metrics.jsonl"), history)
    io.write_json_atomic(os.path.join(workdir, "results.json"), results)
    if c.get("figures", True):
      _write_figures(workdir, exp, clean, attack, history)
  ckpt.close()
  return results


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


def _write_figures(workdir: str, exp: Experiment, clean: dict, attack: dict, history: list) -> None:
  fig_dir = os.path.join(workdir, "figures")
  k = min(8, len(exp.test_source_index))
  if k and len(clean["predictions"]):
    rng = np.random.default_rng(exp.config.seed)
    pick = np.sort(rng.choice(len(exp.test_source_index), size=k, replace=False))
    src = exp.test_source_index[pick]
    figures.poisoned_examples(os.path.join(fig_dir, "poisoned_examples.png"), exp.dataset.test_images[src],
                              exp.test_triggered[pick], exp.dataset.test_labels[src], clean["predictions"][src],
                              attack["predictions"][pick], exp.test_attack_labels[pick], exp.dataset.class_names)
  figures.training_curves(os.path.join(fig_dir, "curves.png"), history)
