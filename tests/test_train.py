"""Training: optimiser/freezing, steps, checkpoints, sharding, resume, end-to-end runs."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from backdoor_jax import models
from backdoor_jax.errors import ConfigError
from backdoor_jax.train import checkpoint as ckpt_lib
from backdoor_jax.train import optim, state as state_lib, steps
from backdoor_jax.train.recipes import badnets
from tests.helpers import REPO, shared_data, tiny_config

SPEC = steps.InputSpec(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def _toy_batch(n=32, seed=0):
  rng = np.random.default_rng(seed)
  y = rng.integers(0, 4, n).astype(np.int32)
  x = rng.integers(0, 60, (n, 16, 16, 3)).astype(np.uint8)
  for i, c in enumerate(y):  # class = which colour channel is bright (3 = none): learnable
    if c < 3:
      x[i, ..., c] += 150
  return jnp.asarray(x), jnp.asarray(y)


def _state(lr=1e-2, trainable=".*", optimizer="adam", steps_per_epoch=10):
  model = models.get_model("small_cnn", 4, widths=(8, 8))
  cfg = tiny_config(**{"train.lr": lr, "train.trainable": trainable, "train.optimizer": optimizer}).train
  variables = models.init_variables(model, jax.random.key(0), (1, 16, 16, 3))
  tx, _ = optim.make_optimizer(cfg, steps_per_epoch, variables["params"])
  return state_lib.create_train_state(model, tx, None, None, variables=variables)


def test_loss_decreases():
  state = _state()
  step = steps.make_train_step(SPEC, jax.random.key(1))
  x, y = _toy_batch()
  losses = []
  for _ in range(40):
    state, m = step(state, x, y)
    losses.append(float(m["loss_sum"] / m["count"]))
  assert losses[-1] < 0.3 * losses[0], losses
  assert int(state.step) == 40


def test_freezing_leaves_other_params_unchanged():
  state = _state(trainable="^fc/|Dense")
  before = jax.device_get(state.params)
  step = steps.make_train_step(SPEC, jax.random.key(1))
  x, y = _toy_batch()
  for _ in range(3):
    state, _ = step(state, x, y)
  after = jax.device_get(state.params)
  flat_b = jax.tree_util.tree_flatten_with_path(before)[0]
  flat_a = jax.tree_util.tree_leaves(after)
  changed = {optim.param_path(p): not np.array_equal(a, b) for (p, b), a in zip(flat_b, flat_a)}
  assert any(changed.values())
  for name, did in changed.items():
    trainable = "fc/" in name or "Dense" in name
    assert did == trainable, (name, did)


def test_trainable_pattern_errors():
  with pytest.raises(ConfigError, match="matches no parameter"):
    _state(trainable="^nothing_like_this$")
  with pytest.raises(ConfigError, match="not a valid regular expression"):
    _state(trainable="(")


def test_schedules():
  cfg = tiny_config(**{"train.lr": 0.1, "train.epochs": 4, "train.warmup_epochs": 1.0}).train
  s = optim.make_schedule(cfg, 10)
  assert float(s(0)) == 0.0 and abs(float(s(10)) - 0.1) < 1e-7
  assert float(s(40)) < 1e-6  # cosine reaches zero at the end
  cfg = tiny_config(**{"train.lr": 0.1, "train.epochs": 4, "train.schedule": "step",
                       "train.step_epochs": (2, 3)}).train
  s = optim.make_schedule(cfg, 10)
  np.testing.assert_allclose([float(s(19)), float(s(20)), float(s(30))], [0.1, 0.01, 0.001], rtol=1e-6)
  with pytest.raises(ConfigError, match="train.schedule"):
    optim.make_schedule(tiny_config(**{"train.schedule": "linear"}).train, 10)


def test_eval_counts_every_sample_once():
  state = _state()
  ev = steps.make_eval_step(SPEC, state.apply_fn)
  from backdoor_jax import evaluate
  from backdoor_jax.train import mesh as mesh_lib
  x, y = _toy_batch(n=37)
  out = evaluate.evaluate_classifier(ev, state.variables, np.asarray(x), np.asarray(y), 16, mesh_lib.make_mesh())
  assert out["count"] == 37 and out["predictions"].shape == (37,)
  assert out["accuracy"] == pytest.approx(float(np.mean(out["predictions"] == np.asarray(y))))
  assert out["top5_accuracy"] == 1.0  # 4 classes: the label is always in the top 5


def test_checkpoint_round_trip_and_corruption(tmp_path):
  state = _state()
  step = steps.make_train_step(SPEC, jax.random.key(1))
  x, y = _toy_batch()
  state, _ = step(state, x, y)
  ck = ckpt_lib.Checkpointer(str(tmp_path))
  ck.save(1, state_lib.checkpoint_tree(state), {"epoch": 1, "history": [{"a": 1.0}], "train_seconds": 2.0})
  fresh = _state()
  tree, meta = ck.restore(ck.latest(), state_lib.checkpoint_tree(fresh))
  restored = state_lib.from_checkpoint_tree(fresh, tree)
  assert meta["history"] == [{"a": 1.0}]
  for a, b in zip(jax.tree_util.tree_leaves(state_lib.checkpoint_tree(state)),
                  jax.tree_util.tree_leaves(state_lib.checkpoint_tree(restored))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # the restored state continues exactly like the original
  s1, _ = step(state, x, y)
  s2, _ = step(restored, x, y)
  np.testing.assert_array_equal(jax.tree_util.tree_leaves(s1.params)[0], jax.tree_util.tree_leaves(s2.params)[0])
  # corrupt every file of the state and expect a clear error
  for root, _, files in os.walk(tmp_path / "checkpoints" / "1" / "state"):
    for f in files:
      with open(os.path.join(root, f), "wb") as fh:
        fh.write(b"garbage")
  ck.close()
  with pytest.raises(ConfigError, match="cannot be restored"):
    ckpt_lib.Checkpointer(str(tmp_path)).restore(1, state_lib.checkpoint_tree(fresh))


SHARDED_SCRIPT = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import jax, jax.numpy as jnp, numpy as np
    from backdoor_jax import models
    from backdoor_jax.train import mesh as mesh_lib, optim, state as state_lib, steps
    from tests.helpers import tiny_config
    assert jax.device_count() == 4, jax.devices()
    spec = steps.InputSpec(mean=(0.5,) * 3, std=(0.25,) * 3, crop_padding=2, flip=True)
    rng = np.random.default_rng(0)
    xs = rng.integers(0, 256, (3, 16, 16, 16, 3)).astype(np.uint8)
    ys = rng.integers(0, 5, (3, 16)).astype(np.int32)
    def run(devices):
      mesh = mesh_lib.make_mesh(devices)
      model = models.get_model("small_cnn", 5, widths=(8, 16))
      v = models.init_variables(model, jax.random.key(0), (1, 16, 16, 3))
      tx, _ = optim.make_optimizer(tiny_config(**{"train.optimizer": "sgd", "train.lr": 0.1}).train, 10, v["params"])
      st = mesh_lib.replicate(mesh, state_lib.create_train_state(model, tx, None, None, variables=v))
      step = steps.make_train_step(spec, jax.random.key(3))
      for x, y in zip(xs, ys):
        x, y = mesh_lib.shard_batch(mesh, x, y)
        st, m = step(st, x, y)
        jax.block_until_ready(st.step)
      return jax.device_get((st.params, st.batch_stats)), x.sharding
    (p1, b1), s1 = run(jax.devices()[:1])
    (p4, b4), s4 = run(jax.devices())
    assert len(s4.device_set) == 4 and len(s1.device_set) == 1
    err = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves((p1, b1)), jax.tree.leaves((p4, b4))))
    moved = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(
        models.init_variables(models.get_model("small_cnn", 5, widths=(8, 16)), jax.random.key(0), (1, 16, 16, 3))["params"])))
    print("MAXERR", err, "MOVED", moved)
    assert moved > 1e-3 and err < 1e-5, (err, moved)
""")


