"""The training engine: divergence guard, resume rules, specs that leave the config alone,
and the drift the single engine removed (transfer members, two-stage splits, Fang weights)."""
from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from backdoor_jax import experiment, models
from backdoor_jax.configs import fang
from backdoor_jax.errors import ConfigError
from backdoor_jax.train import engine, explain_setup, init_weights
from backdoor_jax.train import recipes
from backdoor_jax.train.recipes import ensemble
from tests.helpers import apply_overrides, tiny_config


def test_learning_rate_spike_stops_the_run_and_a_saner_rate_resumes(tmp_path):
  # Epoch 3 multiplies the rate by 1e30 (a "step" schedule): the loss becomes NaN there.
  spike = {"train.epochs": 3, "train.schedule": "step", "train.step_epochs": (2,), "train.step_factor": 1e30,
           "data.max_train": 192, "train.log_every": 1}
  with pytest.raises(engine.NonFiniteError, match=r"non-finite .* at epoch 3, step \d+ of 6.*checkpoints/2"):
    recipes.run(tiny_config(**spike), str(tmp_path))
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2"]  # the last good one survives
  assert not (tmp_path / "results.json").exists()
  assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
  # The same work dir with a sane factor resumes from epoch 2 and finishes with finite numbers.
  res = recipes.run(tiny_config(**{**spike, "train.step_factor": 0.1}), str(tmp_path))
  hist = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [h["epoch"] for h in hist] == [1, 2, 3] and np.isfinite(hist[-1]["train_loss"])
  assert 0 <= res["clean_accuracy"] <= 1 and res["epochs"] == 3


def test_checkpoints_without_config_json_are_refused(tmp_path):
  recipes.run(tiny_config(**{"train.epochs": 1}), str(tmp_path))
  os.remove(tmp_path / "config.json")
  with pytest.raises(ConfigError, match="no config.json"):
    recipes.run(tiny_config(**{"train.epochs": 1}), str(tmp_path))


def test_resume_may_change_only_the_resumable_keys():
  spec = json.loads(engine.config_json(tiny_config()))
  os.makedirs("/tmp/_engine_resume", exist_ok=True)
  path = "/tmp/_engine_resume/config.json"
  with open(path, "w") as f:
    json.dump(spec, f)
  engine.check_resumable("/tmp/_engine_resume", engine.config_json(tiny_config(**{"train.lr": 1e-4})), True)
  with pytest.raises(ConfigError, match="poison.rate"):
    engine.check_resumable("/tmp/_engine_resume", engine.config_json(tiny_config(**{"poison.rate": 0.3})), True)


@pytest.mark.parametrize("key,value", [("checkpoint.keep", 0), ("train.epochs", 0), ("train.log_every", 0)])
def test_run_spec_refuses(key, value):
  with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
    engine.RunSpec.from_config(tiny_config(**{key: value}), "/tmp/x")


def test_unknown_recipe_lists_the_registered_ones():
  with pytest.raises(ConfigError, match="unknown recipe 'nope'; allowed: .*badnets.*two_stage"):
    recipes.get("nope")


def test_fang_weights_derived_unless_set_and_the_config_is_not_modified():
  c = fang.targeted("digits")
  before = c.to_json_best_effort(sort_keys=True)
  spec = explain_setup.explain_spec(c, "conv5", (32, 32))
  assert c.to_json_best_effort(sort_keys=True) == before  # derived values are not written back
  ce, attack, keep = explain_setup.fang_weights(c)
  assert (spec.ce_weight, spec.attack_weight, spec.keep_weight) == pytest.approx((ce, attack, keep))
  # a changed alpha changes the derived weights ...
  c2 = apply_overrides(fang.targeted("digits"), **{"fang.alpha": 3.0})
  assert explain_setup.explain_spec(c2, "conv5", (32, 32)).keep_weight > spec.keep_weight
  # ... and an explicit weight wins over the derived one
  c3 = apply_overrides(fang.targeted("digits"), **{"explain.attack_weight": 0.75})
  s3 = explain_setup.explain_spec(c3, "conv5", (32, 32))
  assert s3.attack_weight == 0.75 and s3.ce_weight == pytest.approx(ce)
  with pytest.raises(ConfigError, match="explain.attack_weight=-1"):
    explain_setup.explain_spec(apply_overrides(fang.targeted("digits"),
                                               **{"explain.attack_weight": -1.0}), "conv5", (32, 32))


