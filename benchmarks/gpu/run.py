r"""The prepared GPU run: every accelerator number of the project in one short command.

``python -m benchmarks gpu --out=DIR`` (on the lent machine through ``benchmarks/gpu/run.sh``,
which first installs the carried wheels) runs these parts one after another, each in its
own subprocess under its own time cap, so one slow part cannot eat the lease:

  suite           train step, Grad-CAM layer4, Grad-CAM all layers and the explanation
                  step for ResNet-18 32x32 batch 128 and ResNet-50 224x224 batch 64: JAX
                  float32 / bfloat16 against PyTorch eager / torch.compile (images/s, peak
                  device memory, TFLOP/s, % of device peak); rows with no time left: n/a
  soak            2,000 explanation steps (ResNet-18, batch 128), device memory in use
                  sampled every 100 steps, JAX and PyTorch: first / last / max
  fast_badnets    ``configs/fast_badnets.py:gtsrb`` through ``launch/train.py`` on the
                  carried GTSRB subset: seconds of training until clean accuracy >= 0.97
                  with ASR >= 0.99
  ensemble        models/hour for K = 1, 8, 32 models per step (vmap) against one at a time
  neural_cleanse  Neural Cleanse on the fast_badnets run, vmap over classes against class by class

After each part its rows join one Markdown table (``results.md``: the table, then each
part's own report) and one CSV (``results.csv``: part, measurement, value, unit, baseline,
ratio), and are printed; ``log.txt`` holds every part's stderr. The explanation step's
cost as a multiple of a plain train step (both frameworks) is computed from the suite's
rows. ``--dry_run`` runs the same parts at tiny sizes on a CPU in about a minute, with
tensorflow_datasets and grain made unimportable as on the lent machine
(``tests/test_gpu_run.py``).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from typing import Any, Callable, Sequence

from backdoor_jax.errors import ConfigError
from benchmarks import common

CARRY = os.path.join(common.REPO, "benchmarks", "gpu", "carry")  # git-ignored; prepare.sh fills it
SUBSET = os.path.join(CARRY, "gtsrb32_subset.npz")
FAST_TARGET = (0.97, 0.99)  # clean accuracy, ASR
BLOCKED = ("tensorflow_datasets", "grain")  # not on the lent machine's image
SUMMARY_COLUMNS = ("part", "measurement", "value", "unit", "baseline", "ratio")


@dataclasses.dataclass(frozen=True)
class Ctx:
  """Where a run writes, and at which sizes.

  Attributes:
    out: folder of results.md, results.csv and log.txt.
    work: scratch folder (part CSVs, the fast_badnets run).
    dry: tiny CPU sizes.
    data: the GTSRB npz of fast_badnets.
  """
  out: str
  work: str
  dry: bool
  data: str

  def path(self, name: str) -> str:
    return os.path.join(self.work, name)


Row = dict[str, Any]  # one SUMMARY_COLUMNS record


@dataclasses.dataclass(frozen=True)
class Part:
  """One part: a command (run with a timeout) and the summary rows read from its files."""
  name: str
  cap_s: float
  command: Callable[[Ctx, float], list[str]]
  summarize: Callable[[Ctx], list[Row]]


def _py(*args: str) -> list[str]:
  return [sys.executable, *args]


def _read_csv(path: str) -> list[dict[str, str]]:
  if not os.path.exists(path):
    return []
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def _num(value: str | None) -> float | None:
  try:
    return float(value) if value not in (None, "") else None
  except ValueError:
    return None


def _row(part: str, what: str, value: Any, unit: str = "", baseline: Any = None, ratio: Any = None) -> Row:
  return dict(zip(SUMMARY_COLUMNS, (part, what, value, unit, baseline, ratio)))


# --------------------------------------------------------------------------- suite + soak

SUITE_GPU = ["--models=resnet18,resnet50", "--batch=128,64", "--size=32,224", "--steps=20", "--warmup=3",
             "--row_timeout=150"]
SUITE_DRY = ["--models=resnet18", "--batch=2", "--size=8", "--steps=1", "--warmup=1", "--impls=jax_f32,torch"]


def _suite_command(ctx: Ctx, cap: float) -> list[str]:
  sizes = SUITE_DRY + ["--workloads=explain,train"] if ctx.dry else SUITE_GPU + [
      "--workloads=explain,train,gradcam_layer4,gradcam_all"]
  return _py("-m", "benchmarks", "suite", *sizes, f"--time_budget={max(cap - 10, 1):.0f}",
             f"--csv={ctx.path('suite.csv')}")


def suite_rows(records: Sequence[dict[str, str]]) -> list[Row]:
  """Summary rows of the suite's CSV: images/s against PyTorch eager, and the explanation
  step's time as a multiple of the train step's (same model and implementation)."""
  from benchmarks.suite import IMPLS, WORKLOADS  # pylint: disable=g-import-not-at-top
  rows, ms = [], {}
  for r in records:
    what = f"{WORKLOADS[r['workload']]}, {r['model']} {r['size']}x{r['size']} b{r['batch']}, {IMPLS[r['implementation']]}"
    if r["error"]:
      if not r["error"].startswith("not measured: not in --impls"):
        rows.append(_row("suite", what, f"n/a ({r['error']})"))
      continue
    eager_ips = (_num(r["ips"]) / _num(r["speedup"])) if _num(r["speedup"]) else None
    rows.append(_row("suite", f"{what}: images/s", _num(r["ips"]), "images/s", eager_ips, _num(r["speedup"])))
    peak, pct = _num(r["peak"]), _num(r["pct"])
    rows.append(_row("suite", f"{what}: peak memory", peak and peak / 2**20, "MiB", None, _num(r["mem_ratio"])))
    if pct is not None:
      rows.append(_row("suite", f"{what}: % of device peak", pct, "%", _num(r["device_peak"]), None))
    ms[(r["workload"], r["layer"], r["model"], r["implementation"])] = _num(r["ms"])
  for (workload, layer, model, impl), t in ms.items():
    base = ms.get(("train", "", model, impl))
    if workload == "explain" and base:
      rows.append(_row("suite", f"explanation step ({layer}) / train step, {model}, {IMPLS[impl]}", t, "ms",
                       base, t / base))
  return rows


def _soak_command(ctx: Ctx, cap: float) -> list[str]:
  sizes = (["--models=resnet18", "--soak_steps=4", "--soak_every=2", "--soak_batch=2", "--soak_size=8", "--warmup=1"]
           if ctx.dry else ["--models=resnet18", "--soak_steps=2000", "--soak_every=100", "--soak_batch=128",
                            "--soak_size=32", "--warmup=3"])
  return _py("-m", "benchmarks", "suite", "--workloads=", *sizes, "--soak_torch",
             f"--time_budget={max(cap - 5, 1):.0f}", f"--soak_csv={ctx.path('soak.csv')}")


def soak_rows(records: Sequence[dict[str, str]]) -> list[Row]:
  """First, last and largest memory sample per implementation (MiB), and last / first."""
  by: dict[str, list[tuple[float, float]]] = {}
  for r in records:
    by.setdefault(r["implementation"], []).append((float(r["step"]), float(r["bytes"])))
  rows = []
  for impl, samples in by.items():
    values = [v for _, v in sorted(samples)]
    steps = f"{len(samples)} samples to step {max(s for s, _ in samples):.0f}"
    rows += [_row("soak", f"{impl}: memory in use, first sample", values[0] / 2**20, "MiB"),
             _row("soak", f"{impl}: memory in use, last sample ({steps})", values[-1] / 2**20, "MiB",
                  values[0] / 2**20, values[-1] / values[0] if values[0] else None),
             _row("soak", f"{impl}: memory in use, max sample", max(values) / 2**20, "MiB")]
  return rows or [_row("soak", "memory samples", "n/a (none written; see log.txt)")]


# --------------------------------------------------------------------------- fast BadNets

def _fast_command(ctx: Ctx, cap: float) -> list[str]:
  del cap
  tiny = (["--config.model.name=small_cnn", "--config.data.image_size=16", "--config.train.epochs=2",
           "--config.train.batch_size=32", "--config.train.eval_batch_size=64", "--config.train.dtype=float32",
           "--config.train.warmup_epochs=0", "--config.train.prefetch=0", "--config.poison.rate=0.1"]
          if ctx.dry else [])
  return _py(os.path.join(common.REPO, "launch", "train.py"), "--config=configs/fast_badnets.py:gtsrb",
             f"--config.data.path={ctx.data}", f"--workdir={ctx.path('fast_badnets')}", *tiny)


def time_to_target(history: Sequence[dict[str, Any]], target: tuple[float, float] = FAST_TARGET
                   ) -> tuple[float | None, int | None]:
  """(training seconds until the first epoch with clean accuracy and ASR at the target, that epoch).

  Seconds are the sum of ``epoch_seconds`` (training only; evaluation excluded) up to and
  including that epoch; (None, None) when no epoch reached it.
  """
  seconds = 0.0
  for record in history:
    seconds += float(record["epoch_seconds"])
    if record["clean_accuracy"] >= target[0] and record["attack_success_rate"] >= target[1]:
      return seconds, int(record["epoch"])
  return None, None


def fast_rows(ctx: Ctx) -> list[Row]:
  """Seconds to the target and the last epoch's accuracy and ASR, from metrics.jsonl."""
  path = os.path.join(ctx.path("fast_badnets"), "metrics.jsonl")
  if not os.path.exists(path):
    return [_row("fast_badnets", "metrics.jsonl", "n/a (no epoch finished; see log.txt)")]
  with open(path) as f:
    history = [json.loads(line) for line in f if line.strip()]
  seconds, epoch = time_to_target(history)
  last = history[-1]
  target = f"clean accuracy >= {FAST_TARGET[0]} and ASR >= {FAST_TARGET[1]}"
  rows = [_row("fast_badnets", f"training seconds until {target}",
               seconds if seconds is not None else f"not reached in {len(history)} epochs", "s", None,
               None if epoch is None else f"epoch {epoch}"),
          _row("fast_badnets", f"after epoch {last['epoch']}: clean accuracy", last["clean_accuracy"]),
          _row("fast_badnets", f"after epoch {last['epoch']}: attack success rate", last["attack_success_rate"]),
          _row("fast_badnets", f"after epoch {last['epoch']}: training images/s", last["images_per_second"],
               "images/s")]
  return rows


