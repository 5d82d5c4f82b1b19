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

from backdoor_jax import losses, triggers
from backdoor_jax import multilabel as ml
from backdoor_jax.explain import metrics as map_metrics
from backdoor_jax.explain import saliency
from backdoor_jax.train import explain_steps, steps


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
  return explain_steps.make_explain_train_step(
      input_spec, spec, base_key, task_loss=lambda logits, labels: jnp.mean(ml.sigmoid_bce(logits, labels, w)),
      map_targets=lambda logits, labels: explain_targets(logits, explain_label), sums=ml.decision_sums)


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
