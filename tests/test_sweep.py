"""Sweeps: grid enumeration and validation, ensemble training, resumable runner, report."""
from __future__ import annotations

import csv
import os

import jax
import numpy as np
import pytest
from ml_collections import config_dict

from backdoor_jax.configs import sok_badnets
from backdoor_jax.errors import ConfigError
from backdoor_jax.sweep import grid as grid_lib
from backdoor_jax.sweep import report as report_lib
from backdoor_jax.sweep import runner
from backdoor_jax.train import restore
from backdoor_jax.train.recipes import badnets, ensemble

from tests.helpers import tiny_config


def sweep_config(**grid):
  c = tiny_config(**{"data.max_train": 256, "data.max_test": 128, "train.epochs": 1})
  sok_badnets.add_sweep_section(c)
  for section, values in grid.items():
    c.sweep.grid[section] = config_dict.ConfigDict(values)
  return c


# ---------------------------------------------------------------- grid


def test_cells_are_the_product_plus_one_baseline_per_model_and_seed():
  c = sweep_config(trigger={"size": (0.1, 0.2, 0.3), "position": ("top-left", "center")},
                   poison={"rate": (0.05, 0.1)}, model={"name": ("small_cnn", "alexnet")})
  c.sweep.seeds = (0, 1)
  cells = grid_lib.enumerate_cells(c)
  attack = [x for x in cells if x.role == "attack"]
  clean = [x for x in cells if x.role == "clean"]
  assert len(attack) == 3 * 2 * 2 * 2 * 2
  assert len(clean) == 2 * 2                       # one per model x seed
  assert cells[:len(clean)] == clean               # baselines train first
  assert len({x.cell_id for x in cells}) == len(cells)
  a = attack[0]
  assert a.baseline_id() in {b.cell_id for b in clean}
  cfg = grid_lib.cell_config(c, a)
  for key, value in a.values:
    node = cfg
    for p in key.split(".")[:-1]:
      node = node[p]
    assert node[key.split(".")[-1]] == value
  assert cfg.seed == a.seed
  assert grid_lib.cell_config(c, clean[0]).poison.rate == 0.0
  c.sweep.clean_baseline = False
  assert all(x.role == "attack" for x in grid_lib.enumerate_cells(c))


def test_a_sweep_over_trigger_kinds_gives_each_cell_its_own_section():
  from backdoor_jax import triggers
  c = sweep_config(trigger={"kind": ("square", "wanet", "blend"), "wanet": {"s": (0.5, 1.0)}}, poison={"rate": (0.1,)})
  assert "wanet" not in c.trigger and "blend" not in c.trigger  # the base config names only square
  attack = [x for x in grid_lib.enumerate_cells(c) if x.role == "attack"]
  assert len(attack) == 3 * 2
  for cell in attack:
    cfg = grid_lib.cell_config(c, cell)
    vals = dict(cell.values)
    kind = vals["trigger.kind"]
    assert [k for k in cfg.trigger if k in triggers.trigger_kinds()] == ([] if kind == "square" else [kind])
    if kind == "wanet":
      assert cfg.trigger.wanet.to_dict() == dict(k=4, s=vals["trigger.wanet.s"], grid_rescale=1.0, cross_ratio=2.0)
      assert triggers.cross_ratio_from_config(cfg.trigger) == 2.0
    triggers.trigger_from_config(cfg.trigger, (32, 32))  # every cell's trigger builds
  assert "wanet" not in c.trigger  # the base config is not modified
  bad = sweep_config(trigger={"kind": ("square", "diamond")}, poison={"rate": (0.1,)})
  with pytest.raises(ConfigError, match="'diamond'"):
    grid_lib.enumerate_cells(bad)


@pytest.mark.parametrize("grid,needle", [
    ({"trigger": {"sise": (0.1,)}}, "trigger.sise"),
    ({"trigger": {"size": ()}}, "non-empty"),
    ({}, "sweep.grid is empty"),
    ({"sweep": {"seeds": (1,)}}, "sweep.seeds"),
])
def test_bad_grids_are_named(grid, needle):
  c = sweep_config(**grid)
  with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
    grid_lib.enumerate_cells(c)


def test_bad_seeds():
  c = sweep_config(poison={"rate": (0.1,)})
  c.sweep.seeds = ()
  with pytest.raises(ConfigError, match="sweep.seeds"):
    grid_lib.enumerate_cells(c)


