"""Known-answer tests for the blend, WaNet, photo-filter and moire triggers and the shared API."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from backdoor_jax import triggers as T
from backdoor_jax.configs import badnets
from backdoor_jax.errors import ConfigError
from backdoor_jax.triggers import moire, warp

HW = (16, 20)
NEW_KINDS = ("blend", "wanet", "filter", "moire")


def _images(hw=HW, n=3, seed=0, dtype=np.uint8):
  return np.random.default_rng(seed).integers(0, 256, (n,) + tuple(hw) + (3,)).astype(dtype)


def _key(seed=0):
  return jax.random.key(seed)


def _raises(match, fn, *args, **kwargs):
  with pytest.raises(ConfigError) as info:
    fn(*args, **kwargs)
  msg = str(info.value)
  assert "\n" not in msg and match in msg, msg


# ----------------------------------------------------------------------------- blend


def test_blend_alpha_zero_is_identity_and_alpha_one_is_the_pattern():
  x = _images()
  t0 = T.make_blend_trigger(HW, alpha=0.0, key=_key())
  np.testing.assert_array_equal(T.apply_trigger(t0, x), x)
  xf = x.astype(np.float32)
  np.testing.assert_array_equal(T.apply_trigger(t0, xf), xf)
  t1 = T.make_blend_trigger(HW, alpha=1.0, key=_key())
  np.testing.assert_array_equal(T.apply_trigger(t1, x), np.broadcast_to(np.asarray(t1.pattern, np.uint8), x.shape))


def test_blend_formula_noise_is_seeded_and_in_range():
  x = _images().astype(np.float32)
  t = T.make_blend_trigger(HW, alpha=0.3, key=_key(5))
  pat = np.asarray(t.pattern)
  assert pat.min() >= 0 and pat.max() <= 255 and np.array_equal(pat, np.round(pat)) and pat.std() > 50
  np.testing.assert_allclose(T.apply_trigger(t, x), 0.7 * x + 0.3 * pat, rtol=1e-6, atol=1e-4)
  np.testing.assert_array_equal(pat, T.make_blend_trigger(HW, alpha=0.3, key=_key(5)).pattern)
  assert not np.array_equal(pat, T.make_blend_trigger(HW, alpha=0.3, key=_key(6)).pattern)


def test_blend_with_corner_mask_changes_only_the_region():
  x = _images()
  cfg = dict(kind="blend", blend=dict(alpha=1.0, region="patch"), size=4, position="top-left")
  t = T.trigger_from_config(cfg, HW, _key(1))
  out = np.asarray(T.apply_trigger(t, x))
  np.testing.assert_array_equal(out[:, 4:], x[:, 4:])
  np.testing.assert_array_equal(out[:, :, 4:], x[:, :, 4:])
  np.testing.assert_array_equal(out[0, :4, :4], np.asarray(t.pattern)[:4, :4].astype(np.uint8))
  region = T.trigger_region(t)
  assert region.shape == HW and region.sum() == 16 and region[:4, :4].all()
  np.testing.assert_array_equal(np.asarray(t.mask)[..., 0] > 0, region)  # usable where patch masks are


def test_blend_pattern_from_image_file(tmp_path):
  from PIL import Image
  rgb = np.random.default_rng(3).integers(0, 256, HW + (3,)).astype(np.uint8)
  Image.fromarray(rgb).save(tmp_path / "t.png")
  np.save(tmp_path / "t.npy", rgb)
  for name in ("t.png", "t.npy"):
    t = T.trigger_from_config(dict(kind="blend", blend=dict(alpha=1.0, pattern=str(tmp_path / name))), HW)
    np.testing.assert_array_equal(np.asarray(t.pattern), rgb.astype(np.float32))
  big = T.make_blend_trigger((8, 10), alpha=0.5, pattern=str(tmp_path / "t.png"))  # resized on load
  assert big.pattern.shape == (8, 10, 3)
  _raises("t.txt", T.make_blend_trigger, HW, pattern=str(tmp_path / "t.txt"))
  _raises("could not be read", T.make_blend_trigger, HW, pattern=str(tmp_path / "missing.png"))


# ----------------------------------------------------------------------------- wanet


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_wanet_s_zero_is_identity(dtype):
  x = _images(dtype=dtype)
  t = T.make_wanet_trigger(HW, _key(), s=0.0)
  np.testing.assert_array_equal(T.apply_trigger(t, x), x)


def test_bicubic_matches_torch_align_corners():
  torch = pytest.importorskip("torch")
  src = np.random.default_rng(0).uniform(-1, 1, (4, 4, 2))
  ours = warp.upsample_bicubic(src, (16, 20))
  ref = torch.nn.functional.interpolate(torch.tensor(src).permute(2, 0, 1)[None], size=(16, 20), mode="bicubic",
                                        align_corners=True)[0].permute(1, 2, 0).numpy()
  np.testing.assert_allclose(ours, ref, atol=1e-9)


def test_wanet_matches_the_published_recipe_in_torch():
  """Rebuilds the grid from the same k x k noise with torch ops and samples with grid_sample."""
  torch = pytest.importorskip("torch")
  h = w = 12
  key, s, k = _key(7), 0.5, 4
  x = _images((h, w), n=2).astype(np.float32)
  ours = np.asarray(T.apply_trigger(T.make_wanet_trigger((h, w), key, k=k, s=s), x))
  ins = torch.tensor(np.asarray(jax.random.uniform(key, (k, k, 2), minval=-1.0, maxval=1.0), np.float64))
  ins = (ins / ins.abs().mean()).permute(2, 0, 1)[None]
  noise = torch.nn.functional.interpolate(ins, size=h, mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
  a = torch.linspace(-1, 1, h, dtype=torch.float64)
  gx, gy = torch.meshgrid(a, a, indexing="ij")
  identity = torch.stack((gy, gx), 2)[None]
  grid = torch.clamp(identity + s * noise / h, -1, 1)
  ref = torch.nn.functional.grid_sample(torch.tensor(x, dtype=torch.float64).permute(0, 3, 1, 2),
                                        grid.expand(2, -1, -1, -1), align_corners=True)
  np.testing.assert_allclose(ours, ref.permute(0, 2, 3, 1).numpy(), atol=2e-3)


def test_wanet_warps_a_little_and_stays_in_range():
  x = _images(n=2).astype(np.float32)
  t = T.make_wanet_trigger(HW, _key(1))
  out = np.asarray(T.apply_trigger(t, x))
  assert out.min() >= 0 and out.max() <= 255
  shift = np.abs(np.asarray(t.coords) - np.stack(np.meshgrid(np.arange(16), np.arange(20), indexing="ij"), -1))
  assert 0.01 < shift.mean() and shift.max() < 2.0  # s=0.5: sub-pixel to ~1 px displacements
  np.testing.assert_array_equal(t.coords, T.make_wanet_trigger(HW, _key(1)).coords)


def test_bilinear_sample_known_values():
  img = jnp.arange(12, dtype=jnp.float32).reshape(3, 4, 1)  # value = 4 * row + col
  coords = jnp.asarray([[[0.5, 0.5], [1.25, 2.0], [2.0, 3.0], [-1.0, 9.0]]])
  np.testing.assert_allclose(warp.bilinear_sample(img, coords)[..., 0], [[2.5, 7.0, 11.0, 3.0]])


def test_wanet_noise_mode_is_seeded_and_differs_from_the_trigger():
  x = _images(n=4)
  t = T.make_wanet_trigger(HW, _key(2), s=1.0)
  noise_warp = jax.jit(T.apply_noise_warp)
  a = np.asarray(noise_warp(t, x, _key(3)))
  np.testing.assert_array_equal(a, noise_warp(t, x, _key(3)))
  assert not np.array_equal(a, noise_warp(t, x, _key(4)))
  assert np.mean(a != np.asarray(T.apply_trigger(t, x))) > 0.3
  assert a.dtype == np.uint8


# ---------------------------------------------------------------------------- filter


def _nashville_by_hand(rgb):
  """The documented recipe on one RGB colour, step by step in float64."""
  v = np.asarray(rgb, np.float64) / 255
  warm, blue = np.array([247, 176, 153]) / 255, np.array([0, 70, 150]) / 255
  v = v + 0.56 * (np.minimum(v, warm) - v)
  v = v + 0.4 * (np.maximum(v, blue) - v)
  sepia = np.array([[0.393 + 0.607 * 0.8, 0.769 * 0.2, 0.189 * 0.2],
                    [0.349 * 0.2, 0.686 + 0.314 * 0.8, 0.168 * 0.2],
                    [0.272 * 0.2, 0.534 * 0.2, 0.131 + 0.869 * 0.8]])
  v = np.clip(sepia @ v, 0, 1)
  v = np.clip((v - 0.5) * 1.2 + 0.5, 0, 1)
  v = np.clip(v * 1.05, 0, 1)
  lum = np.array([0.213, 0.715, 0.072])
  sat = np.array([[lum[0] + 0.787 * 1.2, lum[1] - 0.715 * 1.2, lum[2] - 0.072 * 1.2],
                  [lum[0] - 0.213 * 1.2, lum[1] + 0.285 * 1.2, lum[2] - 0.072 * 1.2],
                  [lum[0] - 0.213 * 1.2, lum[1] - 0.715 * 1.2, lum[2] + 0.928 * 1.2]])
  return np.clip(sat @ v, 0, 1) * 255


@pytest.mark.parametrize("rgb", [(0, 0, 0), (255, 255, 255), (128, 128, 128), (200, 40, 90)])
def test_filter_on_constant_images_equals_hand_computed(rgb):
  x = np.broadcast_to(np.asarray(rgb, np.float32), (1, 4, 5, 3))
  out = np.asarray(T.apply_trigger(T.make_filter_trigger(), x))
  np.testing.assert_allclose(out, np.broadcast_to(_nashville_by_hand(rgb), out.shape), atol=1e-3)


def test_filter_black_pixel_literal_value():
  # Black: darken keeps 0; lighten gives 0.4 * (0, 70, 150) = (0, 28, 60); then the
  # colour steps, in pixel units: sepia(0.2) -> (6.574, 28.258, 52.562); contrast 1.2
  # about 127.5 -> (0, 8.409, 37.575); brightness 1.05 -> (0, 8.830, 39.454);
  # saturate 1.2 -> (0, 8.765, 45.514).
  out = np.asarray(T.apply_trigger(T.make_filter_trigger(), np.zeros((2, 2, 3), np.float32)))
  np.testing.assert_allclose(out[0, 0], [0.0, 8.765, 45.514], atol=0.01)


def test_filter_strength_and_gradient():
  x = _images().astype(np.float32)
  np.testing.assert_array_equal(T.apply_trigger(T.make_filter_trigger(strength=0.0), x), x)
  half = T.apply_trigger(T.make_filter_trigger(strength=0.5), x)
  full = T.apply_trigger(T.make_filter_trigger(strength=1.0), x)
  np.testing.assert_allclose(half, 0.5 * x + 0.5 * np.asarray(full), atol=1e-3)
  g = jax.grad(lambda im: jnp.sum(T.apply_trigger(T.make_filter_trigger(), im)))(jnp.asarray(x))
  assert np.all(np.isfinite(g)) and np.abs(g).sum() > 0


# ----------------------------------------------------------------------------- moire


def test_moire_opacity_zero_is_identity_and_density_is_banded():
  x = _images()
  np.testing.assert_array_equal(T.apply_trigger(T.make_moire_trigger(HW, _key(), opacity=0.0), x), x)
  dens = moire.moire_density((64, 64), _key(1), spacing=2.0, angles=(0.0, 5.0), perspective=0.0)
  assert 0 <= dens.min() and dens.max() <= 1
  # Two gratings 5 degrees apart beat with a period of about 2 / (2 sin 2.5 deg) = 23 px:
  # the density averaged over 8x8 blocks still varies (broad bands), not only pixel to pixel.
  blocks = dens.reshape(8, 8, 8, 8).mean(axis=(1, 3))
  assert blocks.max() - blocks.min() > 0.1


def test_moire_homography_maps_corners():
  src = np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
  dst = src + np.array([[0.1, 0.0], [0.0, 0.05], [-0.1, 0.0], [0.0, -0.05]])
  hom = moire.homography(src, dst)
  p = np.c_[src, np.ones(4)] @ hom.T
  np.testing.assert_allclose(p[:, :2] / p[:, 2:], dst, atol=1e-9)


def test_moire_overlay_formula():
  x = _images().astype(np.float32)
  t = T.make_moire_trigger(HW, _key(2), opacity=0.4, color=(255, 0, 0))
  wgt = np.asarray(t.weight)
  assert wgt.max() <= 0.4 + 1e-6 and wgt.min() >= 0
  want = x * (1 - wgt) + np.array([255.0, 0, 0]) * wgt
  np.testing.assert_allclose(T.apply_trigger(t, x), want, rtol=1e-5, atol=1e-3)


# --------------------------------------------------------------------- shared behaviour


def _all_kinds(hw=HW):
  cfgs = [dict(kind="square", size=3), dict(kind="blend", blend={}), dict(kind="blend", blend=dict(region="patch"), size=4),
          dict(kind="wanet", wanet={}), dict(kind="filter", filter={}), dict(kind="moire", moire={})]
  return [(c, T.trigger_from_config(c, hw, _key(11))) for c in cfgs]


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_every_kind_jit_equals_eager_keeps_dtype_and_range(dtype):
  x = _images(dtype=dtype)
  for cfg, t in _all_kinds():
    eager = np.asarray(T.apply_trigger(t, x))
    jitted = np.asarray(jax.jit(T.apply_trigger)(t, x))
    assert eager.dtype == dtype and eager.shape == x.shape, cfg
    if dtype == np.float32:
      np.testing.assert_allclose(eager, jitted, atol=1e-3, err_msg=str(cfg))
    else:  # XLA may fuse multiply-adds under jit: a value within 1 ulp of .5 can round either way
      diff = np.abs(eager.astype(int) - jitted)
      assert diff.max() <= 1 and np.mean(diff > 0) < 1e-3, cfg
    assert eager.min() >= 0 and eager.max() <= 255 + 1e-3, cfg
    np.testing.assert_array_equal(t.apply(x), eager)
    np.testing.assert_array_equal(T.apply_trigger(t, x[0]), eager[0])  # unbatched (H, W, 3)


def test_every_kind_stacks_for_vmap():
  x = _images(n=2)
  for cfg, t in _all_kinds():
    other = T.trigger_from_config(cfg, HW, _key(12))
    stacked = T.stack_triggers([t, other])
    out = np.asarray(jax.jit(jax.vmap(T.apply_trigger, in_axes=(0, None)))(stacked, x)).astype(int)
    for i, single in enumerate((t, other)):  # same 1-level rounding allowance as jit vs eager
      assert np.abs(out[i] - np.asarray(jax.jit(T.apply_trigger)(single, x))).max() <= 1, cfg
  _raises("different kinds", T.stack_triggers, [_all_kinds()[0][1], _all_kinds()[3][1]])


def test_region_less_kinds_raise_a_clear_error():
  from backdoor_jax.explain import metrics
  for cfg, t in _all_kinds():
    if cfg["kind"] == "square" or cfg.get("blend", {}).get("region") == "patch":
      assert t.has_region and T.trigger_region(t).any()
      continue
    assert not t.has_region
    for fn in (T.trigger_region, lambda t: t.mask, metrics.region_from_trigger):
      _raises(f"trigger kind {cfg['kind']!r} changes the whole image and has no region", fn, t)


def test_shape_mismatch_and_bad_values():
  t = T.make_wanet_trigger(HW, _key())
  _raises("(2, 16, 21, 3)", T.apply_trigger, t, np.zeros((2, 16, 21, 3), np.uint8))
  _raises("'wanet'", T.apply_trigger, t, np.zeros((2, 16, 21, 3), np.uint8))
  T.apply_trigger(T.make_filter_trigger(), np.zeros((1, 5, 7, 3)))  # filters fit any size
  _raises("alpha 1.5", T.make_blend_trigger, HW, alpha=1.5, key=_key())
  _raises("key=None", T.make_blend_trigger, HW, alpha=0.5)
  _raises("wanet.k 1", T.make_wanet_trigger, HW, _key(), k=1)
  _raises("wanet.k 17", T.make_wanet_trigger, HW, _key(), k=17)
  _raises("wanet.s -0.1", T.make_wanet_trigger, HW, _key(), s=-0.1)
  _raises("wanet.grid_rescale 0", T.make_wanet_trigger, HW, _key(), grid_rescale=0)
  _raises("'sepia'", T.make_filter_trigger, "sepia")
  _raises("filter.strength 2", T.make_filter_trigger, strength=2)
  _raises("moire.opacity -1", T.make_moire_trigger, HW, _key(), opacity=-1)
  _raises("moire.spacing 0", T.make_moire_trigger, HW, _key(), spacing=0)
  _raises("moire.angles", T.make_moire_trigger, HW, _key(), angles=(1.0,))
  _raises("'diamond'", T.trigger_from_config, dict(kind="diamond"), HW)
  _raises("trigger.wanet.kk", T.trigger_from_config, dict(kind="wanet", wanet=dict(kk=3)), HW)
  _raises("'middle'", T.trigger_from_config, dict(kind="blend", blend=dict(region="middle")), HW)
  _raises("seed -2", T.trigger_from_config, dict(kind="blend", seed=-2, blend={}), HW)
  _raises("wanet.k 1", T.trigger_from_config, dict(kind="wanet", wanet=dict(k=1)), HW)  # section values reach the builder


def test_config_seed_fixes_the_pattern_and_key_is_used_otherwise():
  a = T.trigger_from_config(dict(kind="blend", seed=3, blend={}), HW, _key(1))
  b = T.trigger_from_config(dict(kind="blend", seed=3, blend={}), HW, _key(2))
  np.testing.assert_array_equal(a.pattern, b.pattern)
  c = T.trigger_from_config(dict(kind="blend", seed=-1, blend={}), HW, _key(1))
  d = T.trigger_from_config(dict(kind="blend", blend={}), HW, _key(2))
  assert not np.array_equal(c.pattern, d.pattern)


def test_badnets_variants_build_their_triggers():
  kinds = {}
  for variant in badnets.VARIANTS:
    c = badnets.get_config(variant)
    if c.trigger.kind == "ssba":  # needs a trained encoder file (see test_ssba_*)
      continue
    kinds[variant] = T.trigger_from_config(c.trigger, (32, 32), _key()).KIND
  assert kinds["digits"] == "patch" and kinds["digits_wanet"] == "wanet" and kinds["gtsrb_moire"] == "moire"
  assert T.cross_ratio_from_config(badnets.get_config("digits_wanet").trigger) == 2.0
  assert T.cross_ratio_from_config(badnets.get_config("digits").trigger) == 0.0
  # a config names only the kind it uses; digits_KIND exists for every registered kind
  wanet = badnets.get_config("digits_wanet").trigger
  assert [k for k in wanet if k in T.trigger_kinds()] == ["wanet"] and wanet.wanet.to_dict() == dict(
      k=4, s=0.5, grid_rescale=1.0, cross_ratio=2.0)
  assert [k for k in badnets.get_config("digits").trigger if k in T.trigger_kinds()] == []
  assert badnets.get_config("gtsrb_checkerboard").trigger.checkerboard.cell == 1
  with pytest.raises(ConfigError, match="digits_KIND"):
    badnets.get_config("digits_diamond")


# ------------------------------------------------------------------------------ ssba


def test_ssba_encoder_roundtrip_bounded_and_jittable(tmp_path):
  """Save / load / apply mechanics with an untrained encoder (training is too slow for a unit test)."""
  from backdoor_jax.triggers import ssba
  imgs = _images((8, 8), n=4)
  bits = jnp.asarray([1.0, 0, 1, 1])
  enc_mod = ssba.StegaEncoder(features=4, max_residual=6.0)
  enc = enc_mod.init(_key(0), jnp.zeros((1, 8, 8, 3)), jnp.zeros((1, 4)))["params"]
  path = str(tmp_path / "enc.npz")
  ssba.save_encoder(path, enc, bits=bits, image_hw=(8, 8), max_residual=6.0, info={"psnr": 40.0})
  t = T.trigger_from_config(dict(kind="ssba", ssba=dict(path=path)), (8, 8))
  assert isinstance(t, T.SSBATrigger) and not t.has_region
  out = np.asarray(T.apply_trigger(t, imgs))
  assert out.dtype == np.uint8 and np.abs(out.astype(int) - imgs).max() <= 6
  assert np.abs(out.astype(int) - np.asarray(jax.jit(T.apply_trigger)(t, imgs))).max() <= 1
  xf = imgs.astype(np.float32)
  direct = enc_mod.apply({"params": enc}, xf / 255.0, jnp.broadcast_to(bits, (4, 4)))
  np.testing.assert_allclose(T.apply_trigger(t, xf), np.clip(xf + np.asarray(direct), 0, 255), atol=1e-3)
  _raises("trained for 8x8", T.trigger_from_config, dict(kind="ssba", ssba=dict(path=path)), (16, 16))
  _raises("needs trigger.ssba.path", T.trigger_from_config, dict(kind="ssba", ssba={}), (8, 8))
  _raises("could not be loaded", T.trigger_from_config, dict(kind="ssba", ssba=dict(path=str(tmp_path / "x.npz"))),
          (8, 8))
  _raises("has no region", T.trigger_region, t)
