r"""The benchmark suite: every workload, model and implementation in one table.

Workloads (``--workloads``):

  * ``train``: one classic training step (SGD with momentum, cross-entropy, BatchNorm
    in train mode), as ``train_throughput.py`` measures it;
  * ``gradcam_layer4``: Grad-CAM maps at ``layer4`` for a batch (``gradcam_throughput.py``);
  * ``gradcam_all``: Grad-CAM maps at all five layers in one forward and one backward pass;
  * ``explain``: the second-order explanation-backdoor step, Grad-CAM at ``layer4`` in the
    loss (``--explain_layers`` adds more), as ``explanation_step.py`` measures it.

Models (``--models``, ``--batch``, ``--size``): ResNet-18 with the CIFAR stem at 32x32,
batch 128, and ResNet-50 with the ImageNet stem at 224x224, batch 64, by default.

Implementations (``--impls``): JAX jit in float32, JAX jit with bfloat16 compute
(parameters stay float32), a PyTorch eager reference (float32), and ``torch.compile`` of
that reference. A row that cannot run shows ``n/a (reason)``.

Usage::

  python -m benchmarks suite                                  # GPU-sized defaults
  python -m benchmarks suite --batch=16,2 --size=32,64 --steps=3 --warmup=1   # a CPU
  python -m benchmarks suite --soak_steps=10000 --soak_every=100 --soak_csv=soak.csv

Each row runs in its own subprocess (``python -m benchmarks.worker``): the worker
functions (``run_jax``/``run_torch``) of the flag-free workload modules
``train_throughput``, ``gradcam_throughput`` and ``explanation_step``, so a row's peak
memory is its own. Rows are measured in priority order (``torch.compile`` rows last,
then by the order of ``--workloads``) and printed in table order; ``--time_budget``
leaves the rows it has no time for as ``n/a``.
Data is synthetic: random uint8 images and labels drawn in the worker from ``--seed``
(no files, no network), so the suite runs on machines without either.

FLOPs per step come from XLA's cost analysis of the compiled JAX float32 program of
each workload and model; the same count is used for every implementation of it (the
work is the same function), so achieved TFLOP/s compare like with like. The device
peak comes from a table of NVIDIA dense (no sparsity) peaks (``--peak_tflops``
overrides it); float32 rows are compared with the TF32 tensor-core peak when the
computation uses TF32 (JAX's and cuDNN's default on Ampere and later), else with the
plain FP32 peak. On a CPU the % column is n/a.

``--soak_steps`` adds a memory-flatness run of the JAX explanation step (and, with
``--soak_torch``, of the PyTorch reference): memory is sampled every ``--soak_every``
steps and summarised in a second block; ``--soak_csv`` writes the samples.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import importlib.util
import math
import os
import re
import shutil
import sys
import tempfile
import time
from typing import Any, Sequence

from backdoor_jax.errors import ConfigError
from benchmarks import common, explanation_step, gradcam_throughput, train_throughput

WORKLOADS = {"train": "train step", "gradcam_layer4": "Grad-CAM layer4",
             "gradcam_all": "Grad-CAM all 5 layers", "explain": "explanation step"}
IMPLS = {"jax_f32": "JAX jit, float32", "jax_bf16": "JAX jit, bfloat16",
         "torch": "PyTorch eager", "torch_compile": "PyTorch torch.compile"}
MODELS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
DEFAULT_BATCH = {"resnet18": 128, "resnet50": 64}  # keyed by stem: CIFAR / ImageNet
DEFAULT_SIZE = {"resnet18": 32, "resnet50": 224}
EXPLAIN_LAM, EXPLAIN_MU, EXPLAIN_LR = 1.0, 1.0, 1e-3  # explanation_step.py's defaults
FLAT_TOLERANCE = (16 * 2**20, 0.02)  # soak: last - first <= max(16 MiB, 2% of first)
H100_TARGET = (2.0, 0.6)  # explanation step: >= 2x images/s at <= 0.6x peak memory
CHECK_BATCH = 4  # images of the Grad-CAM known-answer check (--check)


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """The suite's command-line options (``python -m benchmarks suite --help``)."""
  a = parser.add_argument
  a("--workloads", default=",".join(WORKLOADS),
    help=f"Workloads to measure, from {', '.join(WORKLOADS)} (empty with --soak_steps: the soak only).")
  a("--impls", default=",".join(IMPLS), help=f"Implementations, from {', '.join(IMPLS)}.")
  a("--models", default="resnet18,resnet50", help="ResNets (resnet18/34: CIFAR stem, 10 classes; "
    "resnet50/101/152: ImageNet stem, 1000 classes).")
  a("--batch", default="", help="Batch per model (one value for all, or one per --models entry); empty: "
    "128 for CIFAR-stem models, 64 for ImageNet-stem ones.")
  a("--size", default="", help="Input side per model (one value or one per model); empty: 32 for "
    "CIFAR-stem models, 224 for ImageNet-stem ones.")
  a("--explain_layers", default="layer4", help="Grad-CAM layers of the explanation step, one set of rows each.")
  a("--steps", type=int, default=20, help="Timed steps per row (the explanation step times this number "
    "rounded up to even).")
  a("--warmup", type=int, default=3, help="Untimed steps per row first (compilation and autotuning "
    "included), >= 1.")
  a("--seed", type=int, default=0, help="Seed of the weights and of the synthetic data.")
  a("--check", action="store_true", help="Also run the known-answer checks (float64 Grad-CAM maps, the "
    "explanation step's first loss and gradient norm); their extra passes count in the rows' memory.")
  a("--peak_tflops", default="", help="Device peak TFLOP/s for the %% column, overriding the built-in "
    "table: one number for every row, or two (float32 rows, bfloat16 rows).")
  a("--all_devices", action="store_true", help="Let workers see every GPU. By default, where "
    "CUDA_VISIBLE_DEVICES is unset, it is set to 0 so that every row uses one GPU.")
  a("--row_timeout", type=float, default=0, help="Seconds before a row is abandoned (0: none).")
  a("--time_budget", type=float, default=0, help="Seconds for all rows and the soak together; rows with "
    "no time left are reported as n/a (0: no limit).")
  a("--csv", default="", help="Also write the table to this CSV file (one line per row).")
  a("--soak_steps", type=int, default=0, help="Memory-flatness run of the explanation step: this many "
    "steps (rounded up to even); 0: none.")
  a("--soak_every", type=int, default=100, help="Soak: sample memory every this many steps.")
  a("--soak_model", default="", help="Soak: model (default: the first of --models).")
  a("--soak_batch", type=int, default=0, help="Soak: batch (0: that model's --batch).")
  a("--soak_size", type=int, default=0, help="Soak: input side (0: that model's --size).")
  a("--soak_torch", action="store_true", help="Soak the PyTorch create_graph reference too.")
  a("--soak_csv", default="", help="Soak: write the memory samples to this CSV file (columns "
    "implementation, step, bytes, measure).")


