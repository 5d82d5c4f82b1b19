"""Grad-CAM++, per-feature-map Grad-CAM, SimpleGrad, VisualBackProp and stimulation.

References are slow and written independently: per-sample loops on a model split by
hand at its exposed layer, numpy transposed convolutions, finite differences.
Compilation dominates the run time on CPU, so the jitted functions under test are built
once (module level, fixed shapes) and shared by the reference, jit-vs-eager and vmap
tests.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from backdoor_jax import explain, models
from backdoor_jax.errors import ConfigError
from tests.helpers import Back, Front, Split
from backdoor_jax.explain import methods as methods_lib
from backdoor_jax.explain import vbp as vbp_lib
from backdoor_jax.models.common import INTERMEDIATES, expose


class Levels(nn.Module):
  """Spatial levels 12, 6, 2, 2 for 14x14 inputs; the names sort differently from forward order."""

  @nn.compact
  def __call__(self, x, train=False):
    x = expose(self, "shallow", nn.relu(nn.Conv(4, (3, 3), padding="VALID")(x)))   # 12x12
    x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = expose(self, "mid", nn.relu(nn.Conv(5, (3, 3))(x)))                        # 6x6
    x = expose(self, "deep", nn.relu(nn.Conv(6, (3, 3), strides=3)(x)))            # 2x2
    x = expose(self, "deepest", nn.relu(nn.Conv(3, (1, 1))(x) + 0.1))              # 2x2
    x = expose(self, "pool", jnp.mean(x, axis=(1, 2)))
    return nn.Dense(3)(x)


class Linear(nn.Module):
  """logits = flatten(x) @ W: the input gradient of class t is W[:, t] for every sample."""

  @nn.compact
  def __call__(self, x, train=False):
    return nn.Dense(3, use_bias=False)(x.reshape(x.shape[0], -1))


SPLIT, LEVELS = Split(), Levels()


def _normal(seed, shape, dtype=jnp.float32):
  """Host-side random numbers: compiling jax.random's kernels costs seconds per shape on CPU."""
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


@functools.lru_cache(maxsize=None)
def _init(model, shape, seed=0):
  """Variables with the structure of models.init_variables, filled from numpy (He-scaled kernels)."""
  abstract = jax.eval_shape(lambda: models.init_variables(model, jax.random.key(0), shape))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = jax.tree_util.keystr(path[-1:])
    if "kernel" in name:
      fan_in = int(np.prod(leaf.shape[:-1]))
      return jnp.asarray(rng.normal(size=leaf.shape) * np.sqrt(2.0 / fan_in), leaf.dtype)
    if "scale" in name or "var" in name:
      return jnp.ones(leaf.shape, leaf.dtype)
    if "mean" in name:
      return jnp.zeros(leaf.shape, leaf.dtype)
    return jnp.asarray(rng.normal(size=leaf.shape) * 0.1, leaf.dtype)  # biases

  return jax.tree_util.tree_map_with_path(fill, abstract)


def _setup(dtype=jnp.float32, b=3, seed=0):
  x = _normal(1, (b, 8, 8, 3), dtype)
  v = jax.tree.map(lambda p: p.astype(dtype), _init(SPLIT, (1, 8, 8, 3), seed))
  return v, x


_front = jax.jit(lambda p, x: Front().apply({"params": p["front"]}, x))
_back = jax.jit(lambda p, a: Back().apply({"params": p["back"]}, a))
# d logit_t / d A for one sample alone through the head, vmapped over samples.
_back_grads = jax.jit(jax.vmap(jax.grad(lambda a1, t, p: Back().apply({"params": p["back"]}, a1[None])[0, t]),
                               in_axes=(0, 0, None)))

