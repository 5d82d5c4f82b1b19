"""Multi-process training on one machine: 2 processes x 2 simulated CPU devices (gloo).

The run must compute the same thing as one process with 4 devices on the same global
batches, each process must hold only its shard of the training set, and only process 0
may log and print results.

"The same thing" is checked so that it does not depend on the luck of rounding: the
all-reduce of 2 processes sums in another order than one process does (a relative 3e-6
in the loss), and many SGD steps at a large learning rate amplify that into visibly
different parameters. So the run is short and gentle (SGD, lr 0.01), the per-epoch
training losses must agree to 1e-4 relative, and the parameters must agree to 2% of how
far the second epoch moved them. Processes that really computed something else (another
shard, a gradient off by the process count) miss both by orders of magnitude.
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
        "--config.train.optimizer=sgd", "--config.train.lr=0.01", "--config.data.num_shards=2",
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
  assert "epoch 1/2" in outs[0][1] and "engine.py" not in outs[1][1]
  assert "process 0 of 2: 2 local and 4 global devices" in outs[0][1]

  # The same losses, epoch by epoch (summation order alone changes them by ~3e-6 relative).
  la, lb = ([json.loads(line)["train_loss"] for line in (d / "metrics.jsonl").read_text().splitlines()]
            for d in (multi, single))
  np.testing.assert_allclose(la, lb, rtol=1e-4)

  # The same parameters, measured against how far the last epoch moved them.
  a, b = restore.load_run(str(multi)), restore.load_run(str(single))  # any topology restores on one device
  b1 = restore.load_run(str(single), number=1)
  leaf_max = lambda f, *trees: max(jax.tree_util.tree_leaves(jax.tree_util.tree_map(
      lambda *xs: float(np.max(np.abs(f(*map(np.asarray, xs))))), *trees)))
  diff = leaf_max(lambda x, y: x - y, a.variables["params"], b.variables["params"])
  moved = leaf_max(lambda x, y: x - y, b.variables["params"], b1.variables["params"])
  assert moved > 1e-3, moved  # the second epoch did train
  assert diff < 0.02 * moved, (diff, moved)
  stats = leaf_max(lambda x, y: (x - y) / (1 + np.abs(y)), a.variables["batch_stats"], b.variables["batch_stats"])
  assert stats < 1e-3, stats
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