def _list(value: str) -> list[str]:
  return [v.strip() for v in value.split(",") if v.strip()]


# ---------------------------------------------------------------- device peaks

# Dense (no sparsity) peak TFLOP/s from NVIDIA's data sheets: FP32 on CUDA cores, and
# TF32 / BF16 on tensor cores. Patterns are tried in order, most specific first, and
# matched case-insensitively as whole words against the device name.
PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    (r"GH200", {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4}),
    (r"H200[ -]NVL", {"fp32": 60.0, "tf32": 417.5, "bf16": 835.5}),
    (r"H200", {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4}),
    (r"H100[ -]NVL", {"fp32": 60.0, "tf32": 417.5, "bf16": 835.5}),
    (r"H100[ -]PCIe", {"fp32": 51.0, "tf32": 378.0, "bf16": 756.5}),
    (r"H100", {"fp32": 66.9, "tf32": 494.7, "bf16": 989.4}),  # SXM5 ("NVIDIA H100 80GB HBM3")
    (r"A100", {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0}),
    (r"A30", {"fp32": 10.3, "tf32": 82.0, "bf16": 165.0}),
    (r"A10", {"fp32": 31.2, "tf32": 62.5, "bf16": 125.0}),
    (r"L40S", {"fp32": 91.6, "tf32": 183.0, "bf16": 362.05}),
    (r"L40", {"fp32": 90.5, "tf32": 90.5, "bf16": 181.0}),
    (r"L4", {"fp32": 30.3, "tf32": 60.0, "bf16": 121.0}),
)
MATH_NAMES = {"fp32": "FP32", "tf32": "TF32 tensor-core", "bf16": "BF16 tensor-core"}


def peak_tflops(device: str, math_mode: str) -> float | None:
  """Dense peak TFLOP/s of a known NVIDIA GPU for one kind of arithmetic.

  Args:
    device: a device description containing the GPU's name, e.g.
      ``'1 x gpu (NVIDIA H100 80GB HBM3)'`` or ``'cuda (NVIDIA A100-SXM4-80GB)'``.
    math_mode: ``'fp32'``, ``'tf32'`` or ``'bf16'``.
  Returns:
    The peak, or ``None`` for an unknown device (a CPU included) or arithmetic.
  """
  for pattern, peaks in PEAK_TFLOPS:
    if re.search(rf"\b{pattern}\b", device, re.IGNORECASE):
      return peaks.get(math_mode)
  return None


def f32_math(framework: str, env: dict[str, str] | None = None) -> str:
  """The arithmetic of a float32 row on an NVIDIA GPU: ``'tf32'`` or ``'fp32'``.

  JAX computes float32 matmuls and convolutions in TF32 on Ampere and later unless
  ``jax_default_matmul_precision`` asks for more (``JAX_DEFAULT_MATMUL_PRECISION`` in a
  worker's environment). PyTorch defaults to ``torch.backends.cudnn.allow_tf32 = True``
  (convolutions, nearly all of a ResNet's FLOPs) and ``torch.backends.cuda.matmul.
  allow_tf32 = False`` (only the small classifier matmul), and the workers leave both
  alone. ``NVIDIA_TF32_OVERRIDE=0`` turns TF32 off for both.

  Args:
    framework: ``'jax'`` or ``'torch'``.
    env: the workers' environment (default ``os.environ``).
  """
  env = os.environ if env is None else env
  if env.get("NVIDIA_TF32_OVERRIDE") == "0":
    return "fp32"
  if framework == "jax":
    precision = env.get("JAX_DEFAULT_MATMUL_PRECISION", "").lower()
    if precision in ("highest", "float32", "f32_f32_f32"):
      return "fp32"
  return "tf32"