# The functions under test on the Split model: (variables, images, targets) -> result pytree.
RAW = {
    "gradcam_pp": lambda v, x, t: explain.gradcam_pp(SPLIT.apply, v, x, t, "mid")["mid"],
    "feature_map_cams": lambda v, x, t: explain.feature_map_cams(SPLIT.apply, v, x, t, "mid", rectify=False),
    "simple_grad": lambda v, x, t: explain.simple_grad(SPLIT.apply, v, x, t),
    "visual_backprop": lambda v, x, t: explain.visual_backprop(SPLIT.apply, v, x),
    # replace channels 2, 5 of 'mid' by value (B, 4, 4, 2) inside a bool region mask (4, 4)
    "stimulate": lambda v, x, t, value, region: explain.stimulate(
        SPLIT.apply, v, x, "mid", [2, 5], mode="replace", value=value, region=region, targets=t),
}
JIT = {k: jax.jit(f) for k, f in RAW.items()}
_scale_ch1 = jax.jit(lambda v, x, t, s: explain.stimulate(SPLIT.apply, v, x, "mid", 1, mode="scale", value=s,
                                                          targets=t))
_gradcam_mid = jax.jit(lambda v, x, t: explain.gradcam(SPLIT.apply, v, x, t, "mid")["mid"])


def _stim_args(x):
  """value and region for RAW['stimulate']: 0.5 / 2.0 in rows 1..2, cols 0..1."""
  value = jnp.broadcast_to(jnp.array([0.5, 2.0]), (x.shape[0], 4, 4, 2))
  region = np.zeros((4, 4), bool)
  region[1:3, 0:2] = True
  return value, jnp.asarray(region)


@pytest.fixture
def x64():
  jax.config.update("jax_enable_x64", True)
  yield
  jax.config.update("jax_enable_x64", False)


# ------------------------------------------------------------------------------ Grad-CAM++

def _reference_pp(a, g, alpha_eps=1e-6):
  """Slow Grad-CAM++: explicit loops, float64, alpha = 0 where g == 0 or the denominator is 0."""
  a, g = np.asarray(a, np.float64), np.asarray(g, np.float64)
  b, h, w, k = a.shape
  raw = np.zeros((b, h, w))
  for n in range(b):
    weights = np.zeros(k)
    for c in range(k):
      total = a[n, :, :, c].sum()
      for i in range(h):
        for j in range(w):
          gij = g[n, i, j, c]
          den = 2 * gij**2 + total * gij**3 + alpha_eps
          if gij == 0 or den == 0:
            continue
          weights[c] += gij**2 / den * max(gij, 0.0)
    raw[n] = np.maximum((a[n] * weights).sum(-1), 0.0)
  return raw


def test_gradcam_pp_matches_slow_reference_with_zero_gradients():
  v, x = _setup()
  t = jnp.array([0, 2, 1])
  a = _front(v["params"], x)
  out = JIT["gradcam_pp"](v, x, t)
  np.testing.assert_allclose(out.raw, _reference_pp(a, _back_grads(a, t, v["params"])), rtol=1e-4, atol=1e-6)
  assert out.maps.shape == (3, 8, 8) and float(out.maps.min()) >= 0 and float(out.maps.max()) <= 1
  # Cut channel 2 of 'mid' off from the head: its gradients, so its alpha denominators, are all 0.
  conv = v["params"]["back"]["Conv_0"]
  v = {"params": {**v["params"], "back": {**v["params"]["back"], "Conv_0": {
      **conv, "kernel": conv["kernel"].at[:, :, 2, :].set(0.0)}}}}
  g = np.asarray(_back_grads(a, t, v["params"]))
  assert np.all(g[..., 2] == 0) and np.abs(g).max() > 0
  out = JIT["gradcam_pp"](v, x, t)
  np.testing.assert_allclose(out.raw, _reference_pp(a, g), rtol=1e-4, atol=1e-6)
  assert np.isfinite(np.asarray(out.maps)).all() and float(out.raw.max()) > 0


