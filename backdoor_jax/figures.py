"""Figures a person looks at: poisoned examples with predictions, training curves."""
from __future__ import annotations

import io
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from backdoor_jax.io import write_bytes_atomic  # noqa: E402


def save_figure(fig, path: str) -> None:
  """Writes ``fig`` as a PNG atomically and closes it."""
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
  plt.close(fig)
  write_bytes_atomic(path, buf.getvalue())


def poisoned_examples(path: str, clean: np.ndarray, triggered: np.ndarray, labels: np.ndarray,
                      pred_clean: np.ndarray, pred_triggered: np.ndarray, attack_labels: np.ndarray,
                      class_names: Sequence[str]) -> None:
  """Grid: top row clean test images, bottom row the same images with the trigger.

  Titles give the true label and the prediction; a triggered image whose prediction is
  the attack label is titled in red (the backdoor fired).
  """
  n = len(clean)
  fig, axes = plt.subplots(2, n, figsize=(1.6 * n, 3.8), squeeze=False)
  name = lambda i: str(class_names[int(i)]) if int(i) < len(class_names) else str(int(i))
  for j in range(n):
    for row, (img, pred) in enumerate(((clean[j], pred_clean[j]), (triggered[j], pred_triggered[j]))):
      ax = axes[row, j]
      ax.imshow(img, interpolation="nearest")
      ax.set_xticks([]), ax.set_yticks([])
      fired = row == 1 and pred == attack_labels[j]
      ax.set_title(f"y={name(labels[j])}\npred={name(pred)}", fontsize=7, color="red" if fired else "black")
  axes[0, 0].set_ylabel("clean", fontsize=8)
  axes[1, 0].set_ylabel("triggered", fontsize=8)
  save_figure(fig, path)


def training_curves(path: str, history: Sequence[dict]) -> None:
  """Loss and accuracy / ASR per epoch from the metrics history."""
  if not history:
    return
  epochs = [h["epoch"] for h in history]
  fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
  a.plot(epochs, [h["train_loss"] for h in history], marker="o")
  a.set_xlabel("epoch"), a.set_ylabel("train loss"), a.grid(alpha=0.3)
  for key, label in (("train_accuracy", "train acc"), ("clean_accuracy", "clean test acc"),
                     ("attack_success_rate", "ASR")):
    b.plot(epochs, [h[key] for h in history], marker="o", label=label)
  b.set_xlabel("epoch"), b.set_ylim(0, 1.02), b.grid(alpha=0.3), b.legend(fontsize=8)
  save_figure(fig, path)
