"""Metrics over whole datasets: clean accuracy, top-5, attack success rate."""
from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh

from backdoor_jax.data import pipeline
from backdoor_jax.train import mesh as mesh_lib


def evaluate_classifier(eval_step: Callable, variables: Any, images: np.ndarray, labels: np.ndarray,
                        batch_size: int, mesh: Mesh) -> dict[str, Any]:
  """Runs ``eval_step`` over every sample exactly once.

  Args:
    eval_step: from ``train.steps.make_eval_step``.
    variables: model variables (replicated on the mesh).
    images: (N, H, W, 3) uint8; labels: (N,) int32 (for ASR: the attack labels).
    batch_size: global eval batch (a multiple of the device count).
    mesh: the data mesh.
  Returns:
    accuracy, top5_accuracy, count, predictions (N,) int32.
  """
  n = len(labels)
  if n == 0:
    return {"accuracy": float("nan"), "top5_accuracy": float("nan"), "count": 0,
            "predictions": np.zeros((0,), np.int32)}
  sums = {"correct": 0, "correct5": 0, "count": 0}
  preds = []
  local = mesh_lib.local_slice(batch_size)
  for idx, valid in pipeline.eval_batches(n, batch_size):
    x, y, v = mesh_lib.shard_batch(mesh, images[idx[local]], labels[idx[local]], valid[local])
    out = eval_step(variables, x, y, v)
    for k in sums:
      sums[k] = sums[k] + out[k]
    preds.append((out["predictions"], valid))
  sums = jax.device_get(sums)  # replicated scalars
  predictions = np.concatenate([mesh_lib.to_host(p)[v] for p, v in preds])  # every host gets all rows
  count = int(sums["count"])
  return {"accuracy": float(sums["correct"]) / count, "top5_accuracy": float(sums["correct5"]) / count,
          "count": count, "predictions": predictions.astype(np.int32)}