def row_math(impl: str) -> str:
  """The arithmetic whose peak a row is compared with."""
  if impl == "jax_bf16":
    return "bf16"
  return f32_math("jax" if impl.startswith("jax") else "torch")


def parse_peak_override(values: Sequence[str]) -> tuple[float, float] | None:
  """``--peak_tflops`` as (float32 rows, bfloat16 rows), or ``None`` when empty.

  Raises:
    ConfigError: not one or two positive numbers.
  """
  if not values:
    return None
  try:
    numbers = [float(v) for v in values]
  except ValueError:
    numbers = []
  if len(numbers) not in (1, 2) or min(numbers) <= 0:
    raise ConfigError(f"--peak_tflops={','.join(values)}: allowed: one positive number (all rows) "
                      "or two (float32 rows, bfloat16 rows)")
  return (numbers[0], numbers[-1])


# -------------------------------------------------------------------- the rows


@dataclasses.dataclass
class Row:
  """One line of the table.

  Attributes:
    workload: key of ``WORKLOADS``.
    layer: the Grad-CAM layer of the explanation step's loss ('' for other workloads).
    model: ResNet name.
    size: input side.
    batch: images per step.
    impl: key of ``IMPLS``.
    result: :func:`normalize` output: ``step_s``, ``peak`` (bytes), ``memory_kind``,
      ``device``, ``flops`` (of this worker's own program, or ``None``); or ``error``.
  """
  workload: str
  layer: str
  model: str
  size: int
  batch: int
  impl: str
  result: dict[str, Any]

  @property
  def key(self) -> tuple[str, str, str]:
    """Rows with the same key measure the same work."""
    return (self.workload, self.layer, self.model)


def normalize(workload: str, raw: dict[str, Any]) -> dict[str, Any]:
  """A worker's result in the suite's terms (the three scripts report slightly differently).

  Args:
    workload: key of ``WORKLOADS``.
    raw: what ``common.run_worker`` returned.
  Returns:
    ``{'step_s', 'peak', 'memory_kind', 'device', 'flops'}``, or ``{'error': ...}``.
  """
  if "error" in raw:
    return {"error": raw["error"]}
  if workload.startswith("gradcam"):
    rows = raw.get("rows", {})
    if len(rows) != 1:
      return {"error": f"expected one Grad-CAM row, got {sorted(rows)}"}
    timing = next(iter(rows.values()))
  else:
    timing = raw
  memory = raw.get("memory", {})
  return {"step_s": list(timing["step_s"]), "peak": memory.get("peak", memory.get("bytes")),
          "memory_kind": memory.get("kind", "n/a"), "device": raw.get("device", "n/a"),
          "flops": timing.get("flops"), **({"check": raw["check"]} if "check" in raw else {})}


def workload_flops(rows: Sequence[Row]) -> dict[tuple[str, str, str], float]:
  """FLOPs per step of each workload and model: the JAX float32 program's (else bfloat16's)."""
  out: dict[tuple[str, str, str], float] = {}
  for impl in ("jax_bf16", "jax_f32"):  # float32 last, so it wins
    for row in rows:
      if row.impl == impl and row.result.get("flops"):
        out[row.key] = row.result["flops"]
  return out


def _label(row: Row) -> tuple[str, str]:
  work = WORKLOADS[row.workload]
  if row.workload == "explain":
    work += f" (Grad-CAM {row.layer})"
  return work, f"{row.model} ({row.size}x{row.size}, batch {row.batch})"


def _memory_cell(peak: float | None, kind: str) -> str:
  if peak is None:
    return "-"
  return f"{common.mib(peak)} ({'max RSS' if 'RSS' in kind else 'device peak'})"


def row_metrics(rows: Sequence[Row], peak_override: tuple[float, float] | None = None
                ) -> list[dict[str, Any]]:
  """The numbers of each row: time, images/s, ratios to PyTorch eager, FLOP rates.

  Args:
    rows: the measured rows.
    peak_override: (float32, bfloat16) peak TFLOP/s for every row, else the table's.
  Returns:
    One dict per row (``None`` where a number is unavailable): ``ms``, ``ips``,
    ``speedup`` (images/s over PyTorch eager's for the same key), ``peak``,
    ``mem_ratio`` (peak memory over PyTorch eager's), ``gflop``, ``tflops``,
    ``device_peak`` and ``pct``; ``error`` for a failed row.
  """
  flops = workload_flops(rows)
  eager = {r.key: r for r in rows if r.impl == "torch" and "step_s" in r.result}
  out = []
  for row in rows:
    res = row.result
    if "error" in res:
      out.append({"error": res["error"]})
      continue
    med = common.median(res["step_s"])
    ips = row.batch / med
    ref = eager.get(row.key)
    speedup = mem_ratio = None
    if ref is not None:
      speedup = ips / (ref.batch / common.median(ref.result["step_s"]))
      if res.get("peak") and ref.result.get("peak"):
        mem_ratio = res["peak"] / ref.result["peak"]
    f = flops.get(row.key)
    tflops = f / med / 1e12 if f else None
    if peak_override is not None:
      device_peak = peak_override[1] if row.impl == "jax_bf16" else peak_override[0]
    else:
      device_peak = peak_tflops(res.get("device", ""), row_math(row.impl))
    pct = 100 * tflops / device_peak if tflops is not None and device_peak else None
    out.append({"ms": med * 1e3, "ips": ips, "speedup": speedup, "peak": res.get("peak"),
                "mem_ratio": mem_ratio, "gflop": f / 1e9 if f else None, "tflops": tflops,
                "device_peak": device_peak, "pct": pct})
  return out


