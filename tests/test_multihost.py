"""Multi-process training on one machine: 2 processes x 2 simulated CPU devices (gloo).

The run must end with the same parameters as one process with 4 devices on the same
global batches, each process must hold only its shard of the training set, and only
process 0 may log and print results.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from backdoor_jax.errors import ConfigError
from backdoor_jax.train import restore
from tests.helpers import REPO

ARGS = ["--config=configs/badnets.py", "--config.data.max_train=256", "--config.data.max_test=64",
        "--config.train.epochs=2", "--config.train.batch_size=32", "--config.train.eval_batch_size=32",
        "--config.train.optimizer=sgd", "--config.train.lr=0.1", "--config.data.num_shards=2",
        "--config.figures=False", "--config.model.widths=8,8,8,8"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _cmd(workdir, *extra):
  return [sys.executable, os.path.join(REPO, "launch", "train.py"), *ARGS, f"--workdir={workdir}", *extra]


def _run_two(workdir, port, env):
  procs = [subprocess.Popen(_cmd(workdir, f"--coordinator_address=localhost:{port}", "--num_processes=2",
                                 f"--process_id={i}", "--cpu_devices=2"), cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in (0, 1)]
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  return outs


def test_two_processes_match_one_process(tmp_path):
  multi, single = tmp_path / "multi", tmp_path / "single"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  outs = _run_two(multi, _free_port(), env)
  ref = subprocess.run(_cmd(single, "--cpu_devices=4"), cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=300)
  assert ref.returncode == 0, ref.stderr[-3000:]

  # Only process 0 prints the summary and logs the epochs.
  assert "clean_accuracy=" in outs[0][0] and "clean_accuracy=" not in outs[1][0]
  assert "epoch 1/2" in outs[0][1] and "loop.py" not in outs[1][1]
  assert "process 0 of 2: 2 local and 4 global devices" in outs[0][1]

  a, b = restore.load_run(str(multi)), restore.load_run(str(single))  # any topology restores on one device
  diffs = jax.tree_util.tree_leaves(jax.tree_util.tree_map(
      lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))), a.variables, b.variables))
  assert max(diffs) < 5e-5, max(diffs)
  moved = jax.tree_util.tree_leaves(jax.tree_util.tree_map(
      lambda x: float(np.abs(np.asarray(x)).max()), a.variables))
  assert max(moved) > 0
  ra, rb = (json.loads((d / "results.json").read_text()) for d in (multi, single))
  for key in ("clean_accuracy", "attack_success_rate", "num_poisoned", "num_train", "devices"):
    assert ra[key] == rb[key], key
  assert len((multi / "metrics.jsonl").read_text().splitlines()) == 2
  assert sorted(os.listdir(multi / "checkpoints")) == ["1", "2"]

  # A rerun resumes: both processes restore the collective checkpoint and train nothing more.
  outs = _run_two(multi, _free_port(), env)
  assert "resumed from" in outs[0][1] and "epoch 1/2" not in outs[0][1]
  again = json.loads((multi / "results.json").read_text())
  assert again["clean_accuracy"] == ra["clean_accuracy"] and again["train_seconds"] == ra["train_seconds"]


def test_bad_cluster_flags_are_one_line_errors():
  from backdoor_jax import distributed
  with pytest.raises(ConfigError, match="coordinator_address='nohost'"):
    distributed.initialize(coordinator_address="nohost", num_processes=2, process_id=0)
  with pytest.raises(ConfigError, match=r"--process_id=2 is invalid; allowed: 0 \.\. 1"):
    distributed.initialize(coordinator_address="localhost:1234", num_processes=2, process_id=2)
  with pytest.raises(ConfigError, match="--num_processes=0"):
    distributed.initialize(coordinator_address="localhost:1234", num_processes=0, process_id=0)
  with pytest.raises(ConfigError, match="one or the other"):
    distributed.initialize(auto=True, coordinator_address="localhost:1234", num_processes=2, process_id=0)
  with pytest.raises(ConfigError, match="--cpu_devices=-1"):
    distributed.initialize(cpu_devices=-1)


def test_unreachable_coordinator_is_one_line_error(tmp_path):
  port = _free_port()  # nobody listens there
  r = subprocess.run(_cmd(tmp_path / "w", f"--coordinator_address=localhost:{port}", "--num_processes=2",
                          "--process_id=1", "--coordinator_timeout=2"), cwd=REPO, capture_output=True,
                     text=True, timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert r.returncode == 2, r.stderr[-2000:]
  assert f"error: cannot reach the coordinator localhost:{port} within 2 s" in r.stderr
  assert not (tmp_path / "w").exists()  # failed before anything was written
