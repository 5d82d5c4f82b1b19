"""Defenses against explanation backdoors: BatchNorm re-estimation and the Map Probe detector."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import optax

from backdoor_jax import defenses, models, triggers
from backdoor_jax.defenses import bn_reestimate, map_probe
from backdoor_jax.errors import ConfigError
from backdoor_jax.models.common import expose
from backdoor_jax.models.small_cnn import SmallCNN
from backdoor_jax.train import steps

SPEC = steps.InputSpec(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def _digits(n_train=300, n_test=300):
  """sklearn's 8x8 digits as uint8 RGB (pixel units), split in two."""
  from sklearn.datasets import load_digits
  d = load_digits()
  x = np.repeat((d.images * (255.0 / 16.0)).astype(np.uint8)[..., None], 3, -1)
  perm = np.random.default_rng(0).permutation(len(x))
  x, y = x[perm], d.target[perm].astype(np.int32)
  return x[:n_train], y[:n_train], x[n_train:n_train + n_test], y[n_train:n_train + n_test]


@pytest.fixture(scope="module")
def trained():
  """A tiny SmallCNN trained a few seconds on digits (BatchNorm statistics updated by momentum)."""
  xtr, ytr, xte, yte = _digits()
  model = SmallCNN(num_classes=10, widths=(8, 16), pool_after=(1,))
  v = models.init_variables(model, jax.random.key(0), (1, 8, 8, 3))
  v = {"params": v["params"], "batch_stats": v["batch_stats"]}
  tx = optax.adam(1e-2)

  @jax.jit
  def step(v, opt, x, y):
    def loss(p):
      out, upd = model.apply({**v, "params": p}, steps.preprocess(None, x, SPEC), train=True, mutable=["batch_stats"])
      return steps.cross_entropy(out, y), upd
    (_, upd), g = jax.value_and_grad(loss, has_aux=True)(v["params"])
    u, opt = tx.update(g, opt, v["params"])
    return {"params": optax.apply_updates(v["params"], u), "batch_stats": upd["batch_stats"]}, opt

  opt = tx.init(v["params"])
  rng = np.random.default_rng(1)
  for _ in range(120):
    i = rng.choice(len(ytr), 64, replace=False)
    v, opt = step(v, opt, jnp.asarray(xtr[i]), jnp.asarray(ytr[i]))
  return model, v, (xtr, ytr, xte, yte)


def _accuracy(model, v, x, y):
  out = model.apply(v, steps.preprocess(None, jnp.asarray(x), SPEC), train=False)
  return float(np.mean(np.argmax(np.asarray(out), -1) == y))


def _conv_outputs(model, v, x):
  """BatchNorm inputs (the conv outputs), read independently via flax's capture_intermediates."""
  _, st = model.apply(v, steps.preprocess(None, jnp.asarray(x), SPEC), train=False,
                      capture_intermediates=lambda m, name: isinstance(m, nn.Conv), mutable=["intermediates"])
  return {k: np.asarray(st["intermediates"][k]["conv"]["__call__"][0], np.float64)
          for k in sorted(st["intermediates"]) if k.startswith("block")}


