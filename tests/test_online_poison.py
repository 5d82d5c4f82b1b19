"""Per-batch poisoning (poison.resample='batch', train/online_poison.py) and that 'fixed' is unchanged."""
from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest

from backdoor_jax import config_checks, experiment, poison, triggers
from backdoor_jax.errors import ConfigError
from backdoor_jax.train import feed, online_poison
from backdoor_jax.train import mesh as mesh_lib
from backdoor_jax.train.recipes import badnets
from backdoor_jax.triggers.base import apply_trigger
from tests.helpers import tiny_config

POISONED, CROSS, CLEAN = online_poison.POISONED, online_poison.CROSS, online_poison.CLEAN


def _batch(b=32, hw=8, num_classes=10, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.integers(0, 256, (b, hw, hw, 3), dtype=np.uint8),
          rng.integers(0, num_classes, (b,)).astype(np.int32))


def _wanet(hw=8):
  return triggers.make_wanet_trigger((hw, hw), jax.random.key(3), k=4, s=1.0)


def _run(images, labels, trigger, spec, seed=1):
  out = online_poison.poison_batch(jax.random.key(seed), images, labels, trigger, spec)
  return tuple(np.asarray(a) for a in out)


@pytest.mark.parametrize("mode", ["all_to_one", "all_to_all"])
def test_poisons_exactly_round_rate_b_with_the_exact_trigger_and_label(mode):
  x, y = _batch()
  trig = _wanet()
  spec = online_poison.BatchPoisonSpec.make(32, rate=0.1, cross_ratio=2.0, mode=mode, target=4, num_classes=10)
  assert (spec.num_poison, spec.num_cross) == (3, 6)  # round(3.2), round(2 * 3)
  xo, yo, kind = _run(x, y, trig, spec)
  p, cr, cl = kind == POISONED, kind == CROSS, kind == CLEAN
  assert p.sum() == 3 and cr.sum() == 6
  np.testing.assert_array_equal(xo[p], np.asarray(apply_trigger(trig, x[p])))  # exact trigger output
  np.testing.assert_array_equal(yo[p], 4 if mode == "all_to_one" else (y[p] + 1) % 10)
  if mode == "all_to_one":
    assert (y[p] != 4).all()  # the target class is never poisoned
  np.testing.assert_array_equal(yo[cr], y[cr])  # cross images keep their true label
  assert all((xo[i] != x[i]).any() and (xo[i] != np.asarray(apply_trigger(trig, x[i]))).any()
             for i in np.flatnonzero(cr))  # warped, but not with the exact trigger field
  np.testing.assert_array_equal(xo[cl], x[cl])
  np.testing.assert_array_equal(yo[cl], y[cl])


def test_patch_trigger_has_no_cross_and_few_eligible_images_are_all_poisoned():
  x, y = _batch(b=20)
  y[:] = 2
  y[[3, 11]] = 5  # only two images are not of the target class
  trig = triggers.make_patch_trigger((8, 8), size=2.0, color=(255, 0, 0))
  spec = online_poison.BatchPoisonSpec.make(20, rate=0.25, cross_ratio=0.0, mode="all_to_one", target=2,
                                            num_classes=10)
  xo, yo, kind = _run(x, y, trig, spec)
  np.testing.assert_array_equal(np.flatnonzero(kind == POISONED), [3, 11])
  assert not (kind == CROSS).any() and (yo == 2).all()
  np.testing.assert_array_equal(xo[[3, 11], -2:, -2:], np.broadcast_to([255, 0, 0], (2, 2, 2, 3)))


def test_bad_values_raise_config_errors_naming_them():
  c = tiny_config()
  c.poison.resample = "sometimes"
  with pytest.raises(ConfigError, match="poison.resample='sometimes'"):
    config_checks.check_config(c)
  for key, value, needle in (("poison.mode", "clean_label", "clean_label"), ("poison.count", 5, "poison.count=5"),
                             ("data.stream", True, "data.stream"), ("recipe", "two_stage", "two_stage")):
    c = tiny_config()
    c.poison.resample = "batch"
    node, leaf = (c, key) if "." not in key else (c[key.split(".")[0]], key.split(".")[1])
    node[leaf] = value
    with pytest.raises(ConfigError, match=needle):
      config_checks.check_config(c)
  c = tiny_config()
  c.poison.resample = "batch"
  with pytest.raises(ConfigError, match="resample='batch'"):
    experiment.build_experiment(c)  # tools that need a poisoned training set (defenses, ensembles)
  with pytest.raises(ConfigError, match="at most 32"):
    online_poison.BatchPoisonSpec.make(32, rate=0.5, cross_ratio=2.0, mode="all_to_all", target=0, num_classes=10)


