"""Subprocess entry of one measurement: ``python -m benchmarks.worker MODULE JOB_JSON``.

``MODULE`` is a workload module (``benchmarks.train_throughput``, ...) with a ``Job``
dataclass and ``run_jax(job)`` / ``run_torch(job)``; the job's ``framework`` picks one.
The result is printed as one tagged JSON line (``common.emit_result``); a failure becomes
``{'error': ...}``, which the tables show as ``n/a (...)``. Each measurement has its own
process, so its peak memory is its own and JAX and PyTorch never share a process.
"""
from __future__ import annotations

import importlib
import json
import sys

from benchmarks import common

WORKLOAD_MODULES = ("benchmarks.train_throughput", "benchmarks.gradcam_throughput",
                    "benchmarks.explanation_step")


def main(argv: list[str]) -> int:
  if len(argv) != 3 or argv[1] not in WORKLOAD_MODULES:
    print(f"error: usage: python -m benchmarks.worker MODULE JOB_JSON; MODULE allowed: "
          f"{', '.join(WORKLOAD_MODULES)}", file=sys.stderr)
    return 2
  module = importlib.import_module(argv[1])
  job = module.Job(**json.loads(argv[2]))
  try:
    result = module.run_jax(job) if job.framework == "jax" else module.run_torch(job)
  except Exception as e:  # pylint: disable=broad-except  # reported as n/a in the table
    result = {"error": f"{type(e).__name__}: {common.first_line(str(e))}"}
  common.emit_result(result)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