def _fmt(value: float | None, spec: str) -> str:
  return "n/a" if value is None else format(value, spec)


def format_table(rows: Sequence[Row], peak_override: tuple[float, float] | None = None) -> list[str]:
  """The Markdown table (header line included), one line per row.

  A failed row shows ``n/a (reason)`` in the time column and '-' elsewhere.
  """
  lines = ["| workload | model (input, batch) | implementation | ms / step | images/s | "
           "x PyTorch eager | peak memory | memory x PyTorch eager | GFLOP / step | TFLOP/s | "
           "% of device peak |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
  for row, m in zip(rows, row_metrics(rows, peak_override)):
    work, model = _label(row)
    impl = IMPLS[row.impl]
    if "error" in m:
      lines.append(f"| {work} | {model} | {impl} | n/a ({m['error']}) | - | - | - | - | - | - | - |")
      continue
    pct = "n/a" if m["pct"] is None else f"{m['pct']:.1f}% of {m['device_peak']:g}"
    lines.append(
        f"| {work} | {model} | {impl} | {m['ms']:.1f} | {m['ips']:.1f} | {_fmt(m['speedup'], '.2f')} | "
        f"{_memory_cell(m['peak'], row.result.get('memory_kind', ''))} | {_fmt(m['mem_ratio'], '.2f')} | "
        f"{_fmt(m['gflop'], '.2f')} | {_fmt(m['tflops'], '.3g')} | {pct} |")
  return lines


def target_lines(rows: Sequence[Row], peak_override: tuple[float, float] | None = None) -> list[str]:
  """The explanation-step target (H100: >= 2x PyTorch create_graph's images/s at <= 0.6x its memory)."""
  speed_goal, memory_goal = H100_TARGET
  out = []
  for row, m in zip(rows, row_metrics(rows, peak_override)):
    if row.workload != "explain" or not row.impl.startswith("jax") or "error" in m:
      continue
    work, model = _label(row)
    if m["speedup"] is None or m["mem_ratio"] is None:
      out.append(f"- {work}, {model}, {IMPLS[row.impl]}: no PyTorch eager row to compare with")
      continue
    met = m["speedup"] >= speed_goal and m["mem_ratio"] <= memory_goal
    device = row.result.get("device", "n/a")
    verdict = (("met" if met else "NOT met") if "H100" in device.upper() else
               f"not assessed: the target is for an H100 and this ran on {device}")
    out.append(f"- {work}, {model}, {IMPLS[row.impl]}: {m['speedup']:.2f}x PyTorch create_graph's "
               f"images/s at {m['mem_ratio']:.2f}x its peak memory (target >= {speed_goal:g}x at "
               f"<= {memory_goal:g}x): {verdict}")
  return out


# -------------------------------------------------------------------- the soak


def soak_summary(samples: Sequence[Sequence[float]]) -> dict[str, float]:
  """First, middle, last and largest memory sample and the growth between them.

  Args:
    samples: ``[step, bytes]`` pairs in step order (at least one).
  Returns:
    ``first``, ``mid`` (the sample at the middle of the list), ``last`` and ``max``
    (bytes); ``first_step``, ``last_step``; ``growth`` (last - first) and
    ``second_half_growth`` (last - mid), in bytes; ``flat``: 1.0 when growth <=
    max(16 MiB, 2% of first), else 0.0 (memory that shrinks is flat in this sense: it
    does not grow). A leak grows memory in both halves alike, while an allocator
    settling after the warm-up grows it in the first half only.
  """
  steps = [float(s) for s, _ in samples]
  values = [float(v) for _, v in samples]
  mid = values[(len(values) - 1) // 2]
  growth = values[-1] - values[0]
  tolerance = max(FLAT_TOLERANCE[0], FLAT_TOLERANCE[1] * values[0])
  return {"first": values[0], "mid": mid, "last": values[-1], "max": max(values),
          "first_step": steps[0], "last_step": steps[-1], "growth": growth,
          "second_half_growth": values[-1] - mid, "flat": float(growth <= tolerance)}


def soak_lines(title: str, results: Sequence[tuple[str, dict[str, Any]]]) -> list[str]:
  """The soak block: one line per implementation."""
  lines = [f"#### {title}", "",
           "| implementation | timed steps | ms / step (median) | first sample | last sample | "
           "max sample | growth, last - first | growth, second half | flat | memory measure |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
  for name, res in results:
    samples = res.get("memory", {}).get("samples") if "error" not in res else None
    if not samples:
      lines.append(f"| {name} | n/a ({res.get('error', 'no memory samples')}) | - | - | - | - | - | - | - | - |")
      continue
    s = soak_summary(samples)
    lines.append(
        f"| {name} | {len(res['step_s'])} | {common.median(res['step_s']) * 1e3:.1f} | "
        f"{common.mib(s['first'])} (step {s['first_step']:.0f}) | {common.mib(s['last'])} "
        f"(step {s['last_step']:.0f}) | {common.mib(s['max'])} | {s['growth'] / 2**20:+.1f} MiB | "
        f"{s['second_half_growth'] / 2**20:+.1f} MiB | {'yes' if s['flat'] else 'NO'} | "
        f"{res['memory']['kind']} |")
  return lines


def write_soak_csv(path: str, results: Sequence[tuple[str, dict[str, Any]]]) -> None:
  """Writes every soak sample as ``implementation, step, bytes, measure``."""
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["implementation", "step", "bytes", "measure"])
    for name, res in results:
      for step, value in res.get("memory", {}).get("samples", []):
        writer.writerow([name, step, value, res["memory"]["kind"]])


# -------------------------------------------------------------------- the jobs


def make_job(workload: str, layer: str, model: str, size: int, batch: int, impl: str, steps: int,
             warmup: int, seed: int, workdir: str, sample_every: int = 0, check: bool = False
             ) -> tuple[str, Any]:
  """(workload module path, job) of one row, for ``common.run_worker``.

  The known-answer checks are off unless ``check`` (their float64 / full-precision
  passes would count in the row's memory).
  """
  framework = "jax" if impl.startswith("jax") else "torch"
  dtype = "bfloat16" if impl == "jax_bf16" else "float32"
  compiled = impl == "torch_compile"
  check = check and dtype == "float32" and not compiled
  if workload == "train":
    return train_throughput.__file__, train_throughput.Job(
        label=IMPLS[impl], framework=framework, dtype=dtype, compile=compiled, model=model,
        batch=batch, steps=1, warmup=warmup, repeats=steps, augment=False, seed=seed, size=size,
        stem=common.model_stem(model), num_classes=common.num_classes(model))
  if workload in ("gradcam_layer4", "gradcam_all"):
    return gradcam_throughput.__file__, gradcam_throughput.Job(
        framework=framework, model=model, batch=batch, size=size, steps=steps, warmup=warmup,
        check_batch=min(CHECK_BATCH, batch), seed=seed, workdir=workdir, dtype=dtype, compile=compiled,
        methods=("layer4" if workload == "gradcam_layer4" else "all",), check=check)
  if workload == "explain":
    return explanation_step.__file__, explanation_step.Job(
        framework=framework, model=model, layer=layer, batch=batch, size=size,
        steps=max(1, math.ceil(steps / 2)), warmup=warmup, lam=EXPLAIN_LAM, mu=EXPLAIN_MU,
        lr=EXPLAIN_LR, seed=seed, workdir=workdir, dtype=dtype, compile=compiled, check=check,
        sample_every=sample_every)
  raise ConfigError(f"unknown workload {workload!r}; allowed: {', '.join(WORKLOADS)}")


def _check_choices(name: str, values: Sequence[str], allowed: Sequence[str]) -> list[str]:
  """The flag's values in order without repeats; ConfigError for an empty list or a bad value."""
  bad = [v for v in values if v not in allowed]
  if bad or not values:
    raise ConfigError(f"--{name}={','.join(values)}: {'bad value ' + repr(bad[0]) if bad else 'empty'}; "
                      f"allowed: {', '.join(allowed)}")
  return list(dict.fromkeys(values))


@dataclasses.dataclass
class Plan:
  """What one run measures (the validated options)."""
  workloads: list[str]
  impls: list[str]
  models: list[str]
  batches: list[int]
  sizes: list[int]
  layers: list[str]
  steps: int
  warmup: int
  seed: int
  row_timeout: float
  soak_steps: int
  soak_every: int
  soak_model: str
  soak_batch: int
  soak_size: int
  soak_torch: bool
  check: bool = False
  time_budget: float = 0.0


def plan_from_args(args: argparse.Namespace) -> Plan:
  """Checks the options and returns the plan.

  Raises:
    ConfigError: a value is not allowed (the message names it and what is).
  """
  soak_steps = args.soak_steps
  workloads = ([] if not _list(args.workloads) and soak_steps > 0  # a soak on its own
               else _check_choices("workloads", _list(args.workloads), list(WORKLOADS)))
  impls = _check_choices("impls", _list(args.impls), list(IMPLS))
  models = _check_choices("models", _list(args.models), MODELS)
  layers = _check_choices("explain_layers", _list(args.explain_layers), common.CAM_LAYERS)
  if args.steps < 1 or args.warmup < 1:
    raise ConfigError(f"--steps={args.steps} and --warmup={args.warmup}: allowed: both >= 1")
  batches = common.per_model(_list(args.batch), models, DEFAULT_BATCH, "batch")
  sizes = common.per_model(_list(args.size), models, DEFAULT_SIZE, "size")
  if "explain" in workloads and min(batches) < 2:
    raise ConfigError(f"--batch={args.batch}: allowed: >= 2 for the explanation step (half triggered, "
                      "half clean)")
  soak_model = args.soak_model or models[0]
  if soak_steps < 0:
    raise ConfigError(f"--soak_steps={soak_steps}: allowed: >= 0")
  if soak_steps and soak_model not in MODELS:
    raise ConfigError(f"--soak_model={soak_model}: allowed: {', '.join(MODELS)}")
  if soak_steps and not 1 <= args.soak_every <= soak_steps:
    raise ConfigError(f"--soak_every={args.soak_every}: allowed: between 1 and --soak_steps ({soak_steps})")
  if args.soak_batch == 1 or args.soak_batch < 0:
    raise ConfigError(f"--soak_batch={args.soak_batch}: allowed: 0 (the model's --batch) or >= 2")
  if args.soak_size < 0:
    raise ConfigError(f"--soak_size={args.soak_size}: allowed: 0 (the model's --size) or >= 1")
  if args.row_timeout < 0 or args.time_budget < 0:
    raise ConfigError(f"--row_timeout={args.row_timeout}, --time_budget={args.time_budget}: allowed: >= 0")
  i = models.index(soak_model) if soak_model in models else None
  soak_batch = args.soak_batch or (batches[i] if i is not None else
                                   common.per_model([], [soak_model], DEFAULT_BATCH, "batch")[0])
  soak_size = args.soak_size or (sizes[i] if i is not None else
                                 common.per_model([], [soak_model], DEFAULT_SIZE, "size")[0])
  if soak_steps and soak_batch < 2:
    raise ConfigError(f"soak batch {soak_batch} (--batch of {soak_model}): allowed: >= 2 for the "
                      "explanation step")
  return Plan(workloads, impls, models, batches, sizes, layers, args.steps, args.warmup, args.seed,
              args.row_timeout, soak_steps, args.soak_every, soak_model, soak_batch, soak_size,
              args.soak_torch, args.check, args.time_budget)


class Clock:
  """The time left of a run's ``--time_budget`` (0: unlimited) and each worker's timeout."""

  def __init__(self, budget: float, row_timeout: float):
    self.end = time.monotonic() + budget if budget else None
    self.budget, self.row_timeout = budget, row_timeout

  def timeout(self) -> float | None:
    """Seconds the next worker may take (0: no limit), or None when the budget is spent."""
    if self.end is None:
      return self.row_timeout
    left = self.end - time.monotonic()
    if left < 1:
      return None
    return min(left, self.row_timeout) if self.row_timeout else left


def _measure(script: str, job: Any, what: str, clock: Clock) -> dict[str, Any]:
  """Runs one worker, with a progress line on stderr."""
  timeout = clock.timeout()
  if timeout is None:
    return {"error": f"not measured: the time budget of {clock.budget:g} s was spent"}
  t0 = time.perf_counter()
  print(f"measuring {what} ...", file=sys.stderr, flush=True)
  raw = common.run_worker(script, job, timeout)
  print(f"  {time.perf_counter() - t0:.0f} s{': ' + raw['error'] if 'error' in raw else ''}",
        file=sys.stderr, flush=True)
  return raw


def _row_specs(plan: Plan) -> list[tuple[str, str, int, str]]:
  """(workload, layer, model index, impl) of every row, in table order."""
  return [(workload, layer, m, impl) for m in range(len(plan.models)) for workload in plan.workloads
          for layer in (plan.layers if workload == "explain" else [""]) for impl in IMPLS]


def measure_rows(plan: Plan, workdir: str, have_torch: bool, clock: Clock | None = None) -> list[Row]:
  """Every row of the table, one worker each (rows not selected or not runnable: an error).

  Measured in priority order (``torch.compile`` rows last, then by the order of
  ``plan.workloads``, then model; JAX before PyTorch, whose Grad-CAM and explanation
  workers load a JAX worker's weights) and returned in table order.
  """
  clock = clock or Clock(plan.time_budget, plan.row_timeout)
  specs = _row_specs(plan)
  impl_order = list(IMPLS)
  order = sorted(range(len(specs)), key=lambda k: (specs[k][3] == "torch_compile", plan.workloads.index(specs[k][0]),
                                                   specs[k][2], specs[k][1], impl_order.index(specs[k][3])))
  jax_ok: set[tuple[str, str, int]] = set()
  rows: dict[int, Row] = {}
  for k in order:
    workload, layer, m, impl = specs[k]
    model, batch, size = plan.models[m], plan.batches[m], plan.sizes[m]
    if impl not in plan.impls:
      raw = {"error": "not measured: not in --impls"}
    elif impl.startswith("torch") and not have_torch:
      raw = {"error": "torch not installed"}
    elif impl.startswith("torch") and workload != "train" and (workload, layer, m) not in jax_ok:
      raw = {"error": "needs the weights a JAX row of this workload writes; no JAX row ran"}
    else:
      script, job = make_job(workload, layer, model, size, batch, impl, plan.steps, plan.warmup, plan.seed,
                             workdir, check=plan.check)
      raw = _measure(script, job, f"{workload} {layer} {model} {impl}".replace("  ", " "), clock)
      if impl.startswith("jax") and "error" not in raw:
        jax_ok.add((workload, layer, m))
    rows[k] = Row(workload, layer, model, size, batch, impl, normalize(workload, raw))
  return [rows[k] for k in range(len(specs))]


def measure_soak(plan: Plan, workdir: str, have_torch: bool, clock: Clock | None = None
                 ) -> list[tuple[str, dict[str, Any]]]:
  """The soak runs: (impl, raw worker result) for JAX float32 and, optionally, PyTorch eager."""
  clock = clock or Clock(plan.time_budget, plan.row_timeout)
  soak: list[tuple[str, dict[str, Any]]] = []
  for impl in ["jax_f32"] + (["torch"] if plan.soak_torch else []):
    if impl == "torch" and not have_torch:
      soak.append((impl, {"error": "torch not installed"}))
    elif impl == "torch" and "error" in soak[0][1]:
      soak.append((impl, {"error": "needs the JAX soak's weights"}))
    else:
      script, job = make_job("explain", plan.layers[0], plan.soak_model, plan.soak_size, plan.soak_batch,
                             impl, plan.soak_steps, plan.warmup, plan.seed, workdir,
                             sample_every=plan.soak_every)
      soak.append((impl, _measure(script, job, f"soak {impl} {plan.soak_model}, {2 * job.steps} steps", clock)))
  return soak


def check_lines(plan: Plan, rows: Sequence[Row]) -> list[str]:
  """The known-answer check lines of a ``--check`` run (Grad-CAM maps, explanation step)."""
  out = []
  by = {(r.workload, r.layer, r.model, r.impl): r.result for r in rows}
  for workload, layer, m, impl in _row_specs(plan):
    if impl != "torch":
      continue
    model, torch_res = plan.models[m], by[(workload, layer, plan.models[m], "torch")]
    if workload.startswith("gradcam"):
      out.append(gradcam_throughput.check_line(model, min(CHECK_BATCH, plan.batches[m]), torch_res)
                 + f" ({WORKLOADS[workload]} rows)")
    elif workload == "explain":
      out.append(explanation_step.check_line(model, layer, by[(workload, layer, model, "jax_f32")], torch_res))
  return out


def write_rows_csv(path: str, rows: Sequence[Row], peak_override: tuple[float, float] | None = None) -> None:
  """Writes the table as CSV: one line per row, numbers unformatted, ``error`` for n/a rows."""
  keys = ("ms", "ips", "speedup", "peak", "mem_ratio", "gflop", "tflops", "device_peak", "pct")
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["workload", "layer", "model", "size", "batch", "implementation", *keys, "error"])
    for row, m in zip(rows, row_metrics(rows, peak_override)):
      values = ["" if m.get(k) is None else m[k] for k in keys]
      writer.writerow([row.workload, row.layer, row.model, row.size, row.batch, row.impl, *values,
                       m.get("error", "")])


def report_lines(plan: Plan, rows: Sequence[Row], soak: Sequence[tuple[str, dict[str, Any]]],
                 peak_override: tuple[float, float] | None, load_start: str, elapsed: float,
                 soak_csv: str = "") -> list[str]:
  """The printed report: header, table, explanation-step target, soak block."""
  devices: dict[str, str] = {}
  kinds: dict[str, str] = {}
  for impl, res in [(r.impl, r.result) for r in rows] + [(i, normalize("explain", r)) for i, r in soak]:
    framework = "jax" if impl.startswith("jax") else "torch"
    if "device" in res:
      devices.setdefault(framework, res["device"])
      kinds.setdefault(framework, res["memory_kind"])
  warmup = f"{plan.warmup} untimed warm-up step{'s' if plan.warmup != 1 else ''}"
  if plan.workloads:
    explain = (f" (explanation step: Grad-CAM {', '.join(plan.layers)}, lambda {EXPLAIN_LAM:g}, mu "
               f"{EXPLAIN_MU:g}, Adam lr {EXPLAIN_LR:g}, {2 * math.ceil(plan.steps / 2)} timed steps)"
               if "explain" in plan.workloads else "")
    settings = (", ".join(f"{m} {s}x{s} batch {b}" for m, s, b in zip(plan.models, plan.sizes, plan.batches))
                + f"; workloads {', '.join(plan.workloads)}{explain}; {warmup}, {plan.steps} timed steps "
                "per row, median")
  else:
    settings = f"no table, the soak only; {warmup}"
  lines = common.header_lines("Benchmark suite: train step, Grad-CAM, explanation step", devices, settings,
                              load_start, elapsed)
  lines += [
      "- data: synthetic (random uint8 images and labels drawn in each worker from the seed; "
      "no files, no network); random weights",
      f"- peak memory: JAX: {kinds.get('jax', 'n/a')}; PyTorch: {kinds.get('torch', 'n/a')} "
      "(each row in its own process)",
      "- FLOPs: XLA cost analysis of the compiled JAX float32 program of each workload and model, "
      "used for every implementation of it",
      f"- % of device peak: {peak_description(devices, peak_override)}",
      f"- environment of the workers: {environment_line()}",
  ]
  if devices.get("jax") and devices.get("torch") and (("cpu" in devices["jax"]) != ("cpu" in devices["torch"])):
    lines.append(f"- WARNING: JAX ran on {devices['jax']} but PyTorch on {devices['torch']}: the ratios "
                 "compare different devices")
  lines.append("")
  if rows:
    lines += [*format_table(rows, peak_override), ""]
  targets = target_lines(rows, peak_override)
  if targets:
    lines += ["Explanation-step target (on one H100):", "", *targets, ""]
  if soak:
    named = [(IMPLS[i] + (" create_graph" if i == "torch" else ""), r) for i, r in soak]
    title = (f"Memory over {2 * math.ceil(plan.soak_steps / 2)} steps: explanation step, {plan.soak_model} "
             f"({plan.soak_size}x{plan.soak_size}, batch {plan.soak_batch}), Grad-CAM {plan.layers[0]}, "
             f"float32, sampled every {plan.soak_every} steps after {warmup}")
    lines += soak_lines(title, named)
    lines += ["", f"flat: last - first <= max({FLAT_TOLERANCE[0] // 2**20} MiB, "
              f"{FLAT_TOLERANCE[1]:.0%} of first); second half: last sample - the middle sample (a leak "
              "grows both halves alike; an allocator settling after the warm-up, the first one).", ""]
    if soak_csv:
      write_soak_csv(soak_csv, named)
      lines += [f"Samples written to `{soak_csv}`.", ""]
  if rows:
    lines.append(
        "ms / step: median over the timed steps, each blocked on; images/s = batch / median; x PyTorch "
        "eager = images/s over PyTorch eager's for the same workload and model in this run (above 1: "
        "faster); memory x PyTorch eager = peak memory over its (below 1: less); TFLOP/s = the JAX "
        "float32 program's FLOPs per step / median step time.")
  return lines


def run(args: argparse.Namespace) -> int:
  """``python -m benchmarks suite``: measures, then prints the report (and writes the CSVs)."""
  plan = plan_from_args(args)
  peak_override = parse_peak_override(_list(args.peak_tflops))
  if not args.all_devices and "CUDA_VISIBLE_DEVICES" not in os.environ:
    os.environ["CUDA_VISIBLE_DEVICES"] = "0"  # inherited by the workers: one GPU per row
  have_torch = importlib.util.find_spec("torch") is not None
  load_start = common.load_average()
  start = time.perf_counter()
  clock = Clock(plan.time_budget, plan.row_timeout)
  workdir = tempfile.mkdtemp(prefix="suite_bench_")
  try:
    rows = measure_rows(plan, workdir, have_torch, clock)
    soak = measure_soak(plan, workdir, have_torch, clock) if plan.soak_steps else []
  finally:
    shutil.rmtree(workdir, ignore_errors=True)
  lines = report_lines(plan, rows, soak, peak_override, load_start, time.perf_counter() - start, args.soak_csv)
  if plan.check:
    lines[1:1] = ["", *check_lines(plan, rows)]
  if args.csv:
    write_rows_csv(args.csv, rows, peak_override)
  print("\n".join(lines).rstrip())
  return 0


ENV_VARS = ("CUDA_VISIBLE_DEVICES", "XLA_PYTHON_CLIENT_PREALLOCATE", "XLA_PYTHON_CLIENT_MEM_FRACTION",
            "XLA_FLAGS", "JAX_DEFAULT_MATMUL_PRECISION", "NVIDIA_TF32_OVERRIDE", "OMP_NUM_THREADS",
            "OMP_WAIT_POLICY", "MKL_NUM_THREADS")


def environment_line(env: dict[str, str] | None = None) -> str:
  """The variables of ``ENV_VARS`` that are set (they change what the workers measure)."""
  env = os.environ if env is None else env
  present = [f"{k}={env[k]}" for k in ENV_VARS if k in env]
  return ", ".join(present) if present else "none of " + ", ".join(ENV_VARS) + " set"


def peak_description(devices: dict[str, str], peak_override: tuple[float, float] | None) -> str:
  """What the % column compares with, in words."""
  if peak_override is not None:
    return (f"--peak_tflops: {peak_override[0]:g} TFLOP/s for float32 rows, {peak_override[1]:g} "
            "for bfloat16 rows")
  parts = []
  for framework, device in sorted(devices.items()):
    f32 = f32_math(framework)
    f32_peak, bf16_peak = peak_tflops(device, f32), peak_tflops(device, "bf16")
    if f32_peak is None:
      parts.append(f"{framework}: n/a ({device}: not in the peak table; --peak_tflops sets a peak)")
      continue
    text = f"{framework}: float32 rows vs the dense {MATH_NAMES[f32]} peak {f32_peak:g} TFLOP/s"
    if framework == "jax":
      text += f", bfloat16 rows vs the dense BF16 tensor-core peak {bf16_peak:g}"
    parts.append(text)
  return "; ".join(parts) or "n/a"

