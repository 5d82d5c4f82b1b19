"""The checks that keep a broken run from reading as a result (issue 13), tested directly.

config_checks (every shipped config passes; each rule refuses), strict JSON, work-dir
states, a checkpoint save failing mid-run, inputs too small for a model, corrupted run
configs, and metrics over empty sets.
"""
from __future__ import annotations

import errno
import importlib.util
import inspect
import json
import math
import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import config_dict

from backdoor_jax import config_checks, evaluate, io, models
from backdoor_jax.errors import ConfigError
from backdoor_jax.models import input_size
from backdoor_jax.train import checkpoint as ckpt_lib
from backdoor_jax.train import restore

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")


def _load_module(path: str):
  spec = importlib.util.spec_from_file_location(f"_cfg_{os.path.basename(path)[:-3]}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _shipped_configs():
  """(file, variant) of every config file and every variant it lists or names in its source.

  ``configs/*.py`` may be thin files that import ``get_config`` from ``backdoor_jax.configs``;
  the variants are then read from the module that defines it.
  """
  out = []
  for name in sorted(os.listdir(CONFIGS)):
    if not name.endswith(".py"):
      continue
    module = _load_module(os.path.join(CONFIGS, name))
    if not hasattr(module, "get_config"):
      continue
    text = inspect.getsource(sys.modules.get(module.get_config.__module__, module))
    variants = set(getattr(module, "VARIANTS", ()))
    variants |= set(re.findall(r'variant == "(\w+)"', text))
    for group in re.findall(r"variant in \(([^)]*)\)", text):
      variants |= set(re.findall(r'"(\w+)"', group))
    for group in re.findall(r"^VARIANTS\s*=\s*\(([^)]*)\)", text, re.M):
      variants |= set(re.findall(r'"(\w+)"', group))
    out += [(name, v) for v in sorted(variants)] or [(name, None)]
  return out


@pytest.mark.parametrize("name, variant", _shipped_configs())
def test_every_shipped_config_passes_the_checks(name, variant):
  module = _load_module(os.path.join(CONFIGS, name))
  try:
    config = module.get_config(variant) if variant else module.get_config()
  except (ValueError, ConfigError) as e:  # a variant name the regex picked up that is not one
    pytest.skip(f"not a variant: {e}")
  check = config_checks.check_defense_config if name == "defenses.py" else config_checks.check_config
  check(config)


def _badnets():
  return _load_module(os.path.join(CONFIGS, "badnets.py")).get_config("digits")


@pytest.mark.parametrize("key, value, fragment", [
    ("train.lr", float("nan"), "train.lr=nan is not finite"),
    ("train.lr", -1e-3, "train.lr=-0.001 is invalid; allowed: a number > 0"),
    ("train.epochs", 0, "train.epochs=0"),
    ("train.grad_clip", -1.0, "train.grad_clip=-1.0"),
    ("train.weight_decay", -0.1, "train.weight_decay=-0.1"),
    ("checkpoint.keep", 0, "checkpoint.keep=0"),
    ("seed", 2 ** 32, "seed=4294967296"),
    ("seed", -1, "seed=-1"),
    ("trigger.seed", -2, "trigger.seed=-2"),
    ("model.widths", (), "model.widths=()"),
    ("train.batch_size", 0, "train.batch_size=0"),
    ("poison.rate", float("inf"), "poison.rate=inf is not finite"),
])
def test_check_config_refuses(key, value, fragment):
  c = _badnets()
  section, _, leaf = key.rpartition(".")
  (c[section] if section else c)[leaf] = value
  with pytest.raises(ConfigError, match=re.escape(fragment)):
    config_checks.check_config(c)


def test_check_config_accepts_edges_and_derived_seeds():
  c = _badnets()
  c.trigger.seed = -1          # -1 = derive from the run seed
  c.seed = 2 ** 32 - 1
  c.train.grad_clip = 0.0      # 0 = no clipping
  c.train.weight_decay = 0.0
  c.checkpoint.keep = 1
  config_checks.check_config(c)


def test_rules_match_nested_sections_and_sweep_grids():
  assert config_checks.matches("train.lr", "stage1.train.lr")
  assert not config_checks.matches("^seed", "trigger.seed")
  assert config_checks.matches("*batch_size", "neural_cleanse.unlearn_batch_size")
  c = config_dict.ConfigDict({"seed": 0, "stage1": {"train": {"lr": 0.0}}})
  with pytest.raises(ConfigError, match="stage1.train.lr=0.0"):
    config_checks.check_config(c)
  grid = config_dict.ConfigDict({"seed": 0, "sweep": {"grid": {"train": {"lr": (0.1, -1.0)}}}})
  with pytest.raises(ConfigError, match=r"sweep.grid.train.lr value -1.0 is invalid"):
    config_checks.check_config(grid)


def test_defense_rules():
  d = _load_module(os.path.join(CONFIGS, "defenses.py")).get_config()
  config_checks.check_defense_config(d)  # seed -1 is allowed there
  d.neural_cleanse.lr = -0.1
  with pytest.raises(ConfigError, match="neural_cleanse.lr=-0.1"):
    config_checks.check_defense_config(d)


# --- strict JSON ---------------------------------------------------------------------------------

def test_json_files_are_strict(tmp_path):
  record = {"acc": float("nan"), "asr": np.float32("inf"), "loss": np.float64(-np.inf), "n": np.int64(3),
            "curve": np.array([0.5, np.nan]), "nested": [{"x": float("-inf")}, (np.float16(1.5),)], "ok": 0.25}
  io.write_json_atomic(str(tmp_path / "r.json"), record)
  io.write_jsonl_atomic(str(tmp_path / "m.jsonl"), [record, {"a": 1.0}])
  text = (tmp_path / "r.json").read_text()
  for token in ("NaN", "Infinity"):
    assert token not in text and token not in (tmp_path / "m.jsonl").read_text()

  def strict(s):  # a parser that refuses NaN/Infinity, like browsers and most other languages
    return json.loads(s, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
  back = strict(text)
  assert back == {"acc": None, "asr": None, "loss": None, "n": 3, "curve": [0.5, None],
                  "nested": [{"x": None}, [1.5]], "ok": 0.25}
  lines = (tmp_path / "m.jsonl").read_text().splitlines()
  assert strict(lines[0])["curve"] == [0.5, None] and strict(lines[1]) == {"a": 1.0}


# --- work dirs ------------------------------------------------------------------------------------

def test_workdir_states(tmp_path, monkeypatch):
  io.check_workdir_writable(str(tmp_path / "new" / "run"))
  assert (tmp_path / "new" / "run").is_dir() and not os.listdir(tmp_path / "new" / "run")  # probe removed
  io.check_workdir_writable(str(tmp_path / "absent"), create=False)
  assert not (tmp_path / "absent").exists()
  (tmp_path / "f").write_text("x")
  with pytest.raises(ConfigError, match="is not a folder"):
    io.check_workdir_writable(str(tmp_path / "f"))
  with pytest.raises(ConfigError, match="cannot be created: .* is a file"):
    io.check_workdir_writable(str(tmp_path / "f" / "sub"))

  class Full:
    f_bavail, f_frsize = 100, 4096
  with monkeypatch.context() as m:
    m.setattr(io.os, "statvfs", lambda _: Full())
    with pytest.raises(ConfigError, match="disk full: 0.4 MiB free"):
      io.check_workdir_writable(str(tmp_path))
  for code, fragment in ((errno.EROFS, "is not writable"), (errno.ENOSPC, "disk full")):
    def fail(*a, code=code, **k):
      raise OSError(code, os.strerror(code))
    with monkeypatch.context() as m:
      m.setattr(io.tempfile, "mkstemp", fail)
      with pytest.raises(ConfigError, match=fragment):
        io.check_workdir_writable(str(tmp_path))


def test_checkpoint_save_failure_keeps_the_previous_one(tmp_path, monkeypatch):
  """A disk filling during the save of checkpoint 2: one clear error, checkpoint 1 intact and resumable."""
  from orbax.checkpoint._src.path import async_path
  with pytest.raises(ConfigError, match="checkpoint.keep=0"):
    ckpt_lib.Checkpointer(str(tmp_path), keep=0)
  ck = ckpt_lib.Checkpointer(str(tmp_path), keep=1)
  ck.save(1, {"w": jnp.arange(3.0)}, {"epoch": 1})

  async def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")
  with monkeypatch.context() as m:
    m.setattr(async_path, "rename", disk_full)  # orbax's final rename of the finished temporary folder
    with pytest.raises(ConfigError, match=r"cannot save checkpoint 2 .*: the disk is full; the previous checkpoint "
                                          r".*checkpoints/1 is intact"):
      ck.save(2, {"w": jnp.arange(3.0) + 10}, {"epoch": 2})
  ck.close()
  again = ckpt_lib.Checkpointer(str(tmp_path), keep=1)
  assert again.latest() == 1
  tree, meta = again.restore(1, {"w": jnp.zeros(3)})
  np.testing.assert_array_equal(tree["w"], np.arange(3.0))
  assert meta == {"epoch": 1}
  again.save(2, {"w": jnp.arange(3.0) + 10}, {"epoch": 2})  # once there is room again, saving works
  assert again.latest() == 2
  again.close()


# --- model against input --------------------------------------------------------------------------

def test_input_too_small_for_small_cnn_names_the_smallest_size():
  model = models.get_model("small_cnn", 10, widths=(4, 4, 4, 4), pool_after=(1, 2, 3))
  with pytest.raises(ConfigError, match=r"7x7 inputs are too small for model small_cnn.*smallest square input it "
                                        r"accepts is 8x8"):
    input_size.check_input_size(model, (7, 7, 3), "small_cnn")
  input_size.check_input_size(model, (8, 8, 3))
  # The refusal is real: run at 7x7, the model gives NaN logits (one jitted init-and-apply).
  logits, _ = jax.jit(lambda x: model.init_with_output(jax.random.key(0), x, train=False))(jnp.ones((2, 7, 7, 3)))
  assert logits.shape == (2, 10) and bool(jnp.all(jnp.isnan(logits)))


def test_input_size_resnet_and_a_shrinking_stem():
  input_size.check_input_size(models.get_model("resnet18", 10, stem="cifar"), (32, 32, 3))
  # 'SAME' padding never shrinks a map to nothing, so even a 4x4 input fits ResNet-18.
  input_size.check_input_size(models.get_model("resnet18", 10, stem="imagenet"), (4, 4, 3))
  alexnet = models.get_model("alexnet", 10, stem="imagenet")  # 'VALID' convolutions and pools
  smallest = input_size.smallest_square_size(alexnet)
  assert smallest is not None and smallest > 32
  with pytest.raises(ConfigError, match=f"accepts is {smallest}x{smallest}"):
    input_size.check_input_size(alexnet, (smallest - 1, smallest - 1, 3), "alexnet")
  input_size.check_input_size(alexnet, (smallest, smallest, 3))


# --- run configs of analysed runs -------------------------------------------------------------------

def test_read_run_config_and_clean_reference(tmp_path):
  run = tmp_path / "run"
  (run / "checkpoints" / "3").mkdir(parents=True)
  with pytest.raises(ConfigError, match="holds checkpoints but no config.json"):
    restore.read_run_config(str(run))
  (run / "config.json").write_text('{"model": {"name": "small_cnn"}, ')
  with pytest.raises(ConfigError, match=r"config.json is corrupted \(not valid JSON"):
    restore.read_run_config(str(run))
  (run / "config.json").write_text(json.dumps({"model": {"name": "small_cnn"}, "poison": {"rate": 0.1}}))
  assert restore.read_run_config(str(run)).model.name == "small_cnn"
  assert restore.warn_if_not_clean(str(run)) == ["poison.rate=0.1"]
  (run / "config.json").write_text(json.dumps({"model": {"name": "small_cnn"}, "poison": {"rate": 0.0}}))
  assert restore.warn_if_not_clean(str(run)) == []
  (run / "config.json").write_text(json.dumps({"model": {"name": "small_cnn"}, "recipe": "two_stage",
                                               "poison": {"rate": 0.1, "phase": "test_only"}}))
  assert restore.not_clean_reasons(restore.read_run_config(str(run))) == [
      "it was trained with the 'two_stage' recipe (an explanation attack)"]


# --- metrics over empty sets ----------------------------------------------------------------------

def test_empty_set_metrics_are_none_with_a_reason():
  out = evaluate.evaluate_classifier(None, None, np.zeros((0, 4, 4, 3), np.uint8), np.zeros((0,), np.int32), 8, None)
  assert out["accuracy"] is None and out["top5_accuracy"] is None and out["count"] == 0 and out["reason"]
  assert evaluate.rate(np.zeros((0,), bool)) == (None, evaluate.EMPTY_SET)
  value, reason = evaluate.rate(np.array([True, False, True, True]))
  assert reason is None and math.isclose(value, 0.75)
