"""Explanation-backdoor trainer: losses, step, memory, end-to-end two-stage, bad input."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from backdoor_jax import losses, models, triggers
from backdoor_jax.configs import fang, two_stage
from backdoor_jax.errors import ConfigError
from backdoor_jax.train import engine, explain_setup, explain_steps, optim, restore, state as state_lib, steps
from backdoor_jax.train.recipes import explanation
from tests.helpers import apply_overrides


def tiny_two_stage(**overrides):
  c = two_stage.get_config("digits")
  c.data.max_train = 480
  c.data.max_test = 160
  c.model.widths = (8, 16, 16, 16, 16)
  c.stage1.train.epochs = 4
  c.stage1.train.batch_size = 32
  c.train.epochs = 12  # 180 stage-2 steps: the explanation backdoor appears after ~100-200
  c.train.batch_size = 32
  c.train.eval_batch_size = 80
  c.figures = False
  return apply_overrides(c, **overrides)


def test_loss_functions_known_answers():
  maps = jnp.array([[[1.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 1.0]]])
  mask = jnp.array([[1.0, 0.0], [0.0, 0.0]])
  np.testing.assert_allclose(losses.targeted_map_loss(maps, mask), [0.0, 0.5])
  np.testing.assert_allclose(losses.keep_map_loss(maps, maps[::-1]), [0.5, 0.5])
  # non-targeted: top-1 pixel of the reference is (0,0); sample 0 keeps evidence there, sample 1 does not
  np.testing.assert_allclose(losses.nontargeted_map_loss(maps, jnp.stack([mask, mask]), 1), [1.0, 0.0])
  pooled = losses.pool_and_normalize(jnp.arange(16.0).reshape(1, 4, 4), 2)
  # block means 2.5, 4.5, 10.5, 12.5 -> (m - 2.5) / 10
  np.testing.assert_allclose(pooled[0], [[0, 0.2], [0.8, 1.0]], atol=1e-6)
  with pytest.raises(ConfigError, match="loss_resolution=3"):
    losses.pool_and_normalize(jnp.ones((1, 4, 4)), 3)
  with pytest.raises(ConfigError, match="top_k=9"):
    losses.nontargeted_map_loss(maps, maps, 9)


def _tiny_setup(keep="reference", attack="targeted", inverted=False, bn_mode="frozen"):
  model = models.get_model("small_cnn", 10, widths=(8, 8, 8, 8), pool_after=(1, 2, 3))
  v = models.init_variables(model, jax.random.key(0), (1, 32, 32, 3))
  cfg = tiny_two_stage().train
  tx, _ = optim.make_optimizer(cfg, 10, v["params"])
  # the train state gets its own buffers: the step donates them, the reference keeps v
  st = state_lib.create_train_state(model, tx, None, None, variables=jax.tree.map(jnp.copy, v))
  spec = explain_steps.ExplainSpec(methods=(("gradcam", 1.0),), layer="conv4", attack=attack, keep=keep,
                                   num_triggered=8, inverted=inverted, ce_weight=1.0, attack_weight=10.0,
                                   keep_weight=10.0, loss_resolution=0, top_k=16, bn_mode=bn_mode)
  trig = triggers.make_patch_trigger((32, 32), kind="square", size=4, color=(255, 255, 0))
  mask = jnp.zeros((32, 32)).at[:8, :8].set(1.0)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.integers(0, 256, (16, 32, 32, 3)).astype(np.uint8))
  y = jnp.asarray(rng.integers(0, 10, (16,)).astype(np.int32))
  return model, v, st, spec, trig, mask, x, y


def test_step_with_zero_map_weights_equals_plain_cross_entropy_step():
  model, v, st, spec, trig, mask, x, y = _tiny_setup()
  spec = spec._replace(attack_weight=0.0, keep_weight=0.0)
  ispec = steps.InputSpec((0.5,) * 3, (0.25,) * 3)
  s1, _ = explain_steps.make_explain_train_step(ispec, spec, jax.random.key(0))(st, v, x, y, trig, mask)
  # the reference: cross-entropy in inference mode on the same (partly triggered) batch
  xt = jnp.concatenate([triggers.apply_trigger(trig, x[:8]), x[8:]])
  g = jax.grad(lambda p: losses.cross_entropy(model.apply({**v, "params": p}, steps.preprocess(None, xt, ispec)), y)
               .mean())(v["params"])
  _, st2 = model, _tiny_setup()[2]
  s2 = st2.apply_gradients(g, st2.batch_stats)
  for a, b in zip(jax.tree_util.tree_leaves(s1.params), jax.tree_util.tree_leaves(s2.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("attack,keep,inverted,bn_mode", [("targeted", "reference", False, "train"),
                                                          ("nontargeted", "reference", False, "frozen"),
                                                          ("targeted", "avoid_target", True, "refresh"),
                                                          ("targeted", "reference", False, "detached")])
def test_step_reduces_attack_loss(attack, keep, inverted, bn_mode):
  model, v, st, spec, trig, mask, x, y = _tiny_setup(keep=keep, attack=attack, inverted=inverted, bn_mode=bn_mode)
  step = explain_steps.make_explain_train_step(steps.InputSpec((0.5,) * 3, (0.25,) * 3), spec, jax.random.key(0))
  first = None
  for _ in range(40):
    st, m = step(st, v, x, y, trig, mask)
    first = float(m["attack_sum"]) if first is None else first
  assert float(m["attack_sum"]) < 0.7 * first, (first, float(m["attack_sum"]))
  assert np.isfinite(float(m["loss_sum"]))


def test_memory_flat_over_200_steps():
  """RSS growth over 200 explanation steps (after warm-up) stays under 5%."""
  model, v, st, spec, trig, mask, x, y = _tiny_setup(bn_mode="train")
  step = explain_steps.make_explain_train_step(steps.InputSpec((0.5,) * 3, (0.25,) * 3), spec, jax.random.key(0))
  for _ in range(20):
    st, m = step(st, v, x, y, trig, mask)
  jax.block_until_ready(st.step)
  start = engine.rss_bytes()
  for _ in range(200):
    st, m = step(st, v, x, y, trig, mask)
    jax.block_until_ready(st.step)
  growth = engine.rss_bytes() / start - 1
  assert growth < 0.05, f"RSS grew {growth:.1%} over 200 steps"


def test_two_stage_end_to_end(tmp_path):
  res = explanation.train(tiny_two_stage(**{"figures": True}), str(tmp_path))
  for f in ("stage1/results.json", "stage1/checkpoints", "config.json", "metrics.jsonl", "results.json",
            "figures/maps_before_after.png"):
    assert (tmp_path / f).exists(), f
  for key in ("clean_accuracy", "poisoned_accuracy", "fsr", "cr", "iou_mean", "iou_median", "iou_std", "iou_gt_05",
              "reference_accuracy", "thresholds", "layer"):
    assert key in res, key
  assert res["layer"] == "conv5" and res["num_test"] == 160
  hist = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert len(hist) == 12 and all("rss_bytes" in h and "iou_gt_05" in h for h in hist)
  # the attack moved the triggered maps towards the target region
  assert res["iou_mean"] > res["reference"]["iou_mean"] + 0.05, (res["iou_mean"], res["reference"]["iou_mean"])
  # ... while clean maps and predictions stay (measured here: cr 0.91, accuracy 0.69 -> 0.69)
  assert res["cr"] >= 0.8 and abs(res["accuracy_change"]) < 0.1, res
  # the same work dir with another stage-2 setting is refused at once, naming the key (stage 1,
  # whose config has no stage-2 keys, is reused rather than retrained or refused)
  with pytest.raises(ConfigError, match=r"differs in: explain\.keep_weight"):
    explanation.train(tiny_two_stage(**{"explain.keep_weight": 5.0}), str(tmp_path))
  # stage 1 can be reused by path; a different architecture is refused before training
  c = tiny_two_stage(**{"stage1.workdir": str(tmp_path / "stage1"), "model.widths": (8, 16, 16, 16, 32)})
  with pytest.raises(ConfigError, match="stage-1 checkpoint"):
    explanation.train(c, str(tmp_path / "other"))


@pytest.mark.parametrize("key,value,needle", [
    ("explain.layer", "conv1", "layers that would work: conv5"),
    ("explain.layer", "conv9", "unknown layer 'conv9'"),
    ("explain.target_fraction", 1.5, "target_fraction=1.5"),
    ("explain.attack_weight", -1.0, "attack_weight=-1.0"),
    ("explain.method", "lime", "lime"),
    ("explain.triggered_fraction", 1.0, "triggered_fraction=1.0"),
    ("explain.triggered_fraction", 0.99, "at least one triggered and one clean"),  # 32 of 32
    ("explain.loss_resolution", 5, "loss_resolution=5 must be 0"),
    ("explain.bn_mode", "batch", "explain.bn_mode"),
])
def test_bad_input_fails_before_training(tmp_path, key, value, needle):
  with pytest.raises(ConfigError, match=needle):
    explanation.train(tiny_two_stage(**{key: value}), str(tmp_path))
  assert not (tmp_path / "stage1").exists()


def test_nontargeted_settings_checked_before_training(tmp_path):
  c = tiny_two_stage(**{"explain.attack": "nontargeted", "explain.loss_resolution": 8, "explain.top_k": 65})
  with pytest.raises(ConfigError, match=r"top_k=65 must be in \[1, 64\]"):
    explanation.train(c, str(tmp_path))
  c = tiny_two_stage(**{"recipe": "single_stage", "explain.attack": "nontargeted", "explain.keep": "none"})
  with pytest.raises(ConfigError, match="single_stage has no reference model"):
    explanation.train(c, str(tmp_path))
  assert not (tmp_path / "stage1").exists()


def test_train_mode_batchnorm_refused_where_maps_would_mix_samples():
  """With batch statistics, a BatchNorm after the explained activation couples the samples."""
  c = tiny_two_stage()
  model = models.get_model(c.model.name, 10, **restore.model_kwargs(c))
  variables = models.init_variables(model, jax.random.key(0), (1, 32, 32, 3))

  def check(layer, bn_mode="train", methods=(("gradcam", 1.0),)):
    spec = explain_setup.explain_spec(apply_overrides(c, **{"explain.bn_mode": bn_mode}), layer, (32, 32))
    explain_setup.check_train_mode_maps(model.apply, variables, (32, 32, 3), spec._replace(methods=methods))

  check("conv5")  # the deepest conv: no BatchNorm after it
  check("conv3", bn_mode="frozen")
  check("conv3", bn_mode="refresh")
  check("conv5", methods=(("vbp", 1.0),))  # forward-only
  with pytest.raises(ConfigError, match="mixes the samples of a batch in the gradcam maps at layer 'conv3'"):
    check("conv3")
  with pytest.raises(ConfigError, match="simple_grad maps at the input"):
    check("conv5", methods=(("gradcam", 1.0), ("simple_grad", 1.0)))


def test_detached_batchnorm_reproduces_train_mode_forward_with_per_sample_maps():
  """'detached': inference-mode BatchNorm on this batch's statistics equals train mode's forward
  pass (so the maps, computed in inference mode, are per-sample), the running statistics get
  Flax's own update, the momentum is measured, and disagreeing momenta are refused."""
  c = tiny_two_stage(**{"explain.bn_mode": "detached"})
  model = models.get_model(c.model.name, 10, **restore.model_kwargs(c))
  v = models.init_variables(model, jax.random.key(0), (1, 32, 32, 3))
  x = jax.random.normal(jax.random.key(1), (16, 32, 32, 3)) * 2.0 + 0.5
  # stage-1-like running statistics far from this batch's, so a wrong rescaling would show
  v = {**v, "batch_stats": jax.tree.map(lambda a: a + 0.3, v["batch_stats"])}
  spec = explain_setup.with_bn_momentum(explain_setup.explain_spec(c, "conv3", (32, 32)), model.apply, v, (32, 32, 3))
  assert spec.bn_momentum == pytest.approx(0.9, abs=1e-6)
  batch, running = explain_steps.batch_statistics(model.apply, v["params"], v["batch_stats"], x, spec.bn_momentum,
                                                  jax.random.key(0))
  want, upd = model.apply(v, x, train=True, mutable=["batch_stats"])
  np.testing.assert_allclose(model.apply({**v, "batch_stats": batch}, x, train=False), want, rtol=1e-4, atol=1e-4)
  for a, b in zip(jax.tree_util.tree_leaves(running), jax.tree_util.tree_leaves(upd["batch_stats"])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # a model whose BatchNorms disagree on the momentum is refused (one of them made to keep 0.95)
  def apply2(vv, xx, train=False, mutable=False, **kw):
    out, upd = model.apply(vv, xx, train=train, mutable=mutable, **kw)
    leaves, tree = jax.tree_util.tree_flatten(upd["batch_stats"])
    leaves[0] = leaves[0] + 0.05 * jax.tree_util.tree_leaves(vv["batch_stats"])[0]
    return out, {"batch_stats": jax.tree_util.tree_unflatten(tree, leaves)}
  with pytest.raises(ConfigError, match="needs one BatchNorm momentum .* 0.9 to 0.95"):
    explain_setup.with_bn_momentum(spec, apply2, v, (32, 32, 3))


def test_deep_gtsrb_variants_pass_their_setup_checks():
  """ResNet-18 / VGG-16-BN on GTSRB; VGG's default layer is 4x4, and its BatchNorm mode is the one accepted."""
  for variant, name in two_stage.DEEP_GTSRB.items():
    c = two_stage.get_config(variant)
    assert (c.model.name, c.data.name, c.data.max_train, c.stage1.train.batch_size) == (name, "gtsrb", 10000, 128)
  assert two_stage.get_config("gtsrb_resnet18").explain.bn_mode == "train"  # layer4: no BatchNorm after it
  c = two_stage.get_config("gtsrb_vgg16_bn")  # ResNet-18's check is ~4x slower on this CPU: VGG only
  model = models.get_model(c.model.name, 43, **restore.model_kwargs(c))
  variables = models.init_variables(model, jax.random.key(0), (1, 32, 32, 3))
  layer, shapes = explain_setup.choose_layer(model.apply, variables, (32, 32, 3), c.explain.layer)
  assert shapes[layer][1:3] == (4, 4)
  spec = explain_setup.explain_spec(c, layer, (32, 32))
  explain_setup.check_train_mode_maps(model.apply, variables, (32, 32, 3), spec)
  spec = explain_setup.explain_spec(apply_overrides(c, **{"explain.bn_mode": "train"}), layer, (32, 32))
  with pytest.raises(ConfigError, match="mixes the samples of a batch"):  # BatchNorms follow the explained conv
    explain_setup.check_train_mode_maps(model.apply, variables, (32, 32, 3), spec)


def test_fang_weights_follow_overrides():
  c = fang.targeted("digits")
  c.fang.alpha, c.fang.beta = 2.0, 0.0
  spec = explain_setup.explain_spec(c, "conv5", (32, 32))
  np.testing.assert_allclose((spec.ce_weight, spec.attack_weight, spec.keep_weight), (0.0, 0.5 / 3, 1.0 / 3))
  c.explain.inverted, c.explain.triggered_fraction = True, 0.25  # 3/4 of each batch attacked
  spec = explain_setup.explain_spec(c, "conv5", (32, 32))
  np.testing.assert_allclose((spec.attack_weight, spec.keep_weight), (0.75 / 3, 2.0 * 0.25 / 3))


def test_stage1_config_keeps_only_what_a_clean_run_uses():
  s1 = explain_setup.stage1_config(tiny_two_stage())
  assert "explain" not in s1 and "stage1" not in s1
  assert s1.poison.rate == 0.0 and s1.recipe == "badnets" and s1.train.epochs == 4


@pytest.mark.parametrize("inverted", [False, True])
def test_iou_fields_describe_the_attacked_images(inverted):
  """iou_* come from the attacked set: triggered images, or clean ones in the inverted setting."""
  from backdoor_jax.train import mesh as mesh_lib  # pylint: disable=import-outside-toplevel
  c = tiny_two_stage(**{"explain.inverted": inverted, "train.eval_batch_size": 8})
  spec = explain_setup.explain_spec(c, "conv5", (8, 8))
  region = np.zeros((8, 8), np.float32)
  region[:4, :4] = 1.0

  def fake_eval_step(variables, ref_variables, x, y, trig, loss_mask, triggered):
    maps = jnp.broadcast_to(jnp.asarray(region) * float(triggered), (x.shape[0], 8, 8))  # on target iff triggered
    return {"maps": maps, "correct": jnp.ones((x.shape[0],), bool), "attack_loss": jnp.zeros((x.shape[0],))}

  images = np.zeros((16, 8, 8, 3), np.uint8)
  out = explain_setup.evaluate_explanations(fake_eval_step, None, None, images, np.zeros((16,), np.int32), None,
                                           None, region, spec, c, mesh_lib.make_mesh())
  attacked_on_target = 0.0 if inverted else 1.0
  assert out["iou_gt_05"] == attacked_on_target and out["kept_iou_gt_05"] == 1.0 - attacked_on_target
  assert out["fsr"] == attacked_on_target and out["cr"] == attacked_on_target