# ---------------------------------------------------------------- ensemble


def test_ensemble_member_matches_its_single_run(tmp_path):
  """Member k of a vmapped ensemble ends where a plain run of the same config ends."""
  cfgs = []
  for seed, pos in ((0, "bottom-right"), (1, "top-left")):
    c = tiny_config(**{"train.epochs": 1, "train.optimizer": "sgd", "train.lr": 0.05, "trigger.position": pos})
    c.data.split_seed = 0     # both members on the same 400-image subset
    c.seed = seed
    cfgs.append(c)
  results, stacked = ensemble.train_ensemble(cfgs, workdir=None, progress=False, return_variables=True)
  single = badnets.train(cfgs[1], str(tmp_path / "single"))
  run = restore.load_run(str(tmp_path / "single"))
  member = ensemble.member_variables(stacked, 1)
  diffs = jax.tree_util.tree_leaves(jax.tree_util.tree_map(
      lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))), member["params"], run.variables["params"]))
  assert max(diffs) < 1e-3
  assert abs(results[1]["clean_accuracy"] - single["clean_accuracy"]) <= 0.01
  assert abs(results[1]["attack_success_rate"] - single["attack_success_rate"]) <= 0.01
  assert results[0]["num_poisoned"] == results[1]["num_poisoned"] > 0
  # member 0 really is a different model (other seed, other trigger)
  other = ensemble.member_variables(stacked, 0)
  assert max(jax.tree_util.tree_leaves(jax.tree_util.tree_map(
      lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))), other["params"], member["params"]))) > 1e-2


