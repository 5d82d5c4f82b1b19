"""Explanation-backdoor recipes: two-stage (clean model, then fine-tune) and single-stage.

An explanation backdoor keeps predictions but moves the explanation when the trigger is
present. Stage 1 trains (or loads) a clean reference model; stage 2 fine-tunes it with
cross-entropy on every sample plus map losses (``train/explain_steps.py``). Evaluation
runs every epoch: accuracy on clean and triggered test images, IoU of the triggered
maps with the target region, fooling success rate (FSR) and correct rate (CR).
"""
from __future__ import annotations

import copy
import os
import resource
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from ml_collections import config_dict

from backdoor_jax import io, models, triggers
from backdoor_jax.data import load_dataset, pipeline
from backdoor_jax.errors import ConfigError, check_choice
from backdoor_jax.explain import core as explain_core
from backdoor_jax.explain import metrics as map_metrics
from backdoor_jax.explain import saliency
from backdoor_jax.train import feed
from backdoor_jax.train import checkpoint as ckpt_lib
from backdoor_jax.train import explain_steps, loop, optim, restore, steps
from backdoor_jax.train import mesh as mesh_lib
from backdoor_jax.train import state as state_lib

RECIPES = ("two_stage", "single_stage")
CRITERIA = ("iou", "loss")
KEEP_MODES = ("reference", "avoid_target", "none")


def target_region(cfg: Any, image_hw: tuple[int, int]) -> np.ndarray:
  """(H, W) float mask of the region the attack moves the explanation to.

  ``explain.target`` = 'corner' (a square of ``target_fraction`` of the side in
  ``target_corner``), 'border' (a frame ``target_fraction`` of the side wide), or
  'file' (``target_path``, an .npy (H, W) mask).
  """
  h, w = image_hw
  kind = cfg.target
  check_choice("explain.target", kind, ("corner", "border", "file"))
  if kind == "file":
    if not os.path.exists(cfg.target_path):
      raise ConfigError(f"explain.target_path={cfg.target_path!r} does not exist")
    m = np.load(cfg.target_path, allow_pickle=False).astype(np.float32)
    if m.shape != (h, w):
      raise ConfigError(f"target mask {cfg.target_path} has shape {m.shape}; expected {(h, w)}")
    return m
  f = float(cfg.target_fraction)
  if not 0 < f <= 1:
    raise ConfigError(f"explain.target_fraction={f} must be in (0, 1]")
  if kind == "border":
    t = max(1, int(round(f * min(h, w))))
    m = np.ones((h, w), np.float32)
    m[t:h - t, t:w - t] = 0
    return m
  return np.asarray(map_metrics.square_region((h, w), corner=cfg.target_corner, fraction=f), np.float32)


def choose_layer(apply_fn, variables, image_shape, requested: str) -> tuple[str, dict[str, tuple[int, ...]]]:
  """The Grad-CAM layer: ``requested``, or the deepest spatial layer whose map is >= 4x4."""
  dummy = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
  shapes = explain_core.layer_shapes(apply_fn, variables, dummy)
  spatial = [k for k, s in shapes.items() if len(s) == 4]
  if requested:
    explain_core.resolve_layers(apply_fn, variables, dummy, [requested])
    return requested, shapes
  big = [k for k in spatial if min(shapes[k][1:3]) >= 4]
  if not big:
    raise ConfigError(f"no layer has a map of at least 4x4; set explain.layer to one of {', '.join(spatial)}")
  return big[-1], shapes


def receptive_field(apply_fn, variables, image_shape, layer: str, cells: np.ndarray) -> np.ndarray:
  """(H, W) bool: input pixels that can influence the activations of ``layer`` at ``cells``.

  Measured, not derived: the gradient of the summed activations in those cells (a
  (h, w) bool mask at layer resolution) with respect to a random input, over a few
  inputs so that no pixel's influence hides behind a dead ReLU.
  """
  def summed(x):
    _, st = apply_fn(variables, x, train=False, mutable=["intermediates"])
    a = st["intermediates"][layer][0]
    return jnp.sum(jnp.abs(a) * jnp.asarray(cells, a.dtype)[None, :, :, None])
  x = jax.random.normal(jax.random.key(0), (4,) + tuple(image_shape))
  g = jax.grad(lambda x: summed(x) + jnp.sum(x) * 0)(x)
  field = np.asarray(jnp.any(jnp.abs(g) > 0, axis=(0, 3)))
  return field


