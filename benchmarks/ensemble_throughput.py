r"""Models trained per hour when K backdoored models train at once (sweeps).

Prints one Markdown table. For each model and each K, one ensemble step
(``backdoor_jax.train.ensemble.make_ensemble_step``) updates K models, each on its own
batch of ``--batch`` images, with each strategy:

  * ``vmap``: one jitted computation over the stacked members;
  * ``sequential``: one compiled single-member step run K times per ensemble step,
    updating member k of the donated stack in place.

The baseline, measured in the same run, is one-at-a-time training: the plain jitted
step of one model (``steps.make_train_step``), i.e. what running the cells of a sweep
one after another costs.

models/hour = 3600 * K / (seconds per ensemble step * ``--train_steps``), where
``--train_steps`` is the length of one model's training (default 3063: GTSRB's 39,209
images, batch 128, 10 epochs). The ratio column is models/hour over the baseline's.

Usage::

  python benchmarks/ensemble_throughput.py                      # small CNN + ResNet-18, K=1,8,32
  python benchmarks/ensemble_throughput.py --models=small_cnn --ks=1,8 --steps=3

Data: random uint8 images (32x32x3) and labels, drawn once, reused every step; the
step converts and normalises them on the device, as in training. Optimiser: Adam. Each
timing blocks on the new state after every step; ``--warmup`` steps (compilation) are
excluded and the median over ``--steps`` timed steps is reported. Runs on CPU and GPU
unchanged.
"""
from __future__ import annotations

import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  pylint: disable=wrong-import-position

_MODELS = flags.DEFINE_list("models", ["small_cnn", "resnet18"], "Zoo models (32x32 inputs, CIFAR stem).")
_KS = flags.DEFINE_list("ks", ["1", "8", "32"], "Ensemble sizes K.")
_STRATEGIES = flags.DEFINE_list("strategies", ["vmap", "sequential"], "Ensemble strategies to time.")
_BATCH = flags.DEFINE_integer("batch", 128, "Images per model per step.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps per row.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps first (compilation).")
_TRAIN_STEPS = flags.DEFINE_integer("train_steps", 3063, "Steps of one model's training (for models/hour).")
_NUM_CLASSES = flags.DEFINE_integer("num_classes", 43, "Classes (GTSRB: 43).")
_MAX_IMAGES = flags.DEFINE_integer("max_images_per_step", 0,
                                   "Skip rows whose K * batch exceeds this (0: no limit); useful on CPU.")


def _model(name: str, num_classes: int):
  from backdoor_jax import models
  if name == "small_cnn":  # the GTSRB BadNets recipe's network
    return models.get_model(name, num_classes, widths=(32, 64, 128, 128), pool_after=(1, 2, 3))
  return models.get_model(name, num_classes, stem="cifar")


def measure(name: str, k: int, strategy: str | None) -> float:
  """Median seconds of one step updating ``k`` models (``strategy`` None: the plain step)."""
  import jax
  import numpy as np
  import optax
  from backdoor_jax.train import ensemble, state as state_lib, steps
  spec = steps.InputSpec((0.5,) * 3, (0.25,) * 3)
  model = _model(name, _NUM_CLASSES.value)
  tx = optax.adam(1e-3)
  rng = np.random.default_rng(0)
  b = _BATCH.value
  if strategy is None:
    state = state_lib.create_train_state(model, tx, jax.random.key(0), (1, 32, 32, 3))
    step = steps.make_train_step(spec, jax.random.key(1))
    x = jax.device_put(rng.integers(0, 256, (b, 32, 32, 3), dtype=np.uint8))
    y = jax.device_put(rng.integers(0, _NUM_CLASSES.value, (b,)).astype(np.int32))
    holder = [state]

    def run():
      holder[0], _ = step(holder[0], x, y)
      jax.block_until_ready(holder[0].params)
  else:
    state = jax.vmap(lambda key: state_lib.create_train_state(model, tx, key, (1, 32, 32, 3)))(
        jax.random.split(jax.random.key(0), k))
    step = ensemble.make_ensemble_step(spec, strategy)
    x = jax.device_put(rng.integers(0, 256, (k, b, 32, 32, 3), dtype=np.uint8))
    y = jax.device_put(rng.integers(0, _NUM_CLASSES.value, (k, b)).astype(np.int32))
    keys = jax.random.split(jax.random.key(1), k)
    holder = [state]

    def run():
      holder[0], _ = step(holder[0], x, y, keys)
      jax.block_until_ready(holder[0].params)
  out = common.time_steps(run, _WARMUP.value, _STEPS.value)
  return common.median(out["step_s"])


def main(argv):
  del argv
  load_start = common.load_average()
  t_start = time.time()
  rows = []
  for name in _MODELS.value:
    base = measure(name, 1, None)
    base_mph = 3600 / (base * _TRAIN_STEPS.value)
    rows.append((name, "one at a time", 1, base, base_mph, 1.0))
    print(f"{name} one-at-a-time: {base * 1000:.0f} ms/step, {base_mph:.2f} models/h", flush=True)
    for strategy in _STRATEGIES.value:
      for k in (int(v) for v in _KS.value):
        if _MAX_IMAGES.value and k * _BATCH.value > _MAX_IMAGES.value:
          rows.append((name, strategy, k, None, None, None))
          continue
        sec = measure(name, k, strategy)
        mph = 3600 * k / (sec * _TRAIN_STEPS.value)
        rows.append((name, strategy, k, sec, mph, mph / base_mph))
        print(f"{name} {strategy} K={k}: {sec * 1000:.0f} ms/step, {mph:.2f} models/h", flush=True)
  lines = common.header_lines(
      "Models per hour, K models at once", {"jax": common.jax_device_info()},
      f"32x32x3, {_NUM_CLASSES.value} classes, batch {_BATCH.value} per model, Adam, "
      f"{_STEPS.value} timed steps after {_WARMUP.value} warm-up, one training = {_TRAIN_STEPS.value} steps",
      load_start, time.time() - t_start)
  lines += ["", "| model | strategy | K | ms / step | models / hour | x one-at-a-time |", "|---|---|---|---|---|---|"]
  for name, strategy, k, sec, mph, ratio in rows:
    if sec is None:
      lines.append(f"| {name} | {strategy} | {k} | skipped | | |")
    else:
      lines.append(f"| {name} | {strategy} | {k} | {sec * 1000:.0f} | {mph:.2f} | {ratio:.2f} |")
  print("\n".join(lines))


if __name__ == "__main__":
  app.run(main)