def test_ensemble_strategies_agree():
  import optax
  from backdoor_jax import models
  from backdoor_jax.train import state as state_lib, steps
  spec = steps.InputSpec((0.5,) * 3, (0.25,) * 3)
  model = models.get_model("small_cnn", 5, widths=(4, 8), pool_after=(1,))
  tx = optax.sgd(0.1)
  k = 3
  init = lambda: jax.vmap(lambda key: state_lib.create_train_state(model, tx, key, (1, 8, 8, 3)))(
      jax.random.split(jax.random.key(0), k))
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (k, 4, 8, 8, 3), dtype=np.uint8)
  y = rng.integers(0, 5, (k, 4)).astype(np.int32)
  keys = jax.random.split(jax.random.key(1), k)
  out = {}
  for strategy in ensemble.STRATEGIES:
    s, m = ensemble.make_ensemble_step(spec, strategy)(init(), x, y, keys)
    out[strategy] = (s.params, m["loss_sum"])
  np.testing.assert_allclose(out["vmap"][1], out["sequential"][1], rtol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(out["vmap"][0]), jax.tree_util.tree_leaves(out["sequential"][0])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  with pytest.raises(ConfigError, match="sweep.strategy"):
    ensemble.make_ensemble_step(spec, "pmap")


def test_ensemble_refuses_members_that_differ_in_shared_keys():
  a, b = tiny_config(), tiny_config(**{"train.lr": 0.1})
  with pytest.raises(ConfigError, match="train"):
    ensemble.train_ensemble([a, b], progress=False)


def test_invalid_member_is_recorded_and_others_train():
  good = tiny_config(**{"train.epochs": 1})
  bad = tiny_config(**{"train.epochs": 1, "trigger.size": 40.0})   # larger than the 32x32 image
  res = ensemble.train_ensemble([good, bad], progress=False, member_errors="record")
  assert "error" in res[1] and "40" in res[1]["error"]
  assert 0.0 <= res[0]["clean_accuracy"] <= 1.0
  with pytest.raises(ConfigError):
    ensemble.train_ensemble([good, bad], progress=False)


# ---------------------------------------------------------------- runner


def _rows(workdir):
  with open(os.path.join(workdir, "results.csv"), newline="") as f:
    return list(csv.DictReader(f))


def test_sweep_end_to_end_resume_and_mismatch(tmp_path, monkeypatch):
  c = sweep_config(trigger={"size": (0.1, 0.25)}, poison={"rate": (0.1,)})
  c.sweep.models_per_step = 2
  wd = str(tmp_path / "sweep")
  rows = runner.run_sweep(c, wd, progress=False)
  assert len(rows) == 3 and all(r["status"] == "ok" for r in rows)
  file_rows = _rows(wd)
  assert [r["role"] for r in file_rows].count("clean") == 1
  assert list(file_rows[0]) == runner.columns(c)
  for r in file_rows:
    assert 0 <= float(r["clean_accuracy"]) <= 1 and 0 <= float(r["attack_success_rate"]) <= 1
    if r["role"] == "attack":
      clean = next(x for x in file_rows if x["role"] == "clean")
      assert float(r["clean_accuracy_drop"]) == pytest.approx(
          float(clean["clean_accuracy"]) - float(r["clean_accuracy"]))
  for name in ("summary.md", "summary.csv", "effects.json", "asr_vs_size.png", "asr_vs_rate.png"):
    assert os.path.exists(os.path.join(wd, "report", name)), name

  # A rerun trains nothing.
  def boom(*a, **k):
    raise AssertionError("a finished cell was trained again")
  monkeypatch.setattr(ensemble, "train_ensemble", boom)
  assert len(runner.run_sweep(c, wd, progress=False)) == 3

  # Another grid in the same work dir is refused.
  c2 = sweep_config(trigger={"size": (0.1, 0.3)}, poison={"rate": (0.1,)})
  with pytest.raises(ConfigError, match="different sweep"):
    runner.run_sweep(c2, wd, progress=False)


def test_crashed_group_is_recorded_and_sweep_goes_on(tmp_path, monkeypatch):
  c = sweep_config(trigger={"size": (0.1, 0.25)}, poison={"rate": (0.1,)})
  c.sweep.clean_baseline = False
  c.sweep.models_per_step = 1
  calls = []

  def flaky(cfgs, **kwargs):
    calls.append(cfgs[0].trigger.size)
    if len(calls) == 1:
      raise RuntimeError("out of memory (simulated)")
    return [{"clean_accuracy": 0.9, "attack_success_rate": 0.8, "num_poisoned": 3}]
  monkeypatch.setattr(ensemble, "train_ensemble", flaky)
  wd = str(tmp_path / "sweep")
  runner.run_sweep(c, wd, progress=False)
  rows = _rows(wd)
  assert [r["status"] for r in rows] == ["failed", "ok"]
  assert "out of memory" in rows[0]["error"]
  runner.run_sweep(c, wd, progress=False)            # failed cells stay recorded...
  assert len(calls) == 2
  with c.unlocked():
    c.sweep.retry_failed = True                         # ...unless asked to retry
  runner.run_sweep(c, wd, progress=False)
  assert len(calls) == 3
  assert [r["status"] for r in _rows(wd)] == ["ok", "ok"]


# ---------------------------------------------------------------- report


def test_report_effects_known_answer(tmp_path):
  """ASR = size-driven by construction: the report must say size moves ASR more than rate."""
  c = sweep_config(trigger={"size": (0.04, 0.08)}, poison={"rate": (0.01, 0.02)})
  c.sweep.seeds = (0, 1)
  wd = str(tmp_path)
  runner._check_workdir(wd, c, runner.columns(c))
  rows = []
  for cell in grid_lib.enumerate_cells(c):
    vals = dict(cell.values)
    row = {"cell_id": cell.cell_id, "role": cell.role, "seed": cell.seed, "status": "ok",
           **{k: grid_lib.encode(v) for k, v in cell.values}}
    if cell.role == "clean":
      row.update(clean_accuracy=0.95, attack_success_rate=0.01)
    else:
      asr = 10 * vals["trigger.size"] + 2 * vals["poison.rate"] + 0.01 * cell.seed
      row.update(clean_accuracy=0.94, attack_success_rate=asr, clean_accuracy_drop=0.01)
    rows.append(row)
  runner.write_results(os.path.join(wd, "results.csv"), runner.columns(c), rows)
  eff = report_lib.write_report(wd)
  assert eff["trigger.size"]["spread"] == pytest.approx(0.4, abs=1e-9)
  assert eff["poison.rate"]["spread"] == pytest.approx(0.02, abs=1e-9)
  text = open(os.path.join(wd, "report", "summary.md")).read()
  assert "ASR changes more with trigger size" in text
  series = report_lib.marginal([r for r in report_lib.load(wd)[1] if r["role"] == "attack"],
                               "attack_success_rate", "trigger.size")[(None, None)]
  assert [s[0] for s in series] == ["0.04", "0.08"]
  assert series[0][1] == pytest.approx(0.4 + 2 * 0.015 + 0.005)
  assert series[0][3] == 4                               # 2 rates x 2 seeds