def check_layer_for_region(apply_fn, variables, image_shape, layer, shapes, region, trigger_mask) -> None:
  """Fails early when the layer cannot express the target region or cannot see the trigger.

  Two checks: a target region smaller than one cell of the layer's map, and target
  cells whose receptive field misses the trigger (the cells then cannot "know" the
  trigger is there). The message lists the layers that pass both checks.
  """
  def problem(name):
    h, w = image_shape[:2]
    lh, lw = shapes[name][1:3]
    ch, cw = h / lh, w / lw
    rows, cols = np.nonzero(region > 0)
    if rows.size == 0:
      return "the target region is empty"
    if (rows.max() - rows.min() + 1) < ch or (cols.max() - cols.min() + 1) < cw:
      return f"its {lh}x{lw} map has cells of {ch:g}x{cw:g} px, larger than the target region"
    cell_region = np.asarray(jax.image.resize(jnp.asarray(region, jnp.float32), (lh, lw), "linear")) > 0.25
    field = receptive_field(apply_fn, variables, image_shape, name, cell_region)
    if not np.any(field & (np.asarray(trigger_mask) > 0)):
      return "the receptive field of its target cells does not contain the trigger"
    return None

  why = problem(layer)
  if why is None:
    return
  spatial = [k for k, s in shapes.items() if len(s) == 4]
  ok = [k for k in spatial if k != layer and problem(k) is None]
  raise ConfigError(f"Grad-CAM layer {layer!r} cannot carry this attack: {why}; layers that would work: "
                    f"{', '.join(ok) or 'none'} (or set explain.check_layer=False)")


def _stage1_config(c: config_dict.ConfigDict) -> config_dict.ConfigDict:
  """The clean run's config: stage-2 sections dropped, so changing them keeps stage 1 reusable."""
  s1 = copy.deepcopy(c)
  with s1.unlocked():
    for key in ("explain", "stage1", "fang"):
      if key in s1:
        del s1[key]
    s1.poison.rate = 0.0
    s1.train = copy.deepcopy(c.stage1.train)
    s1.recipe = "badnets"
  return s1


def reference_run(c: config_dict.ConfigDict, workdir: str) -> restore.TrainedRun:
  """Stage 1: the clean model, loaded from ``stage1.workdir`` or trained in ``workdir/stage1``."""
  if c.stage1.workdir:
    run = restore.load_run(c.stage1.workdir)
    if run.config.model.name != c.model.name or restore.model_kwargs(run.config) != restore.model_kwargs(c):
      raise ConfigError(f"stage-1 checkpoint {c.stage1.workdir} is a {run.config.model.name} "
                        f"{restore.model_kwargs(run.config)}; this config trains a {c.model.name} "
                        f"{restore.model_kwargs(c)}")
    return run
  s1_dir = os.path.join(workdir, "stage1")
  s1_config = _stage1_config(c)
  if os.path.exists(os.path.join(s1_dir, "results.json")):  # finished earlier: reuse, if it is this config
    loop._check_workdir(s1_dir, s1_config, True)
    logging.info("stage 1: reusing the finished clean run in %s", s1_dir)
    return restore.load_run(s1_dir)
  logging.info("stage 1: training the clean reference model in %s", s1_dir)
  loop.train_and_evaluate(s1_config, s1_dir)
  return restore.load_run(s1_dir)


def _fang_weights(c: config_dict.ConfigDict) -> tuple[float, float, float]:
  """(ce, attack, keep) weights of Fang et al.'s per-sample losses averaged over a batch.

  clean: (beta L_c + alpha L_s) / z, poisoned: (beta L_c + L_p) / z, z = alpha + beta + 1;
  with a fraction f of every batch attacked (1 - f when inverted) the batch mean is
  beta/z mean L_c + f/z mean_attacked L_p + alpha (1 - f)/z mean_kept L_s.
  """
  alpha, beta = float(c.fang.alpha), float(c.fang.beta)
  if alpha < 0 or beta < 0:
    raise ConfigError(f"fang.alpha={alpha} and fang.beta={beta} must be >= 0")
  f = float(c.explain.triggered_fraction)
  f = 1.0 - f if c.explain.inverted else f
  z = alpha + beta + 1.0
  return beta / z, f / z, alpha * (1.0 - f) / z


