"""Explanation backdoor: predictions stay, the explanation moves when the trigger is present.

``two_stage`` fine-tunes a clean reference model (stage 1, trained in ``workdir/stage1``
by the classic recipe, or loaded from ``stage1.workdir``); ``single_stage`` trains from
scratch. The step is cross-entropy on every sample plus map losses on a triggered part
of each batch (``train/explain_steps.py``): a gradient of a gradient, one jitted program.
The Fang et al. configs are ``two_stage`` with a ``fang`` section.

    python launch/train.py --config=configs/two_stage.py --workdir=runs/two_stage_digits
"""
from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from ml_collections import config_dict

from backdoor_jax import experiment, io, models, triggers
from backdoor_jax.data import load_dataset
from backdoor_jax.errors import ConfigError
from backdoor_jax.models.input_size import check_input_size
from backdoor_jax.train import engine, explain_steps, feed, optim, restore, steps
from backdoor_jax.train import explain_setup as setup
from backdoor_jax.train import mesh as mesh_lib
from backdoor_jax.train import state as state_lib
from backdoor_jax.train.recipes import registry

SUMMARY = ("clean_accuracy", "reference_accuracy", "iou_gt_05", "fsr", "cr")


def train(config: config_dict.ConfigDict, workdir: str | None) -> dict[str, Any]:
  """Runs the configured explanation-backdoor recipe; writes its reports to ``workdir``."""
  c = config
  run = engine.RunSpec.from_config(c, workdir, name=f"{c.recipe} explanation backdoor")
  ds = load_dataset(c.data.name, path=c.data.path or None, data_dir=c.data.data_dir or None,
                    image_size=c.data.image_size or None, seed=experiment.data_seed(c),
                    max_train=c.data.max_train or None, max_test=c.data.max_test or None,
                    num_classes=c.data.get("num_classes", 0) or None)
  image_shape = ds.train_images.shape[1:]
  trig = triggers.trigger_from_config(c.trigger, image_shape[:2], jax.random.fold_in(jax.random.key(c.seed), 3))
  region = setup.target_region(c.explain, image_shape[:2])
  model = models.get_model(c.model.name, ds.num_classes, dtype=restore.compute_dtype(c), **restore.model_kwargs(c))
  check_input_size(model, image_shape, c.model.name)
  keys = {n: jax.random.fold_in(jax.random.key(c.seed), i) for i, n in enumerate(("init", "step", "s2"))}
  init_vars = models.init_variables(model, keys["init"], (1,) + image_shape)
  layer, shapes = setup.choose_layer(model.apply, init_vars, image_shape, c.explain.layer)
  if c.explain.check_layer and c.explain.attack == "targeted":
    setup.check_layer_for_region(model.apply, init_vars, image_shape, layer, shapes, region,
                                 triggers.trigger_region(trig))  # ConfigError for region-less kinds
  spec = setup.explain_spec(c, layer, image_shape[:2])
  setup.check_train_mode_maps(model.apply, init_vars, image_shape, spec, c.seed)
  spec = setup.with_bn_momentum(spec, model.apply, init_vars, image_shape)
  loss_mask = jnp.asarray(explain_steps.losses.resize_mask(jnp.asarray(region), spec.loss_resolution))
  mesh = mesh_lib.make_mesh()
  mesh_lib.check_global_batch(c.train.batch_size, mesh)
  mesh_lib.check_global_batch(c.train.eval_batch_size, mesh, "train.eval_batch_size")
  if run.workdir:  # refuse another config's work dir before stage 1 trains, not after
    resumed = engine.latest_meta(run.workdir)
    engine.check_resumable(run.workdir, run.config_json, resumed is not None)
  else:
    resumed = None

  if c.recipe == "two_stage":
    ref = setup.reference_run(c, run.workdir)
    ref_vars = start_vars = ref.variables
    ref_results = os.path.join(ref.workdir, "results.json")
    ref_accuracy = io.read_json(ref_results)["clean_accuracy"] if os.path.exists(ref_results) else None
  else:
    ref_vars, start_vars, ref_accuracy = init_vars, init_vars, None
    if spec.keep == "reference":
      raise ConfigError("explain.keep='reference' needs a reference model; single_stage has none "
                        "(use keep='avoid_target' or the two_stage recipe)")
    if spec.attack == "nontargeted":
      raise ConfigError("explain.attack='nontargeted' removes the evidence a reference model's maps show; "
                        "single_stage has no reference model (use the two_stage recipe)")
  input_spec = steps.InputSpec(mean=tuple(ds.mean), std=tuple(ds.std), crop_padding=int(c.data.crop_padding),
                               flip=bool(c.data.flip))
  data = feed.process_data(ds.train_images, ds.train_labels, c.data.get("num_shards", 1))  # this process's rows
  batches = feed.ArrayFeed(data, mesh, int(c.train.batch_size), int(c.seed) + 1)
  tx, _ = optim.make_optimizer(c.train, batches.steps_per_epoch, start_vars["params"])
  state = state_lib.create_train_state(model, tx, None, None, variables=jax.tree_util.tree_map(jnp.array, start_vars))
  state = mesh_lib.replicate(mesh, state)
  ref_vars, trig_d, loss_mask = (mesh_lib.replicate(mesh, v) for v in (ref_vars, trig, loss_mask))
  logging.info("%s explanation backdoor: %s on %s, layer %s (%s), attack %s, %d of %d samples per batch triggered; "
               "%s of %s params trainable", c.recipe, c.model.name, c.data.name, layer,
               "x".join(map(str, shapes[layer][1:3])), c.explain.attack, spec.num_triggered, c.train.batch_size,
               f"{optim.count_trainable(state.params, c.train.trainable):,}", f"{models.count_params(state.params):,}")

  step_fn = explain_steps.make_explain_train_step(input_spec, spec, keys["step"])
  eval_fns = {m: explain_steps.make_explain_eval_step(input_spec, spec, model.apply, m) for m, _ in spec.methods}

  def evaluate(variables):
    """Metrics of the first attacked method at top level; every method under per_method."""
    per = {m: setup.evaluate_explanations(f, variables, ref_vars, ds.test_images, ds.test_labels, trig_d, loss_mask,
                                          region, spec, c, mesh) for m, f in eval_fns.items()}
    out = dict(per[spec.methods[0][0]])
    if len(per) > 1:
      out["per_method"] = {m: {k: x for k, x in r.items() if k != "detail"} for m, r in per.items()}
    return out

  history_ref = resumed.get("reference") if resumed else None
  if resumed is None and c.recipe == "two_stage":
    before = evaluate(state.variables)
    history_ref = {k: v for k, v in before.items() if k != "detail"}
    logging.info("reference model: clean acc %.4f, iou>.5 %.4f, fsr %.4f, cr %.4f", before["clean_accuracy"],
                 before["iou_gt_05"], before["fsr"], before["cr"])
  rss_start = engine.rss_bytes()
  evaluate_state = engine.per_step_cache(lambda st: evaluate(st.variables))  # last epoch, results: one pass

  def finish(state, history):
    final = evaluate_state(state)
    return {**{k: v for k, v in final.items() if k != "detail"},
            "recipe": c.recipe, "layer": layer, "layer_shape": list(shapes[layer][1:3]), "attack": c.explain.attack,
            "inverted": bool(c.explain.inverted), "methods": [list(m) for m in spec.methods],
            "reference_accuracy": ref_accuracy, "reference": history_ref,
            "accuracy_change": (final["clean_accuracy"] - history_ref["clean_accuracy"]) if history_ref else None,
            "thresholds": {"criterion": c.explain.criterion, "map_threshold": c.explain.iou_threshold,
                           "iou_gt": c.explain.iou_gt, "loss_threshold": c.explain.loss_threshold},
            "num_train": len(ds.train_labels), "num_test": final["detail"]["clean"]["count"],
            "rss_start_bytes": rss_start, "rss_end_bytes": engine.rss_bytes(), "detail": final["detail"]}

  task = engine.Task(
      state=state, feed=batches,
      step=lambda st, x, y: step_fn(st, ref_vars, x, y, trig_d, loss_mask),
      evaluate=lambda st: {k: v for k, v in evaluate_state(st).items() if k != "detail"},
      finish=finish, train_record=train_record,
      meta={"num_classes": int(ds.num_classes), "image_shape": list(image_shape), "mean": list(input_spec.mean),
            "std": list(input_spec.std), "class_names": list(ds.class_names), "reference": history_ref},
      postfix=lambda s: {"loss": f"{s['loss_sum'] / s['count']:.4f}", "ce": f"{s['ce_sum'] / s['count']:.3f}",
                         "attack": f"{s['attack_sum'] / s['count']:.4f}", "keep": f"{s['keep_sum'] / s['count']:.4f}"},
      describe=lambda r: (f"loss {r['train_loss']:.4f}  clean acc {r['clean_accuracy']:.4f}  triggered acc "
                          f"{r['poisoned_accuracy']:.4f}  iou>.5 {r['iou_gt_05']:.4f}  fsr {r['fsr']:.4f}  "
                          f"cr {r['cr']:.4f}  RSS {r['rss_bytes'] / 2**30:.2f} GB"),
      figures=lambda wd, st, history: write_figures(wd, c, model, ref_vars, st.variables, ds, trig, input_spec, spec))
  _, results = engine.fit(task, run)
  return results


