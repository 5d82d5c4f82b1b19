r"""Neural Cleanse wall time: all classes at once (jax.vmap) against class by class.

Both paths run the same jitted per-class step on the same batches (the results are
equal; tests/test_defenses.py checks it). A one-step warm-up of each path compiles its
functions first, so the table compares steady-state wall time; compile time is shown
separately.

  python benchmarks/neural_cleanse_vmap.py --workdir=runs/digits
  python benchmarks/neural_cleanse_vmap.py --workdir=runs/gtsrb --epochs=2 --steps_per_epoch=5 --batch_size=16
"""
from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdir", required=True, help="trained run (launch/train.py work dir)")
  p.add_argument("--epochs", type=int, default=2)
  p.add_argument("--steps_per_epoch", type=int, default=5)
  p.add_argument("--batch_size", type=int, default=32)
  args = p.parse_args()

  import jax
  from backdoor_jax.defenses import common, neural_cleanse, report

  cfg = report.default_config()
  ctx = common.load_context(args.workdir, cfg)
  nc = copy.deepcopy(cfg.neural_cleanse)
  nc.epochs, nc.steps_per_epoch, nc.batch_size = args.epochs, args.steps_per_epoch, args.batch_size
  warm = copy.deepcopy(nc)
  warm.epochs, warm.steps_per_epoch = 1, 1
  rows = []
  for use_vmap in (True, False):
    call = lambda c: neural_cleanse.reverse_triggers(ctx.apply_fn, ctx.variables, ctx.run.input_spec,
                                                     ctx.val_images, ctx.num_classes, c, ctx.seed,
                                                     use_vmap=use_vmap)
    t0 = time.perf_counter()
    jax.block_until_ready(call(warm)["l1"])
    t_warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    jax.block_until_ready(call(nc)["l1"])
    rows.append(("vmap over classes" if use_vmap else "class by class", t_warm, time.perf_counter() - t0))
  steps = args.epochs * args.steps_per_epoch
  print(f"# Neural Cleanse, {ctx.num_classes} classes, {steps} steps of {args.batch_size} images per class "
        f"({ctx.run.config.model.name}, {ctx.run.config.data.name})")
  print(f"device: {jax.devices()[0].platform} x{jax.device_count()}, jax {jax.__version__}, {platform.machine()}, "
        f"load average {os.getloadavg()[0]:.1f}, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
  print("| path | warm-up (1 step, compile included) s | timed run s | s per step (all classes) | speed-up |")
  print("| --- | --- | --- | --- | --- |")
  base = rows[1][2]
  for name, tw, tt in rows:
    print(f"| {name} | {tw:.1f} | {tt:.1f} | {tt / steps:.2f} | {base / tt:.2f}x |")


if __name__ == "__main__":
  main()
