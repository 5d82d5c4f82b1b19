"""What the explanation-backdoor recipes set up before training: the target region, the
Grad-CAM layer and its checks, the stage-1 reference model and the step's frozen spec,
and the per-epoch map evaluation (accuracy, IoU with the target region, FSR, CR).
"""
from __future__ import annotations

import copy
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from ml_collections import config_dict

from backdoor_jax.data import pipeline
from backdoor_jax.errors import ConfigError, check_choice
from backdoor_jax.explain import layers
from backdoor_jax.explain import registry as explain_registry
from backdoor_jax.explain import metrics as map_metrics
from backdoor_jax.explain import saliency
from backdoor_jax.train import engine, explain_steps, restore
from backdoor_jax.train import mesh as mesh_lib

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
  """The explained layer and every layer's shape: ``requested``, or the library's default rule
  (``explain.layers.default_layer``: the deepest spatial layer whose map is >= 4x4)."""
  info = layers.layer_info_for_shape(apply_fn, variables, image_shape)
  return layers.choose_layer(info, requested, what="explain.layer"), dict(info.shapes)


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


def stage1_config(c: config_dict.ConfigDict) -> config_dict.ConfigDict:
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
  s1_config = stage1_config(c)
  if os.path.exists(os.path.join(s1_dir, "results.json")):  # finished earlier: reuse, if it is this config
    engine.check_resumable(s1_dir, engine.config_json(s1_config), True)
    logging.info("stage 1: reusing the finished clean run in %s", s1_dir)
    return restore.load_run(s1_dir)
  logging.info("stage 1: training the clean reference model in %s", s1_dir)
  from backdoor_jax.train.recipes import badnets  # the clean run is a classic run without poison
  badnets.train(s1_config, s1_dir)
  return restore.load_run(s1_dir)


def fang_weights(c: config_dict.ConfigDict) -> tuple[float, float, float]:
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


def explain_spec(c: config_dict.ConfigDict, layer: str, image_hw: tuple[int, int]) -> explain_steps.ExplainSpec:
  """The frozen settings of the explanation step, validated (``c`` is not modified).

  With a ``fang`` section the three loss weights follow ``fang.alpha``/``fang.beta`` and
  the batch split (:func:`fang_weights`), except a weight set explicitly (not None),
  which is used as given.
  """
  e = c.explain
  weights = {name: e.get(name) for name in ("ce_weight", "attack_weight", "keep_weight")}
  if c.get("fang"):
    for name, derived in zip(("ce_weight", "attack_weight", "keep_weight"), fang_weights(c)):
      if weights[name] is None:
        weights[name] = derived
      else:
        logging.info("explain.%s=%g set explicitly; the fang.alpha/beta value %g is not used", name,
                     weights[name], derived)
  for name, value in weights.items():
    if value is None:
      raise ConfigError(f"explain.{name} is not set; allowed: a number >= 0 (None derives it only with a fang "
                        "section)")
  for name in ("attack_weight", "keep_weight", "ce_weight"):
    if weights[name] < 0:
      raise ConfigError(f"explain.{name}={weights[name]} must be >= 0")
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
      ce_weight=float(weights["ce_weight"]), attack_weight=float(weights["attack_weight"]),
      keep_weight=float(weights["keep_weight"]),
      loss_resolution=res, top_k=int(e.top_k), bn_mode=e.bn_mode)


def with_bn_momentum(spec: explain_steps.ExplainSpec, apply_fn, variables: Any, image_shape: tuple[int, ...]
                     ) -> explain_steps.ExplainSpec:
  """``spec`` with the model's BatchNorm momentum, measured, where ``bn_mode='detached'`` needs it.

  Two train-mode passes from running statistics of all zeros and all ones: each statistic
  moves to ``momentum * old + (1 - momentum) * batch``, so their difference is the momentum.
  Models whose BatchNorms disagree on it are refused.
  """
  if spec.bn_mode != "detached" or "batch_stats" not in variables:
    return spec
  x = jax.random.normal(jax.random.key(0), (2,) + tuple(image_shape))

  def updated(fill):
    stats = jax.tree.map(lambda a: jnp.full_like(a, fill), variables["batch_stats"])
    _, upd = apply_fn({**variables, "batch_stats": stats}, x, train=True, mutable=["batch_stats"],
                      rngs={"dropout": jax.random.key(0)})
    return jax.tree_util.tree_leaves(upd["batch_stats"])

  moms = np.concatenate([np.ravel(np.asarray(b - a)) for a, b in zip(updated(0.0), updated(1.0))] or [[]])
  if moms.size == 0:  # no BatchNorm statistics: nothing to hold constant
    return spec
  if np.ptp(moms) > 1e-4:
    raise ConfigError(f"explain.bn_mode='detached' needs one BatchNorm momentum for the whole model; measured "
                      f"{moms.min():.4g} to {moms.max():.4g}; use explain.bn_mode='refresh' or 'frozen'")
  return spec._replace(bn_momentum=float(np.mean(moms)))


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
  shapes = layers.layer_info(apply_fn, variables, x).shapes
  base = {k: v for k, v in variables.items() if k != PERTURBATIONS}
  for method, _ in spec.methods:
    gradient = explain_registry.get(method).gradient
    if gradient == "none":  # forward-only (e.g. VisualBackProp): no gradient to mix
      continue
    on_input = gradient == "input"

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
          f"explain.bn_mode='detached' (batch statistics held constant), 'frozen' or 'refresh', or explain a layer "
          f"with no BatchNorm after it")


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


