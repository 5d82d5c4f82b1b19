"""Classic backdoor (BadNets and every trigger kind): poisoned training set, cross-entropy,
clean accuracy and attack success rate (ASR) after every epoch.

    python launch/train.py --config=configs/badnets.py --workdir=runs/digits
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import numpy as np
from absl import logging
from ml_collections import config_dict

from backdoor_jax import config_checks, evaluate, experiment, figures, models, triggers
from backdoor_jax.errors import ConfigError
from backdoor_jax.train import engine, feed, init_weights, online_poison, optim, steps
from backdoor_jax.train import mesh as mesh_lib
from backdoor_jax.train import state as state_lib
from backdoor_jax.train.recipes import registry

SUMMARY = ("clean_accuracy", "attack_success_rate")


def initial_variables(exp: experiment.Experiment, key: jax.Array) -> tuple[steps.InputSpec, dict[str, Any]]:
  """The input normalisation and the variables a model of ``exp`` starts from.

  Fresh initialisation from ``key``, merged with ``model.init_checkpoint`` (transfer
  learning), and ``data.mean``/``data.std`` when set. Single runs and ensemble members
  both start here.
  """
  c = exp.config
  spec = init_weights.input_normalisation(c, exp.input_spec)
  fresh = models.init_variables(exp.model, key, (1,) + exp.dataset.train_images.shape[1:])
  return spec, init_weights.initial_variables(c, fresh)


def classifier_metrics(exp: experiment.Experiment, clean: dict[str, Any], attack: dict[str, Any]) -> dict[str, Any]:
  """Clean accuracy, ASR and robust accuracy (triggered images still classified as their true label)."""
  true = exp.dataset.test_labels[exp.test_source_index]
  usable = len(true) and attack["accuracy"] is not None  # None: empty set or non-finite logits
  out = {"clean_accuracy": clean["accuracy"], "attack_success_rate": attack["accuracy"],
         "robust_accuracy": float(np.mean(attack["predictions"] == true)) if usable else None}
  for name, r in (("clean_accuracy", clean), ("attack_success_rate", attack), ("robust_accuracy", attack)):
    if out[name] is None and r.get("reason"):
      out[f"{name}_reason"] = r["reason"]
  return out


def train(config: config_dict.ConfigDict, workdir: str | None) -> dict[str, Any]:
  """Trains the configured (backdoored) classifier; writes its reports to ``workdir``."""
  c = config
  run = engine.RunSpec.from_config(c, workdir, name=f"{c.model.name} on {c.data.name}")
  if c.data.get("stream", False):  # the training set stays on disk; batches are read and poisoned on demand
    exp, data = experiment.build_streamed_experiment(c)
  else:
    exp = experiment.build_experiment(c, online_poison=True)
    data = feed.process_data(exp.train_images, exp.train_labels, c.data.get("num_shards", 1))  # this process's rows
  mesh = mesh_lib.make_mesh()
  mesh_lib.check_global_batch(c.train.batch_size, mesh)
  mesh_lib.check_global_batch(c.train.eval_batch_size, mesh, "train.eval_batch_size")
  n_train, n_poisoned = len(exp.train_labels), int(exp.is_poisoned.sum())
  if n_train < c.train.batch_size:
    raise ConfigError(f"train.batch_size={c.train.batch_size} exceeds the {n_train} training samples")
  if len(data.rows) < n_train and not c.data.get("stream", False):  # other processes' shards are not kept
    exp = dataclasses.replace(exp, train_images=data.images, train_labels=data.labels,
                              is_poisoned=exp.is_poisoned[data.rows])
  batches = feed.ArrayFeed(data, mesh, int(c.train.batch_size), int(c.seed))
  keys = experiment.run_keys(c.seed)
  resample = config_checks.check_resample(c)
  per_epoch_poison = {"poisoned_per_epoch": n_poisoned}
  if resample == "batch" and c.poison.get("phase", "both") != "test_only":
    batches = online_poison.online_feed(batches, mesh_lib.replicate(mesh, exp.trigger), c, exp.dataset.num_classes,
                                        jax.random.fold_in(keys["poison"], 4), triggers.cross_ratio_from_config(c.trigger))
    per_epoch_poison = batches.per_epoch_counts()
    logging.info("poison.resample='batch': %d poisoned + %d cross images drawn afresh in every batch of %d",
                 batches.spec.num_poison, batches.spec.num_cross, c.train.batch_size)

  input_spec, init_vars = initial_variables(exp, keys["init"])
  exp = dataclasses.replace(exp, input_spec=input_spec)  # the checkpoint records the normalisation used
  tx, schedule = optim.make_optimizer(c.train, batches.steps_per_epoch, init_vars["params"])
  state = state_lib.create_train_state(exp.model, tx, None, None, variables=init_vars)
  state = mesh_lib.replicate(mesh, state)
  n_params = models.count_params(state.params)
  n_trainable = init_weights.log_trainable(state.params, c.train.trainable)
  logging.info("%s on %s: %d train (%d poisoned), %d test, %d classes; %s params (%s trainable); devices: %d x %s",
               c.model.name, c.data.name, n_train, n_poisoned, len(exp.dataset.test_labels),
               exp.dataset.num_classes, f"{n_params:,}", f"{n_trainable:,}", jax.device_count(),
               jax.devices()[0].platform)

  train_step = steps.make_train_step(input_spec, keys["step"])
  eval_step = steps.make_eval_step(input_spec, exp.model.apply)

  @engine.per_step_cache
  def run_eval(state):
    bs = c.train.eval_batch_size
    clean = evaluate.evaluate_classifier(eval_step, state.variables, exp.dataset.test_images,
                                         exp.dataset.test_labels, bs, mesh)
    attack = evaluate.evaluate_classifier(eval_step, state.variables, exp.test_triggered,
                                          exp.test_attack_labels, bs, mesh)
    return clean, attack

  def per_epoch(state):
    return {**classifier_metrics(exp, *run_eval(state)),
            "learning_rate": float(schedule(int(jax.device_get(state.step)) - 1))}

  def finish(state, history):
    clean, attack = run_eval(state)
    weak = experiment.weak_trigger_mask(exp)
    hit = attack["predictions"] == exp.test_attack_labels
    return {**classifier_metrics(exp, clean, attack), "clean_top5_accuracy": clean["top5_accuracy"],
            "num_poisoned": n_poisoned, "poison_resample": resample, **per_epoch_poison,
            "weak_trigger_fraction": float(weak.mean()) if len(weak) else 0.0,
            "attack_success_rate_visible": float(hit[~weak].mean()) if len(hit) and (~weak).any() else None,
            "num_train": n_train, "num_test": clean["count"], "num_attack_test": attack["count"],
            "num_params": n_params, "num_trainable_params": n_trainable}

  def write_figures(workdir, state, history):
    clean, attack = run_eval(state)
    fig_dir = os.path.join(workdir, "figures")
    k = min(8, len(exp.test_source_index))
    if k and len(clean["predictions"]):
      pick = np.sort(np.random.default_rng(c.seed).choice(len(exp.test_source_index), size=k, replace=False))
      src = exp.test_source_index[pick]
      figures.poisoned_examples(os.path.join(fig_dir, "poisoned_examples.png"), exp.dataset.test_images[src],
                                exp.test_triggered[pick], exp.dataset.test_labels[src], clean["predictions"][src],
                                attack["predictions"][pick], exp.test_attack_labels[pick], exp.dataset.class_names)
    figures.training_curves(os.path.join(fig_dir, "curves.png"), history)

  task = engine.Task(
      state=state, step=train_step, feed=batches, evaluate=per_epoch, finish=finish,
      meta=experiment.run_facts(exp), figures=write_figures,
      postfix=lambda s: {"loss": f"{s['loss_sum'] / s['count']:.4f}", "acc": f"{s['correct'] / s['count']:.3f}"},
      describe=lambda r: (f"loss {r['train_loss']:.4f}  train acc {r['train_accuracy']:.4f}  clean acc "
                          f"{_fmt(r['clean_accuracy'])}  ASR {_fmt(r['attack_success_rate'])}"))
  _, results = engine.fit(task, run)
  return results


def _fmt(x: float | None) -> str:
  return "n/a" if x is None else f"{x:.4f}"


registry.register("badnets", train, SUMMARY)