def test_sharded_step_equals_single_device():
  env = dict(os.environ, PYTHONPATH=REPO)
  r = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT], cwd=REPO, env=env, capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
  assert "MAXERR" in r.stdout


def _launch(workdir, *overrides, timeout=600):
  cmd = [sys.executable, os.path.join(REPO, "launch", "train.py"), f"--config={REPO}/configs/badnets.py",
         f"--workdir={workdir}", *overrides]
  return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=dict(os.environ, PYTHONPATH=REPO))


TINY_FLAGS = ("--config.data.max_train=400", "--config.data.max_test=200", "--config.model.widths=(8,16,16)",
              "--config.model.pool_after=(1,2)",
              "--config.train.epochs=3", "--config.train.batch_size=32", "--config.figures=False")


def test_kill_and_resume_matches_uninterrupted(tmp_path):
  ref = _launch(tmp_path / "ref", *TINY_FLAGS)
  out, _ = ref.communicate(timeout=600)
  assert ref.returncode == 0, out[-3000:]
  # Second run: SIGKILL right after the first checkpoint is committed, then resume.
  work = tmp_path / "killed"
  p = _launch(work, *TINY_FLAGS)
  marker = work / "checkpoints" / "1" / "commit_success.txt"
  deadline = time.time() + 600
  while not marker.exists() and p.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  assert p.poll() is None, "run finished before it could be killed"
  p.send_signal(signal.SIGKILL)
  p.wait()
  assert not (work / "results.json").exists()
  r = _launch(work, *TINY_FLAGS)
  out, _ = r.communicate(timeout=600)
  assert r.returncode == 0, out[-3000:]
  assert "resumed from" in out
  a = json.loads((tmp_path / "ref" / "results.json").read_text())
  b = json.loads((work / "results.json").read_text())
  for key in ("clean_accuracy", "clean_top5_accuracy", "attack_success_rate", "num_poisoned"):
    assert a[key] == b[key], key
  ma = [json.loads(l) for l in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
  mb = [json.loads(l) for l in (work / "metrics.jsonl").read_text().splitlines()]
  assert [m["epoch"] for m in mb] == [1, 2, 3]
  assert [m["train_loss"] for m in ma] == [m["train_loss"] for m in mb]
  # Same work dir, different config: refused with a clear message.
  bad = _launch(work, *TINY_FLAGS, "--config.poison.rate=0.2")
  out, _ = bad.communicate(timeout=300)
  assert bad.returncode == 2 and "different config" in out and "poison.rate" in out, out[-2000:]


def test_end_to_end_digits(tmp_path):
  c = tiny_config(**{"data.max_train": 0, "data.max_test": 0, "train.epochs": 4, "figures": True})
  res = badnets.train(c, str(tmp_path))
  for f in ("config.json", "metrics.jsonl", "results.json", "figures/poisoned_examples.png", "figures/curves.png"):
    assert (tmp_path / f).exists(), f
  assert res["num_poisoned"] == round(0.1 * res["num_train"])
  assert res["clean_accuracy"] > 0.85 and res["attack_success_rate"] > 0.85, res
  hist = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert len(hist) == 4 and hist[-1]["train_loss"] < hist[0]["train_loss"]


@pytest.mark.skipif(not os.path.exists(shared_data("gtsrb32.npz")), reason="../shared/data/gtsrb32.npz not present")
def test_short_gtsrb_run(tmp_path):
  # The digits default's 4-conv CNN (tiny_config's 3-conv one barely learns 43 classes in 3 epochs).
  c = tiny_config(**{"data.name": "gtsrb", "data.path": shared_data("gtsrb32.npz"), "data.max_train": 4000,
                     "data.max_test": 1000, "trigger.size": 3.0, "train.epochs": 3,
                     "train.batch_size": 64, "model.widths": (16, 32, 64, 64), "model.pool_after": (1, 2, 3)})
  res = badnets.train(c, str(tmp_path))
  assert res["num_test"] == 1000
  # Some GTSRB test images already have a near-white bottom-right corner, where a white 3x3 patch
  # changes nothing; ASR over the rest is the number the trigger must drive.
  assert 0.0 < res["weak_trigger_fraction"] < 0.1, res
  assert res["attack_success_rate_visible"] > 0.9, res
  assert res["attack_success_rate"] > 0.85, res
  assert res["clean_accuracy"] > 0.3, res  # 43 classes, 4k images, 3 epochs: far above chance (0.023)


@pytest.mark.parametrize("key,value,needle", [
    ("trigger.size", 40.0, "40"),
    ("trigger.position", "upper-middle", "upper-middle"),
    ("poison.rate", 1.5, "1.5"),
    ("poison.target", 12, "12"),
    ("poison.mode", "one_to_one", "one_to_one"),
    ("model.name", "resnet7", "resnet7"),
    ("data.name", "imagenet22k", "imagenet22k"),
    ("train.batch_size", 1000, "1000"),
])
def test_bad_input_fails_before_training(tmp_path, key, value, needle):
  with pytest.raises(ConfigError, match=needle):
    badnets.train(tiny_config(**{key: value}), str(tmp_path))
  assert not (tmp_path / "checkpoints").exists() or not os.listdir(tmp_path / "checkpoints")


def test_missing_data_path_is_one_line_error(tmp_path):
  p = _launch(tmp_path, "--config.data.name=npz", f"--config.data.path={tmp_path}/nope.npz")
  out, _ = p.communicate(timeout=300)
  assert p.returncode == 2, out[-2000:]
  assert "nope.npz" in out and "Traceback" not in out
