r"""Workload: Neural Cleanse wall time, all classes at once (jax.vmap) against class by class.

Flag-free; ``python -m benchmarks neural-cleanse --workdir=RUN`` prints the table. Both
paths run the same jitted per-class step on the same batches (the results are equal;
tests/test_defenses.py checks it). A one-step warm-up of each path compiles its functions
first, so the table compares steady-state wall time; compile time is shown separately.
"""
from __future__ import annotations

import copy
import time
from typing import Any, Sequence

from benchmarks import common


def measure(workdir: str, epochs: int, steps_per_epoch: int, batch_size: int) -> tuple[Any, list[dict[str, Any]]]:
  """(defense context, rows ``path, warmup_s, seconds, seconds_per_step, speedup``) of a trained run."""
  import jax

  from backdoor_jax.defenses import common as defense_common, neural_cleanse, report

  cfg = report.default_config()
  ctx = defense_common.load_context(workdir, cfg)
  nc = copy.deepcopy(cfg.neural_cleanse)
  nc.epochs, nc.steps_per_epoch, nc.batch_size = epochs, steps_per_epoch, batch_size
  warm = copy.deepcopy(nc)
  warm.epochs, warm.steps_per_epoch = 1, 1
  rows = []
  for use_vmap in (True, False):
    def call(c: Any, use_vmap: bool = use_vmap) -> Any:
      return neural_cleanse.reverse_triggers(ctx.apply_fn, ctx.variables, ctx.run.input_spec, ctx.val_images,
                                             ctx.num_classes, c, ctx.seed, use_vmap=use_vmap)
    t0 = time.perf_counter()
    jax.block_until_ready(call(warm)["l1"])
    t_warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    jax.block_until_ready(call(nc)["l1"])
    rows.append({"path": "vmap over classes" if use_vmap else "class by class", "warmup_s": t_warm,
                 "seconds": time.perf_counter() - t0})
  steps = epochs * steps_per_epoch
  for r in rows:
    r["seconds_per_step"] = r["seconds"] / steps
    r["speedup"] = rows[1]["seconds"] / r["seconds"]
  return ctx, rows


def table_lines(ctx: Any, rows: Sequence[dict[str, Any]], steps: int, batch_size: int, load_start: str,
                elapsed: float) -> list[str]:
  """Header and Markdown table."""
  lines = common.header_lines(
      f"Neural Cleanse, {ctx.num_classes} classes, vmap over classes vs class by class",
      {"jax": common.jax_device_info()},
      f"{steps} steps of {batch_size} images per class ({ctx.run.config.model.name}, {ctx.run.config.data.name})",
      load_start, elapsed)
  lines += ["", "| path | warm-up (1 step, compile included) s | timed run s | s per step (all classes) | speed-up |",
            "| --- | --- | --- | --- | --- |"]
  for r in rows:
    lines.append(f"| {r['path']} | {r['warmup_s']:.1f} | {r['seconds']:.1f} | {r['seconds_per_step']:.2f} | "
                 f"{r['speedup']:.2f}x |")
  return lines