def test_gradcam_pp_weights_known_answer_with_zero_denominator():
  # One channel, two positions, sum A = 1. At g = -2 the denominator 2g^2 + g^3 is exactly 0.
  a = jnp.array([0.5, 0.5]).reshape(1, 1, 2, 1)
  g = jnp.array([-2.0, 1.0]).reshape(1, 1, 2, 1)
  np.testing.assert_allclose(methods_lib.gradcam_pp_weights(a, g, 0.0), [[1 / 3]], rtol=1e-6)
  np.testing.assert_allclose(methods_lib.gradcam_pp_weights(a, g, 1e-6), [[1 / (3 + 1e-6)]], rtol=1e-6)
  d = jax.grad(lambda a, g: methods_lib.gradcam_pp_weights(a, g, 0.0).sum(), argnums=(0, 1))(a, g)
  assert all(np.isfinite(np.asarray(x)).all() for x in d)
  # g == 0 everywhere -> weight 0, finite gradients.
  z = jnp.zeros_like(g)
  assert float(methods_lib.gradcam_pp_weights(a, z, 0.0)[0, 0]) == 0.0
  assert np.isfinite(np.asarray(jax.grad(lambda g: methods_lib.gradcam_pp_weights(a, g, 0.0).sum())(z))).all()


def test_gradcam_pp_all_layers_in_forward_order():
  v = _init(LEVELS, (1, 14, 14, 3))
  x = _normal(2, (2, 14, 14, 3))
  t = jnp.array([0, 2])
  info = explain.layer_info(LEVELS.apply, v, x)
  assert info.order == ("shallow", "mid", "deep", "deepest", "pool")
  assert explain.resolve_layers(info, "all", "x") == ["shallow", "mid", "deep", "deepest"]
  # (a jitted caller gets the dict back key-sorted: JAX rebuilds output dicts that way)
  every, one = jax.jit(lambda v, x, t: (explain.gradcam_pp(LEVELS.apply, v, x, t),
                                        explain.gradcam_pp(LEVELS.apply, v, x, t, ["deep"])))(v, x, t)
  assert sorted(every) == ["deep", "deepest", "mid", "shallow"] and list(one) == ["deep"]
  assert every["shallow"].raw.shape == (2, 12, 12) and every["deep"].maps.shape == (2, 14, 14)
  np.testing.assert_allclose(every["deep"].maps, one["deep"].maps, rtol=1e-5, atol=1e-6)


def test_layer_info_is_execution_order():
  for name in ("vgg11", "resnet18"):
    m = models.get_model(name, 10)
    v = jax.eval_shape(lambda: models.init_variables(m, jax.random.key(0), (1, 32, 32, 3)))
    info = explain.layer_info(m.apply, v, jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32))
    assert info.order == m.layer_names and info.num_classes == 10
    assert info.spatial == m.layer_names[:-1] and info.shapes["pool"][0] == 2


# ------------------------------------------------------------------ per-feature-map Grad-CAM

