"""Spectral Signatures: poisoned samples stand out along the top singular vector of a class's features.

Per class (training label), the features are centred, projected on their top right
singular vector and scored by the squared projection; the ``removal_factor *
expected_poison_fraction * n_c`` highest-scoring samples of each class are removed.
The model is then retrained from scratch on what is left, with the run's own training
config (``retrain_epochs`` > 0 shortens it), and clean accuracy / ASR are reported
before and after.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from backdoor_jax.defenses import common, training, registry
from backdoor_jax.defenses.activation_clustering import detection_rates
from backdoor_jax.errors import ConfigError


def scores(feats: np.ndarray) -> np.ndarray:
  """Squared projections of the centred rows of ``feats`` on their top right singular vector."""
  x = feats.astype(np.float64)
  x = x - x.mean(axis=0, keepdims=True)
  _, _, vt = np.linalg.svd(x, full_matrices=False)
  return (x @ vt[0]) ** 2


def run(ctx: common.DefenseContext, out_dir: str) -> dict[str, Any]:
  """Spectral Signatures filtering of the training set, then retraining."""
  cfg = ctx.config.spectral
  eps = float(cfg.expected_poison_fraction)
  if not 0 < eps * float(cfg.removal_factor) < 1:
    raise ConfigError(f"spectral.expected_poison_fraction={eps} x removal_factor={cfg.removal_factor} is invalid; "
                      "allowed: a product in (0, 1)")
  layer = common.feature_layer(ctx, cfg.layer, "spectral")
  with common.Timer() as t:
    feats = common.training_set_features(ctx, layer)
    labels, truth = ctx.exp.train_labels, ctx.exp.is_poisoned
    removed = np.zeros(len(labels), bool)
    all_scores = np.zeros(len(labels))
    per_class = []
    for c in range(ctx.num_classes):
      idx = np.flatnonzero(labels == c)
      if len(idx) < 3:
        continue
      s = scores(feats[idx])
      all_scores[idx] = s
      k = min(len(idx) - 1, int(round(float(cfg.removal_factor) * eps * len(idx))))
      top = idx[np.argsort(-s)[:k]]
      removed[top] = True
      per_class.append({"class": c, "count": int(len(idx)), "removed": int(k), "num_poisoned": int(truth[idx].sum()),
                        "poisoned_removed": int(truth[top].sum())})
  rec = {"layer": layer, "expected_poison_fraction": eps, "removal_factor": float(cfg.removal_factor),
         **detection_rates(removed, truth), "num_removed": int(removed.sum()), "per_class": per_class,
         "detect_seconds": t.seconds, "true_target": ctx.target}
  if cfg.retrain:
    keep = ~removed
    with common.Timer() as t:
      variables = training.retrain(ctx, ctx.exp.train_images[keep], labels[keep], int(cfg.retrain_epochs))
    rec["after_retraining"] = common.evaluate(ctx, variables, name="retrained")
    rec["retrain_epochs"] = int(cfg.retrain_epochs) or int(ctx.run.config.train.epochs)
    rec["retrain_seconds"] = t.seconds
  from backdoor_jax.defenses import plots
  if ctx.target is not None:
    show = ctx.target
  else:  # no known target: the class with the most concentrated top score
    show = max(per_class, key=lambda r: r["count"])["class"] if per_class else 0
  idx = np.flatnonzero(labels == show)
  plots.score_histogram(f"{out_dir}/scores.png", all_scores[idx], truth[idx], show, ctx.run.class_names)
  return rec


def summary(rec: dict[str, Any]) -> dict[str, Any]:
  """Summary-row part: detection rates and how many samples are removed."""
  return {"detection_rate": rec["detection_rate"], "false_positive_rate": rec["false_positive_rate"],
          "verdict": f"removes {rec['num_removed']} samples", "after": rec.get("after_retraining")}


registry.register(registry.Defense("spectral", run, summary))
