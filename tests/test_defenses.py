"""Defenses (backdoor_jax.defenses, launch/defend.py) on synthetic data and a tiny digits run."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from backdoor_jax import defenses
from backdoor_jax.defenses import activation_clustering, common, neural_cleanse, spectral, tv_denoise
from backdoor_jax.errors import ConfigError
from backdoor_jax.train.recipes import badnets
from tests.helpers import REPO, apply_overrides, tiny_config


def _fast_config(**overrides):
  c = defenses.default_config()
  c.val_size = 60
  c.max_test = 100
  c.neural_cleanse.epochs = 2
  c.neural_cleanse.steps_per_epoch = 2
  c.neural_cleanse.batch_size = 8
  c.spectral.retrain_epochs = 1
  c.fine_pruning.step = 0.5
  c.fine_pruning.max_fraction = 0.5
  c.fine_pruning.finetune_epochs = 1
  c.strip.num_overlays = 4
  c.strip.max_inputs = 40
  c.strip.batch_size = 16
  c.tv_denoise.weights = (0.1,)
  c.tv_denoise.iterations = 10
  return apply_overrides(c, **overrides)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("defend") / "bd")
  badnets.train(tiny_config(), d)
  return d


@pytest.fixture(scope="module")
def ctx(run_dir):
  return common.load_context(run_dir, _fast_config())


def test_anomaly_index_median_absolute_deviation():
  l1 = np.array([10.0, 11.0, 9.0, 10.5, 9.5, 2.0])
  idx = neural_cleanse.anomaly_index(l1)
  med = np.median(l1)
  mad = 1.4826 * np.median(np.abs(l1 - med))
  np.testing.assert_allclose(idx, (med - l1) / mad)
  assert np.argmax(idx) == 5 and idx[5] > 2 and (idx[:5] < 2).all()


def test_validation_split_seeded_and_bounded():
  a = common.validation_split(100, fraction=0.1, size=0, seed=3)
  assert len(a) == 10 and (a == common.validation_split(100, fraction=0.1, size=0, seed=3)).all()
  assert len(set(a)) == 10 and a.max() < 100
  with pytest.raises(ConfigError, match="does not fit the 100 training samples"):
    common.validation_split(100, fraction=0.1, size=500, seed=0)
  with pytest.raises(ConfigError, match="val_fraction=1.5"):
    common.validation_split(100, fraction=1.5, size=0, seed=0)


def test_spectral_scores_find_planted_direction():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(200, 16))
  x[:15] += 6.0 * np.eye(16)[3]          # 15 "poisoned" rows shifted along one axis
  s = spectral.scores(x)
  assert set(np.argsort(-s)[:15]) == set(range(15))


def test_activation_clustering_flags_small_cluster_only():
  rng = np.random.default_rng(0)
  cfg = _fast_config().activation_clustering
  poisoned = rng.normal(size=(20, 32)) + 8.0
  clean = rng.normal(size=(180, 32))
  r = activation_clustering.cluster_class(np.concatenate([poisoned, clean]), cfg, 0)
  truth = np.arange(200) < 20
  rates = activation_clustering.detection_rates(r["flag"], truth)
  assert r["flagged"] and rates["detection_rate"] == 1.0 and rates["false_positive_rate"] == 0.0
  r = activation_clustering.cluster_class(rng.normal(size=(200, 32)), cfg, 0)  # one blob: halves, not flagged
  assert not r["flagged"] and r["flag"].sum() == 0


def test_tv_denoise_identity_constant_and_smoothing():
  img = jnp.full((1, 8, 8, 3), 100.0)
  np.testing.assert_allclose(tv_denoise.denoise(img, 0.2), img, atol=1e-3)
  step = np.zeros((1, 16, 16, 3), np.float32)
  step[:, :, 8:] = 200.0
  noisy = step + np.random.default_rng(0).normal(scale=20, size=step.shape).astype(np.float32)
  out = np.asarray(tv_denoise.denoise(jnp.asarray(noisy), 0.1, 100))
  tv = lambda u: np.abs(np.diff(u, axis=1)).sum() + np.abs(np.diff(u, axis=2)).sum()
  assert tv(out) < 0.5 * tv(noisy)
  assert np.abs(out - step).mean() < np.abs(noisy - step).mean()
  np.testing.assert_array_equal(tv_denoise.denoise(jnp.asarray(noisy), 0.0), noisy)


def test_prune_mask_matches_zeroed_channels(ctx):
  layer = common.spatial_layer(ctx, "", "test")
  assert layer == "conv3"  # tiny model: three convs, then the global pool
  x = ctx.test_images[:8]
  plain = common.logits(ctx, ctx.variables, x)
  k = ctx.shapes[layer][-1]
  ones = common.logits(ctx, common.with_prune_mask(ctx.variables, layer, np.ones(k)), x)
  np.testing.assert_allclose(ones, plain, rtol=1e-5, atol=1e-5)
  zero = common.logits(ctx, common.with_prune_mask(ctx.variables, layer, np.zeros(k)), x)
  bias = np.asarray(ctx.variables["params"]["fc"]["bias"])  # pool of an all-zero layer is 0
  np.testing.assert_allclose(zero, np.broadcast_to(bias, zero.shape), atol=1e-5)
  half = np.ones(k)
  half[: k // 2] = 0
  feats = common.features(ctx, common.with_prune_mask(ctx.variables, layer, half), x, layer)
  assert np.abs(feats[..., : k // 2]).max() == 0 and np.abs(feats[..., k // 2:]).max() > 0


def test_neural_cleanse_vmap_equals_class_by_class(ctx):
  cfg = ctx.config.neural_cleanse
  args = (ctx.apply_fn, ctx.variables, ctx.run.input_spec, ctx.val_images, ctx.num_classes, cfg, 0)
  a = neural_cleanse.reverse_triggers(*args, classes=np.array([0, 3]), use_vmap=True)
  b = neural_cleanse.reverse_triggers(*args, classes=np.array([0, 3]), use_vmap=False)
  np.testing.assert_allclose(a["mask"], b["mask"], atol=1e-4)
  np.testing.assert_allclose(a["l1"], b["l1"], rtol=1e-4)
  assert a["mask"].shape == (2, 32, 32) and a["pattern"].shape == (2, 32, 32, 3)
  assert a["mask"].min() >= 0 and a["mask"].max() <= 1 and a["pattern"].max() <= 255


def test_defend_all_writes_reports_and_summary(run_dir):
  summary = defenses.defend_all(run_dir, _fast_config())
  out = os.path.join(run_dir, "defenses")
  assert [r["defense"] for r in summary["rows"]] == list(defenses.NAMES)
  assert not any(str(r.get("verdict", "")).startswith("error") for r in summary["rows"])
  for name, figs in (("neural_cleanse", ("anomaly_index.png", "reversed_triggers.png")),
                     ("activation_clustering", ("clusters.png",)), ("spectral", ("scores.png",)),
                     ("fine_pruning", ("curves.png",)), ("strip", ("entropy.png",)),
                     ("tv_denoise", ("curves.png", "examples.png"))):
    rec = json.load(open(os.path.join(out, name, "report.json")))
    assert rec["defense"] == name and rec["run"]["num_val"] == 60 and rec["run"]["num_test"] == 100
    for f in figs:
      assert os.path.getsize(os.path.join(out, name, f)) > 0, (name, f)
  nc = json.load(open(os.path.join(out, "neural_cleanse", "report.json")))
  assert len(nc["anomaly_index"]) == 10 and nc["true_target"] == 0
  ac = json.load(open(os.path.join(out, "activation_clustering", "report.json")))
  assert ac["num_poisoned"] == 40 and 0 <= ac["detection_rate"] <= 1  # 10% of 400
  fp = json.load(open(os.path.join(out, "fine_pruning", "report.json")))
  assert [r["fraction"] for r in fp["curve"]] == [0.0, 0.5]
  assert fp["chosen_fraction"] in (0.0, 0.5) and 0 <= fp["after_finetuning"]["attack_success_rate"] <= 1
  st = json.load(open(os.path.join(out, "strip", "report.json")))
  assert st["num_clean"] == 40 and 0 <= st["detection_rate"] <= 1
  assert "| neural_cleanse |" in open(os.path.join(out, "summary.md")).read()


def test_bad_input(run_dir, tmp_path):
  with pytest.raises(ConfigError, match="unknown defense 'nope'"):
    defenses.defend_run(run_dir, "nope", _fast_config())
  with pytest.raises(ConfigError, match="no config.json"):
    defenses.defend_run(str(tmp_path), "strip", _fast_config())
  empty = tmp_path / "empty"
  (empty / "checkpoints").mkdir(parents=True)
  (empty / "config.json").write_text(open(os.path.join(run_dir, "config.json")).read())
  with pytest.raises(ConfigError, match="no checkpoint"):
    defenses.defend_run(str(empty), "strip", _fast_config())
  with pytest.raises(ConfigError, match="does not fit the 400 training samples"):
    defenses.defend_run(run_dir, "strip", _fast_config(val_size=5000))
  with pytest.raises(ConfigError, match="layer 'pool' is not a spatial layer"):
    defenses.defend_run(run_dir, "fine_pruning", _fast_config(**{"fine_pruning.layer": "pool"}))
  with pytest.raises(ConfigError, match="layer 'nope' does not exist"):
    defenses.defend_run(run_dir, "spectral", _fast_config(**{"spectral.layer": "nope"}))


def test_model_without_spatial_layer_is_refused(ctx):
  class Flat:  # what spatial_layer sees of a model exposing only (B, D) layers
    layers = ("fc1", "pool")
    shapes = {"fc1": (1, 64), "pool": (1, 32)}
    run = ctx.run
  with pytest.raises(ConfigError, match="needs a spatial"):
    common.spatial_layer(Flat, "", "fine_pruning")


def test_launcher_bad_defense_is_one_line(run_dir):
  p = subprocess.run([sys.executable, os.path.join(REPO, "launch", "defend.py"), f"--workdir={run_dir}",
                      "--defense=nope"], capture_output=True, text=True, cwd=REPO, timeout=300)
  assert p.returncode == 2
  assert "error: unknown defense 'nope'; allowed: neural_cleanse" in p.stderr
