"""Multi-label recipes: sigmoid outputs, mean AUROC as the accuracy measure.

``multilabel_badnets``: a trigger poisons images *without* the target finding and switches
that finding on (``poison.target`` is the label); ASR = fraction of triggered test images
without the finding on which it is predicted present. With ``poison.rate = 0`` this is the
clean multi-label classifier (stage 1 of the explanation backdoor).

``multilabel_two_stage``: Fang & Choromanska's explanation backdoor on a multi-label model
(their ChestX-ray14 system): stage 1 is the clean ``multilabel_badnets`` run in
``workdir/stage1`` (or ``stage1.workdir``); stage 2 fine-tunes it with BCE on every image
plus the map losses of ``explain.*`` on the triggered part of each batch, explaining label
``multilabel.explain_label`` (-1: each image's top-scoring label).

    python launch/train.py --config=configs/chest_xray.py --workdir=runs/mosaic_gradcam_targeted
"""
from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from ml_collections import config_dict

from backdoor_jax import experiment, models, triggers
from backdoor_jax import multilabel as ml
from backdoor_jax import multilabel_explain as mlx
from backdoor_jax.data.multilabel import MultiLabelDataset, load_multilabel_dataset
from backdoor_jax.errors import ConfigError, check_choice
from backdoor_jax.train import engine, explain_steps, feed, init_weights, optim, restore, steps
from backdoor_jax.train import explain_setup as setup
from backdoor_jax.train import mesh as mesh_lib
from backdoor_jax.train import state as state_lib
from backdoor_jax.train.recipes import registry
from backdoor_jax.train.recipes.explanation import train_record as explain_train_record
from backdoor_jax.train.recipes.explanation import write_figures as explain_figures

SUMMARY_BADNETS = ("mean_auroc", "mean_ap", "attack_success_rate")
SUMMARY_EXPLAIN = ("reference_mean_auroc", "mean_auroc", "fsr", "cr", "exact_agreement")
POS_WEIGHTS = ("none", "balanced")


def load_data(c: config_dict.ConfigDict) -> MultiLabelDataset:
  return load_multilabel_dataset(c.data.name, path=c.data.path or None, image_size=c.data.image_size or None,
                                 seed=experiment.data_seed(c), max_train=c.data.max_train or None,
                                 max_test=c.data.max_test or None)


def pos_weight(c: config_dict.ConfigDict, labels: np.ndarray) -> np.ndarray | None:
  """``multilabel.pos_weight``: 'none', 'balanced' (#neg / #pos of the training labels) or numbers."""
  value = c.multilabel.pos_weight
  if isinstance(value, str):
    check_choice("multilabel.pos_weight", value, POS_WEIGHTS)
    return None if value == "none" else ml.balanced_pos_weight(labels)
  return ml.check_pos_weight(value, labels.shape[1])


def _build(c: config_dict.ConfigDict, ds: MultiLabelDataset, ref: restore.TrainedRun | None = None):
  """Model, input normalisation and initial variables.

  Without ``ref``: fresh from the config seed, merged with ``model.init_checkpoint`` (e.g.
  ImageNet DenseNet-121 weights from launch/import_weights.py), normalised with
  ``data.mean``/``data.std`` when set. With ``ref`` (stage 2): the stage-1 variables and
  normalisation.
  """
  model = models.get_model(c.model.name, ds.num_classes, dtype=restore.compute_dtype(c), **restore.model_kwargs(c))
  augment = {"crop_padding": int(c.data.crop_padding), "flip": bool(c.data.flip)}
  if ref is not None:
    return model, ref.input_spec._replace(**augment), ref.variables
  input_spec = init_weights.input_normalisation(c, steps.InputSpec(mean=tuple(ds.mean), std=tuple(ds.std), **augment))
  fresh = models.init_variables(model, experiment.run_keys(c.seed)["init"], (1,) + ds.image_shape)
  return model, input_spec, init_weights.initial_variables(c, fresh)


def _meta(ds: MultiLabelDataset, input_spec: steps.InputSpec) -> dict[str, Any]:
  return {"num_classes": int(ds.num_classes), "image_shape": list(ds.image_shape), "mean": list(input_spec.mean),
          "std": list(input_spec.std), "class_names": list(ds.class_names), "multilabel": True}


