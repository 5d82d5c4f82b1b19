"""Grad-CAM: against a model split by hand, per-sample scores, all layers, FD gradients."""
import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import numpy as np
import pytest

from backdoor_jax import explain, models
from backdoor_jax.errors import ConfigError
from tests.helpers import Back, Front, Split


def _setup(dtype=jnp.float32, b=3, hw=8):
  model = Split()
  x = jax.random.normal(jax.random.key(1), (b, hw, hw, 3), dtype)
  v = models.init_variables(model, jax.random.key(0), (1, hw, hw, 3))
  v = jax.tree.map(lambda p: p.astype(dtype), v)
  return model, v, x


def _reference_raw(model, v, x, targets):
  """Slow reference: run the front, then differentiate the back per sample."""
  p = v["params"]
  a = Front().apply({"params": p["front"]}, x)
  def score(a1, t):
    return Back().apply({"params": p["back"]}, a1[None])[0, t]
  g = jax.vmap(jax.grad(score))(a, targets)
  w = g.mean(axis=(1, 2))
  return np.maximum(np.einsum("bk,bhwk->bhw", w, a), 0)


def test_matches_hand_split_reference():
  model, v, x = _setup()
  t = jnp.array([0, 2, 1])
  out = explain.gradcam(model.apply, v, x, t, "mid")["mid"]
  np.testing.assert_allclose(out.raw, _reference_raw(model, v, x, t), rtol=1e-5, atol=1e-6)
  assert out.maps.shape == (3, 8, 8)
  assert float(out.maps.min()) >= 0 and float(out.maps.max()) <= 1
  # None -> the predicted class of each sample
  pred = jnp.argmax(model.apply(v, x), -1)
  np.testing.assert_allclose(explain.gradcam(model.apply, v, x, None, "mid")["mid"].raw,
                             _reference_raw(model, v, x, pred), rtol=1e-5, atol=1e-6)


def test_scores_are_per_sample():
  model, v, x = _setup()
  t = jnp.array([1, 1, 2])
  batch = explain.gradcam(model.apply, v, x, t, "mid")["mid"].raw
  for i in range(3):
    one = explain.gradcam(model.apply, v, x[i:i + 1], t[i:i + 1], "mid")["mid"].raw
    np.testing.assert_allclose(batch[i:i + 1], one, rtol=1e-5, atol=1e-6)


def test_all_layers_in_one_pass_equals_one_at_a_time():
  model = models.get_model("small_cnn", 5, widths=(4, 6, 8), pool_after=(1, 2))
  v = models.init_variables(model, jax.random.key(0), (1, 16, 16, 3))
  x = jax.random.normal(jax.random.key(2), (2, 16, 16, 3))
  every = explain.gradcam(model.apply, v, x, jnp.array([0, 3]), "all")
  assert list(every) == ["conv1", "conv2", "conv3"]
  assert every["conv1"].raw.shape == (2, 16, 16) and every["conv3"].raw.shape == (2, 4, 4)
  for name, res in every.items():
    one = explain.gradcam(model.apply, v, x, jnp.array([0, 3]), name)[name]
    np.testing.assert_allclose(res.maps, one.maps, rtol=1e-5, atol=1e-6)


def test_normalize_and_upsample_known_answers():
  m = jnp.array([[[1.0, 3.0], [5.0, 9.0]]])
  np.testing.assert_allclose(explain.normalize_maps(m, eps=0.0), [[[0, 0.25], [0.5, 1.0]]])
  assert float(jnp.abs(explain.normalize_maps(jnp.ones((1, 4, 4)))).max()) == 0.0  # flat map -> 0, no NaN
  up = explain.upsample(jnp.array([[[0.0, 4.0], [8.0, 12.0]]]), (4, 4))
  # half-pixel centres: output col centres map to -0.25, 0.25, 0.75, 1.25 in source coords (edge clamped)
  np.testing.assert_allclose(up[0, 0], [0.0, 1.0, 3.0, 4.0], atol=1e-6)
  np.testing.assert_allclose(up[0, :, 0], [0.0, 2.0, 6.0, 8.0], atol=1e-6)


def test_jit_and_vmap():
  model, v, x = _setup()
  t = jnp.array([0, 1, 2])
  f = lambda v, x, t: explain.gradcam_maps(model.apply, v, x, t, "mid")
  np.testing.assert_allclose(jax.jit(f)(v, x, t), f(v, x, t), rtol=1e-5, atol=1e-6)
  # vmap over a stack of two parameter sets (two models explained at once)
  v2 = models.init_variables(model, jax.random.key(7), (1, 8, 8, 3))
  stacked = jax.tree.map(lambda a, b: jnp.stack([a, b]), v, v2)
  both = jax.vmap(f, in_axes=(0, None, None))(stacked, x, t)
  np.testing.assert_allclose(both[1], f(v2, x, t), rtol=1e-5, atol=1e-6)


@pytest.fixture
def x64():
  jax.config.update("jax_enable_x64", True)
  yield
  jax.config.update("jax_enable_x64", False)


def test_second_order_gradient_matches_finite_differences(x64):
  """d/dparams MSE(Grad-CAM map, mask) (a grad of a grad) vs central differences, float64."""
  model, v, x = _setup(jnp.float64, b=2)
  t = jnp.array([0, 2])
  mask = jnp.zeros((2, 8, 8), jnp.float64).at[:, :4, :4].set(1.0)

  def loss(params):
    maps = explain.gradcam_maps(model.apply, {"params": params}, x, t, "mid", eps=1e-6)
    return jnp.mean((maps - mask) ** 2)

  params = v["params"]
  g = jax.grad(loss)(params)
  flat, unravel = ravel_pytree(params)
  gflat = ravel_pytree(g)[0]
  assert float(jnp.abs(gflat).max()) > 0
  rng = np.random.default_rng(0)
  idx = rng.choice(flat.size, size=12, replace=False)
  h = 1e-6
  for i in idx:
    e = jnp.zeros_like(flat).at[i].set(h)
    fd = (loss(unravel(flat + e)) - loss(unravel(flat - e))) / (2 * h)
    np.testing.assert_allclose(float(gflat[i]), float(fd), rtol=1e-4, atol=1e-9)
  # A random direction too (covers all parameters at once).
  d = jnp.asarray(rng.normal(size=flat.size))
  fd = (loss(unravel(flat + h * d)) - loss(unravel(flat - h * d))) / (2 * h)
  np.testing.assert_allclose(float(gflat @ d), float(fd), rtol=1e-5)


def test_bad_input_errors():
  model, v, x = _setup()
  with pytest.raises(ConfigError, match=r"unknown layer 'layer9'.*mid"):
    explain.gradcam(model.apply, v, x, None, "layer9")
  with pytest.raises(ConfigError, match="out of range"):
    explain.gradcam(model.apply, v, x, jnp.array([0, 1, 3]), "mid")
  with pytest.raises(ConfigError, match="uint8"):
    explain.gradcam(model.apply, v, (x * 0).astype(jnp.uint8), None, "mid")
  with pytest.raises(ConfigError, match="shape"):
    explain.gradcam(model.apply, v, x[0], None, "mid")
