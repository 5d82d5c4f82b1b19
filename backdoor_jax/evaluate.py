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
    accuracy, top5_accuracy, count, predictions (N,) int32. Over an empty set (e.g. an
    attack test set when every test image is of the target class) both accuracies are
    None and ``reason`` says why; they are never NaN. When the eval step reports a
    ``nonfinite`` count (samples whose logits are NaN/inf) and it is not zero, the
    accuracies are None as well: argmax over NaN logits is class 0, which would read
    as a result.
  """
  n = len(labels)
  if n == 0:
    return {"accuracy": None, "top5_accuracy": None, "count": 0, "reason": EMPTY_SET,
            "predictions": np.zeros((0,), np.int32)}
  sums = {"correct": 0, "correct5": 0, "count": 0, "nonfinite": 0}
  preds = []
  local = mesh_lib.local_slice(batch_size)
  for idx, valid in pipeline.eval_batches(n, batch_size):
    x, y, v = mesh_lib.shard_batch(mesh, images[idx[local]], labels[idx[local]], valid[local])
    out = eval_step(variables, x, y, v)
    for k in sums:
      sums[k] = sums[k] + out.get(k, 0)
    preds.append((out["predictions"], valid))
  sums = jax.device_get(sums)  # replicated scalars
  predictions = np.concatenate([mesh_lib.to_host(p)[v] for p, v in preds])  # every host gets all rows
  count = int(sums["count"])
  bad = int(sums["nonfinite"])
  if bad:
    return {"accuracy": None, "top5_accuracy": None, "count": count, "nonfinite": bad,
            "reason": f"{bad} of {count} samples have non-finite logits", "predictions": predictions.astype(np.int32)}
  return {"accuracy": float(sums["correct"]) / count, "top5_accuracy": float(sums["correct5"]) / count,
          "count": count, "predictions": predictions.astype(np.int32)}


EMPTY_SET = "empty set: no samples to score"


def rate(hits: np.ndarray) -> tuple[float | None, str | None]:
  """``(mean of an array, None)`` (a rate for booleans), or ``(None, reason)`` when it is empty.

  For metrics written as a pair ``metric`` / ``metric_reason``.
  """
  hits = np.asarray(hits)
  if hits.size == 0:
    return None, EMPTY_SET
  return float(hits.mean()), None