def test_feature_map_cams_sum_to_gradcam_and_slices_match():
  v, x = _setup()
  t = jnp.array([0, 2, 1])
  a = np.asarray(_front(v["params"], x))
  w = np.asarray(_back_grads(a, t, v["params"])).mean(axis=(1, 2))
  pre_relu = np.einsum("bk,bhwk->bhw", w, a)
  assert (pre_relu < 0).any() and (pre_relu > 0).any()  # the ReLU matters here
  signed = JIT["feature_map_cams"](v, x, t)
  assert signed.raw.shape == (3, 6, 4, 4) and signed.maps.shape == (3, 6, 8, 8)
  np.testing.assert_allclose(signed.weights, w, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(signed.raw.sum(1), pre_relu, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(jax.nn.relu(signed.raw.sum(1)), _gradcam_mid(v, x, t).raw, rtol=1e-5, atol=1e-6)
  part = jax.jit(lambda v, x, t: (explain.feature_map_cams(SPLIT.apply, v, x, t, "mid", [4, 1], rectify=False),
                                  explain.feature_map_cams(SPLIT.apply, v, x, t, "mid", [4, 1])))
  part_signed, part_rect = part(v, x, t)
  for field in ("raw", "maps", "weights"):
    np.testing.assert_allclose(getattr(part_signed, field), getattr(signed, field)[:, [4, 1]], rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(part_rect.raw, jax.nn.relu(signed.raw[:, [4, 1]]), rtol=1e-6, atol=1e-7)
  # Upsampled and normalised per image and per channel.
  for b in range(3):
    np.testing.assert_allclose(part_rect.maps[b], explain.normalize_maps(explain.upsample(part_rect.raw[b], (8, 8))),
                               rtol=1e-5, atol=1e-6)
  assert float(part_rect.maps.max()) <= 1 and float(part_rect.maps.min()) >= 0


# ---------------------------------------------------------------------------- SimpleGrad

def test_simple_grad_matches_finite_differences(x64):
  v, x = _setup(jnp.float64, b=2)
  t = jnp.array([2, 0])
  out = jax.jit(lambda v, x, t: explain.simple_grad(SPLIT.apply, v, x, t))(v, x, t)
  score = jax.jit(lambda x: SPLIT.apply(v, x)[jnp.arange(2), t])  # per-sample target logits
  h = 1e-6
  for (i, j) in [(0, 0), (3, 5), (7, 2)]:
    fd = np.zeros((2, 3))
    for c in range(3):
      e = np.zeros(x.shape)
      e[:, i, j, c] = h  # the samples are independent, so one difference serves both
      fd[:, c] = (score(x + e) - score(x - e)) / (2 * h)
    np.testing.assert_allclose(out.raw[:, i, j], np.abs(fd).max(-1), rtol=1e-5, atol=1e-10)
  np.testing.assert_allclose(out.maps, explain.normalize_maps(out.raw), rtol=1e-12)


def test_simple_grad_reduce_known_answers():
  kernel = np.arange(4 * 4 * 3 * 3, dtype=np.float32).reshape(48, 3) % 7 - 3.0  # signs mixed
  v = {"params": {"Dense_0": {"kernel": jnp.asarray(kernel)}}}
  x = _normal(0, (2, 4, 4, 3))
  t = jnp.array([1, 2])
  g = kernel.T.reshape(3, 4, 4, 3)[np.asarray(t)]  # (B, H, W, C)
  expected = {"max_abs": np.abs(g).max(-1), "sum_abs": np.abs(g).sum(-1),
              "mean_abs": np.abs(g).mean(-1), "l2": np.sqrt((g**2).sum(-1))}
  outs = jax.jit(lambda v, x, t: {r: explain.simple_grad(Linear().apply, v, x, t, r) for r in expected})(v, x, t)
  for reduce, want in expected.items():
    np.testing.assert_allclose(outs[reduce].raw, want, rtol=1e-6, err_msg=reduce)
    lo, hi = want.min(axis=(1, 2), keepdims=True), want.max(axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(outs[reduce].maps, (want - lo) / (hi - lo), rtol=1e-5, atol=1e-6)
  # l2 at an all-zero gradient pixel: 0 with a finite derivative.
  zero = jnp.zeros((1, 2, 2, 3))
  assert float(methods_lib.reduce_channels(zero, "l2").max()) == 0.0
  assert np.isfinite(np.asarray(jax.grad(lambda z: methods_lib.reduce_channels(z, "l2").sum())(zero))).all()


# ------------------------------------------------------------------------ VisualBackProp

def _np_transposed_conv(m, kernel, stride):
  """(h, w) map, all-ones (kh, kw) kernel, (sh, sw) stride, no padding: scatter-add loops."""
  (kh, kw), (sh, sw) = kernel, stride
  h, w = m.shape
  out = np.zeros(((h - 1) * sh + kh, (w - 1) * sw + kw))
  for i in range(h):
    for j in range(w):
      for p in range(kh):
        for q in range(kw):
          out[i * sh + p, j * sw + q] += m[i, j] * 1.0
  return out


def _np_up(m, size):
  (h, w), (bh, bw) = m.shape, size
  if bh % h == 0 and bw % w == 0:
    r = (bh // h, bw // w)
    return _np_transposed_conv(m, r, r)
  return np.asarray(explain.upsample(jnp.asarray(m, jnp.float32)[None], size))[0].astype(np.float64)


def _reference_vbp(acts, names, size):
  out = []
  for n in range(acts[names[0]].shape[0]):
    levels = [np.asarray(acts[k][n], np.float64).mean(-1) for k in names]
    mask = levels[-1]
    for level in levels[-2::-1]:
      mask = _np_up(mask, level.shape) * level
    mask = _np_up(mask, size)
    out.append((mask - mask.min()) / (mask.max() - mask.min()))
  return np.stack(out)


def test_visual_backprop_matches_numpy_reference():
  v = _init(LEVELS, (1, 14, 14, 3), 3)
  x = _normal(4, (2, 14, 14, 3))
  state = jax.jit(lambda v, x: LEVELS.apply(v, x, mutable=[INTERMEDIATES])[1])(v, x)
  acts = {k: val[0] for k, val in state[INTERMEDIATES].items()}
  # Ratios: deepest -> deep 1 (identity), deep -> mid 3, mid -> shallow 2, shallow -> input 14/12
  # (bilinear); the subset: deep -> mid 3, mid -> input 14/6 (bilinear).
  got_all, got_sub = jax.jit(lambda v, x: (explain.visual_backprop(LEVELS.apply, v, x, eps=0.0),
                                           explain.visual_backprop(LEVELS.apply, v, x, ["deep", "mid"], eps=0.0))
                             )(v, x)
  want = _reference_vbp(acts, ["shallow", "mid", "deep", "deepest"], (14, 14))
  assert got_all.shape == (2, 14, 14) and np.ptp(want, axis=(1, 2)).min() > 0
  np.testing.assert_allclose(got_all, want, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(got_sub, _reference_vbp(acts, ["mid", "deep"], (14, 14)), rtol=1e-4, atol=1e-5)


def test_ones_transposed_conv_is_block_replication():
  m = np.arange(6.0).reshape(2, 3)
  got = np.asarray(vbp_lib.ones_transposed_conv(jnp.asarray(m)[None], (2, 3))[0])
  np.testing.assert_array_equal(got, np.kron(m, np.ones((2, 3))))
  np.testing.assert_array_equal(got, _np_transposed_conv(m, (2, 3), (2, 3)))


# --------------------------------------------------------------------------- stimulation

def test_stimulate_identity_reproduces_plain_pass():
  v, x = _setup()
  a = _front(v["params"], x)
  plain = _gradcam_mid(v, x, None)
  # replacing with the original values everywhere, and scaling by 1
  runs = [JIT["stimulate"](v, x, None, a[..., [2, 5]], jnp.ones((4, 4), bool)),
          _scale_ch1(v, x, None, 1.0)]
  for out in runs:
    np.testing.assert_allclose(out["logits"], _back(v["params"], a), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(out["activation"], a, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(out["cams"]["mid"].raw, plain.raw, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(out["cams"]["mid"].maps, plain.maps, rtol=1e-6, atol=1e-7)


def test_stimulate_matches_hand_split_model():
  v, x = _setup()
  a = np.asarray(_front(v["params"], x))
  # channels 2 and 5 replaced by 0.5 / 2.0 inside rows 1..2, cols 0..1, and nulled elsewhere
  edited = a.copy()
  edited[..., [2, 5]] = 0.0
  edited[:, 1:3, 0:2, 2] = 0.5
  edited[:, 1:3, 0:2, 5] = 2.0
  out = JIT["stimulate"](v, x, None, *_stim_args(x))
  np.testing.assert_allclose(out["activation"], edited, rtol=1e-6, atol=1e-7)
  assert np.all(np.asarray(out["activation"])[:, 3:, :, [2, 5]] == 0)  # nulled exactly
  want_logits = np.asarray(_back(v["params"], edited))
  np.testing.assert_allclose(out["logits"], want_logits, rtol=1e-5, atol=1e-6)
  pred = want_logits.argmax(-1)
  np.testing.assert_array_equal(out["targets"], pred)  # None -> the prediction under stimulation
  w = np.asarray(_back_grads(edited, pred, v["params"])).mean(axis=(1, 2))
  np.testing.assert_allclose(out["cams"]["mid"].raw, np.maximum(np.einsum("bk,bhwk->bhw", w, edited), 0),
                             rtol=1e-5, atol=1e-6)
  # the same region as a box
  boxed = jax.jit(lambda v, x: explain.stimulate(SPLIT.apply, v, x, "mid", [2, 5], mode="replace",
                                                 value=jnp.array([0.5, 2.0]), region=(1, 0, 3, 2)))(v, x)
  np.testing.assert_allclose(boxed["activation"], edited, rtol=1e-6, atol=1e-7)


def test_stimulate_scale_values_and_parameter_gradients():
  v, x = _setup()
  t = jnp.array([0, 0, 1])
  c = jnp.array([1.0, -2.0, 0.5])

  def stimulated(p):
    out = _scale_ch1({"params": p}, x, t, 3.0)
    return jnp.sum(out["logits"] * c), out["logits"]

  def by_hand(p):
    a = Front().apply({"params": p["front"]}, x)
    logits = Back().apply({"params": p["back"]}, a.at[..., 1].multiply(3.0))
    return jnp.sum(logits * c), logits

  (_, got), g_got = jax.value_and_grad(stimulated, has_aux=True)(v["params"])
  (_, want), g_want = jax.jit(jax.value_and_grad(by_hand, has_aux=True))(v["params"])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # d/dparams is the stimulated network's own derivative (the first-pass A is not stopped)
  for leaf_got, leaf_want in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want)):
    np.testing.assert_allclose(leaf_got, leaf_want, rtol=1e-4, atol=1e-6)
  assert float(jnp.abs(g_got["front"]["Conv_1"]["kernel"][..., 1]).max()) > 0


def test_stimulate_zero_equals_zeroed_weights():
  model = models.get_model("small_cnn", 4, widths=(3, 4, 5), pool_after=(1, 2))
  v = _init(model, (1, 12, 12, 3))
  x = _normal(5, (2, 12, 12, 3))
  t = jnp.array([3, 1])
  # conv2 = ReLU(BN(conv)); BN scale = bias = 0 on channels 1 and 3 makes them exactly 0.
  bn = v["params"]["block2"]["bn"]
  zeroed = {**v, "params": {**v["params"], "block2": {**v["params"]["block2"], "bn": {
      "scale": bn["scale"].at[jnp.array([1, 3])].set(0.0), "bias": bn["bias"].at[jnp.array([1, 3])].set(0.0)}}}}
  out, ref, ref_logits = jax.jit(lambda v, z, x, t: (
      explain.stimulate(model.apply, v, x, "conv2", [1, 3], mode="replace", value=0.0, targets=t, cam_layer="all"),
      explain.gradcam(model.apply, z, x, t, ["conv2", "conv3"]), model.apply(z, x)))(v, zeroed, x, t)
  assert sorted(out["cams"]) == ["conv2", "conv3"]
  np.testing.assert_allclose(out["logits"], ref_logits, rtol=1e-6, atol=1e-6)
  for n in ("conv2", "conv3"):
    np.testing.assert_allclose(out["cams"][n].raw, ref[n].raw, rtol=1e-5, atol=1e-6)
  with pytest.raises(ConfigError, match="cam_layer 'conv1' runs before the stimulated layer 'conv2'"):
    explain.stimulate(model.apply, v, x, "conv2", 0, mode="scale", value=2.0, cam_layer="conv1")


# ------------------------------------------------------------- jit, vmap, parameter gradients

def _args(name, x, t):
  return (t,) + (_stim_args(x) if name == "stimulate" else ())


def test_jit_matches_eager_and_vmap_over_params():
  v, x = _setup()
  t = jnp.array([0, 2, 1])
  v2 = _init(SPLIT, (1, 8, 8, 3), 7)
  stacked = jax.tree.map(lambda p, q: jnp.stack([p, q]), v, v2)
  for name, f in RAW.items():
    args = _args(name, x, t)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=name),
                 JIT[name](v, x, *args), f(v, x, *args))
    if name in ("gradcam_pp", "visual_backprop"):
      both = jax.jit(jax.vmap(f, in_axes=(0, None) + (None,) * len(args)))(stacked, x, *args)
      np.testing.assert_allclose(both.maps[1] if name == "gradcam_pp" else both[1],
                                 (JIT[name](v2, x, *args).maps if name == "gradcam_pp" else JIT[name](v2, x, *args)),
                                 rtol=1e-5, atol=1e-6, err_msg=name)


def test_parameter_gradients_are_finite_and_nonzero():
  v, x = _setup()
  t = jnp.array([0, 2, 1])
  weight = jnp.asarray(np.random.default_rng(9).uniform(size=(3, 8, 8)), jnp.float32)
  maps = {"gradcam_pp": lambda p: RAW["gradcam_pp"]({"params": p}, x, t).maps,
          "simple_grad": lambda p: RAW["simple_grad"]({"params": p}, x, t).maps,
          "visual_backprop": lambda p: RAW["visual_backprop"]({"params": p}, x, t)}
  for name, f in maps.items():
    g = jax.jit(jax.grad(lambda p: jnp.sum(f(p) * weight)))(v["params"])
    leaves = np.concatenate([np.ravel(np.asarray(leaf)) for leaf in jax.tree.leaves(g)])
    assert np.isfinite(leaves).all(), name
    assert np.abs(leaves).max() > 0, name


# ---------------------------------------------------------------------------- bad input

def test_bad_input_errors():
  v, x = _setup()
  with pytest.raises(ConfigError, match=r"unknown layer 'layer9' for Grad-CAM\+\+.*mid"):
    explain.gradcam_pp(SPLIT.apply, v, x, None, "layer9")
  with pytest.raises(ConfigError, match="out of range"):
    explain.gradcam_pp(SPLIT.apply, v, x, np.array([0, 1, 3]), "mid")
  with pytest.raises(ConfigError, match=r"channel 6 out of range \[0, 6\) for layer 'mid'"):
    explain.feature_map_cams(SPLIT.apply, v, x, None, "mid", [0, 6])
  with pytest.raises(ConfigError, match="unknown layer 'pool'"):
    explain.feature_map_cams(SPLIT.apply, v, x, None, "pool")
  with pytest.raises(ConfigError, match="unknown reduce 'max'; allowed: max_abs, sum_abs, l2, mean_abs"):
    explain.simple_grad(SPLIT.apply, v, x, None, "max")
  with pytest.raises(ConfigError, match="uint8"):
    explain.simple_grad(SPLIT.apply, v, np.zeros(x.shape, np.uint8))
  with pytest.raises(ConfigError, match="unknown layer 'conv9' for VisualBackProp"):
    explain.visual_backprop(SPLIT.apply, v, x, ["conv9"])

  def stim(**kw):
    return explain.stimulate(SPLIT.apply, v, x, **{"layer": "mid", "channels": 0, "mode": "scale",
                                                   "value": 1.0, **kw})
  with pytest.raises(ConfigError, match="unknown stimulation mode 'add'; allowed: scale, replace"):
    stim(mode="add")
  with pytest.raises(ConfigError, match=r"channel -1 out of range \[0, 6\)"):
    stim(channels=[-1])
  with pytest.raises(ConfigError, match="distinct"):
    stim(channels=[1, 1])
  with pytest.raises(ConfigError, match="region box"):
    stim(region=(0, 0, 5, 2))
  with pytest.raises(ConfigError, match=r"region mask must have shape \(4, 4\)"):
    stim(region=np.ones((8, 8), bool))
  with pytest.raises(ConfigError, match="boolean"):
    stim(region=np.ones((4, 4)))
  with pytest.raises(ConfigError, match="does not broadcast"):
    stim(channels=[0, 1], value=np.ones(3))
  with pytest.raises(ConfigError, match="unknown layer 'nope' for stimulation"):
    stim(layer="nope")