# --------------------------------------------------------------------------- ensemble, Neural Cleanse

def _ensemble_command(ctx: Ctx, cap: float) -> list[str]:
  sizes = (["--models=small_cnn", "--ks=1,2", "--batch=4", "--steps=1", "--warmup=1"] if ctx.dry else
           ["--models=small_cnn,resnet18", "--ks=1,8,32", "--batch=128", "--steps=5", "--warmup=2"])
  return _py("-m", "benchmarks", "ensemble", *sizes, "--strategies=vmap", f"--time_budget={max(cap - 20, 1):.0f}",
             f"--csv={ctx.path('ensemble.csv')}")


def ensemble_rows(records: Sequence[dict[str, str]]) -> list[Row]:
  """models/hour per model and K against one at a time."""
  rows = []
  for r in records:
    if r["strategy"] == "one at a time":
      continue
    mph = _num(r["models_per_hour"])
    ratio = _num(r["ratio"])
    rows.append(_row("ensemble", f"{r['model']}, K={r['k']} ({r['strategy']}): models/hour",
                     mph if mph is not None else "n/a (skipped: time cap)", "models/h",
                     mph / ratio if mph and ratio else None, ratio))
  return rows


def _nc_command(ctx: Ctx, cap: float) -> list[str]:
  del cap
  sizes = ["--epochs=1", "--steps_per_epoch=1", "--batch_size=4"] if ctx.dry else [
      "--epochs=2", "--steps_per_epoch=5", "--batch_size=32"]
  return _py("-m", "benchmarks", "neural-cleanse", f"--workdir={ctx.path('fast_badnets')}", *sizes,
             f"--csv={ctx.path('neural_cleanse.csv')}")


