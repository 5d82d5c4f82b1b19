r"""The benchmarks' one command line: ``python -m benchmarks COMMAND [options]``, from the repository root.

Commands:
  suite           train step, Grad-CAM (layer4 / all layers), explanation step and a memory
                  soak: JAX float32 / bfloat16 against PyTorch eager / torch.compile, one table
  ensemble        models/hour with K models per step (vmap, sequential) against one at a time
  neural-cleanse  Neural Cleanse with all classes under vmap against class by class (a trained run)
  gtsrb-subset    write a class-stratified GTSRB subset small enough to travel with a GPU run
  gpu             the prepared GPU run: every part above at GPU sizes plus the fast BadNets
                  recipe, each part under its own time cap, into one Markdown table and a CSV

``python -m benchmarks COMMAND --help`` lists a command's options. A bad value ends the
command with one ``error:`` line and exit status 2.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Callable

from backdoor_jax.errors import ConfigError
from benchmarks import common


def _ints(value: str) -> tuple[int, ...]:
  try:
    return tuple(int(v) for v in value.split(",") if v.strip())
  except ValueError:
    raise ConfigError(f"{value!r}: allowed: comma-separated integers") from None


def _ensemble(args: argparse.Namespace) -> int:
  from benchmarks import ensemble_throughput as et
  strategies = tuple(v for v in args.strategies.split(",") if v)
  models = tuple(v for v in args.models.split(",") if v)
  bad = [v for v in strategies if v not in et.STRATEGIES] + [v for v in models if v not in et.MODELS]
  if bad or not strategies or not models:
    raise ConfigError(f"--models={args.models} --strategies={args.strategies}: allowed: models "
                      f"{', '.join(et.MODELS)}; strategies {', '.join(et.STRATEGIES)}")
  s = et.Settings(models=models, ks=_ints(args.ks), strategies=strategies, batch=args.batch, steps=args.steps,
                  warmup=args.warmup, train_steps=args.train_steps, num_classes=args.num_classes,
                  max_images_per_step=args.max_images_per_step, time_budget=args.time_budget)
  if min(s.ks, default=0) < 1 or min(s.batch, s.steps, s.warmup, s.train_steps) < 1:
    raise ConfigError(f"--ks={args.ks}, --batch, --steps, --warmup, --train_steps: allowed: integers >= 1")
  load_start, start = common.load_average(), time.perf_counter()
  rows = et.measure_table(s, log=lambda line: print(line, file=sys.stderr, flush=True))
  if args.csv:
    common.write_csv(args.csv, rows)
  print("\n".join(et.table_lines(s, rows, load_start, time.perf_counter() - start)))
  return 0


def _neural_cleanse(args: argparse.Namespace) -> int:
  from benchmarks import neural_cleanse_vmap as ncv
  if min(args.epochs, args.steps_per_epoch, args.batch_size) < 1:
    raise ConfigError("--epochs, --steps_per_epoch, --batch_size: allowed: integers >= 1")
  load_start, start = common.load_average(), time.perf_counter()
  ctx, rows = ncv.measure(args.workdir, args.epochs, args.steps_per_epoch, args.batch_size)
  if args.csv:
    common.write_csv(args.csv, rows)
  print("\n".join(ncv.table_lines(ctx, rows, args.epochs * args.steps_per_epoch, args.batch_size, load_start,
                                  time.perf_counter() - start)))
  return 0


def _gtsrb_subset(args: argparse.Namespace) -> int:
  from benchmarks import make_gtsrb_subset
  if min(args.train, args.test) < 1:
    raise ConfigError(f"--train={args.train} --test={args.test}: allowed: integers >= 1")
  print(make_gtsrb_subset.write_subset(args.src, args.out, args.train, args.test, args.seed))
  return 0


def _suite(args: argparse.Namespace) -> int:
  from benchmarks import suite
  return suite.run(args)


def _gpu(args: argparse.Namespace) -> int:
  from benchmarks.gpu import run
  return run.run(args)


def build_parser() -> argparse.ArgumentParser:
  """The parser of every command."""
  parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest="command", required=True)
  commands: dict[str, tuple[str, Callable[[argparse.Namespace], int]]] = {
      "suite": ("every hot path, JAX vs PyTorch, one table", _suite),
      "ensemble": ("models/hour with K models at once", _ensemble),
      "neural-cleanse": ("Neural Cleanse, vmap over classes vs class by class", _neural_cleanse),
      "gtsrb-subset": ("write a class-stratified GTSRB subset", _gtsrb_subset),
      "gpu": ("the prepared GPU run (one table + CSV)", _gpu),
  }
  parsers = {}
  for name, (text, fn) in commands.items():
    parsers[name] = sub.add_parser(name, help=text, description=text)
    parsers[name].set_defaults(fn=fn)
  from benchmarks import suite  # pylint: disable=g-import-not-at-top
  from benchmarks.gpu import run as gpu_run  # pylint: disable=g-import-not-at-top
  suite.add_arguments(parsers["suite"])
  gpu_run.add_arguments(parsers["gpu"])
  a = parsers["ensemble"].add_argument
  a("--models", default="small_cnn,resnet18", help="Zoo models (32x32 inputs, CIFAR stem).")
  a("--ks", default="1,8,32", help="Ensemble sizes K.")
  a("--strategies", default="vmap,sequential", help="Ensemble strategies to time.")
  a("--batch", type=int, default=128, help="Images per model per step.")
  a("--steps", type=int, default=5, help="Timed steps per row.")
  a("--warmup", type=int, default=2, help="Untimed steps first (compilation).")
  a("--train_steps", type=int, default=3063, help="Steps of one model's training (for models/hour).")
  a("--num_classes", type=int, default=43, help="Classes (GTSRB: 43).")
  a("--max_images_per_step", type=int, default=0, help="Skip rows whose K * batch exceeds this (0: no limit).")
  a("--time_budget", type=float, default=0, help="Seconds for the table; later rows are skipped (0: none).")
  a("--csv", default="", help="Also write the rows to this CSV file.")
  a = parsers["neural-cleanse"].add_argument
  a("--workdir", required=True, help="A trained run (launch/train.py work dir).")
  a("--epochs", type=int, default=2)
  a("--steps_per_epoch", type=int, default=5)
  a("--batch_size", type=int, default=32)
  a("--csv", default="", help="Also write the rows to this CSV file.")
  a = parsers["gtsrb-subset"].add_argument
  a("--src", required=True, help="The full GTSRB npz (train_images, train_labels, test_images, test_labels).")
  a("--out", required=True, help="Output .npz (compressed).")
  a("--train", type=int, default=16000, help="Training images kept (stratified by class).")
  a("--test", type=int, default=3000, help="Test images kept (stratified by class).")
  a("--seed", type=int, default=0, help="Subset seed.")
  return parser


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  try:
    return args.fn(args)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
