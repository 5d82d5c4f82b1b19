"""The explanation backdoor on a multi-label classifier (Fang & Choromanska's ChestX-ray14 system).

The single-label step (``train.explain_steps``) explains each sample's class; here each
sample has a *set* of findings, so the explained label is chosen per run:

* ``explain_label >= 0``: always that label's logit (e.g. one finding of interest);
* ``explain_label = -1``: each image's top-scoring label (the label a viewer of the top
  finding would look at; the analogue of "the predicted class").

Label ``j``'s map is the map of logit ``j`` (``explain.saliency.explanation_maps`` with
``targets = j``; a label index is a class index there). The step is the sigmoid BCE of
every sample plus the same map terms as the single-label attack (``explanation_terms``:
targeted / non-targeted L_p on the triggered part, the keep-clean L_s on the rest), so the
trigger must leave every prediction as it is while moving the explanation.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from backdoor_jax import losses, triggers
from backdoor_jax import multilabel as ml
from backdoor_jax.explain import metrics as map_metrics
from backdoor_jax.explain import saliency
from backdoor_jax.train import explain_steps, optim, steps
from backdoor_jax.train.state import TrainState


def explain_targets(logits: jax.Array, explain_label: int) -> jax.Array:
  """``(B,)`` int32 label to explain: ``explain_label``, or (``-1``) each row's top logit."""
  if explain_label >= 0:
    return jnp.full((logits.shape[0],), explain_label, jnp.int32)
  return jnp.argmax(jax.lax.stop_gradient(logits), axis=-1).astype(jnp.int32)


