"""The attacks x defenses table: config resolution, the report's cells, and the command end to end."""
from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest

from backdoor_jax.configs import attacks_x_defenses
from backdoor_jax.errors import ConfigError
from backdoor_jax.sweep import attack_table, table_report

from tests.test_defenses import _fast_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_table(attacks=("clean", "badnets"), defenses=("neural_cleanse", "spectral", "strip")):
  c = attacks_x_defenses.get_config("digits")
  c.table.attacks = attacks
  c.table.defenses = defenses
  c.shared.data.max_train = 400
  c.shared.data.max_test = 200
  c.shared.model.widths = (16, 32, 32)
  c.shared.model.pool_after = (1, 2)
  c.shared.train.epochs = 2
  c.shared.train.batch_size = 32
  c.shared.figures = False
  c.defenses = _fast_config(**{"neural_cleanse.unlearn": True, "neural_cleanse.unlearn_epochs": 1})
  return c


def test_resolve_applies_shared_keeps_the_rest_and_does_not_modify_the_config(tmp_path):
  c = tiny_table()
  before = c.to_json_best_effort()
  lc = attack_table.resolve_attack(c, "label_consistent", str(tmp_path))
  assert lc.data.max_train == 400 and lc.model.widths == (16, 32, 32) and lc.train.epochs == 2
  assert lc.poison.mode == "clean_label" and lc.trigger.kind == "four_corner"  # its own settings survive
  assert lc.data.path == ""  # shared.data.path is None: the attack keeps its own value
  assert lc.poison.surrogate_path == os.path.join(str(tmp_path), "cache", "adversarial_surrogate.msgpack")
  clean = attack_table.resolve_attack(c, "clean", str(tmp_path))
  assert clean.poison.rate == 0.0
  assert attack_table.resolve_attack(c, "ssba", "/w").trigger.ssba.path == "/w/cache/ssba_encoder.npz"
  assert c.to_json_best_effort() == before
  with pytest.raises(ConfigError, match="'nope'"):
    attack_table.resolve_attack(c, "nope", str(tmp_path))


def _row(attack, defense, **kw):
  base = {"attack": attack, "defense": defense, "status": "ok", "clean_accuracy_before": 0.9,
          "attack_success_rate_before": 0.95, "robust_accuracy_before": 0.04}
  return {**base, **kw}


def test_report_cells_unchanged_models_and_detection_verdicts(tmp_path):
  none = dict(num_train=100, num_test=50, num_val=10, num_poisoned=10, poison_rate=0.1, num_attack_test=45,
              target=0, train_seconds=12.0, defenses_seconds=30.0, clean_accuracy_after=0.9,
              attack_success_rate_after=0.95, robust_accuracy_after=0.04)
  rows = [_row("badnets", "none", **none),
          _row("badnets", "fine_pruning", clean_accuracy_after=0.85, attack_success_rate_after=0.10,
               robust_accuracy_after=0.8, seconds=5.0),
          _row("badnets", "neural_cleanse", flagged_classes=[], max_anomaly_index=1.2, names_true_target=False,
               seconds=7.0),
          _row("badnets", "strip", detection_rate=0.75, false_positive_rate=0.1, seconds=2.0),
          {"attack": "wanet", "defense": "none", "status": "failed", "error": "ConfigError: bad"}]
  # neural_cleanse is a removal defense elsewhere (it reports a model when it flags a class)
  rows.insert(3, _row("blend", "none", **none))
  rows.insert(4, _row("blend", "neural_cleanse", clean_accuracy_after=0.7, attack_success_rate_after=0.2,
                      robust_accuracy_after=0.6, flagged_classes=[0], max_anomaly_index=3.5, names_true_target=True))
  assert table_report.removal_defenses(rows) == ["fine_pruning", "neural_cleanse"]
  assert table_report.detectors(rows) == ["neural_cleanse", "strip"]
  assert table_report.after(rows[2], "attack_success_rate") == (0.95, True)  # nothing flagged: model unchanged
  assert table_report.after(rows[1], "attack_success_rate") == (0.10, False)
  md = table_report.markdown(rows, 60.0)
  assert "| badnets | 0.900 / 0.950 / 0.040 | 0.850 / 0.100 / 0.800 | 0.900 / 0.950 / 0.040 (unchanged) |" in md
  assert "flags none, AI 1.20, target missed" in md and "flags [0], AI 3.50, target named" in md
  assert "TPR 0.75 / FPR 0.10" in md
  many = _row("badnets", "activation_clustering", flagged_classes=[0, 1, 2, 3, 4, 5])
  assert table_report._detection_cell(many, 0).startswith("flags 6 classes incl. the target")
  assert table_report._detection_cell(many, 9).startswith("flags 6 classes not the target")
  assert "| wanet | failed: ConfigError: bad |" in md
  paths = table_report.write_report(str(tmp_path), rows, 60.0)
  assert os.path.getsize(paths["png"]) > 1000
  with open(paths["csv"]) as f:
    got = list(csv.DictReader(f))
  assert [(r["attack"], r["defense"]) for r in got] == [(r["attack"], r["defense"]) for r in rows]


