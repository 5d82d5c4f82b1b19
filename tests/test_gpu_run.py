"""benchmarks/gpu/run.py: the summary rows of each part (known inputs) and one dry-run part end to end."""
from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest

from benchmarks.gpu import run as gpu_run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _suite_record(workload, impl, ms, ips=None, speedup="", error=""):
  return {"workload": workload, "layer": "layer4" if workload == "explain" else "", "model": "resnet18",
          "size": "32", "batch": "128", "implementation": impl, "ms": str(ms), "ips": str(ips or (128e3 / ms if ms else "")),
          "speedup": str(speedup), "peak": str(64 * 2**20), "mem_ratio": "0.5", "gflop": "1", "tflops": "1",
          "device_peak": "", "pct": "", "error": error}


def test_suite_rows_explain_over_train_per_framework():
  records = [_suite_record("explain", "jax_f32", 30.0, speedup="2.0"), _suite_record("explain", "torch", 60.0),
             _suite_record("train", "jax_f32", 20.0), _suite_record("train", "torch", 15.0),
             _suite_record("train", "torch_compile", 0, error="not measured: not in --impls"),
             _suite_record("explain", "jax_bf16", 0, error="timed out after 9 s")]
  rows = gpu_run.suite_rows(records)
  cost = {r["measurement"]: r for r in rows if "/ train step" in r["measurement"]}
  assert cost["explanation step (layer4) / train step, resnet18, JAX jit, float32"]["ratio"] == pytest.approx(1.5)
  assert cost["explanation step (layer4) / train step, resnet18, PyTorch eager"]["ratio"] == pytest.approx(4.0)
  speed = next(r for r in rows if r["measurement"].endswith("JAX jit, float32: images/s")
               and r["measurement"].startswith("explanation"))
  assert speed["value"] == pytest.approx(128e3 / 30) and speed["baseline"] == pytest.approx(128e3 / 60)
  assert any(r["value"] == "n/a (timed out after 9 s)" for r in rows)
  assert not any("not in --impls" in str(r["value"]) for r in rows)  # unselected rows stay out


def test_time_to_target_sums_training_seconds_to_the_first_epoch_at_target():
  history = [{"epoch": 1, "epoch_seconds": 10.0, "clean_accuracy": 0.98, "attack_success_rate": 0.5},
             {"epoch": 2, "epoch_seconds": 4.0, "clean_accuracy": 0.96, "attack_success_rate": 1.0},
             {"epoch": 3, "epoch_seconds": 4.5, "clean_accuracy": 0.97, "attack_success_rate": 0.99},
             {"epoch": 4, "epoch_seconds": 4.0, "clean_accuracy": 0.99, "attack_success_rate": 1.0}]
  assert gpu_run.time_to_target(history) == (18.5, 3)
  assert gpu_run.time_to_target(history[:2]) == (None, None)


def test_soak_ensemble_and_neural_cleanse_rows():
  mib = 2**20
  soak = [{"implementation": "JAX", "step": str(s), "bytes": str(b * mib), "measure": "m"}
          for s, b in ((200, 110), (100, 100), (300, 105))]
  rows = {r["measurement"].split(": ")[1]: r for r in gpu_run.soak_rows(soak)}
  assert rows["memory in use, first sample"]["value"] == 100
  last = rows["memory in use, last sample (3 samples to step 300)"]
  assert last["value"] == 105 and last["ratio"] == pytest.approx(1.05)
  assert rows["memory in use, max sample"]["value"] == 110
  ens = gpu_run.ensemble_rows([
      {"model": "m", "strategy": "one at a time", "k": "1", "seconds": "1", "models_per_hour": "2", "ratio": "1"},
      {"model": "m", "strategy": "vmap", "k": "8", "seconds": "2", "models_per_hour": "8", "ratio": "4"},
      {"model": "m", "strategy": "vmap", "k": "32", "seconds": "", "models_per_hour": "", "ratio": ""}])
  assert ens[0]["baseline"] == pytest.approx(2.0) and ens[0]["ratio"] == 4.0 and "skipped" in ens[1]["value"]
  nc = gpu_run.nc_rows([{"path": "vmap over classes", "seconds": "2"}, {"path": "class by class", "seconds": "10"}])
  assert nc[0]["ratio"] == pytest.approx(5.0) and nc[1]["ratio"] == pytest.approx(1.0)


def test_bad_part_is_a_one_line_error(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "benchmarks", "gpu", f"--out={tmp_path}", "--parts=suite,tpu"],
                        capture_output=True, text=True, cwd=REPO, timeout=120)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1].startswith("error: --parts=suite,tpu: allowed: suite, soak,")


def test_dry_run_fast_badnets_without_tfds_and_grain(tmp_path):
  # The training launcher under the dry run's import blocker (tensorflow_datasets and grain
  # unimportable, as on the lent GPU image), on the tiny synthetic GTSRB the dry run writes.
  proc = subprocess.run([sys.executable, "-m", "benchmarks", "gpu", "--dry_run", f"--out={tmp_path}",
                         "--parts=fast_badnets"], capture_output=True, text=True, cwd=REPO, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  log = (tmp_path / "log.txt").read_text()
  assert "- fast_badnets: ok" in (tmp_path / "results.md").read_text(), log[-3000:]
  with open(tmp_path / "results.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  assert [r["part"] for r in rows] == ["fast_badnets"] * 4
  assert rows[0]["value"] == "not reached in 2 epochs"  # random labels: never 0.97 accurate
  assert 0.0 <= float(rows[1]["value"]) <= 1.0 and 0.0 <= float(rows[2]["value"]) <= 1.0
  sitecustomize = tmp_path / "work" / "no_tfds" / "sitecustomize.py"
  blocked = subprocess.run([sys.executable, "-c", "import grain"], capture_output=True, text=True,
                           env=dict(os.environ, PYTHONPATH=str(sitecustomize.parent)), timeout=60)
  assert blocked.returncode != 0 and "not installed on the lent GPU image" in blocked.stderr