def nc_rows(records: Sequence[dict[str, str]]) -> list[Row]:
  """Seconds of the timed run per path, against class by class."""
  base = next((_num(r["seconds"]) for r in records if r["path"] == "class by class"), None)
  return [_row("neural_cleanse", f"{r['path']}: seconds (compile excluded)", _num(r["seconds"]), "s", base,
               base / _num(r["seconds"]) if base and _num(r["seconds"]) else None) for r in records]


PARTS: tuple[Part, ...] = (
    Part("suite", 210, _suite_command, lambda c: suite_rows(_read_csv(c.path("suite.csv")))),
    Part("soak", 90, _soak_command, lambda c: soak_rows(_read_csv(c.path("soak.csv")))),
    Part("fast_badnets", 100, _fast_command, fast_rows),
    Part("ensemble", 45, _ensemble_command, lambda c: ensemble_rows(_read_csv(c.path("ensemble.csv")))),
    Part("neural_cleanse", 35, _nc_command, lambda c: nc_rows(_read_csv(c.path("neural_cleanse.csv")))),
)
PART_NAMES = tuple(p.name for p in PARTS)


# --------------------------------------------------------------------------- running

def add_arguments(parser: argparse.ArgumentParser) -> None:
  """The options of ``python -m benchmarks gpu``."""
  a = parser.add_argument
  a("--out", required=True, help="Folder for results.md, results.csv and log.txt (created).")
  a("--dry_run", action="store_true", help="Tiny sizes for a CPU (about a minute); tensorflow_datasets and "
    "grain are made unimportable in every part, as on the lent machine.")
  a("--parts", default=",".join(PART_NAMES), help=f"Parts to run, in this order: {', '.join(PART_NAMES)}.")
  a("--total_budget", type=float, default=470, help="Seconds for all parts; a part's cap is its own or "
    "what is left, whichever is smaller.")
  a("--cap_scale", type=float, default=1.0, help="Multiplies every part's cap (the caps are sized for an "
    "H100/H200; --dry_run uses 3).")
  a("--data", default=SUBSET, help="GTSRB npz of fast_badnets (default: the subset prepare.sh writes; "
    "--dry_run writes a tiny synthetic one when this is missing).")


