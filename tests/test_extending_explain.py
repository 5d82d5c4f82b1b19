"""docs/extending.md, "A new explanation method": a CAM method defined OUTSIDE the library.

"Grad-CAM with absolute weights" (w_k = spatial mean of |dScore/dA_k|) is defined and
registered here, then used by the library paths that take a method name: the
explanation-backdoor loss (``train.explain_steps`` calls ``saliency.explanation_maps``)
and the explanation report behind ``launch/explain.py`` (``analysis.explain_run``).
"""
import json
import os

import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import numpy as np
import pytest

from backdoor_jax import analysis, models
from backdoor_jax.errors import ConfigError
from backdoor_jax.explain import core, layers, metrics, registry, saliency
from backdoor_jax.explain.gradcam import finish
from tests.helpers import Back, Front, Split, tiny_config


# ---- the worked example of docs/extending.md (kept identical) ----
def gradcam_abs(apply_fn, variables, x, targets, layer):
  """Grad-CAM with channel weights mean_ij |dScore/dA_kij|: (B, H, W) maps in [0, 1]."""
  info = core.check_inputs(apply_fn, variables, x, targets)
  (name,) = layers.resolve_layers(info, layer, "gradcam_abs")
  out = core.activations_and_gradients(apply_fn, variables, x, targets, [name], info.shapes)
  a, g = out["activations"][name], out["gradients"][name]
  w = jnp.mean(jnp.abs(g), axis=(1, 2), keepdims=True)  # (B, 1, 1, K)
  raw = jax.nn.relu(jnp.sum(w * a, axis=-1))           # (B, h, w)
  return finish(raw, x.shape[1:3]).maps                # upsampled, min-max normalised
# ---- end of the worked example ----


@pytest.fixture(scope="module", autouse=True)
def registered():
  registry.register(registry.Method("gradcam_abs", gradcam_abs, takes_layer=True, gradient="layer"))
  yield
  registry.unregister("gradcam_abs")


def _split(dtype=jnp.float32, b=3):
  model = Split()
  v = models.init_variables(model, jax.random.key(0), (1, 8, 8, 3))
  v = jax.tree.map(lambda p: p.astype(dtype), v)
  return model, v, jax.random.normal(jax.random.key(1), (b, 8, 8, 3), dtype)


def test_registered_method_matches_hand_split_reference():
  model, v, x = _split()
  t = jnp.array([0, 2, 1])
  maps_of = jax.jit(saliency.explanation_maps, static_argnums=(0, 1, 5))  # one compilation, not op by op
  maps = maps_of("gradcam_abs", model.apply, v, x, t, "mid")
  # slow reference: run the front, differentiate the back sample by sample
  p = v["params"]
  a = Front().apply({"params": p["front"]}, x)
  g = jax.jit(jax.vmap(jax.grad(lambda a1, c: Back().apply({"params": p["back"]}, a1[None])[0, c])))(a, t)
  raw = np.maximum(np.einsum("bk,bhwk->bhw", np.abs(g).mean(axis=(1, 2)), a), 0)
  up = np.asarray(jax.image.resize(raw, (3, 8, 8), "bilinear"))
  lo, hi = up.min(axis=(1, 2), keepdims=True), up.max(axis=(1, 2), keepdims=True)
  np.testing.assert_allclose(maps, (up - lo) / (hi - lo + 1e-8), rtol=1e-4, atol=1e-5)
  # |w| differs from Grad-CAM's signed weights on this model, so the maps differ too
  assert np.abs(np.asarray(maps) - np.asarray(maps_of("gradcam", model.apply, v, x, t, "mid"))).max() > 1e-3
  assert "gradcam_abs" in saliency.METHODS and "gradcam_abs" in list(registry.NAMES)
  with pytest.raises(ConfigError, match=r"unknown layer 'nope' for gradcam_abs.*mid"):
    saliency.explanation_maps("gradcam_abs", model.apply, v, x, t, "nope")
  with pytest.raises(ConfigError, match=r"unknown explanation method 'gradcam_ab'; allowed: .*gradcam_abs"):
    saliency.explanation_maps("gradcam_ab", model.apply, v, x, t, "mid")
  with pytest.raises(ConfigError, match="already registered"):
    registry.register(registry.Method("gradcam_abs", gradcam_abs))