def test_fixed_mode_is_the_unchanged_poisoned_set():
  c = tiny_config(**{"trigger.kind": "wanet", "data.max_train": 200})
  exp = experiment.build_experiment(c)
  c2 = tiny_config(**{"trigger.kind": "wanet", "data.max_train": 200})
  c2.poison.resample = "fixed"
  exp2 = experiment.build_experiment(c2, online_poison=True)
  ds = exp.dataset
  x, y, is_p = poison.poison_train_set(experiment.run_keys(c.seed)["poison"], ds.train_images, ds.train_labels,
                                       exp.trigger, rate=c.poison.rate, target=c.poison.target, mode=c.poison.mode,
                                       num_classes=ds.num_classes, cross_ratio=2.0)
  for e in (exp, exp2):
    np.testing.assert_array_equal(e.train_images, x)
    np.testing.assert_array_equal(e.train_labels, y)
    np.testing.assert_array_equal(e.is_poisoned, is_p)
  assert is_p.sum() == 20 and (x != ds.train_images).any(axis=(1, 2, 3)).sum() == 60  # 20 poisoned + 40 cross


def _online_feed(c):
  exp = experiment.build_experiment(c, online_poison=True)
  mesh = mesh_lib.make_mesh()
  base = feed.ArrayFeed(feed.process_data(exp.train_images, exp.train_labels), mesh, c.train.batch_size, c.seed)
  key = jax.random.fold_in(experiment.run_keys(c.seed)["poison"], 4)
  return exp, online_poison.online_feed(base, exp.trigger, c, exp.dataset.num_classes, key,
                                        triggers.cross_ratio_from_config(c.trigger))


def test_batch_mode_is_deterministic_and_redraws_every_step_and_epoch():
  c = tiny_config(**{"trigger.kind": "wanet", "poison.resample": "batch"})
  exp, f = _online_feed(c)
  assert not exp.is_poisoned.any()
  np.testing.assert_array_equal(exp.train_images, exp.dataset.train_images)  # the stored set stays clean
  assert f.per_epoch_counts() == {"poisoned_per_epoch": 12 * 3, "cross_per_epoch": 12 * 6}  # 400 // 32 steps

  def poisoned_rows(feed_, epoch):
    rows = []
    for item in list(feed_.items(epoch))[:4]:
      _, _, kind = feed_.make_with_kind(item)
      rows.append(set(item[2][np.asarray(kind) == POISONED].tolist()))
    return rows

  e0, e1 = poisoned_rows(f, 0), poisoned_rows(f, 1)
  assert all(len(r) == 3 for r in e0 + e1)
  assert set.union(*e0) != set.union(*e1)
  # A fresh feed (what a resumed process builds) gives the same batches, byte for byte.
  _, f2 = _online_feed(tiny_config(**{"trigger.kind": "wanet", "poison.resample": "batch"}))
  for item, item2 in zip(list(f.items(1))[:3], list(f2.items(1))[:3]):
    for a, b in zip(f.make_with_kind(item), f2.make_with_kind(item2)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # The same positions in two steps are not poisoned the same way (fresh draws per step).
  kinds = [np.asarray(f.make_with_kind(item)[2]) for item in list(f.items(0))[:4]]
  assert len({k.tobytes() for k in kinds}) > 1


def test_batch_mode_trains_resumes_identically_and_records_the_mode(tmp_path):
  over = {"trigger.kind": "square", "poison.resample": "batch", "train.schedule": "constant",
          "data.max_train": 128, "data.max_test": 32, "train.eval_batch_size": 32}
  ref = badnets.train(tiny_config(**over), str(tmp_path / "ref"))
  assert ref["poison_resample"] == "batch" and ref["num_poisoned"] == 0
  assert ref["poisoned_per_epoch"] == 4 * 3 and ref["cross_per_epoch"] == 0  # 128 // 32 steps, round(0.1 * 32)
  # A run stopped after epoch 1 (its epoch-2 checkpoint and reports removed) resumes to the same end.
  cut = tmp_path / "cut"
  shutil.copytree(tmp_path / "ref", cut)
  shutil.rmtree(cut / "checkpoints" / "2")
  (cut / "results.json").unlink()
  (cut / "metrics.jsonl").write_text((cut / "metrics.jsonl").read_text().splitlines()[0] + "\n")
  resumed = badnets.train(tiny_config(**over), str(cut))
  ma = [json.loads(l) for l in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
  mb = [json.loads(l) for l in (cut / "metrics.jsonl").read_text().splitlines()]
  assert len(mb) == 2 and [m["train_loss"] for m in ma] == [m["train_loss"] for m in mb]
  assert ref["attack_success_rate"] == resumed["attack_success_rate"]
  assert ref["clean_accuracy"] == resumed["clean_accuracy"]