def make_explain_train_step(input_spec: steps.InputSpec, spec: explain_steps.ExplainSpec, base_key: jax.Array,
                            explain_label: int, pos_weight: Any = None):
  """``step(state, ref_variables, images_uint8, labels (B, L), trigger, target_mask) -> (state, sums)``.

  The first ``spec.num_triggered`` images of each batch get the trigger (labels kept).
  Sums: ``loss_sum``, ``ce_sum`` (the BCE), ``attack_sum``, ``keep_sum``, ``correct``
  (label-wise accuracy at 0.5, per image), ``count``, ``grad_norm_sum``. Jitted, state donated.
  """
  w = None if pos_weight is None else jnp.asarray(pos_weight, jnp.float32)

  def step(state: TrainState, ref_variables: Any, images: jax.Array, labels: jax.Array, trigger: Any,
           target_mask: jax.Array):
    key = jax.random.fold_in(base_key, state.step)
    aug_key, drop_key = jax.random.split(key)
    if input_spec.crop_padding or input_spec.flip:  # augment first, so the trigger stays where it belongs
      from backdoor_jax.data import pipeline  # pylint: disable=g-import-not-at-top
      images = pipeline.augment(aug_key, images, crop_padding=input_spec.crop_padding, flip=input_spec.flip)
    k = spec.num_triggered
    images = jnp.concatenate([triggers.apply_trigger(trigger, images[:k]), images[k:]], axis=0)
    x = steps.preprocess(None, images, input_spec)
    scale = optim.loss_scale(state.opt_state)

    def loss_fn(params):
      variables = {"params": params, **({"batch_stats": state.batch_stats} if state.batch_stats else {})}
      new_stats, map_apply = state.batch_stats, state.apply_fn
      if spec.bn_mode == "train" and state.batch_stats:
        logits, upd = state.apply_fn(variables, x, train=True, mutable=["batch_stats"], rngs={"dropout": drop_key})
        new_stats = upd["batch_stats"]
        map_apply = explain_steps.train_mode_apply(state.apply_fn, drop_key)
      else:
        logits = state.apply_fn(variables, x, train=False)
      bce = jnp.mean(ml.sigmoid_bce(logits, labels, w))
      terms = explain_steps.explanation_terms(spec, map_apply, variables, ref_variables, x,
                                              explain_targets(logits, explain_label), target_mask,
                                              ref_apply_fn=state.apply_fn)
      attacked = terms["attacked"].astype(jnp.float32)
      l_attack = jnp.sum(terms["attack"] * attacked) / jnp.maximum(jnp.sum(attacked), 1)
      l_keep = jnp.sum(terms["keep"] * (1 - attacked)) / jnp.maximum(jnp.sum(1 - attacked), 1)
      loss = spec.ce_weight * bce + spec.attack_weight * l_attack + spec.keep_weight * l_keep
      return loss * scale, (loss, logits, new_stats, bce, l_attack, l_keep)

    (_, (loss, logits, new_stats, bce, l_attack, l_keep)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    new_stats = jax.lax.stop_gradient(new_stats)
    if spec.bn_mode == "refresh" and state.batch_stats:
      _, upd = state.apply_fn({"params": state.params, "batch_stats": state.batch_stats}, x, train=True,
                              mutable=["batch_stats"], rngs={"dropout": drop_key})
      new_stats = jax.lax.stop_gradient(upd["batch_stats"])
    grad_norm = optax.tree.norm(grads) / scale
    state = state.apply_gradients(grads, steps.keep_if_finite(state, grads, new_stats))
    n = labels.shape[0]
    sums = ml.decision_sums(logits, labels, loss)
    sums.update({"ce_sum": bce * n, "attack_sum": l_attack * n, "keep_sum": l_keep * n, "grad_norm_sum": grad_norm * n})
    return state, sums

  return jax.jit(step, donate_argnums=(0,))


def make_explain_eval_step(input_spec: steps.InputSpec, spec: explain_steps.ExplainSpec, apply_fn: Callable,
                           method: str, explain_label: int):
  """``eval(variables, ref_variables, images_uint8, trigger, target_mask, triggered: bool) -> per-sample dict``.

  Returns ``logits`` (B, L), ``explained`` (B,) label, ``attack_loss`` (B,) (L_p at the loss
  resolution), ``maps`` (B, H, W) at input size and ``loss_maps`` (the maps the loss sees:
  pooled to the loss resolution, renormalised). Jitted (``triggered`` static).
  """

  def evaluate(variables, ref_variables, images, trigger, target_mask, triggered):
    if triggered:
      images = triggers.apply_trigger(trigger, images)
    x = steps.preprocess(None, images, input_spec)
    logits = apply_fn(variables, x, train=False).astype(jnp.float32)
    targets = explain_targets(logits, explain_label)
    full = saliency.explanation_maps(method, apply_fn, variables, x, targets, spec.layer)
    maps = losses.pool_and_normalize(full, spec.loss_resolution)
    ref = (losses.pool_and_normalize(saliency.explanation_maps(method, apply_fn, ref_variables, x, targets,
                                                               spec.layer), spec.loss_resolution)
           if spec.attack == "nontargeted" else jnp.zeros_like(maps))
    attack = losses.attack_map_loss(spec.attack, maps, target_mask, ref, spec.top_k)
    return {"logits": logits, "explained": targets, "attack_loss": attack, "maps": full, "loss_maps": maps}

  return jax.jit(evaluate, static_argnums=(5,))


def evaluate_explanation_backdoor(eval_step: Callable, variables: Any, ref_variables: Any, images: np.ndarray,
                                  labels: np.ndarray, trigger: Any, loss_mask: jax.Array, region: np.ndarray,
                                  spec: explain_steps.ExplainSpec, *, criterion: str, iou_threshold: float,
                                  iou_gt: float, loss_threshold: float, batch_size: int, mesh: Any,
                                  class_names: tuple[str, ...] | None = None) -> dict[str, Any]:
  """AUROC with and without the trigger, prediction agreement, and FSR / CR of the maps.

  An image's map is *fooled* when (criterion ``'iou'``) IoU(map > ``iou_threshold``,
  region) > ``iou_gt``, or (``'loss'``) its attack loss < ``loss_threshold``. FSR is the
  fooled rate of the attacked images (triggered; clean when ``spec.inverted``), CR one
  minus the fooled rate of the others. ``fsr_loss_res`` / ``cr_loss_res`` apply the same
  criterion to the maps the loss sees (pooled to ``spec.loss_resolution``, against the
  region pooled there and thresholded at 0.5): a map can match the target there while its
  pixel-level version (SimpleGrad, VisualBackProp) stays too speckled for IoU > 0.5.

  Returns:
    flat metrics: ``mean_auroc`` (clean images), ``triggered_mean_auroc`` (triggered
    images against their true labels), ``mean_ap``, ``mean_accuracy``,
    ``label_agreement`` / ``exact_agreement`` (:func:`multilabel.prediction_agreement`),
    ``fsr``, ``cr``, ``iou_gt_05``, ``iou_mean``; and ``detail`` (per split, per label).
  """
  region_j = jnp.asarray(region > 0)
  region_lr = jnp.asarray(loss_mask) > 0.5
  out = {}
  for name, triggered in (("clean", False), ("triggered", True)):
    def run(x, triggered=triggered):
      r = eval_step(variables, ref_variables, x, trigger, loss_mask, triggered)
      return {"logits": r["logits"], "attack_loss": r["attack_loss"],
              "iou": map_metrics.iou(r["maps"], region_j, threshold=iou_threshold),
              "iou_lr": map_metrics.iou(r["loss_maps"], region_lr, threshold=iou_threshold)}
    r = ml.batched_outputs(run, images, batch_size, mesh)
    fooled = r["iou"] > iou_gt if criterion == "iou" else r["attack_loss"] < loss_threshold
    fooled_lr = r["iou_lr"] > iou_gt if criterion == "iou" else fooled
    out[name] = {"logits": r["logits"], "fooled_rate": float(fooled.mean()) if len(fooled) else None,
                 "fooled_rate_loss_res": float(fooled_lr.mean()) if len(fooled) else None,
                 "iou": {k: float(v) for k, v in map_metrics.iou_summary(jnp.asarray(r["iou"])).items()},
                 "attack_loss_mean": float(r["attack_loss"].mean()) if len(fooled) else None,
                 "metrics": ml.multilabel_metrics(r["logits"], labels, class_names)}
  attacked, kept = ("clean", "triggered") if spec.inverted else ("triggered", "clean")
  clean_m, trig_m = out["clean"]["metrics"], out["triggered"]["metrics"]
  return {"mean_auroc": clean_m["mean_auroc"], "mean_ap": clean_m["mean_ap"],
          "mean_accuracy": clean_m["mean_accuracy"], "triggered_mean_auroc": trig_m["mean_auroc"],
          **ml.prediction_agreement(out["clean"]["logits"], out["triggered"]["logits"]),
          "fsr": out[attacked]["fooled_rate"],
          "cr": None if out[kept]["fooled_rate"] is None else 1.0 - out[kept]["fooled_rate"],
          "fsr_loss_res": out[attacked]["fooled_rate_loss_res"],
          "cr_loss_res": None if out[kept]["fooled_rate"] is None else 1.0 - out[kept]["fooled_rate_loss_res"],
          "iou_gt_05": out[attacked]["iou"]["gt_05"], "iou_mean": out[attacked]["iou"]["mean"],
          "detail": {k: {kk: vv for kk, vv in v.items() if kk != "logits"} for k, v in out.items()}}