def test_bad_table_settings_are_named(tmp_path):
  c = tiny_table(defenses=("strip", "nope"))
  with pytest.raises(ConfigError, match="nope"):
    attack_table.run_table(c, str(tmp_path), progress=False)
  c = tiny_table(attacks=("clean", "clean"))
  with pytest.raises(ConfigError, match="twice"):
    attack_table.run_table(c, str(tmp_path), progress=False)
  c = tiny_table()
  c.defenses.val_fraction = 2.0
  with pytest.raises(ConfigError, match="val_fraction"):
    attack_table.run_table(c, str(tmp_path), progress=False)


def test_table_end_to_end_failed_attack_recorded_and_rerun_reuses(tmp_path):
  c = tiny_table(attacks=("badnets", "blend"), defenses=("spectral", "strip"))
  c.attacks.blend.trigger.blend.alpha = 7.0  # invalid: this attack fails, the others go on
  w = str(tmp_path / "t")
  rows = attack_table.run_table(c, w, progress=False)
  by = {(r["attack"], r["defense"]): r for r in rows}
  assert by[("blend", "none")]["status"] == "failed" and "alpha" in by[("blend", "none")]["error"]
  bd = by[("badnets", "none")]
  assert bd["num_poisoned"] == 40 and bd["num_train"] == 400 and bd["attack_success_rate_after"] > 0.3
  for d in ("spectral", "strip"):
    assert by[("badnets", d)]["status"] == "ok", by[("badnets", d)]
    assert by[("badnets", d)]["attack_success_rate_before"] == bd["attack_success_rate_after"]
  assert by[("badnets", "spectral")]["clean_accuracy_after"] is not None  # the retrained model
  assert by[("badnets", "strip")]["detection_rate"] is not None
  md = open(os.path.join(w, "report", "attacks_x_defenses.md")).read()
  assert "| badnets |" in md and "| blend | failed" in md
  stamp = os.path.join(w, "attacks", "badnets", "defenses", "table_settings.json")
  mtime = os.path.getmtime(stamp)
  c.table.attacks = ("badnets",)
  again = attack_table.run_table(c, w, progress=False)  # finished: re-evaluated, defenses reused
  assert os.path.getmtime(stamp) == mtime
  assert [r["attack_success_rate_after"] for r in again if r["defense"] == "none"] == [bd["attack_success_rate_after"]]


def test_launcher_bad_table_setting_is_one_error_line(tmp_path):
  r = subprocess.run([sys.executable, "launch/sweep.py", "--config=configs/attacks_x_defenses.py:digits",
                      "--config.shared.train.epochs=-3", f"--workdir={tmp_path / 'w'}"],
                     cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert r.returncode != 0
  lines = [l for l in r.stderr.splitlines() + r.stdout.splitlines() if l.startswith("error:")]
  assert len(lines) == 1 and "epochs" in lines[0], r.stderr[-2000:]


@pytest.mark.parametrize("variant,mode_target", [("digits", 0), ("digits_label_consistent", 2), ("digits_clean_label", 0)])
def test_defenses_know_the_target_of_all_to_one_and_clean_label_attacks(variant, mode_target):
  import types
  from backdoor_jax.configs import badnets as badnets_config
  from backdoor_jax.defenses import common
  cfg = badnets_config.get_config(variant)
  fake = types.SimpleNamespace(run=types.SimpleNamespace(config=cfg), is_explanation_run=False)
  assert common.DefenseContext.target.fget(fake) == mode_target
  cfg.poison.mode = "all_to_all"  # no single target class
  assert common.DefenseContext.target.fget(fake) is None
  cfg.poison.mode = "clean_label"
  cfg.poison.rate = 0.0  # nothing poisoned: no target
  assert common.DefenseContext.target.fget(fake) is None


def test_report_only_on_a_table_work_dir_is_one_error_line(tmp_path):
  (tmp_path / "table.json").write_text("{}")
  r = subprocess.run([sys.executable, "launch/sweep.py", f"--workdir={tmp_path}", "--report_only"],
                     cwd=ROOT, capture_output=True, text=True, timeout=120)
  lines = [l for l in r.stderr.splitlines() + r.stdout.splitlines() if l.startswith("error:")]
  assert r.returncode != 0 and len(lines) == 1 and "attacks x defenses table" in lines[0]
