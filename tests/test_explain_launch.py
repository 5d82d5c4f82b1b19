"""Grad-CAM report of a trained run (report.explain_run and launch/explain.py) on tiny digits runs."""
import json
import os
import subprocess
import sys

import matplotlib.image
import pytest

from backdoor_jax.errors import ConfigError
from backdoor_jax import analysis as report
from backdoor_jax.train.recipes import badnets
from tests.helpers import REPO, tiny_config

# The full digits training split (1437 images) for 3 epochs: ~10 s, clean accuracy ~0.8
# and ASR > 0.95 over seeds 0-2. (The default tiny config's 400 images / 2 epochs give
# ASR 0.5-0.9, too weak a backdoor to test the explanation effect on.)
BACKDOOR = {"data.max_train": 0, "train.epochs": 3}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("explain_runs")
  out = {}
  for name, overrides in (("bd", BACKDOOR), ("clean", {**BACKDOOR, "poison.rate": 0.0})):
    out[name] = str(root / name)
    out[name + "_results"] = badnets.train(tiny_config(**overrides), out[name])
  return out


def _sets(rec):
  for role, m in rec["models"].items():
    for name in ("clean", "triggered"):
      yield role, name, m[name]


def _check_unit_interval(rec):
  for role, name, s in _sets(rec):
    values = [s["accuracy"], s["energy_in_trigger"], s["energy_in_trigger_median"], s["pointing_game"],
              *s["iou"].values()] + ([s["attack_success_rate"]] if name == "triggered" else [])
    for scores in s["by_layer"].values():
      values += list(scores.values())
    for v in values:
      assert isinstance(v, float) and 0.0 <= v <= 1.0, (role, name, s)


def test_report_files_scores_and_trigger_effect(runs):
  bd, bd_res = runs["bd"], runs["bd_results"]
  assert bd_res["attack_success_rate"] > 0.9, bd_res  # a real backdoor to explain
  rec = report.explain_run(bd, reference=runs["clean"], num_images=3, top_k=4)
  out = os.path.join(bd, "explain")
  for f in report.FILES:
    assert os.path.getsize(os.path.join(out, f)) > 0, f
  for f in report.FILES[:3]:
    h, w = matplotlib.image.imread(os.path.join(out, f)).shape[:2]
    assert h > 200 and w > 200, f
  on_disk = json.load(open(os.path.join(out, "explain.json")))
  assert on_disk["models"].keys() == {"run", "reference"}
  assert on_disk == json.loads(json.dumps(rec))
  _check_unit_interval(on_disk)
  for role, name, s in _sets(on_disk):
    assert s["count"] == (bd_res["num_test"] if name == "clean" else bd_res["num_attack_test"]), (role, name)
    assert s["layer"] == "conv3"  # the deepest spatial layer of the tiny CNN
    assert list(s["by_layer"]) == ["conv1", "conv2", "conv3"]
    assert s["by_layer"]["conv3"]["energy_in_trigger"] == s["energy_in_trigger"]
    assert set(s["iou"]) == {"mean", "median", "std", "gt_05"}
    assert s["thresholds"]["iou_map"] == 0.5
  assert on_disk["region"]["pixels"] == 9  # the 3x3 trigger
  run, ref = on_disk["models"]["run"], on_disk["models"]["reference"]
  # the scores' accuracy / ASR agree with the training run's own evaluation
  assert run["clean"]["accuracy"] == pytest.approx(bd_res["clean_accuracy"], abs=1e-6)
  assert run["triggered"]["attack_success_rate"] == pytest.approx(bd_res["attack_success_rate"], abs=1e-6)
  assert ref["triggered"]["attack_success_rate"] < 0.2
  # The BadNets effect: with the trigger, the backdoored model's Grad-CAM moves onto it
  # (observed ~0.06 vs ~0.005; the trigger is 0.9% of the image) -- and a clean model's does not.
  e_clean, e_trig = run["clean"]["energy_in_trigger"], run["triggered"]["energy_in_trigger"]
  assert e_trig > 3 * e_clean, run
  assert e_trig > 3 * ref["triggered"]["energy_in_trigger"], (run, ref)


def _explain(*flags):
  cmd = [sys.executable, os.path.join(REPO, "launch", "explain.py"), *flags]
  return subprocess.run(cmd, cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True,
                        timeout=600)


def test_launcher(runs, tmp_path):
  bd = runs["bd"]
  r = _explain(f"--workdir={bd}", f"--reference={runs['clean']}", "--max_test=100", "--num_images=2",
               "--layer=conv2", "--feature_layer=conv3")
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
  assert "energy in trigger" in r.stdout and "explain" in r.stdout
  rec = json.load(open(os.path.join(bd, "explain", "explain.json")))
  assert rec["num_test"] == 100 and rec["max_test"] == 100 and rec["feature_layer"] == "conv3"
  assert rec["models"]["run"]["clean"]["count"] == 100
  assert rec["models"]["run"]["layer"] == rec["models"]["reference"]["layer"] == "conv2"
  _check_unit_interval(rec)
  # bad input: one line on stderr, exit code 2, no traceback
  r = _explain(f"--workdir={tmp_path}")
  assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
  assert r.stderr.strip().splitlines()[-1].startswith("error: ") and "train first" in r.stderr
  r = _explain(f"--workdir={bd}", "--layer=conv9")
  assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
  assert "conv9" in r.stderr and "conv1, conv2, conv3" in r.stderr


def test_bad_inputs(runs, tmp_path):
  bd = runs["bd"]
  with pytest.raises(ConfigError, match="no config.json"):
    report.explain_run(str(tmp_path / "nothing"))
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "config.json").write_text(open(os.path.join(bd, "config.json")).read())
  with pytest.raises(ConfigError, match="no checkpoint"):
    report.explain_run(str(tmp_path / "empty"))
  with pytest.raises(ConfigError, match=r"unknown layer 'fc'.*conv1, conv2, conv3"):
    report.explain_run(bd, layer="fc")
  with pytest.raises(ConfigError, match=r"unknown feature layer 'pool'.*conv1, conv2, conv3"):
    report.explain_run(bd, feature_layer="pool")
  with pytest.raises(ConfigError, match="num_images"):
    report.explain_run(bd, num_images=0)
  small = str(tmp_path / "small")
  badnets.train(tiny_config(**{"data.image_size": 16, "data.max_train": 64, "train.epochs": 1}), small)
  with pytest.raises(ConfigError, match=r"takes \(16, 16, 3\) inputs.*\(32, 32, 3\)"):
    report.explain_run(bd, reference=small)