def _blocker_dir(work: str) -> str:
  """A folder whose sitecustomize.py makes BLOCKED unimportable (as on the lent machine's image)."""
  path = os.path.join(work, "no_tfds")
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "sitecustomize.py"), "w") as f:
    f.write("import importlib.abc, sys\n"
            "class _Block(importlib.abc.MetaPathFinder):\n"
            "  def find_spec(self, name, path=None, target=None):\n"
            f"    if name.split('.')[0] in {BLOCKED!r}:\n"
            "      raise ImportError(f'{name} is not installed on the lent GPU image (blocked by the dry run)')\n"
            "sys.meta_path.insert(0, _Block())\n")
  return path


def _tiny_gtsrb(path: str) -> None:
  """A synthetic 43-class npz in GTSRB's format (the dry run's data)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  arrays = {}
  for split, n in (("train", 172), ("test", 86)):
    labels = np.arange(n) % 43
    arrays[f"{split}_images"] = rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)
    arrays[f"{split}_labels"] = labels.astype(np.int64)
  np.savez(path, **arrays)


def run_part(part: Part, ctx: Ctx, cap: float, env: dict[str, str], log: Any) -> tuple[str, str, float]:
  """Runs one part under ``cap`` seconds; returns (status, its stdout, seconds)."""
  cmd = part.command(ctx, cap)
  log.write(f"\n===== {part.name} (cap {cap:.0f} s): {' '.join(cmd)}\n")
  log.flush()
  t0 = time.perf_counter()
  try:
    proc = subprocess.run(cmd, cwd=common.REPO, env=env, stdout=subprocess.PIPE, stderr=log, text=True,
                          timeout=cap)
    status = "ok" if proc.returncode == 0 else f"exit status {proc.returncode}"
    stdout = proc.stdout
  except subprocess.TimeoutExpired as e:
    status = f"stopped at its cap of {cap:.0f} s"
    stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
  return status, stdout, time.perf_counter() - t0


def _fmt(value: Any) -> str:
  if value is None or value == "":
    return "-"
  if isinstance(value, float):
    return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.0f}"
  return str(value)


def summary_table(rows: Sequence[Row]) -> list[str]:
  """The one Markdown table of the run."""
  lines = ["| part | measurement | value | unit | baseline (same run) | ratio |", "| --- | --- | --- | --- | --- | --- |"]
  lines += ["| " + " | ".join(_fmt(r[c]) for c in SUMMARY_COLUMNS) + " |" for r in rows]
  return lines


def header(ctx: Ctx, elapsed: float) -> list[str]:
  """Date, device, versions, commit: what the numbers were measured on."""
  commit_file = os.path.join(CARRY, "COMMIT")
  commit = open(commit_file).read().strip() if os.path.exists(commit_file) else "unknown"
  gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                       capture_output=True, text=True, check=False).stdout.strip() if _has("nvidia-smi") else "none"
  now = datetime.datetime.now(datetime.timezone.utc)
  return [f"# GPU run{' (dry run: tiny sizes, CPU)' if ctx.dry else ''}: {now:%Y-%m-%d %H:%M} UTC, {elapsed:.0f} s",
          "",
          f"- GPU: {gpu}; host: {common.cpu_name()}, {os.cpu_count()} logical CPUs",
          f"- versions: python {platform.python_version()}, jax {common.version('jax')}, jaxlib "
          f"{common.version('jaxlib')}, flax {common.version('flax')}, optax {common.version('optax')}, "
          f"torch {common.version('torch')}, ml-collections {common.version('ml-collections')}",
          f"- commit (written by prepare.sh): {commit}",
          f"- command: `python -m benchmarks {' '.join(sys.argv[1:])}`",
          ""]


def _has(program: str) -> bool:
  return any(os.access(os.path.join(d, program), os.X_OK) for d in os.environ.get("PATH", "").split(os.pathsep))


def write_results(ctx: Ctx, rows: Sequence[Row], statuses: Sequence[str], details: Sequence[str],
                  elapsed: float) -> None:
  """results.md (header, the table, the parts' status and reports) and results.csv."""
  lines = header(ctx, elapsed) + summary_table(rows) + ["", "## Parts", "", *statuses, ""] + list(details)
  with open(os.path.join(ctx.out, "results.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  with open(os.path.join(ctx.out, "results.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, SUMMARY_COLUMNS)
    writer.writeheader()
    writer.writerows([{k: ("" if r[k] is None else r[k]) for k in SUMMARY_COLUMNS} for r in rows])


def run(args: argparse.Namespace) -> int:
  """``python -m benchmarks gpu``: every part in order, each under its cap; returns 0."""
  names = [v for v in args.parts.split(",") if v]
  bad = [v for v in names if v not in PART_NAMES]
  if bad or not names:
    raise ConfigError(f"--parts={args.parts}: allowed: {', '.join(PART_NAMES)}")
  if args.total_budget <= 0 or args.cap_scale <= 0:
    raise ConfigError(f"--total_budget={args.total_budget}, --cap_scale={args.cap_scale}: allowed: > 0")
  out = os.path.abspath(args.out)
  work = os.path.join(out, "work") if args.dry_run else "/tmp/backdoor_jax_gpu_run"
  os.makedirs(work, exist_ok=True)
  data = args.data
  if not os.path.exists(data):
    if not args.dry_run:
      raise ConfigError(f"--data={data}: no such file; allowed: the subset benchmarks/gpu/prepare.sh writes")
    data = os.path.join(work, "tiny_gtsrb.npz")
    _tiny_gtsrb(data)
  ctx = Ctx(out, work, args.dry_run, os.path.abspath(data))
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # each worker's peak is its own use
  paths = [common.REPO] + ([_blocker_dir(work)] if args.dry_run else [])
  env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in [env.get("PYTHONPATH")] if p])
  scale = args.cap_scale * (3 if args.dry_run else 1)
  start = time.perf_counter()
  rows: list[Row] = []
  statuses, details = [], []
  with open(os.path.join(out, "log.txt"), "a") as log:
    for part in (p for p in PARTS if p.name in names):
      left = args.total_budget * (3 if args.dry_run else 1) - (time.perf_counter() - start)
      cap = min(part.cap_s * scale, left)
      if cap < 5:
        statuses.append(f"- {part.name}: not run (the total budget was spent)")
        continue
      print(f"[{time.perf_counter() - start:5.0f} s] {part.name}: cap {cap:.0f} s", flush=True)
      status, stdout, seconds = run_part(part, ctx, cap, env, log)
      new = part.summarize(ctx)
      rows += new
      statuses.append(f"- {part.name}: {status}, {seconds:.0f} s (cap {cap:.0f} s)")
      details += [f"## {part.name}", "", stdout.strip() or "(no output; see log.txt)", ""]
      write_results(ctx, rows, statuses, details, time.perf_counter() - start)
      print("\n".join([statuses[-1]] + summary_table(new)[2:]), flush=True)
  write_results(ctx, rows, statuses, details, time.perf_counter() - start)
  print("\n" + "\n".join(summary_table(rows)) + "\n\n" + "\n".join(statuses), flush=True)
  return 0