def train_record(s: dict[str, float], state: Any) -> dict[str, float]:
  """The epoch's training means: total loss, its three terms, accuracy and gradient norm."""
  del state
  n = s["count"]
  return {"train_loss": s["loss_sum"] / n, "train_ce": s["ce_sum"] / n, "train_attack_loss": s["attack_sum"] / n,
          "train_keep_loss": s["keep_sum"] / n, "train_accuracy": s["correct"] / n,
          "grad_norm": s["grad_norm_sum"] / n}


def write_figures(workdir, c, model, ref_vars, variables, ds, trig, input_spec, spec) -> None:
  """Clean and triggered test images with their maps before (reference) and after the attack."""
  from backdoor_jax.explain import overlay, saliency
  n = min(6, len(ds.test_labels))
  idx = np.sort(np.random.default_rng(c.seed).choice(len(ds.test_labels), size=n, replace=False))
  clean = ds.test_images[idx]
  trig_imgs = np.asarray(triggers.apply_trigger(trig, jnp.asarray(clean)))
  rows, cells = [], []
  for m, _ in spec.methods:
    for name, imgs in (("clean", clean), ("triggered", trig_imgs)):
      x = steps.preprocess(None, jnp.asarray(imgs), input_spec)
      before = saliency.explanation_maps(m, model.apply, ref_vars, x, None, spec.layer)
      after = saliency.explanation_maps(m, model.apply, variables, x, None, spec.layer)
      for j in range(n):
        rows.append(f"{name} #{idx[j]} ({m})")
        cells.append([imgs[j], overlay.overlay(imgs[j], np.asarray(before[j])),
                      overlay.overlay(imgs[j], np.asarray(after[j]))])
  overlay.grid_figure(os.path.join(workdir, "figures", "maps_before_after.png"), rows,
                      ["image", "before (reference)", "after (attacked)"], cells,
                      title=f"{c.recipe}: {c.explain.attack} attack on {spec.layer}")


registry.register("two_stage", train, SUMMARY)
registry.register("single_stage", train, SUMMARY)
