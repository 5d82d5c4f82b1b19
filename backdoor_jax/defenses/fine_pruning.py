"""Fine-Pruning: prune the channels clean data leaves dormant, then fine-tune.

Channels of the last spatial layer (``layer``; default the deepest exposed (B, h, w, K)
layer) are ranked by their mean activation on the clean validation split and masked in
increasing order. The pruning point is chosen on the validation split only: the largest
pruned fraction whose validation accuracy is within ``max_val_drop`` of the unpruned
model's. The pruned model is then fine-tuned on the validation split. Test-set clean
accuracy, ASR (and FSR for explanation backdoors) are reported along the whole curve.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from backdoor_jax.defenses import common, training, registry
from backdoor_jax.errors import ConfigError


def channel_order(ctx: common.DefenseContext, layer: str) -> tuple[np.ndarray, np.ndarray]:
  """(order, mean activation): channels of ``layer`` from least to most active on clean validation images."""
  acts = common.features(ctx, ctx.variables, ctx.val_images, layer)
  mean = acts.reshape(-1, acts.shape[-1]).mean(axis=0)
  return np.argsort(mean, kind="stable"), mean


def mask_for(order: np.ndarray, fraction: float) -> np.ndarray:
  """(K,) float mask with the ``round(fraction * K)`` least active channels set to 0."""
  k = int(round(float(fraction) * len(order)))
  m = np.ones(len(order), np.float32)
  m[order[:k]] = 0.0
  return m


def run(ctx: common.DefenseContext, out_dir: str) -> dict[str, Any]:
  """Pruning curve, chosen point (validation), fine-tuning, test-set report."""
  cfg = ctx.config.fine_pruning
  if not 0 < float(cfg.step) <= float(cfg.max_fraction) < 1:
    raise ConfigError(f"fine_pruning.step={cfg.step} / max_fraction={cfg.max_fraction} are invalid; allowed: "
                      "0 < step <= max_fraction < 1")
  layer = common.spatial_layer(ctx, cfg.layer, "fine_pruning")
  fractions = np.round(np.arange(0.0, float(cfg.max_fraction) + 1e-9, float(cfg.step)), 6)
  with common.Timer() as t:
    order, mean_act = channel_order(ctx, layer)
    curve = []
    for f in fractions:
      v = common.with_prune_mask(ctx.variables, layer, mask_for(order, f))
      val_acc = common.accuracy(common.logits(ctx, v, ctx.val_images), ctx.val_labels)
      curve.append({"fraction": float(f), "pruned_channels": int(round(f * len(order))), "val_accuracy": val_acc,
                    **common.evaluate(ctx, v)})
    base = curve[0]["val_accuracy"]
    ok = [r for r in curve if r["val_accuracy"] >= base - float(cfg.max_val_drop)]
    chosen = ok[-1]
    pruned = common.with_prune_mask(ctx.variables, layer, mask_for(order, chosen["fraction"]))
    tuned = training.finetune(ctx, pruned, ctx.val_images, ctx.val_labels, epochs=int(cfg.finetune_epochs),
                            lr=float(cfg.finetune_lr), batch_size=int(cfg.finetune_batch_size), seed=ctx.seed)
    after = common.evaluate(ctx, tuned)
    after["val_accuracy"] = common.accuracy(common.logits(ctx, tuned, ctx.val_images), ctx.val_labels)
  rec = {"layer": layer, "channels": int(len(order)), "curve": curve, "chosen_fraction": chosen["fraction"],
         "max_val_drop": float(cfg.max_val_drop), "before": curve[0], "pruned": chosen,
         "after_finetuning": after, "finetune_epochs": int(cfg.finetune_epochs), "seconds": t.seconds,
         "mean_activation": mean_act.tolist()}
  from backdoor_jax.defenses import plots
  plots.curves(f"{out_dir}/curves.png", "fraction", curve, chosen["fraction"], "pruned fraction of channels",
               f"Fine-pruning at {layer}")
  return rec


def summary(rec: dict[str, Any]) -> dict[str, Any]:
  """Summary-row part: the chosen pruned fraction, and the fine-tuned model."""
  return {"verdict": f"prunes {rec['chosen_fraction']:.2f} of {rec['channels']} channels at {rec['layer']}",
          "after": rec["after_finetuning"]}


registry.register(registry.Defense("fine_pruning", run, summary))
