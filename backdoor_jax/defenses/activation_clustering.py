"""Activation Clustering: poisoned samples of a class form their own small cluster in feature space.

Per class (by the *training* label, which for poisoned samples is the target), the
last hidden layer's activations of every training sample of that class (the whole
class at once, never per mini-batch) are reduced to ``n_components`` dimensions (ICA or
PCA) and split by k-means into two clusters. The smaller cluster is flagged as poisoned
when its relative size is below ``size_threshold`` (``method='size'``) or when the
silhouette score of the split is above ``silhouette_threshold`` (``method='silhouette'``).
Clean classes usually split into two clusters of comparable size, so a size threshold
flags few of them; the report lists every class so this can be checked.
"""
from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from backdoor_jax.defenses import common, registry
from backdoor_jax.errors import ConfigError, check_choice

REDUCTIONS = ("ica", "pca")
METHODS = ("size", "silhouette")


def reduce(x: np.ndarray, n_components: int, kind: str, seed: int) -> np.ndarray:
  """(n, D) -> (n, k) with ICA or PCA (k = min(n_components, n - 1, D))."""
  from sklearn.decomposition import PCA, FastICA
  k = max(1, min(int(n_components), x.shape[0] - 1, x.shape[1]))
  x = x.astype(np.float64)
  if kind == "pca":
    return PCA(n_components=k, random_state=seed).fit_transform(x)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # FastICA convergence warnings on near-degenerate features
    return FastICA(n_components=k, random_state=seed, max_iter=500, whiten="unit-variance").fit_transform(x)


def cluster_class(feats: np.ndarray, cfg: Any, seed: int) -> dict[str, Any]:
  """Two-means clustering of one class; ``flag`` (n,) marks the samples called poisoned."""
  from sklearn.cluster import KMeans
  from sklearn.metrics import silhouette_score
  z = reduce(feats, int(cfg.n_components), cfg.reduction, seed)
  labels = KMeans(n_clusters=2, n_init=10, random_state=seed).fit_predict(z)
  sizes = np.bincount(labels, minlength=2)
  small = int(np.argmin(sizes))
  rel = float(sizes[small] / len(labels))
  sil = float(silhouette_score(z, labels)) if sizes.min() > 0 and len(set(labels)) == 2 else 0.0
  if cfg.method == "size":
    suspicious = rel < float(cfg.size_threshold)
  else:
    suspicious = sil > float(cfg.silhouette_threshold)
  flag = (labels == small) & suspicious
  return {"cluster": labels, "small_cluster": small, "relative_size": rel, "silhouette": sil,
          "flagged": bool(suspicious), "flag": flag}


def detection_rates(flag: np.ndarray, truth: np.ndarray) -> dict[str, Any]:
  """Detection (true positive) rate over poisoned samples and false positive rate over clean ones."""
  p, n = truth.sum(), (~truth).sum()
  return {"detection_rate": float((flag & truth).sum() / p) if p else None,
          "false_positive_rate": float((flag & ~truth).sum() / n) if n else None,
          "num_flagged": int(flag.sum()), "num_poisoned": int(p)}


def run(ctx: common.DefenseContext, out_dir: str) -> dict[str, Any]:
  """Activation Clustering over the run's (poisoned) training set."""
  cfg = ctx.config.activation_clustering
  check_choice("activation_clustering.reduction", cfg.reduction, REDUCTIONS)
  check_choice("activation_clustering.method", cfg.method, METHODS)
  if not 0 < float(cfg.size_threshold) < 0.5:
    raise ConfigError(f"activation_clustering.size_threshold={cfg.size_threshold} is invalid; allowed: (0, 0.5)")
  layer = common.feature_layer(ctx, cfg.layer, "activation_clustering")
  with common.Timer() as t:
    feats = common.training_set_features(ctx, layer)
    labels, truth = ctx.exp.train_labels, ctx.exp.is_poisoned
    flag = np.zeros(len(labels), bool)
    per_class, details = [], {}
    for c in range(ctx.num_classes):
      idx = np.flatnonzero(labels == c)
      row = {"class": c, "count": int(len(idx)), "num_poisoned": int(truth[idx].sum())}
      if len(idx) < int(cfg.min_class_size):
        row["skipped"] = f"fewer than {cfg.min_class_size} samples"
        per_class.append(row)
        continue
      r = cluster_class(feats[idx], cfg, ctx.seed)
      flag[idx] = r["flag"]
      details[c] = (idx, r)
      pois = truth[idx]
      row.update(relative_size=r["relative_size"], silhouette=r["silhouette"], flagged=r["flagged"],
                 num_flagged=int(r["flag"].sum()))
      if pois.any():  # truth known: how many samples end up on the wrong side of the split
        guess = r["cluster"] == r["small_cluster"]
        row["misclustering_rate"] = float(min(np.mean(guess != pois), np.mean(guess == pois)))
      per_class.append(row)
  rec = {"layer": layer, "reduction": cfg.reduction, "n_components": int(cfg.n_components), "method": cfg.method,
         "size_threshold": float(cfg.size_threshold), "flagged_classes": [r["class"] for r in per_class
                                                                          if r.get("flagged")],
         "true_target": ctx.target, **detection_rates(flag, truth), "per_class": per_class, "seconds": t.seconds}
  rec["detected"] = bool(rec["flagged_classes"])
  show = ctx.target if ctx.target in details else (rec["flagged_classes"][0] if rec["flagged_classes"] else
                                                    next(iter(details), None))
  if show is not None:
    from backdoor_jax.defenses import plots
    idx, r = details[show]
    z2 = reduce(feats[idx], 2, cfg.reduction, ctx.seed)
    plots.clusters(f"{out_dir}/clusters.png", z2, truth[idx], r["cluster"] == r["small_cluster"], show,
                   ctx.run.class_names)
  return rec


def summary(rec: dict[str, Any]) -> dict[str, Any]:
  """Summary-row part: detection rates and the flagged classes."""
  return {"detection_rate": rec["detection_rate"], "false_positive_rate": rec["false_positive_rate"],
          "verdict": f"flags classes {rec['flagged_classes']}", "after": rec.get("after_retraining")}


registry.register(registry.Defense("activation_clustering", run, summary))