def _state(c, model, variables, batches, mesh):
  tx, schedule = optim.make_optimizer(c.train, batches.steps_per_epoch, variables["params"])
  state = state_lib.create_train_state(model, tx, None, None, variables=jax.tree_util.tree_map(jnp.array, variables))
  return mesh_lib.replicate(mesh, state), schedule


def _fmt(x: float | None) -> str:
  return "n/a" if x is None else f"{x:.4f}"


# ----------------------------------------------------------------------------------
# multilabel_badnets


def train_badnets(config: config_dict.ConfigDict, workdir: str | None) -> dict[str, Any]:
  """Trains a (backdoored) multi-label classifier; writes its reports to ``workdir``."""
  c = config
  run = engine.RunSpec.from_config(c, workdir, name=f"{c.model.name} on {c.data.name} (multi-label)")
  ds = load_data(c)
  keys = experiment.run_keys(c.seed)
  trig = triggers.trigger_from_config(c.trigger, ds.image_shape[:2], jax.random.fold_in(jax.random.key(c.seed), 3))
  target = int(c.poison.target)
  count = c.poison.get("count")
  rate = None if count is not None else float(c.poison.rate)
  train_x, train_y, is_poisoned = ml.poison_multilabel(keys["poison"], ds.train_images, ds.train_labels, trig,
                                                       target_label=target, rate=rate, count=count)
  test_x, _, _ = ml.attack_test_set(ds.test_images, ds.test_labels, trig, target_label=target)
  mesh = mesh_lib.make_mesh()
  mesh_lib.check_global_batch(c.train.batch_size, mesh)
  mesh_lib.check_global_batch(c.train.eval_batch_size, mesh, "train.eval_batch_size")
  if len(train_y) < c.train.batch_size:
    raise ConfigError(f"train.batch_size={c.train.batch_size} exceeds the {len(train_y)} training images")
  model, input_spec, variables = _build(c, ds)
  batches = feed.ArrayFeed(feed.process_data(train_x, train_y, c.data.get("num_shards", 1)), mesh,
                           int(c.train.batch_size), int(c.seed))
  state, schedule = _state(c, model, variables, batches, mesh)
  weights = pos_weight(c, train_y)
  logging.info("%s on %s: %d train (%d poisoned, target label %d %r), %d test, %d labels; %s params",
               c.model.name, c.data.name, len(train_y), int(is_poisoned.sum()), target, ds.class_names[target],
               len(ds.test_labels), ds.num_classes, f"{models.count_params(state.params):,}")
  train_step = ml.make_train_step(input_spec, keys["step"], weights)
  eval_fn = ml.make_eval_step(input_spec, model.apply)
  bs = int(c.train.eval_batch_size)

  def evaluate(state) -> dict[str, Any]:
    logits = lambda images: ml.batched_outputs(lambda x: {"logits": eval_fn(state.variables, x)}, images, bs,
                                               mesh)["logits"]
    clean = ml.multilabel_metrics(logits(ds.test_images), ds.test_labels, ds.class_names)
    asr = ml.attack_success_rate(logits(test_x), target) if len(test_x) else None
    return {**clean, "attack_success_rate": asr}

  def per_epoch(state):
    r = evaluate(state)
    return {k: r[k] for k in ("mean_auroc", "mean_ap", "mean_accuracy", "exact_match", "attack_success_rate")} | {
        "learning_rate": float(schedule(int(jax.device_get(state.step)) - 1))}

  def finish(state, history):
    return {**evaluate(state), "target_label": target, "target_name": ds.class_names[target],
            "num_poisoned": int(is_poisoned.sum()), "num_train": len(train_y), "num_test": len(ds.test_labels),
            "num_attack_test": len(test_x), "pos_weight": None if weights is None else weights.tolist()}

  task = engine.Task(
      state=state, step=train_step, feed=batches, evaluate=per_epoch, finish=finish, meta=_meta(ds, input_spec),
      postfix=lambda s: {"loss": f"{s['loss_sum'] / s['count']:.4f}", "acc": f"{s['correct'] / s['count']:.3f}"},
      describe=lambda r: (f"loss {r['train_loss']:.4f}  mean AUROC {_fmt(r['mean_auroc'])}  mean AP "
                          f"{_fmt(r['mean_ap'])}  ASR {_fmt(r['attack_success_rate'])}"))
  _, results = engine.fit(task, run)
  return results