def _explain_spec(c: config_dict.ConfigDict, layer: str, image_hw: tuple[int, int]) -> explain_steps.ExplainSpec:
  e = c.explain
  if c.get("fang"):  # the weights follow fang.alpha / fang.beta and the batch split, overrides included
    with e.unlocked():
      e.ce_weight, e.attack_weight, e.keep_weight = _fang_weights(c)
  for name in ("attack_weight", "keep_weight", "ce_weight"):
    if e[name] < 0:
      raise ConfigError(f"explain.{name}={e[name]} must be >= 0")
  if not 0 < e.triggered_fraction < 1:
    raise ConfigError(f"explain.triggered_fraction={e.triggered_fraction} must be in (0, 1)")
  num_triggered = int(round(e.triggered_fraction * c.train.batch_size))
  if not 1 <= num_triggered <= c.train.batch_size - 1:
    raise ConfigError(f"explain.triggered_fraction={e.triggered_fraction} of train.batch_size="
                      f"{c.train.batch_size} gives {num_triggered} triggered samples per batch; it must "
                      f"leave at least one triggered and one clean sample")
  check_choice("explain.keep", e.keep, KEEP_MODES)
  check_choice("explain.bn_mode", e.bn_mode, explain_steps.BN_MODES)
  check_choice("explain.criterion", e.criterion, CRITERIA)
  h, w = image_hw
  res = int(e.loss_resolution)
  if res < 0 or (res and (h % res or w % res)):
    raise ConfigError(f"explain.loss_resolution={res} must be 0 (input size) or divide the image size {h}x{w}")
  if e.attack == "nontargeted" and not 1 <= int(e.top_k) <= (res or h) * (res or w):
    raise ConfigError(f"explain.top_k={e.top_k} must be in [1, {(res or h) * (res or w)}] (pixels of the "
                      f"{res or h}x{res or w} loss maps)")
  methods = tuple((m, float(w)) for m, w in (e.joint_weights.items() if e.get("joint_weights") else [(e.method, 1.0)]))
  for m, _ in methods:
    check_choice("explain.method", m, saliency.METHODS)
  return explain_steps.ExplainSpec(
      methods=methods, layer=layer, attack=e.attack, keep=e.keep,
      num_triggered=num_triggered, inverted=bool(e.inverted),
      ce_weight=float(e.ce_weight), attack_weight=float(e.attack_weight), keep_weight=float(e.keep_weight),
      loss_resolution=res, top_k=int(e.top_k), bn_mode=e.bn_mode)


def check_train_mode_maps(apply_fn, variables: Any, image_shape: tuple[int, ...], spec: explain_steps.ExplainSpec,
                          seed: int = 0) -> None:
  """Refuses bn_mode='train' where it would make a sample's map depend on the others' scores.

  The maps are computed from the gradient of the batch's summed scores. In train mode a
  BatchNorm *after* the explained activation (any BatchNorm for SimpleGrad, which
  explains the input) normalises over the batch, so that gradient picks up
  d score_c / d A_b for c != b and the training maps stop being the per-sample maps
  that evaluation reports. Measured directly: the Jacobian of sample 1's score with
  respect to sample 0's activation must vanish.
  """
  if spec.bn_mode != "train" or "batch_stats" not in variables:
    return
  from backdoor_jax.models.common import INTERMEDIATES, PERTURBATIONS
  apply = explain_steps.train_mode_apply(apply_fn, jax.random.key(seed))
  x = jax.random.normal(jax.random.key(seed), (2,) + tuple(image_shape))
  shapes = explain_core.layer_shapes(apply_fn, variables, x)
  base = {k: v for k, v in variables.items() if k != PERTURBATIONS}
  for method, _ in spec.methods:
    if method == "vbp":  # forward-only: no gradient to mix
      continue
    on_input = method == "simple_grad"

    def scores(z, on_input=on_input):
      v = base if on_input else {**base, PERTURBATIONS: {spec.layer: z}}
      logits, _ = apply(v, x + z if on_input else x, mutable=[INTERMEDIATES])
      return logits[:, 0]

    zero = jnp.zeros_like(x) if on_input else jnp.zeros(shapes[spec.layer], x.dtype)
    jac = jax.jacrev(scores)(zero)  # (2, 2, ...): d score_c / d z_b
    own, cross = float(jnp.abs(jac[0, 0]).max()), float(jnp.abs(jac[1, 0]).max())
    if cross > 1e-3 * max(own, 1e-12):
      where = "the input" if on_input else f"layer {spec.layer!r}"
      raise ConfigError(
          f"explain.bn_mode='train' mixes the samples of a batch in the {method} maps at {where}: a "
          f"BatchNorm after it normalises over the batch, so each sample's map picks up the other "
          f"samples' scores (largest d score_1 / d sample 0: {cross:.2g}, against {own:.2g} for its own); use "
          f"explain.bn_mode='frozen' or 'refresh', or explain a layer with no BatchNorm after it")


