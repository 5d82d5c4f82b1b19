"""benchmarks/suite.py: peak table, FLOPs from XLA, table and soak formatting, one tiny run."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from absl import flags

from backdoor_jax.errors import ConfigError
from benchmarks import common, suite

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIB = 2**20


def test_workload_modules_define_no_flags():
  # The suite and the three workload modules it imports define no absl flags at all.
  for name in ("soak_steps", "impls", "workloads", "bf16_steps", "check_batch", "lam"):
    assert name not in flags.FLAGS
  assert suite.train_throughput.Job and suite.gradcam_throughput.run_jax and suite.explanation_step.run_torch


@pytest.mark.parametrize("device,math,expected", [
    ("1 x gpu (NVIDIA H100 80GB HBM3)", "tf32", 494.7),
    ("cuda (NVIDIA H100 80GB HBM3)", "bf16", 989.4),
    ("cuda (NVIDIA H100 80GB HBM3)", "fp32", 66.9),
    ("1 x gpu (NVIDIA H100 PCIe)", "bf16", 756.5),
    ("1 x gpu (NVIDIA H100 NVL)", "tf32", 417.5),
    ("1 x gpu (NVIDIA H200)", "bf16", 989.4),
    ("1 x gpu (NVIDIA GH200 480GB)", "tf32", 494.7),
    ("cuda (NVIDIA A100-SXM4-80GB)", "tf32", 156.0),
    ("cuda (NVIDIA A100 80GB PCIe)", "bf16", 312.0),
    ("cuda (NVIDIA L4)", "bf16", 121.0),
    ("cuda (NVIDIA L40S)", "bf16", 362.05),  # not L4's
    ("cuda (NVIDIA A10)", "tf32", 62.5),
])
def test_peak_tflops_known_devices(device, math, expected):
  assert suite.peak_tflops(device, math) == pytest.approx(expected)


@pytest.mark.parametrize("device,math", [
    ("1 x cpu (cpu)", "tf32"), ("cpu (2 threads)", "fp32"), ("cuda (NVIDIA A10G)", "bf16"),
    ("cuda (Tesla V100-SXM2-16GB)", "fp32"), ("cuda (NVIDIA H100 80GB HBM3)", "fp8"), ("", "bf16")])
def test_peak_tflops_unknown_is_none(device, math):
  assert suite.peak_tflops(device, math) is None


def test_f32_math_follows_the_environment():
  assert suite.f32_math("jax", {}) == "tf32"
  assert suite.f32_math("torch", {}) == "tf32"
  assert suite.f32_math("jax", {"JAX_DEFAULT_MATMUL_PRECISION": "highest"}) == "fp32"
  assert suite.f32_math("torch", {"JAX_DEFAULT_MATMUL_PRECISION": "highest"}) == "tf32"
  assert suite.f32_math("torch", {"NVIDIA_TF32_OVERRIDE": "0"}) == "fp32"


def test_cost_flops_shapes():
  assert common.cost_flops({"flops": 12.0, "bytes accessed": 3.0}) == 12.0
  assert common.cost_flops([{"bytes accessed": 1.0}, {"flops": 7.0}]) == 7.0  # older JAX: a list
  assert common.cost_flops(({"flops": 5.0},)) == 5.0
  for missing in (None, {}, {"bytes accessed": 1.0}, [], [{}], {"flops": -1.0}, {"flops": 0.0},
                  {"flops": "n/a"}, {"flops": float("nan")}):
    assert common.cost_flops(missing) is None


def test_xla_flops_of_a_matmul():
  m, k, n = 64, 48, 80
  f = jax.jit(lambda a, b: a @ b)
  flops = common.xla_flops(f, jnp.ones((m, k)), jnp.ones((k, n)))
  assert flops == pytest.approx(2 * m * n * k, rel=0.05)
  assert common.xla_flops(lambda a: a, jnp.ones(3)) is None  # not jitted: no estimate, no exception


def _row(impl, step_s=None, peak=None, flops=None, device="cuda (NVIDIA H100 80GB HBM3)",
         workload="explain", error=None):
  result = ({"error": error} if error else
            {"step_s": step_s, "peak": peak, "memory_kind": "device peak_bytes_in_use", "device": device,
             "flops": flops})
  return suite.Row(workload, "layer4" if workload == "explain" else "", "resnet18", 32, 128, impl, result)


def test_format_table_ratios_flops_and_error_row():
  rows = [_row("jax_f32", [0.1, 0.1, 0.3], 50 * MIB, 2e12, device="1 x gpu (NVIDIA H100 80GB HBM3)"),
          _row("jax_bf16", error="boom"),
          _row("torch", [0.2, 0.2], 100 * MIB),
          _row("torch_compile", [0.4], 80 * MIB)]
  lines = suite.format_table(rows)
  assert len(lines) == 2 + len(rows)
  cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
  jax_row, err_row, eager_row, compiled_row = cells
  # median 0.1 s: 1280 images/s, 2x eager, half its memory, 2e12 FLOP / 0.1 s = 20 TFLOP/s
  assert jax_row[3:10] == ["100.0", "1280.0", "2.00", "50 MiB (device peak)", "0.50", "2000.00", "20"]
  assert jax_row[10] == "4.0% of 494.7"  # TF32 dense peak of an H100 SXM
  assert err_row[3] == "n/a (boom)" and set(err_row[4:]) == {"-"}
  assert eager_row[5] == "1.00" and eager_row[9] == "10"  # the JAX float32 FLOP count, 0.2 s
  assert compiled_row[5] == "0.50" and compiled_row[7] == "0.80"
  override = suite.format_table(rows, peak_override=(100.0, 200.0))
  assert override[2].split("|")[-2].strip() == "20.0% of 100"


def test_format_table_without_eager_or_flops_says_na():
  rows = [_row("jax_f32", [0.5], 10 * MIB, None, device="1 x cpu (cpu)"), _row("torch", error="torch not installed")]
  cells = [c.strip() for c in suite.format_table(rows)[2].strip("|").split("|")]
  assert cells[5] == "n/a" and cells[7] == "n/a" and cells[8:] == ["n/a", "n/a", "n/a"]


def test_flops_come_from_jax_float32_else_bfloat16():
  rows = [_row("jax_bf16", [0.1], 1, 3e9), _row("jax_f32", [0.1], 1, 2e9), _row("torch", [0.1], 1, None)]
  assert suite.workload_flops(rows) == {("explain", "layer4", "resnet18"): 2e9}
  assert suite.workload_flops(rows[:1]) == {("explain", "layer4", "resnet18"): 3e9}


def test_target_lines():
  fast = [_row("jax_f32", [0.1], 50 * MIB, 1e9), _row("torch", [0.25], 100 * MIB)]
  assert suite.target_lines(fast)[0].endswith(": met")
  slow = [_row("jax_f32", [0.1], 70 * MIB, 1e9), _row("torch", [0.25], 100 * MIB)]
  assert "NOT met" in suite.target_lines(slow)[0]
  cpu = [_row("jax_f32", [0.1], 50 * MIB, 1e9, device="1 x cpu (cpu)"), _row("torch", [0.25], 100 * MIB)]
  assert "not assessed" in suite.target_lines(cpu)[0]


def test_normalize_the_three_worker_formats():
  train = {"step_s": [1.0, 2.0], "memory": {"bytes": 5, "kind": "process max RSS"}, "device": "d", "flops": 3.0}
  assert suite.normalize("train", train) == {"step_s": [1.0, 2.0], "peak": 5, "memory_kind": "process max RSS",
                                             "device": "d", "flops": 3.0}
  cam = {"rows": {"all": {"step_s": [0.5], "flops": 9.0}}, "memory": {"current": 1, "peak": 7, "kind": "k"},
         "device": "d"}
  assert suite.normalize("gradcam_all", cam)["peak"] == 7 and suite.normalize("gradcam_all", cam)["flops"] == 9.0
  assert suite.normalize("explain", {"error": "x"}) == {"error": "x"}


def test_soak_summary():
  samples = [[100, 100 * MIB], [200, 140 * MIB], [300, 130 * MIB], [400, 110 * MIB], [500, 112 * MIB]]
  s = suite.soak_summary(samples)
  assert (s["first"], s["mid"], s["last"], s["max"]) == (100 * MIB, 130 * MIB, 112 * MIB, 140 * MIB)
  assert s["growth"] == 12 * MIB and s["second_half_growth"] == -18 * MIB
  assert s["flat"] == 1.0 and (s["first_step"], s["last_step"]) == (100, 500)
  leak = suite.soak_summary([[i, (1000 + 10 * i) * MIB] for i in range(1, 11)])
  assert leak["flat"] == 0.0 and leak["growth"] == 90 * MIB
  assert suite.soak_summary([[10, 5.0]])["growth"] == 0.0
  assert suite.soak_summary([[10, 900 * MIB], [20, 800 * MIB]])["flat"] == 1.0  # shrinking is not growth
  lines = suite.soak_lines("t", [("JAX", {"step_s": [0.1, 0.3], "memory": {"samples": samples, "kind": "RSS"}}),
                                 ("torch", {"error": "nope"})])
  assert "+12.0 MiB" in lines[4] and "| yes |" in lines[4] and "n/a (nope)" in lines[5]


def _plan(**overrides):
  fields = dict(workloads=["explain"], impls=list(suite.IMPLS), models=["resnet18"], batches=[8], sizes=[32],
                layers=["layer4"], steps=3, warmup=1, seed=0, row_timeout=0, soak_steps=0, soak_every=10,
                soak_model="resnet18", soak_batch=8, soak_size=32, soak_torch=False)
  fields.update(overrides)
  return suite.Plan(**fields)


def test_report_with_table_targets_and_soak(tmp_path):
  rows = [_row("jax_f32", [0.1], 50 * MIB, 1e9), _row("jax_bf16", error="x"), _row("torch", [0.25], 100 * MIB),
          _row("torch_compile", error="not measured: not in --impls")]
  soak = [("jax_f32", {"step_s": [0.1] * 20, "device": "cuda (NVIDIA H100 80GB HBM3)",
                       "memory": {"samples": [[10, 5 * MIB], [20, 5 * MIB]], "kind": "device bytes_in_use"}})]
  csv_path = str(tmp_path / "soak.csv")
  text = "\n".join(suite.report_lines(_plan(soak_steps=20), rows, soak, None, "0.00", 1.0, csv_path))
  assert "| explanation step (Grad-CAM layer4) | resnet18 (32x32, batch 128) | JAX jit, float32 | 100.0 |" in text
  assert "2.50x PyTorch create_graph's images/s at 0.50x its peak memory" in text and ": met" in text
  assert "#### Memory over 20 steps" in text and "| +0.0 MiB | +0.0 MiB | yes |" in text
  assert "jax: float32 rows vs the dense TF32 tensor-core peak 494.7 TFLOP/s" in text
  assert open(csv_path).read().splitlines() == [
      "implementation,step,bytes,measure", f'"JAX jit, float32",10,{5 * MIB},device bytes_in_use',
      f'"JAX jit, float32",20,{5 * MIB},device bytes_in_use']
  soak_only = "\n".join(suite.report_lines(_plan(workloads=[], soak_steps=20), [], soak, None, "0.00", 1.0))
  assert "no table, the soak only" in soak_only and "| workload |" not in soak_only


def test_make_job_per_workload(tmp_path):
  script, job = suite.make_job("explain", "layer3", "resnet50", 64, 4, "jax_bf16", 5, 1, 0, str(tmp_path))
  assert script.endswith("explanation_step.py")
  assert (job.steps, job.dtype, job.layer, job.check, job.compile) == (3, "bfloat16", "layer3", False, False)
  script, job = suite.make_job("gradcam_all", "", "resnet18", 32, 8, "torch_compile", 4, 1, 0, str(tmp_path))
  assert script.endswith("gradcam_throughput.py") and job.methods == ("all",) and job.compile
  script, job = suite.make_job("train", "", "resnet50", 224, 64, "torch", 7, 2, 0, str(tmp_path))
  assert script.endswith("train_throughput.py")
  assert (job.repeats, job.steps, job.stem, job.num_classes, job.size) == (7, 1, "imagenet", 1000, 224)


def test_parse_peak_override():
  assert suite.parse_peak_override([]) is None
  assert suite.parse_peak_override(["10"]) == (10.0, 10.0)
  assert suite.parse_peak_override(["10", "20"]) == (10.0, 20.0)
  for bad in (["a"], ["1", "2", "3"], ["-1"]):
    with pytest.raises(ConfigError):
      suite.parse_peak_override(bad)


def _run(*args, timeout=120):
  return subprocess.run([sys.executable, "-m", "benchmarks", "suite", *args], capture_output=True, text=True,
                        timeout=timeout, cwd=REPO)


def test_bad_flag_is_a_one_line_usage_error():
  proc = _run("--impls=jax_f32,tpu")
  assert proc.returncode != 0
  assert "--impls=jax_f32,tpu: bad value 'tpu'; allowed: jax_f32, jax_bf16, torch, torch_compile" in proc.stderr


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="needs torch")
def test_tiny_suite_end_to_end():
  # One workload, two implementations, the smallest ResNet-18: two workers, ~25 s on 2 cores.
  proc = _run("--models=resnet18", "--batch=2", "--size=8", "--steps=1", "--warmup=1",
              "--workloads=gradcam_layer4", "--impls=jax_f32,torch", timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  rows = [line for line in proc.stdout.splitlines() if line.startswith("| Grad-CAM layer4 |")]
  assert len(rows) == 4
  cells = {r.split("|")[3].strip(): [c.strip() for c in r.strip("|").split("|")] for r in rows}
  jax_row, eager_row = cells["JAX jit, float32"], cells["PyTorch eager"]
  assert float(jax_row[4]) > 0 and float(jax_row[8]) > 0 and float(jax_row[9]) > 0  # images/s, GFLOP, TFLOP/s
  assert eager_row[5] == "1.00" and eager_row[8] == jax_row[8]  # same FLOP count for both
  assert jax_row[10] == "n/a"  # a CPU has no peak in the table
  assert cells["JAX jit, bfloat16"][3] == "n/a (not measured: not in --impls)"
  assert "- data: synthetic" in proc.stdout and "peak memory: JAX: process RSS" in proc.stdout