@pytest.fixture
def x64():
  jax.config.update("jax_enable_x64", True)
  yield
  jax.config.update("jax_enable_x64", False)


def test_registered_method_trains_through_the_explanation_loss(x64):
  """The explanation-backdoor loss with method 'gradcam_abs': its parameter gradient vs central differences."""
  from backdoor_jax.train import explain_steps
  model, v, x = _split(jnp.float64, b=2)
  labels = jnp.array([0, 2])
  mask = jnp.zeros((8, 8), jnp.float64).at[:4, :4].set(1.0)
  spec = explain_steps.ExplainSpec(methods=(("gradcam_abs", 1.0),), layer="mid", attack="targeted", keep="none",
                                   num_triggered=1, inverted=False, ce_weight=1.0, attack_weight=1.0,
                                   keep_weight=0.0, loss_resolution=0, top_k=1, bn_mode="frozen")

  def loss(params):
    terms = explain_steps.explanation_terms(spec, model.apply, {"params": params}, v, x, labels, mask)
    return jnp.sum(terms["attack"])

  flat, unravel = ravel_pytree(v["params"])
  g = ravel_pytree(jax.jit(jax.grad(loss))(v["params"]))[0]
  loss = jax.jit(loss)
  assert float(jnp.abs(g).max()) > 0
  d = jnp.asarray(np.random.default_rng(0).normal(size=flat.size))
  h = 1e-6
  fd = (loss(unravel(flat + h * d)) - loss(unravel(flat - h * d))) / (2 * h)
  np.testing.assert_allclose(float(g @ d), float(fd), rtol=1e-5)


def _train(config, workdir):
  from backdoor_jax.train import recipes
  return recipes.run(config, workdir)


def test_explain_report_uses_registered_method(tmp_path):
  run = str(tmp_path / "run")
  _train(tiny_config(**{"data.max_train": 200, "data.max_test": 60, "train.epochs": 1}), run)
  rec = analysis.explain_run(run, method="gradcam_abs", num_images=1, top_k=1, batch_size=32)
  on_disk = json.load(open(os.path.join(run, "explain", "explain.json")))
  assert on_disk["method"] == "gradcam_abs" and on_disk == json.loads(json.dumps(rec))
  s = on_disk["models"]["run"]["clean"]
  assert s["count"] == 60 and s["layer"] == "conv3" and list(s["by_layer"]) == ["conv1", "conv2", "conv3"]
  for f in on_disk["figures"]:
    assert os.path.getsize(os.path.join(run, "explain", f)) > 0
  # the report scores the method's own maps (energy inside a box, recomputed directly), also for a
  # method that takes no layer
  from backdoor_jax.train import restore, steps
  r = restore.load_run(run)
  images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3)), jnp.uint8)
  x = steps.preprocess(None, images, r.input_spec)
  pred = jnp.argmax(r.model.apply(r.variables, x, train=False), -1)
  box = jnp.zeros((32, 32), bool).at[2:10, 2:10].set(True)
  for method, key, maps in (("gradcam_abs", "conv3", gradcam_abs(r.model.apply, r.variables, x, pred, "conv3")),
                            ("vbp", analysis.NO_LAYER, saliency.explanation_maps("vbp", r.model.apply, r.variables,
                                                                                 x, pred, None))):
    out = analysis.make_scorer(r.model.apply, r.input_spec, [key], 0.5, method)(r.variables, images, box)
    np.testing.assert_allclose(out["layers"][key]["energy"], metrics.energy_in_region(maps, box), rtol=1e-5,
                               atol=1e-6)
  with pytest.raises(ConfigError, match="'vbp' takes no layer"):
    analysis.explain_run(run, method="vbp", layer="conv3")