def test_both_stages_see_the_same_split_with_split_seed(tmp_path, monkeypatch):
  """The explanation recipe's own data and its stage-1 run's data come from the same split seed."""
  from tests.test_explain_train import tiny_two_stage
  from backdoor_jax.train.recipes import explanation
  seen = []
  real = experiment.load_dataset

  class Seen(Exception):
    pass

  def spy(*args, **kwargs):
    ds = real(*args, **kwargs)
    seen.append((kwargs["seed"], ds.train_labels.copy(), ds.test_labels.copy()))
    if len(seen) == 2:  # the recipe's load, then stage 1's: enough, no need to train
      raise Seen
    return ds
  monkeypatch.setattr(experiment, "load_dataset", spy)
  monkeypatch.setattr(explanation, "load_dataset", spy)
  c = tiny_two_stage(**{"seed": 3, "data.split_seed": 11, "data.max_train": 96, "data.max_test": 32,
                        "stage1.train.epochs": 1, "train.epochs": 1, "explain.check_layer": False})
  with pytest.raises(Seen):
    explanation.train(c, str(tmp_path))
  assert len(seen) == 2 and {s[0] for s in seen} == {11}
  np.testing.assert_array_equal(seen[0][1], seen[1][1])
  np.testing.assert_array_equal(seen[0][2], seen[1][2])


def test_transfer_config_as_a_sweep_member_starts_from_the_init_checkpoint(tmp_path):
  c = tiny_config(**{"train.epochs": 1, "train.trainable": "^fc/", "data.max_train": 64})
  exp = experiment.build_experiment(c)
  imported = models.init_variables(exp.model, jax.random.key(123), (1,) + exp.train_images.shape[1:])
  init_weights.save_init_checkpoint(str(tmp_path / "init"), imported, {"arch": "small_cnn", "source": "test"})
  member = apply_overrides(tiny_config(**{"train.epochs": 1, "train.trainable": "^fc/",
                                          "data.max_train": 64}), **{"model.init_checkpoint": str(tmp_path / "init")})
  _, stacked = ensemble.train_ensemble([member], progress=False, return_variables=True)
  params = ensemble.member_variables(stacked, 0)["params"]
  frozen = [k for k in imported["params"] if not k.startswith("fc")]
  assert frozen, list(imported["params"])
  for name in frozen:  # frozen layers end exactly as imported (not as a fresh seed-0 init)
    for a, b in zip(jax.tree_util.tree_leaves(params[name]), jax.tree_util.tree_leaves(imported["params"][name])):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_run_written_with_the_flat_trigger_config_still_loads(tmp_path):
  """config.json of runs made before trigger kinds had sections: restore reads them in the new shape."""
  from backdoor_jax.train import restore
  old = json.loads(engine.config_json(tiny_config()))
  old["trigger"] = {"kind": "wanet", "size": 0.1, "position": "bottom-right", "color": [255, 255, 255], "margin": 0,
                    "seed": -1, "alpha": 0.2, "blend_pattern": "noise", "blend_region": "full", "wanet_k": 4,
                    "wanet_s": 0.75, "wanet_grid_rescale": 1.0, "wanet_cross_ratio": 2.0, "pattern_path": "",
                    "mask_path": "", "filter_name": "nashville", "filter_strength": 1.0, "moire_opacity": 0.5,
                    "moire_spacing": 2.0, "moire_angles": [0.0, 5.0], "moire_perspective": 0.15, "ssba_path": ""}
  (tmp_path / "config.json").write_text(json.dumps(old))
  config = restore.read_run_config(str(tmp_path))
  assert config.trigger.kind == "wanet" and config.trigger.wanet.s == 0.75 and config.trigger.wanet.k == 4
  assert "wanet_s" not in config.trigger and "alpha" not in config.trigger