def test_bn_reestimate_known_moments_and_forward_order(trained):
  model, v, (xtr, *_rest) = trained
  assert bn_reestimate.forward_order(model.apply, v, (8, 8, 3)) == [("block1", "bn"), ("block2", "bn")]
  new = bn_reestimate.reestimate(model.apply, v, SPEC, xtr[:200], batch_size=64)  # 200 = 3 full batches + 8 padded
  jax.tree_util.tree_map(np.testing.assert_array_equal, new["params"], v["params"])  # parameters untouched
  # In inference mode with the new statistics, each BatchNorm's input has exactly the stored moments.
  acts = _conv_outputs(model, new, xtr[:200])
  for k, a in acts.items():
    flat = a.reshape(-1, a.shape[-1])
    np.testing.assert_allclose(new["batch_stats"][k]["bn"]["mean"], flat.mean(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(new["batch_stats"][k]["bn"]["var"], flat.var(0), rtol=1e-3, atol=1e-6)
  # the momentum statistics the model trained with are not those
  assert not np.allclose(v["batch_stats"]["block2"]["bn"]["mean"], new["batch_stats"]["block2"]["bn"]["mean"], atol=1e-3)


def test_bn_reestimate_clean_model_within_noise_and_restores_corrupted(trained):
  model, v, (xtr, ytr, xte, yte) = trained
  base = _accuracy(model, v, xte, yte)
  assert base > 0.7
  clean = bn_reestimate.reestimate(model.apply, v, SPEC, xtr[:200], batch_size=64)
  assert abs(_accuracy(model, clean, xte, yte) - base) <= 0.04  # 2 standard errors at 300 test images
  rng = np.random.default_rng(3)
  bad = {"params": v["params"], "batch_stats": jax.tree_util.tree_map(
      lambda a: jnp.asarray(a) * 8.0 + jnp.asarray(rng.normal(size=a.shape) * 3, a.dtype), v["batch_stats"])}
  assert _accuracy(model, bad, xte, yte) < base - 0.3
  fixed = bn_reestimate.reestimate(model.apply, bad, SPEC, xtr[:200], batch_size=64)
  assert abs(_accuracy(model, fixed, xte, yte) - base) <= 0.04
  # sequential re-estimation depends only on the parameters and the data, not on the old statistics
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                         fixed["batch_stats"], clean["batch_stats"])
  batch = bn_reestimate.reestimate(model.apply, bad, SPEC, xtr[:200], mode="batch", batch_size=64)
  assert abs(_accuracy(model, batch, xte, yte) - base) <= 0.06
  with pytest.raises(ConfigError, match="bn_reestimate.mode"):
    bn_reestimate.reestimate(model.apply, v, SPEC, xtr[:10], mode="momentum")


class Planted(nn.Module):
  """A hand-built explanation backdoor: a yellow bottom-right patch lights the top-left cell of 'feat'.

  'feat' is (B, 4, 4, 9): eight channels of a 4x4/4 conv (each cell sees only its own
  pixels) and one extra channel that is ``strength * sigmoid(yellowness of the
  bottom-right 4x4 pixels)`` in the top-left cell only. The extra channel adds the same
  amount to every logit (prediction unchanged) and has Grad-CAM weight 1/16 for every
  class, so the trigger moves the map to the top-left. ``strength=0`` is the clean twin.
  """
  strength: float = 1.0

  @nn.compact
  def __call__(self, x, train=False):
    del train
    h = nn.relu(nn.Conv(8, (4, 4), strides=(4, 4), padding="VALID", name="conv")(x))
    patch = x[:, -4:, -4:, :]
    yellow = jnp.mean(patch[..., 0] + patch[..., 1] - 2 * patch[..., 2], axis=(1, 2))  # 8 for pure yellow
    corner = jnp.zeros((4, 4)).at[0, 0].set(1.0)
    extra = self.strength * 20.0 * nn.sigmoid(4.0 * (yellow - 6.0))[:, None, None] * corner
    feat = expose(self, "feat", jnp.concatenate([h, extra[..., None]], -1))
    pooled = jnp.mean(feat, axis=(1, 2))
    return nn.Dense(3, name="fc")(pooled[:, :8]) + pooled[:, 8:]


def _planted_probe(strength):
  model = Planted(strength)
  v = models.init_variables(model, jax.random.key(0), (1, 16, 16, 3))
  images = np.random.default_rng(0).integers(0, 256, (40, 16, 16, 3)).astype(np.uint8)
  cfg = map_probe.defaults()
  cfg.num_images, cfg.noise_patterns = 12, 1
  return map_probe.detect(model.apply, v, SPEC, images, cfg, "feat", seed=0), cfg


def test_map_probe_finds_planted_explanation_backdoor_not_clean_twin():
  found, cfg = _planted_probe(1.0)
  assert (found["region"], found["pattern"], found["position_name"]) == ("top-left", "yellow", "bottom-right")
  assert found["position"] == [12, 12] and found["hit_rate"] == 1.0 and found["probes"] == 9 * 16
  clean, _ = _planted_probe(0.0)
  assert clean["score"] < cfg.lift_threshold < found["score"]


def test_map_probe_helpers_known_answers():
  m = map_probe.region_masks(("top-right", "center"), (8, 8), 0.25)
  assert m.shape == (2, 8, 8) and m[0, :2, 6:].all() and m[0].sum() == 4 and m[1, 3:5, 3:5].all() and m[1].sum() == 4
  pos = map_probe.grid_positions((10, 10), 4, 4)  # rows / cols 0, 4 and the border-touching 6
  assert pos.tolist() == [[r, c] for r in (0, 4, 6) for c in (0, 4, 6)]
  assert map_probe.nearest_position((6, 0), 4, (10, 10)) == "bottom-left"
  assert map_probe.nearest_position((3, 3), 4, (10, 10)) == "center"
  rates = np.full((1, 2, 2), 0.5)
  lift = map_probe.lifts(rates, np.array([0.25, 0.0]), m[:, None].repeat(1, 1)[:, 0], np.array([[0, 6], [4, 0]]), 2)
  assert lift.tolist() == [[[-1.0, 0.5], [0.25, 0.5]]]  # the patch at (0, 6) covers the top-right region
  names, pats = map_probe.probe_patterns(3, 2, seed=0)
  assert len(names) == 10 and pats.shape == (10, 3, 3, 3) and (pats[names.index("yellow")] == (255, 255, 0)).all()
  with pytest.raises(ConfigError, match="map_probe region"):
    map_probe.region_masks(("middle",), (8, 8), 0.25)
  assert {"bn_reestimate", "map_probe"} <= set(defenses.NAMES)


def test_population_tpr_at_fpr_known_answer():
  from benchmarks import explanation_detector_population as pop
  labels = np.array([0] * 20 + [1] * 4)
  scores = np.concatenate([np.arange(20) / 20.0, [0.97, 0.9, 0.5, 0.96]])
  tpr, thr = pop.tpr_at_fpr(labels, scores, 0.05)  # one negative (0.95) may score above the threshold 0.90
  assert thr == 0.9 and tpr == 0.5
  assert pop.tpr_at_fpr(labels, scores, 0.0) == (0.5, 0.95)
  specs = pop.population_specs(8, 2)
  assert len({(s["trigger"], s["target"]) for s in specs[:8]}) == 8 and all(s["trigger"] != s["target"] for s in specs)
  assert {s["look"] for s in specs[:8]} == {"yellow"}


def test_population_varied_triggers_reach_the_configs():
  """--appearance=varied: each member's trigger kind and colour end up in its training config."""
  import argparse
  from benchmarks import explanation_detector_population as pop
  specs = pop.population_specs(8, 1, "varied")
  looks = [s["look"] for s in specs[:8]]
  assert looks.count("noise") == 2 and len(set(looks)) == 7
  assert sum(s["look"] not in map_probe.COLOURS for s in specs[:8]) >= 4  # outside the probe dictionary
  args = argparse.Namespace(dataset="digits", widths="", stage1_epochs=0, stage2_epochs=0, stage2_batch_size=0)
  for s in specs[:8]:
    c = pop.make_config(s, args)
    assert c.trigger.kind == s["trigger_kind"] and c.trigger.position == s["trigger"]
    assert c.explain.target_corner == s["target"]
    if s["color"]:
      assert tuple(c.trigger.color) == s["color"]
    region = triggers.trigger_region(triggers.trigger_from_config(c.trigger, (32, 32), jax.random.key(s["seed"])))
    assert 0 < region.sum() < 32 * 32 / 4
