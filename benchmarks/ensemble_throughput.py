r"""Workload: models trained per hour when K backdoored models train at once (sweeps).

Flag-free; ``python -m benchmarks ensemble`` prints the table. For each model and each
K, one ensemble step (``backdoor_jax.train.recipes.ensemble.make_ensemble_step``) updates K
models, each on its own batch, with each strategy:

  * ``vmap``: one jitted computation over the stacked members;
  * ``sequential``: one compiled single-member step run K times per ensemble step,
    updating member k of the donated stack in place.

The baseline, measured in the same run, is one-at-a-time training: the plain jitted
step of one model (``steps.make_train_step``), i.e. what running the cells of a sweep
one after another costs. models/hour = 3600 * K / (seconds per ensemble step *
``train_steps``), where ``train_steps`` is the length of one model's training (default
3063: GTSRB's 39,209 images, batch 128, 10 epochs).

Data: random uint8 images (32x32x3) and labels, drawn once, reused every step; the step
converts and normalises them on the device, as in training. Optimiser: Adam. Each timing
blocks on the new state after every step; ``warmup`` steps (compilation) are excluded
and the median over ``steps`` timed steps is reported.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Sequence

from benchmarks import common

STRATEGIES = ("vmap", "sequential")
MODELS = ("small_cnn", "resnet18")


@dataclasses.dataclass(frozen=True)
class Settings:
  """What one table measures."""
  models: tuple[str, ...] = MODELS
  ks: tuple[int, ...] = (1, 8, 32)
  strategies: tuple[str, ...] = STRATEGIES
  batch: int = 128
  steps: int = 5
  warmup: int = 2
  train_steps: int = 3063
  num_classes: int = 43
  max_images_per_step: int = 0  # skip rows whose K * batch exceeds this (0: no limit)
  time_budget: float = 0.0  # seconds for the whole table; rows with no time left are skipped (0: none)


def _model(name: str, num_classes: int) -> Any:
  from backdoor_jax import models
  if name == "small_cnn":  # the GTSRB BadNets recipe's network
    return models.get_model(name, num_classes, widths=(32, 64, 128, 128), pool_after=(1, 2, 3))
  return models.get_model(name, num_classes, stem="cifar")


def measure(s: Settings, name: str, k: int, strategy: str | None) -> float:
  """Median seconds of one step updating ``k`` models (``strategy`` None: the plain step)."""
  import jax
  import numpy as np
  import optax

  from backdoor_jax.train import state as state_lib, steps
  from backdoor_jax.train.recipes import ensemble

  spec = steps.InputSpec((0.5,) * 3, (0.25,) * 3)
  model = _model(name, s.num_classes)
  tx = optax.adam(1e-3)
  rng = np.random.default_rng(0)
  lead = () if strategy is None else (k,)
  x = jax.device_put(rng.integers(0, 256, (*lead, s.batch, 32, 32, 3), dtype=np.uint8))
  y = jax.device_put(rng.integers(0, s.num_classes, (*lead, s.batch)).astype(np.int32))
  if strategy is None:
    holder = [state_lib.create_train_state(model, tx, jax.random.key(0), (1, 32, 32, 3))]
    step = steps.make_train_step(spec, jax.random.key(1))
    args: tuple[Any, ...] = (x, y)
  else:
    holder = [jax.vmap(lambda key: state_lib.create_train_state(model, tx, key, (1, 32, 32, 3)))(
        jax.random.split(jax.random.key(0), k))]
    step = ensemble.make_ensemble_step(spec, strategy)
    args = (x, y, jax.random.split(jax.random.key(1), k))

  def run() -> None:
    holder[0], _ = step(holder[0], *args)
    jax.block_until_ready(holder[0].params)

  return common.median(common.time_steps(run, s.warmup, s.steps)["step_s"])


def measure_table(s: Settings, log: Any = None) -> list[dict[str, Any]]:
  """One record per row: ``model, strategy, k, seconds, models_per_hour, ratio`` (None: skipped)."""
  end = time.monotonic() + s.time_budget if s.time_budget else None
  rows: list[dict[str, Any]] = []
  for name in s.models:
    base = measure(s, name, 1, None)
    base_mph = 3600 / (base * s.train_steps)
    rows.append({"model": name, "strategy": "one at a time", "k": 1, "seconds": base,
                 "models_per_hour": base_mph, "ratio": 1.0})
    for strategy in s.strategies:
      for k in s.ks:
        skip = ((s.max_images_per_step and k * s.batch > s.max_images_per_step)
                or (end is not None and time.monotonic() > end))
        sec = None if skip else measure(s, name, k, strategy)
        mph = None if sec is None else 3600 * k / (sec * s.train_steps)
        rows.append({"model": name, "strategy": strategy, "k": k, "seconds": sec, "models_per_hour": mph,
                     "ratio": None if mph is None else mph / base_mph})
        if log:
          log(f"{name} {strategy} K={k}: " + ("skipped" if sec is None else f"{sec * 1000:.0f} ms/step"))
  return rows


def table_lines(s: Settings, rows: Sequence[dict[str, Any]], load_start: str, elapsed: float) -> list[str]:
  """Header and Markdown table."""
  import jax
  lines = common.header_lines(
      "Models per hour, K models at once", {"jax": common.jax_device_info()},
      f"32x32x3, {s.num_classes} classes, batch {s.batch} per model, Adam, {s.steps} timed steps after "
      f"{s.warmup} warm-up, one training = {s.train_steps} steps; jax {jax.__version__}", load_start, elapsed)
  lines += ["", "| model | strategy | K | ms / step | models / hour | x one-at-a-time |",
            "|---|---|---|---|---|---|"]
  for r in rows:
    if r["seconds"] is None:
      lines.append(f"| {r['model']} | {r['strategy']} | {r['k']} | skipped | | |")
    else:
      lines.append(f"| {r['model']} | {r['strategy']} | {r['k']} | {r['seconds'] * 1000:.0f} | "
                   f"{r['models_per_hour']:.2f} | {r['ratio']:.2f} |")
  return lines