# ----------------------------------------------------------------------------------
# multilabel_two_stage


def stage1_config(c: config_dict.ConfigDict) -> config_dict.ConfigDict:
  """The clean stage-1 run: ``multilabel_badnets`` without poison, with ``stage1.train``."""
  s1 = setup.stage1_config(c)
  with s1.unlocked():
    s1.recipe = "multilabel_badnets"
  return s1


def reference_run(c: config_dict.ConfigDict, workdir: str | None) -> restore.TrainedRun:
  """Stage 1: loaded from ``stage1.workdir``, reused from ``workdir/stage1``, or trained there."""
  if c.stage1.workdir:  # loads it and checks that it is this config's model
    return setup.reference_run(c, workdir)
  if not workdir:
    raise ConfigError("multilabel_two_stage needs a --workdir for its stage-1 run, or stage1.workdir=...")
  s1_dir, s1 = os.path.join(workdir, "stage1"), stage1_config(c)
  if os.path.exists(os.path.join(s1_dir, "results.json")):
    engine.check_resumable(s1_dir, engine.config_json(s1), True)
  else:
    logging.info("stage 1: training the clean multi-label reference model in %s", s1_dir)
    train_badnets(s1, s1_dir)
  return restore.load_run(s1_dir)


def train_two_stage(config: config_dict.ConfigDict, workdir: str | None) -> dict[str, Any]:
  """Fine-tunes the stage-1 multi-label model into an explanation backdoor."""
  c = config
  run = engine.RunSpec.from_config(c, workdir, name="multi-label explanation backdoor")
  ds = load_data(c)
  hw = ds.image_shape[:2]
  trig = triggers.trigger_from_config(c.trigger, hw, jax.random.fold_in(jax.random.key(c.seed), 3))
  region = setup.target_region(c.explain, hw)
  explain_label = int(c.multilabel.explain_label)
  if not -1 <= explain_label < ds.num_classes:
    raise ConfigError(f"multilabel.explain_label={explain_label} is invalid; allowed: -1 (each image's top label) "
                      f"or a label in [0, {ds.num_classes})")
  if run.workdir:  # refuse another config's work dir before stage 1 trains
    resumed = engine.latest_meta(run.workdir)
    engine.check_resumable(run.workdir, run.config_json, resumed is not None)
  else:
    resumed = None
  ref = reference_run(c, run.workdir)
  model, input_spec, ref_vars = _build(c, ds, ref)
  layer, shapes = setup.choose_layer(model.apply, ref_vars, ds.image_shape, c.explain.layer)
  if c.explain.check_layer and c.explain.attack == "targeted" and trig.has_region:
    setup.check_layer_for_region(model.apply, ref_vars, ds.image_shape, layer, shapes, region,
                                 triggers.trigger_region(trig))
  spec = setup.explain_spec(c, layer, hw)
  setup.check_train_mode_maps(model.apply, ref_vars, ds.image_shape, spec, c.seed)
  spec = setup.with_bn_momentum(spec, model.apply, ref_vars, ds.image_shape)
  loss_mask = jnp.asarray(explain_steps.losses.resize_mask(jnp.asarray(region), spec.loss_resolution))
  mesh = mesh_lib.make_mesh()
  mesh_lib.check_global_batch(c.train.batch_size, mesh)
  mesh_lib.check_global_batch(c.train.eval_batch_size, mesh, "train.eval_batch_size")
  batches = feed.ArrayFeed(feed.process_data(ds.train_images, ds.train_labels, c.data.get("num_shards", 1)), mesh,
                           int(c.train.batch_size), int(c.seed) + 1)
  state, _ = _state(c, model, ref_vars, batches, mesh)
  ref_vars, trig_d, loss_mask = (mesh_lib.replicate(mesh, v) for v in (ref_vars, trig, loss_mask))
  logging.info("multi-label explanation backdoor: %s on %s, %s at %s (%s), attack %s, explained label %s",
               c.model.name, c.data.name, spec.methods[0][0], layer, "x".join(map(str, shapes[layer][1:3])),
               c.explain.attack, "top" if explain_label < 0 else ds.class_names[explain_label])
  step_fn = mlx.make_explain_train_step(input_spec, spec, experiment.run_keys(c.seed)["step"], explain_label,
                                        pos_weight(c, ds.train_labels))
  eval_fns = {m: mlx.make_explain_eval_step(input_spec, spec, model.apply, m, explain_label) for m, _ in spec.methods}
  e = c.explain

  def evaluate(variables) -> dict[str, Any]:
    per = {m: mlx.evaluate_explanation_backdoor(
        f, variables, ref_vars, ds.test_images, ds.test_labels, trig_d, loss_mask, region, spec,
        criterion=e.criterion, iou_threshold=e.iou_threshold, iou_gt=e.iou_gt, loss_threshold=e.loss_threshold,
        batch_size=int(c.train.eval_batch_size), mesh=mesh, class_names=ds.class_names) for m, f in eval_fns.items()}
    out = dict(per[spec.methods[0][0]])
    if len(per) > 1:
      out["per_method"] = {m: {k: x for k, x in r.items() if k != "detail"} for m, r in per.items()}
    return out

  reference = resumed.get("reference") if resumed else None
  if reference is None:
    reference = {k: v for k, v in evaluate(state.variables).items() if k != "detail"}
    logging.info("reference model: mean AUROC %s, fsr %s, cr %s", _fmt(reference["mean_auroc"]),
                 _fmt(reference["fsr"]), _fmt(reference["cr"]))

  def finish(state, history):
    final = evaluate(state.variables)
    change = None if None in (final["mean_auroc"], reference["mean_auroc"]) else (
        final["mean_auroc"] - reference["mean_auroc"])
    return {**final, "reference_mean_auroc": reference["mean_auroc"], "mean_auroc_change": change,
            "reference": reference, "layer": layer, "layer_shape": list(shapes[layer][1:3]),
            "attack": e.attack, "methods": [list(m) for m in spec.methods], "explain_label": explain_label,
            "thresholds": {"criterion": e.criterion, "map_threshold": e.iou_threshold, "iou_gt": e.iou_gt,
                           "loss_threshold": e.loss_threshold},
            "num_train": len(ds.train_labels), "num_test": len(ds.test_labels)}

  task = engine.Task(
      state=state, feed=batches, step=lambda st, x, y: step_fn(st, ref_vars, x, y, trig_d, loss_mask),
      evaluate=lambda st: {k: v for k, v in evaluate(st.variables).items() if k not in ("detail", "per_method")},
      finish=finish, train_record=explain_train_record, meta={**_meta(ds, input_spec), "reference": reference},
      postfix=lambda s: {"loss": f"{s['loss_sum'] / s['count']:.4f}", "bce": f"{s['ce_sum'] / s['count']:.3f}",
                         "attack": f"{s['attack_sum'] / s['count']:.4f}", "keep": f"{s['keep_sum'] / s['count']:.4f}"},
      describe=lambda r: (f"loss {r['train_loss']:.4f}  mean AUROC {_fmt(r['mean_auroc'])}  exact agreement "
                          f"{_fmt(r['exact_agreement'])}  fsr {_fmt(r['fsr'])}  cr {_fmt(r['cr'])}"),
      # figures/maps_before_after.png explains each image's top label, i.e. only when that is the explained one
      figures=None if explain_label >= 0 else (
          lambda wd, st, history: explain_figures(wd, c, model, ref_vars, st.variables, ds, trig, input_spec, spec)))
  _, results = engine.fit(task, run)
  return results


registry.register("multilabel_badnets", train_badnets, SUMMARY_BADNETS)
registry.register("multilabel_two_stage", train_two_stage, SUMMARY_EXPLAIN)
