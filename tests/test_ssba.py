"""SSBA encoder: residual bound, resumable training, the trained file as a trigger, bad values."""
from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from backdoor_jax import triggers as T
from backdoor_jax.errors import ConfigError
from backdoor_jax.triggers import ssba, ssba_train
from tests.test_bad_inputs import run_launcher

TINY = dict(steps=8, num_bits=4, batch_size=8, features=4, ramp_start=2, ramp_steps=4, log_every=2,
            checkpoint_every=4, progress=False)


def _images(n: int = 32, hw: int = 8, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (n, hw, hw, 3), dtype=np.uint8)


def _flat(tree) -> dict[str, np.ndarray]:
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def test_saturated_encoder_stays_within_its_linf_and_psnr_bound():
  """Known answer: a saturated residual r * tanh(.) changes pixels by at most r: PSNR >= 20 log10(255 / r)."""
  r = 6.0
  s = ssba_train.StegaSettings(num_bits=4, features=4, max_residual=r)
  params = ssba_train.init_state(s, (8, 8))["params"]
  params = jax.tree_util.tree_map(lambda v: v * 50.0, params)  # tanh saturates: |residual| reaches r
  x = _images(16)
  x[0] = 0   # clipping at both ends must not break the bound
  x[1] = 255
  trig = ssba.SSBATrigger(params=params["enc"], bits=jnp.asarray(ssba_train.fixed_bits(s)),
                          max_residual=jnp.asarray(r, jnp.float32))
  y = np.asarray(T.apply_trigger(trig, x)).astype(int)
  change = np.abs(y - x)
  assert change.max() <= r and change.max() >= r - 1  # bounded, and the bound is reached (the test can fail)
  mse = ((y - x.astype(float)) ** 2).mean(axis=(1, 2, 3))
  assert np.all(10 * np.log10(255.0 ** 2 / mse) >= 20 * math.log10(255.0 / r) - 1e-9)
  info = ssba_train.evaluate_encoder(params, s, x)
  assert info["max_abs_change"] <= r and info["psnr_min"] >= 20 * math.log10(255.0 / r) - 1e-9
  # evaluate_encoder's encoding is the trigger's (uint8 rounding included)
  enc, _ = ssba_train._eval_fns(s)  # pylint: disable=protected-access
  same = np.asarray(enc(params["enc"], x, np.broadcast_to(ssba_train.fixed_bits(s), (16, 4))))
  assert np.abs(same.astype(int) - y).max() <= 1


def test_killed_training_resumes_to_the_same_parameters_and_loads_as_a_trigger(tmp_path, monkeypatch):
  train, test = _images(32), _images(8, seed=1)
  full = str(tmp_path / "full.npz")
  info = ssba_train.train_encoder_file(full, train, test, **TINY)
  assert not (tmp_path / "full.ckpt.npz").exists()
  full_records = [json.loads(line) for line in open(tmp_path / "full.metrics.jsonl")]
  assert [r["step"] for r in full_records] == [2, 4, 6, 8]

  killed = str(tmp_path / "killed.npz")
  save = ssba_train._save_checkpoint  # pylint: disable=protected-access

  def save_then_die(*args, **kwargs):
    save(*args, **kwargs)
    raise KeyboardInterrupt  # killed right after the step-4 checkpoint

  monkeypatch.setattr(ssba_train, "_save_checkpoint", save_then_die)
  with pytest.raises(KeyboardInterrupt):
    ssba_train.train_encoder_file(killed, train, test, **TINY)
  monkeypatch.setattr(ssba_train, "_save_checkpoint", save)
  assert (tmp_path / "killed.ckpt.npz").exists() and not (tmp_path / "killed.npz").exists()
  # a checkpoint of other settings is refused, naming the setting
  with pytest.raises(ConfigError, match="lr"):
    ssba_train.train_encoder_file(killed, train, test, **dict(TINY, lr=0.01))
  resumed = ssba_train.train_encoder_file(killed, train, test, **TINY)

  with np.load(full) as a, np.load(killed) as b:
    assert sorted(a.files) == sorted(b.files)
    for k in a.files:
      if k.startswith(("params/", "decoder/")) or k == "bits":
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  records = [json.loads(line) for line in open(tmp_path / "killed.metrics.jsonl")]
  assert [r["step"] for r in records] == [2, 4, 6, 8]
  assert [r["loss"] for r in records] == [r["loss"] for r in full_records]
  for k in ("psnr", "bit_accuracy_fixed", "bit_accuracy_random", "max_abs_change"):
    assert resumed[k] == info[k]
  assert info["max_abs_change"] <= 8 and info["settings"]["steps"] == 8

  # finished: the same call returns the stored info without training; other settings are refused
  monkeypatch.setattr(ssba_train, "_make_step", None)
  again = ssba_train.train_encoder_file(full, train, test, **TINY)
  assert again["psnr"] == info["psnr"] and again["settings"] == info["settings"]
  with pytest.raises(ConfigError, match="exists with other settings.*steps"):
    ssba_train.train_encoder_file(full, train, test, **dict(TINY, steps=10))

  # the file is a trigger hiding the seed's bit string; its encoding is the evaluated one
  trig = T.trigger_from_config(dict(kind="ssba", ssba=dict(path=full)), (8, 8))
  np.testing.assert_array_equal(np.asarray(trig.bits), ssba_train.fixed_bits(ssba_train.StegaSettings(num_bits=4)))
  y = np.asarray(T.apply_trigger(trig, test)).astype(int)
  assert np.abs(y - test).max() == info["max_abs_change"]


@pytest.mark.parametrize("kwargs, match", [
    (dict(steps=0), "steps=0"), (dict(max_residual=300.0), "max_residual=300.0"), (dict(lr=float("nan")), "lr=nan"),
    (dict(residual_weight=-1.0), "residual_weight=-1.0"), (dict(ramp_steps=-2), "ramp_steps=-2"),
    (dict(ramp_start=-1), "ramp_start=-1"),
    (dict(checkpoint_every=3), "multiple of log_every"), (dict(out="x.msgpack"), "ending in .npz"),
    (dict(train=np.zeros((4, 6, 6, 3), np.uint8)), "divisible by 4"),
    (dict(train=np.zeros((4, 8, 8, 3), np.float32)), "uint8"),
])
def test_bad_values_are_one_config_error(kwargs, match, tmp_path):
  kwargs = dict(TINY, **kwargs)
  out = str(tmp_path / kwargs.pop("out", "e.npz"))
  train = kwargs.pop("train", _images(8))
  with pytest.raises(ConfigError, match=match):
    ssba_train.train_encoder_file(out, train, _images(4), **kwargs)


@pytest.mark.parametrize("argv, expected", [
    (["--steps=0"], "steps=0"), (["--max_residual=-1"], "max_residual=-1.0"), (["--out=x.txt"], "ending in .npz"),
])
def test_launcher_bad_flags_give_one_error_line(argv, expected, tmp_path, capfd):
  out = [a for a in argv if a.startswith("--out")] or [f"--out={tmp_path / 'e.npz'}"]
  argv = [a for a in argv if not a.startswith("--out")] + out + ["--max_train=8", "--progress=false"]
  code, text = run_launcher("train_ssba", argv, capfd)
  lines = [line for line in text.splitlines() if line.strip()]
  assert code != 0 and lines[-1].startswith("error:") and expected in lines[-1], text
  assert "Traceback" not in text