def evaluate_explanations(eval_step, variables, ref_variables, images, labels, trig, loss_mask, region,
                          spec: explain_steps.ExplainSpec, c: config_dict.ConfigDict, mesh) -> dict[str, Any]:
  """Accuracy and map metrics on clean and triggered versions of ``images``."""
  out = {}
  bs = c.train.eval_batch_size
  local = mesh_lib.local_slice(bs)
  region_j = jnp.asarray(region > 0)
  for name, triggered in (("clean", False), ("triggered", True)):
    correct, attack_loss, ious = [], [], []
    for idx, valid in pipeline.eval_batches(len(labels), bs):
      x, y = mesh_lib.shard_batch(mesh, images[idx[local]], labels[idx[local]])
      r = eval_step(variables, ref_variables, x, y, trig, loss_mask, triggered)
      iou = map_metrics.iou(r["maps"], region_j, threshold=c.explain.iou_threshold)
      r = mesh_lib.to_host({"correct": r["correct"], "attack_loss": r["attack_loss"], "iou": iou})
      correct.append(r["correct"][valid])
      attack_loss.append(r["attack_loss"][valid])
      ious.append(r["iou"][valid])
    correct, attack_loss, ious = map(np.concatenate, (correct, attack_loss, ious))
    if c.explain.criterion == "iou":
      fooled = ious > c.explain.iou_gt
    else:
      fooled = attack_loss < c.explain.loss_threshold
    out[name] = {"accuracy": float(correct.mean()), "fooled_rate": float(fooled.mean()),
                 "iou": {k: float(v) for k, v in map_metrics.iou_summary(jnp.asarray(ious)).items()},
                 "attack_loss_mean": float(attack_loss.mean()), "count": int(len(correct))}
  attacked, kept = ("clean", "triggered") if spec.inverted else ("triggered", "clean")
  return {"clean_accuracy": out["clean"]["accuracy"], "poisoned_accuracy": out["triggered"]["accuracy"],
          "fsr": out[attacked]["fooled_rate"], "cr": 1.0 - out[kept]["fooled_rate"],
          # IoU with the target region: of the attacked images (triggered ones; clean ones when
          # inverted), and of the kept images under kept_iou_gt_05.
          "iou_mean": out[attacked]["iou"]["mean"], "iou_median": out[attacked]["iou"]["median"],
          "iou_std": out[attacked]["iou"]["std"], "iou_gt_05": out[attacked]["iou"]["gt_05"],
          "kept_iou_gt_05": out[kept]["iou"]["gt_05"], "detail": out}


def _rss_bytes() -> int:
  """Current resident set size (Linux /proc), else the peak from getrusage."""
  try:
    with open("/proc/self/statm") as f:
      return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
  except OSError:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def device_memory_bytes() -> int | None:
  stats = getattr(jax.devices()[0], "memory_stats", lambda: None)()
  return int(stats["bytes_in_use"]) if stats and "bytes_in_use" in stats else None


