"""Figures of the defense reports (PNG, written atomically)."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from backdoor_jax import figures

plt = figures.plt


def neural_cleanse(index_path: str, triggers_path: str, index: np.ndarray, rev: dict[str, Any], flagged: list[int],
                   threshold: float, target: int | None, class_names: Sequence[str]) -> None:
  """Anomaly index per class, and the reversed mask * pattern of the most anomalous classes."""
  c = len(index)
  fig, ax = plt.subplots(figsize=(max(5, 0.18 * c + 2), 3))
  colors = ["tab:red" if i in flagged else "tab:gray" for i in range(c)]
  ax.bar(np.arange(c), index, color=colors)
  ax.axhline(threshold, color="k", ls="--", lw=1, label=f"threshold {threshold:g}")
  if target is not None:
    ax.axvline(target, color="tab:blue", ls=":", lw=1, label=f"true target {target}")
  ax.set_xlabel("class")
  ax.set_ylabel("anomaly index")
  ax.legend(fontsize=7)
  ax.set_title("Neural Cleanse: anomaly index of the reversed-trigger L1 norms")
  figures.save_figure(fig, index_path)
  show = list(np.argsort(-index)[:min(6, c)])
  fig, axes = plt.subplots(2, len(show), figsize=(1.6 * len(show), 3.4), squeeze=False)
  for j, k in enumerate(show):
    m, p = rev["mask"][k], rev["pattern"][k]
    axes[0, j].imshow(m, cmap="gray", vmin=0, vmax=1)
    axes[0, j].set_title(f"{class_names[k] if k < len(class_names) else k}\nL1 {rev['l1'][k]:.1f}", fontsize=7)
    axes[1, j].imshow(np.clip(m[..., None] * p, 0, 255).astype(np.uint8))
    for a in axes[:, j]:
      a.axis("off")
  axes[0, 0].text(-4, 16, "mask", rotation=90, va="center", fontsize=7)
  axes[1, 0].text(-4, 16, "mask x pattern", rotation=90, va="center", fontsize=7)
  fig.suptitle("reversed triggers (most anomalous first)", fontsize=8)
  figures.save_figure(fig, triggers_path)


def clusters(path: str, z2: np.ndarray, truth: np.ndarray, flagged: np.ndarray, cls: int,
             class_names: Sequence[str]) -> None:
  """2-D projection of one class's activations, coloured by ground truth and by cluster."""
  fig, axes = plt.subplots(1, 2, figsize=(8, 3.6))
  for ax, lab, title in ((axes[0], truth, "ground truth (red: poisoned)"),
                         (axes[1], flagged, "clusters (red: smaller cluster)")):
    ax.scatter(z2[~lab, 0], z2[~lab, 1], s=5, c="tab:gray", alpha=0.6)
    ax.scatter(z2[lab, 0], z2[lab, 1], s=5, c="tab:red", alpha=0.7)
    ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
  name = class_names[cls] if cls < len(class_names) else cls
  fig.suptitle(f"Activation Clustering, class {name}", fontsize=9)
  figures.save_figure(fig, path)


def score_histogram(path: str, scores: np.ndarray, truth: np.ndarray, cls: int, class_names: Sequence[str]) -> None:
  fig, ax = plt.subplots(figsize=(5, 3))
  bins = np.linspace(scores.min() if len(scores) else 0, scores.max() if len(scores) else 1, 40)
  ax.hist(scores[~truth], bins=bins, alpha=0.6, label="clean", color="tab:gray")
  ax.hist(scores[truth], bins=bins, alpha=0.7, label="poisoned", color="tab:red")
  ax.set_xlabel("spectral score")
  ax.legend(fontsize=7)
  name = class_names[cls] if cls < len(class_names) else cls
  ax.set_title(f"Spectral Signatures, class {name}", fontsize=9)
  figures.save_figure(fig, path)


def curves(path: str, key: str, curve: list[dict[str, Any]], chosen: float, xlabel: str, title: str) -> None:
  """Clean accuracy, ASR (or FSR / triggered accuracy) and validation accuracy against ``key``."""
  fig, ax = plt.subplots(figsize=(5.5, 3.4))
  x = [r[key] for r in curve]
  for name, label in (("clean_accuracy", "clean accuracy (test)"), ("attack_success_rate", "ASR (test)"),
                      ("triggered_accuracy", "triggered accuracy (test)"), ("fsr", "FSR (test)"),
                      ("val_accuracy", "accuracy (validation)")):
    if curve and curve[0].get(name) is not None:
      ax.plot(x, [r[name] for r in curve], marker="o", ms=3, label=label)
  ax.axvline(chosen, color="k", ls="--", lw=1, label=f"chosen {chosen:g}")
  ax.set_xlabel(xlabel)
  ax.set_ylim(-0.02, 1.02)
  ax.legend(fontsize=7)
  ax.set_title(title, fontsize=9)
  figures.save_figure(fig, path)


def entropy_histogram(path: str, clean: np.ndarray, triggered: np.ndarray, threshold: float) -> None:
  fig, ax = plt.subplots(figsize=(5, 3))
  hi = max(clean.max() if len(clean) else 1, triggered.max() if len(triggered) else 1)
  bins = np.linspace(0, hi, 40)
  ax.hist(clean, bins=bins, alpha=0.6, label="clean test", color="tab:gray")
  ax.hist(triggered, bins=bins, alpha=0.6, label="triggered test", color="tab:red")
  ax.axvline(threshold, color="k", ls="--", lw=1, label="threshold")
  ax.set_xlabel("mean prediction entropy (nats)")
  ax.legend(fontsize=7)
  ax.set_title("STRIP", fontsize=9)
  figures.save_figure(fig, path)


def denoised_examples(path: str, images: np.ndarray, denoised: list[np.ndarray], weights: list[float]) -> None:
  fig, axes = plt.subplots(len(images), len(weights), figsize=(1.2 * len(weights), 1.2 * len(images)), squeeze=False)
  for i in range(len(images)):
    for j, w in enumerate(weights):
      axes[i, j].imshow(np.clip(denoised[j][i], 0, 255).astype(np.uint8))
      axes[i, j].axis("off")
      if i == 0:
        axes[i, j].set_title(f"w={w:g}", fontsize=7)
  figures.save_figure(fig, path)