def train_explanation_backdoor(config: config_dict.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs the configured explanation-backdoor recipe and writes its reports to ``workdir``.

  Writes config.json, metrics.jsonl (per epoch), results.json, checkpoints/, figures/;
  stage 1 (two-stage, when trained here) lives in ``workdir/stage1``. Resumable.
  """
  c = config
  check_choice("recipe", c.recipe, RECIPES)
  workdir = os.path.abspath(workdir)
  is_main = jax.process_index() == 0
  ds = load_dataset(c.data.name, path=c.data.path or None, data_dir=c.data.data_dir or None,
                    image_size=c.data.image_size or None, seed=c.seed,
                    max_train=c.data.max_train or None, max_test=c.data.max_test or None)
  image_shape = ds.train_images.shape[1:]
  trig = triggers.trigger_from_config(c.trigger, image_shape[:2], jax.random.fold_in(jax.random.key(c.seed), 3))
  region = target_region(c.explain, image_shape[:2])
  model = models.get_model(c.model.name, ds.num_classes, dtype=restore.compute_dtype(c), **restore.model_kwargs(c))
  keys = {n: jax.random.fold_in(jax.random.key(c.seed), i) for i, n in enumerate(("init", "step", "s2"))}
  init_vars = models.init_variables(model, keys["init"], (1,) + image_shape)
  layer, shapes = choose_layer(model.apply, init_vars, image_shape, c.explain.layer)
  if c.explain.check_layer and c.explain.attack == "targeted":
    check_layer_for_region(model.apply, init_vars, image_shape, layer, shapes, region,
                           triggers.trigger_region(trig))  # ConfigError for region-less kinds
  spec = _explain_spec(c, layer, image_shape[:2])
  check_train_mode_maps(model.apply, init_vars, image_shape, spec, c.seed)
  loss_mask = jnp.asarray(explain_steps.losses.resize_mask(jnp.asarray(region), spec.loss_resolution))
  mesh = mesh_lib.make_mesh()
  mesh_lib.check_global_batch(c.train.batch_size, mesh)
  mesh_lib.check_global_batch(c.train.eval_batch_size, mesh, "train.eval_batch_size")

  ckpt = ckpt_lib.Checkpointer(workdir, keep=c.checkpoint.keep)
  latest = ckpt.latest()
  loop._check_workdir(workdir, c, latest is not None)  # before stage 1 trains, not after
  if c.recipe == "two_stage":
    ref = reference_run(c, workdir)
    ref_vars, start_vars = ref.variables, ref.variables
    ref_accuracy = io.read_json(os.path.join(ref.workdir, "results.json"))["clean_accuracy"] if os.path.exists(
        os.path.join(ref.workdir, "results.json")) else None
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
  n_train = len(ds.train_labels)
  data = feed.process_data(ds.train_images, ds.train_labels, c.data.get("num_shards", 1))  # this process's rows
  steps_per_epoch = pipeline.num_sharded_train_steps(n_train, c.train.batch_size, data.num_shards)
  tx, schedule = optim.make_optimizer(c.train, steps_per_epoch, start_vars["params"])
  state = state_lib.create_train_state(model, tx, None, None, variables=jax.tree_util.tree_map(jnp.array, start_vars))
  state = mesh_lib.replicate(mesh, state)
  ref_vars = mesh_lib.replicate(mesh, ref_vars)
  trig_d = mesh_lib.replicate(mesh, trig)
  loss_mask = mesh_lib.replicate(mesh, loss_mask)

  start_epoch, history, train_seconds, history_ref = 0, [], 0.0, None
  if latest is not None:
    tree, meta = ckpt.restore(latest, state_lib.checkpoint_tree(state))
    state = state_lib.from_checkpoint_tree(state, tree)
    start_epoch, history, train_seconds = meta["epoch"], meta["history"], meta["train_seconds"]
    history_ref = meta.get("reference")
    logging.info("resumed from %s (epoch %d of %d)", ckpt.directory, start_epoch, c.train.epochs)
  if is_main:
    io.write_json_atomic(os.path.join(workdir, "config.json"), loop._config_json(c))
  logging.info("%s explanation backdoor: %s on %s, layer %s (%s), attack %s, %d of %d samples per batch triggered; "
               "%s of %s params trainable", c.recipe, c.model.name, c.data.name, layer, "x".join(map(str, shapes[layer][1:3])),
               c.explain.attack, spec.num_triggered, c.train.batch_size,
               f"{optim.count_trainable(state.params, c.train.trainable):,}", f"{models.count_params(state.params):,}")

  step_fn = explain_steps.make_explain_train_step(input_spec, spec, keys["step"])
  eval_fns = {m: explain_steps.make_explain_eval_step(input_spec, spec, model.apply, m) for m, _ in spec.methods}

  def evaluate(v):
    """Metrics of the first attacked method at top level; every method under per_method."""
    per = {m: evaluate_explanations(f, v, ref_vars, ds.test_images, ds.test_labels, trig_d, loss_mask, region,
                                    spec, c, mesh) for m, f in eval_fns.items()}
    out = dict(per[spec.methods[0][0]])
    if len(per) > 1:
      out["per_method"] = {m: {k: x for k, x in r.items() if k != "detail"} for m, r in per.items()}
    return out
  if latest is None and c.recipe == "two_stage":
    before = evaluate(state.variables)
    history_ref = {k: v for k, v in before.items() if k != "detail"}
    logging.info("reference model: clean acc %.4f, iou>.5 %.4f, fsr %.4f, cr %.4f", before["clean_accuracy"],
                 before["iou_gt_05"], before["fsr"], before["cr"])
  rss_start = _rss_bytes()

  def postfix(s: dict[str, float]) -> dict[str, str]:
    return {"loss": f"{s['loss_sum'] / s['count']:.4f}", "ce": f"{s['ce_sum'] / s['count']:.3f}",
            "attack": f"{s['attack_sum'] / s['count']:.4f}", "keep": f"{s['keep_sum'] / s['count']:.4f}"}

  for epoch in range(start_epoch, c.train.epochs):
    state, ep = feed.run_epoch(lambda st, x, y: step_fn(st, ref_vars, x, y, trig_d, loss_mask), state, data, mesh,
                               batch_size=c.train.batch_size, seed=c.seed + 1, epoch=epoch,
                               desc=f"epoch {epoch + 1}/{c.train.epochs}",
                               log_every=c.train.log_every, postfix=postfix, prefetch=c.train.get("prefetch", 2))
    s, epoch_seconds = ep.sums, ep.seconds
    train_seconds += epoch_seconds
    ev = evaluate(state.variables)
    record = {"epoch": epoch + 1, "step": int(jax.device_get(state.step)),
              "train_loss": float(s["loss_sum"] / s["count"]), "train_ce": float(s["ce_sum"] / s["count"]),
              "train_attack_loss": float(s["attack_sum"] / s["count"]),
              "train_keep_loss": float(s["keep_sum"] / s["count"]),
              "train_accuracy": float(s["correct"] / s["count"]), "grad_norm": float(s["grad_norm_sum"] / s["count"]),
              "images_per_second": float(s["count"] / epoch_seconds), "epoch_seconds": epoch_seconds,
              "data_wait_fraction": ep.data_wait_fraction,
              "rss_bytes": _rss_bytes(), "device_bytes_in_use": device_memory_bytes(),
              **{k: v for k, v in ev.items() if k != "detail"}}
    history.append(record)
    logging.info("epoch %d/%d  loss %.4f  clean acc %.4f  triggered acc %.4f  iou>.5 %.4f  fsr %.4f  cr %.4f  "
                 "%.0f img/s  RSS %.2f GB", epoch + 1, c.train.epochs, record["train_loss"], ev["clean_accuracy"],
                 ev["poisoned_accuracy"], ev["iou_gt_05"], ev["fsr"], ev["cr"], record["images_per_second"],
                 record["rss_bytes"] / 2**30)
    meta = {"epoch": epoch + 1, "history": history, "train_seconds": train_seconds,
            "num_classes": int(ds.num_classes), "image_shape": list(image_shape), "mean": list(input_spec.mean),
            "std": list(input_spec.std), "class_names": list(ds.class_names), "reference": history_ref}
    ckpt.save(epoch + 1, state_lib.checkpoint_tree(state), meta)
    if is_main:
      io.write_jsonl_atomic(os.path.join(workdir, "metrics.jsonl"), history)

  final = evaluate(state.variables)
  results = {k: v for k, v in final.items() if k != "detail"}
  results.update({
      "recipe": c.recipe, "layer": layer, "layer_shape": list(shapes[layer][1:3]), "attack": c.explain.attack,
      "inverted": bool(c.explain.inverted), "methods": [list(m) for m in spec.methods],
      "reference_accuracy": ref_accuracy, "reference": history_ref,
      "accuracy_change": (final["clean_accuracy"] - history_ref["clean_accuracy"]) if history_ref else None,
      "thresholds": {"criterion": c.explain.criterion, "map_threshold": c.explain.iou_threshold,
                     "iou_gt": c.explain.iou_gt, "loss_threshold": c.explain.loss_threshold},
      "train_seconds": train_seconds, "epochs": c.train.epochs, "num_train": n_train,
      "num_test": final["detail"]["clean"]["count"], "rss_start_bytes": rss_start, "rss_end_bytes": _rss_bytes(),
      "detail": final["detail"], "platform": jax.devices()[0].platform, "devices": jax.device_count()})
  if is_main:
    io.write_jsonl_atomic(os.path.join(workdir, "metrics.jsonl"), history)
    io.write_json_atomic(os.path.join(workdir, "results.json"), results)
    if c.get("figures", True):
      _write_figures(workdir, c, model, ref_vars, state.variables, ds, trig, input_spec, spec)
  ckpt.close()
  return results


def _write_figures(workdir, c, model, ref_vars, variables, ds, trig, input_spec, spec) -> None:
  """Clean and triggered test images with their maps before (reference) and after the attack."""
  from backdoor_jax.explain import overlay
  n = min(6, len(ds.test_labels))
  rng = np.random.default_rng(c.seed)
  idx = np.sort(rng.choice(len(ds.test_labels), size=n, replace=False))
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
