"""Known-answer tests for BadNets patch triggers."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from backdoor_jax.errors import ConfigError
from backdoor_jax import triggers as T

SHAPES = [(32, 32), (20, 36)]


def _images(hw, n=2, seed=0, dtype=np.uint8):
  # Values <= 200 so that every trigger pixel (white/red/...) really changes.
  return np.random.default_rng(seed).integers(0, 201, (n,) + tuple(hw) + (3,)).astype(dtype)


def _expected(images, rows, cols, color):
  """Images with the pixels at (rows, cols) (index arrays / slices) set to color."""
  out = images.copy()
  out[:, rows, cols] = np.asarray(color, images.dtype)
  return out


def _apply(trigger, images):
  return np.asarray(T.apply_trigger(trigger, images))


def _changed(before, after):
  return np.argwhere(np.any(before != after, axis=(0, 3)))


def _origin(name, hw, s, margin=0):
  h, w = hw
  return {
      "top-left": (margin, margin),
      "top-right": (margin, w - s - margin),
      "bottom-left": (h - s - margin, margin),
      "bottom-right": (h - s - margin, w - s - margin),
      "center": ((h - s) // 2, (w - s) // 2),
  }[name]


# ----------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("hw", SHAPES)
@pytest.mark.parametrize("position", T.POSITIONS)
def test_square_every_named_position(hw, position):
  imgs = _images(hw)
  trig = T.make_patch_trigger(hw, kind="square", size=3, position=position, color=(10, 250, 30))
  r, c = _origin(position, hw, 3)
  want = _expected(imgs, slice(r, r + 3), slice(c, c + 3), (10, 250, 30))
  np.testing.assert_array_equal(_apply(trig, imgs), want)
  assert len(_changed(imgs, want)) == 9


def test_center_exact_pixels():
  imgs = _images((32, 32))
  out = _apply(T.make_patch_trigger((32, 32), size=4, position="center"), imgs)
  np.testing.assert_array_equal(out, _expected(imgs, slice(14, 18), slice(14, 18), (255,) * 3))
  out = _apply(T.make_patch_trigger((20, 36), size=3, position="center"), _images((20, 36)))
  np.testing.assert_array_equal(_changed(_images((20, 36)), out),
                                [(r, c) for r in range(8, 11) for c in range(16, 19)])


@pytest.mark.parametrize("size,hw,side", [
    (0.1, (32, 32), 3),      # 3.2 -> 3
    (0.1, (20, 36), 2),      # shorter side 20 -> 2
    (0.25, (20, 36), 5),
    (0.05, (50, 50), 3),     # 2.5 rounds half up
    (0.001, (32, 32), 1),    # never below one pixel
    (3, (32, 32), 3),
    (3.0, (32, 32), 3),
    (1, (32, 32), 1),        # 1 means one pixel, not the whole image
    (np.int64(5), (32, 32), 5),
    (32, (32, 32), 32),      # the whole image is allowed
])
def test_size_fraction_and_pixels(size, hw, side):
  assert T.patch_side(size, hw) == side
  imgs = _images(hw)
  out = _apply(T.make_patch_trigger(hw, size=size, position="top-left"), imgs)
  np.testing.assert_array_equal(out, _expected(imgs, slice(0, side), slice(0, side), (255,) * 3))


@pytest.mark.parametrize("position", ["top-left", "top-right", "bottom-left", "bottom-right"])
def test_margin(position):
  hw = (32, 32)
  imgs = _images(hw)
  r, c = _origin(position, hw, 3, margin=2)
  out = _apply(T.make_patch_trigger(hw, size=3, position=position, margin=2), imgs)
  np.testing.assert_array_equal(out, _expected(imgs, slice(r, r + 3), slice(c, c + 3), (255,) * 3))


def test_margin_is_ignored_for_center():
  a = T.make_patch_trigger((32, 32), size=4, position="center", margin=5)
  b = T.make_patch_trigger((32, 32), size=4, position="center")
  np.testing.assert_array_equal(a.mask, b.mask)


def test_margin_bottom_right_known_rows():
  mask = np.asarray(T.make_patch_trigger((32, 32), size=3, margin=2).mask[..., 0])
  assert set(map(tuple, np.argwhere(mask))) == {(r, c) for r in (27, 28, 29) for c in (27, 28, 29)}


@pytest.mark.parametrize("position", [(5, 7), [5, 7], "5,7", " (5, 7) ", "[5,7]",
                                      (np.int64(5), np.int32(7)), np.array([5, 7])])
def test_explicit_position(position):
  imgs = _images((20, 36))
  out = _apply(T.make_patch_trigger((20, 36), size=3, position=position), imgs)
  np.testing.assert_array_equal(out, _expected(imgs, slice(5, 8), slice(7, 10), (255,) * 3))


def test_explicit_position_at_far_corner_fits():
  trig = T.make_patch_trigger((32, 32), size=3, position=(29, 29))
  assert np.asarray(trig.mask)[29:, 29:].all()


def test_position_names_are_forgiving():
  a = T.make_patch_trigger((32, 32), size=3, position="Bottom_Right")
  b = T.make_patch_trigger((32, 32), size=3, position="bottom-right")
  np.testing.assert_array_equal(a.mask, b.mask)


@pytest.mark.parametrize("size,rows", [(3, [0]), (9, [0, 1, 2]), (0.1, [0]), (5, [0])])
def test_stripe_pixels(size, rows):
  hw = (32, 32)
  side = T.patch_side(size, hw)
  imgs = _images(hw)
  trig = T.make_patch_trigger(hw, kind="stripe", size=size)  # defaults: red, top-left
  out = _apply(trig, imgs)
  rr, cc = np.meshgrid(rows, np.arange(side), indexing="ij")
  np.testing.assert_array_equal(out, _expected(imgs, rr.ravel(), cc.ravel(), (255, 0, 0)))


def test_stripe_bottom_right_non_square():
  mask = np.asarray(T.make_patch_trigger((20, 36), kind="stripe", size=6,
                                         position="bottom-right").mask[..., 0])
  assert set(map(tuple, np.argwhere(mask))) == {(r, c) for r in (18, 19) for c in range(30, 36)}


def test_dots_pixels_size3():
  hw = (32, 32)
  imgs = _images(hw)
  out = _apply(T.make_patch_trigger(hw, kind="dots", size=3), imgs)  # defaults: red, bottom-right
  rows, cols = np.array([31, 31, 29]), np.array([29, 31, 30])
  np.testing.assert_array_equal(out, _expected(imgs, rows, cols, (255, 0, 0)))


def test_dots_pixels_size9_top_left():
  mask = np.asarray(T.make_patch_trigger((32, 32), kind="dots", size=9, position="top-left",
                                         color="green").mask[..., 0])
  want = set()
  for r0, c0 in [(6, 0), (6, 6), (0, 3)]:
    want |= {(r0 + i, c0 + j) for i in range(3) for j in range(3)}
  assert set(map(tuple, np.argwhere(mask))) == want


def test_dots_size4_and_2():
  m4 = np.asarray(T.make_patch_trigger((8, 8), kind="dots", size=4, position="top-left").mask[..., 0])
  assert set(map(tuple, np.argwhere(m4))) == {(3, 0), (3, 3), (0, 1)}
  m2 = np.asarray(T.make_patch_trigger((8, 8), kind="dots", size=2, position="top-left").mask[..., 0])
  assert set(map(tuple, np.argwhere(m2))) == {(1, 0), (1, 1), (0, 0)}


@pytest.mark.parametrize("color,rgb", [("white", (255, 255, 255)), ("black", (0, 0, 0)),
                                       ("red", (255, 0, 0)), ("green", (0, 255, 0)),
                                       ("yellow", (255, 255, 0)), ("blue", (0, 0, 255)),
                                       ("Blue", (0, 0, 255)), ("1,2,3", (1, 2, 3)),
                                       ([4, 5, 6], (4, 5, 6)), (np.array([7, 8, 9]), (7, 8, 9))])
def test_colors(color, rgb):
  trig = T.make_patch_trigger((8, 8), size=2, color=color)
  np.testing.assert_array_equal(np.asarray(trig.pattern)[7, 7], rgb)
  assert T.parse_color(color) == rgb


def test_trigger_arrays():
  trig = T.make_patch_trigger((20, 36), size=3)
  assert trig.pattern.shape == (20, 36, 3) and trig.mask.shape == (20, 36, 1)
  assert trig.pattern.dtype == jnp.float32 and trig.mask.dtype == jnp.float32
  assert set(np.unique(np.asarray(trig.mask))) == {0.0, 1.0}
  # The pattern is zero wherever the mask is zero.
  assert not np.asarray(trig.pattern)[np.asarray(trig.mask)[..., 0] == 0].any()


def test_default_kind_is_white_bottom_right_square():
  imgs = _images((32, 32))
  out = _apply(T.make_patch_trigger((32, 32)), imgs)
  np.testing.assert_array_equal(out, _expected(imgs, slice(29, 32), slice(29, 32), (255,) * 3))


# ------------------------------------------------------------------------------- custom


def test_custom_blend_float_and_uint8():
  pattern = np.array([[[100, 200, 0], [50, 50, 50], [255, 255, 255]],
                      [[0, 0, 0], [10, 20, 30], [1, 2, 3]]], np.float32)
  mask = np.array([[1.0, 0.5, 0.0], [0.25, 1.0, 0.5]])
  trig = T.make_patch_trigger((6, 7), kind="custom", pattern=pattern, mask=mask, position=(1, 2))
  imgs = np.full((1, 6, 7, 3), 101, np.uint8)
  f = _apply(trig, imgs.astype(np.float32))
  want = imgs.astype(np.float32)
  m = mask[..., None]
  want[0, 1:3, 2:5] = want[0, 1:3, 2:5] * (1 - m) + pattern * m
  np.testing.assert_allclose(f, want, rtol=0, atol=1e-4)
  u = _apply(trig, imgs)
  assert u.dtype == np.uint8
  np.testing.assert_array_equal(u, np.clip(np.round(want), 0, 255).astype(np.uint8))
  # Outside the custom box nothing changes, even where the mask is zero inside it.
  assert (u[0, 1, 4] == 101).all()


def test_custom_default_mask_and_mask_shapes():
  pattern = np.full((2, 2, 3), 7, np.uint8)
  a = T.make_patch_trigger((5, 5), kind="custom", pattern=pattern, position="top-left")
  b = T.make_patch_trigger((5, 5), kind="custom", pattern=pattern, mask=np.ones((2, 2, 1)),
                           position="top-left")
  np.testing.assert_array_equal(a.mask, b.mask)
  np.testing.assert_array_equal(np.asarray(a.mask)[:2, :2, 0], np.ones((2, 2)))
  assert np.asarray(a.mask).sum() == 4
  # Default custom position is bottom-right.
  c = T.make_patch_trigger((5, 5), kind="custom", pattern=pattern)
  assert np.asarray(c.mask)[3:, 3:].all() and np.asarray(c.mask).sum() == 4


def test_custom_from_config_npy(tmp_path):
  pattern = np.random.default_rng(1).integers(0, 256, (3, 4, 3)).astype(np.uint8)
  mask = np.zeros((3, 4))
  mask[1] = 1
  np.save(tmp_path / "p.npy", pattern)
  np.save(tmp_path / "m.npy", mask)
  cfg = ml_collections.ConfigDict(dict(kind="custom", size=0.1, position="top-right", color="red",
                                       custom=dict(pattern_path=str(tmp_path / "p.npy"),
                                                   mask_path=str(tmp_path / "m.npy"))))
  trig = T.trigger_from_config(cfg, (10, 12))
  direct = T.make_patch_trigger((10, 12), kind="custom", pattern=pattern, mask=mask,
                                position="top-right")
  np.testing.assert_array_equal(trig.mask, direct.mask)
  np.testing.assert_array_equal(trig.pattern, direct.pattern)
  assert set(map(tuple, np.argwhere(np.asarray(trig.mask)[..., 0]))) == {(1, c) for c in range(8, 12)}


# ------------------------------------------------------------------------------- config


def test_from_config_matches_direct():
  cfg = ml_collections.ConfigDict(dict(kind="square", size=0.1, position="bottom-left",
                                       color="yellow", margin=1))
  a = T.trigger_from_config(cfg, (32, 32))
  b = T.make_patch_trigger((32, 32), kind="square", size=0.1, position="bottom-left",
                           color="yellow", margin=1)
  np.testing.assert_array_equal(a.mask, b.mask)
  np.testing.assert_array_equal(a.pattern, b.pattern)


def test_from_config_optional_fields_and_kind_defaults():
  cfg = ml_collections.ConfigDict(dict(kind="stripe", size=6))
  a = T.trigger_from_config(cfg, (32, 32))
  b = T.make_patch_trigger((32, 32), kind="stripe", size=6, position="top-left", color="red")
  np.testing.assert_array_equal(a.mask, b.mask)
  np.testing.assert_array_equal(a.pattern, b.pattern)
  # A plain dict works too; "row,col" strings from command lines are accepted; the
  # section of a kind the config does not use is ignored.
  c = T.trigger_from_config({"kind": "square", "size": 3, "position": "4,5", "color": "",
                             "margin": None, "custom": {"pattern_path": ""}}, (32, 32))
  assert np.asarray(c.mask)[4:7, 5:8].all() and np.asarray(c.mask).sum() == 9


# ------------------------------------------------------------------------- jax behaviour


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_dtype_kept_and_jit_matches(dtype):
  imgs = _images((32, 32), n=3, dtype=dtype)
  trig = T.make_patch_trigger((32, 32), kind="dots", size=6, color=(1, 2, 3))
  eager = T.apply_trigger(trig, imgs)
  jitted = jax.jit(T.apply_trigger)(trig, jnp.asarray(imgs))
  assert eager.dtype == dtype and jitted.dtype == dtype
  np.testing.assert_array_equal(np.asarray(eager), np.asarray(jitted))


def test_float_unchanged_pixels_bit_identical():
  imgs = np.random.default_rng(0).uniform(0, 255, (2, 16, 16, 3)).astype(np.float32)
  out = _apply(T.make_patch_trigger((16, 16), size=4), imgs)
  np.testing.assert_array_equal(out[:, :12], imgs[:, :12])
  np.testing.assert_array_equal(out[:, :, :12], imgs[:, :, :12])
  assert (out[:, 12:, 12:] == 255).all()


def test_uint8_rounds_and_clips():
  pattern = np.full((1, 1, 3), 255.0)
  trig = T.make_patch_trigger((2, 2), kind="custom", pattern=pattern, mask=np.full((1, 1), 0.5),
                              position="top-left")
  imgs = np.array([[[[254, 0, 1], [9, 9, 9]], [[9, 9, 9], [9, 9, 9]]]], np.uint8)
  out = _apply(trig, imgs)
  # 0.5*254+127.5 = 254.5 -> 254 (half to even); 127.5 -> 128; 128.0 -> 128.
  np.testing.assert_array_equal(out[0, 0, 0], [254, 128, 128])
  np.testing.assert_array_equal(out[0, 0, 1], [9, 9, 9])


def test_single_image_and_vmap_over_images():
  imgs = _images((8, 8), n=4)
  trig = T.make_patch_trigger((8, 8), size=2)
  single = np.stack([_apply(trig, im) for im in imgs])
  vm = np.asarray(jax.vmap(T.apply_trigger, in_axes=(None, 0))(trig, imgs))
  np.testing.assert_array_equal(single, _apply(trig, imgs))
  np.testing.assert_array_equal(vm, _apply(trig, imgs))


def test_vmap_over_batch_of_triggers():
  imgs = _images((20, 36), n=3)
  trigs = [T.make_patch_trigger((20, 36), size=3, position=p) for p in T.POSITIONS]
  trigs.append(T.make_patch_trigger((20, 36), kind="stripe", size=6))
  stacked = T.stack_triggers(trigs)
  assert stacked.pattern.shape == (len(trigs), 20, 36, 3)
  out = jax.jit(jax.vmap(T.apply_trigger, in_axes=(0, None)))(stacked, imgs)
  assert out.shape == (len(trigs), 3, 20, 36, 3) and out.dtype == np.uint8
  for i, t in enumerate(trigs):
    np.testing.assert_array_equal(np.asarray(out[i]), _apply(t, imgs))


def test_input_not_modified():
  imgs = _images((8, 8))
  before = imgs.copy()
  _apply(T.make_patch_trigger((8, 8), size=2), imgs)
  np.testing.assert_array_equal(imgs, before)


# ---------------------------------------------------------------------------- bad input


def _raises(match, fn, *args, **kwargs):
  with pytest.raises(ConfigError) as info:
    fn(*args, **kwargs)
  msg = str(info.value)
  assert "\n" not in msg
  assert match in msg, msg
  return msg


@pytest.mark.parametrize("size", [0, -1, -0.5, 1.5, 2.25, float("nan"), float("inf"), True, "big", None])
def test_bad_size(size):
  msg = _raises(repr(size), T.make_patch_trigger, (32, 32), size=size)
  assert "32x32" in msg


@pytest.mark.parametrize("size,margin,hw", [(33, 0, (32, 32)), (31, 2, (32, 32)), (21, 0, (20, 36)),
                                           (20, 1, (20, 36))])
def test_patch_too_big(size, margin, hw):
  msg = _raises(f"size={size!r}", T.make_patch_trigger, hw, size=size, margin=margin,
                position="top-left")
  assert f"{hw[0]}x{hw[1]}" in msg


def test_patch_too_big_for_center_and_stripe():
  _raises("size=40", T.make_patch_trigger, (32, 32), size=40, position="center")
  _raises("size=33", T.make_patch_trigger, (32, 32), kind="stripe", size=33)


@pytest.mark.parametrize("margin", [-1, 1.5, "2", True])
def test_bad_margin(margin):
  _raises(repr(margin), T.make_patch_trigger, (32, 32), size=3, margin=margin)


@pytest.mark.parametrize("position", ["middle", "", "a,b", (1, 2, 3), (1.5, 2), (True, 2), 5, ("1", "2")])
def test_bad_position(position):
  _raises(repr(position), T.make_patch_trigger, (32, 32), size=3, position=position)


@pytest.mark.parametrize("position", [(30, 0), (0, 30), (-1, 0), (0, -1), "29,30", (100, 100)])
def test_position_off_image(position):
  msg = _raises(repr(T.parse_position(position)), T.make_patch_trigger, (32, 32), size=3,
                position=position)
  assert "32x32" in msg and "[0, 29]" in msg


def test_bad_kind():
  msg = _raises("'star'", T.make_patch_trigger, (32, 32), kind="star")
  assert "square" in msg and "custom" in msg


@pytest.mark.parametrize("color", [(256, 0, 0), (-1, 0, 0), (1, 2), (1.0, 2, 3), "purple",
                                   "1,2", (True, 0, 0), 7])
def test_bad_color(color):
  _raises(repr(color), T.make_patch_trigger, (32, 32), size=3, color=color)


@pytest.mark.parametrize("hw", [(0, 32), (32,), (32, 32, 3), (32.0, 32), None, "32x32"])
def test_bad_image_hw(hw):
  _raises(repr(hw), T.make_patch_trigger, hw)


def test_bad_custom():
  ok = np.zeros((2, 2, 3))
  _raises("None", T.make_patch_trigger, (8, 8), kind="custom")
  _raises("(2, 2)", T.make_patch_trigger, (8, 8), kind="custom", pattern=np.zeros((2, 2)))
  _raises("256", T.make_patch_trigger, (8, 8), kind="custom", pattern=np.full((2, 2, 3), 256.0))
  _raises("-1", T.make_patch_trigger, (8, 8), kind="custom", pattern=np.full((2, 2, 3), -1.0))
  _raises("1.5", T.make_patch_trigger, (8, 8), kind="custom", pattern=ok, mask=np.full((2, 2), 1.5))
  _raises("(3, 3)", T.make_patch_trigger, (8, 8), kind="custom", pattern=ok, mask=np.ones((3, 3)))
  _raises("all zero", T.make_patch_trigger, (8, 8), kind="custom", pattern=ok, mask=np.zeros((2, 2)))
  _raises("non-finite", T.make_patch_trigger, (8, 8), kind="custom",
          pattern=np.full((2, 2, 3), np.nan))
  _raises("9x9", T.make_patch_trigger, (8, 8), kind="custom", pattern=np.zeros((9, 9, 3)))
  _raises("'square'", T.make_patch_trigger, (8, 8), kind="square", pattern=ok)


def test_bad_config(tmp_path):
  _raises("'colour'", T.trigger_from_config,
          ml_collections.ConfigDict(dict(kind="square", colour="red")), (32, 32))
  _raises("kind", T.trigger_from_config, ml_collections.ConfigDict(dict(size=3)), (32, 32))
  missing = str(tmp_path / "nope.npy")
  _raises(missing, T.trigger_from_config, dict(kind="custom", custom=dict(pattern_path=missing)), (32, 32))
  _raises("p.txt", T.trigger_from_config, dict(kind="custom", custom=dict(pattern_path="p.txt")), (32, 32))
  _raises("trigger.custom.pattern_path", T.trigger_from_config, dict(kind="custom", custom={}), (32, 32))
  _raises("'diamond'", T.trigger_from_config, dict(kind="diamond"), (32, 32))
  _raises("size 0.0", T.trigger_from_config, dict(kind="square", size=0.0), (32, 32))


def test_apply_shape_mismatch():
  trig = T.make_patch_trigger((32, 32))
  _raises("(2, 28, 28, 3)", T.apply_trigger, trig, np.zeros((2, 28, 28, 3), np.uint8))
  _raises("(2, 32, 32, 1)", T.apply_trigger, trig, np.zeros((2, 32, 32, 1), np.uint8))
  _raises("bool", T.apply_trigger, trig, np.zeros((1, 32, 32, 3), bool))


def test_stack_mismatch():
  _raises("different image sizes", T.stack_triggers,
          [T.make_patch_trigger((8, 8)), T.make_patch_trigger((9, 9))])
  _raises("empty", T.stack_triggers, [])


# ------------------------------------------------------------------- pattern patches


@pytest.mark.parametrize("cell", [1, 2])
def test_checkerboard_exact_pixels(cell):
  hw = (8, 10)
  imgs = _images(hw)
  trig = T.make_checkerboard_trigger(hw, size=4, position="top-left", margin=1, color="red",
                                     color2=(0, 0, 255), cell=cell)
  want = imgs.copy()
  for i in range(4):
    for j in range(4):  # box pixel (i, j) at image pixel (1 + i, 1 + j); the box's top-left is red
      want[:, 1 + i, 1 + j] = (255, 0, 0) if (i // cell + j // cell) % 2 == 0 else (0, 0, 255)
  np.testing.assert_array_equal(_apply(trig, imgs), want)
  assert T.trigger_region(trig).sum() == 16 and T.trigger_region(trig)[1:5, 1:5].all()
  cfg = dict(kind="checkerboard", size=4, position="top-left", margin=1, color="red",
             checkerboard=dict(color2=(0, 0, 255), cell=cell))
  np.testing.assert_array_equal(_apply(T.trigger_from_config(cfg, hw), imgs), want)


def test_checkerboard_defaults_white_and_black_bottom_right():
  imgs = _images((6, 6))
  out = _apply(T.trigger_from_config(dict(kind="checkerboard", size=2, checkerboard={}), (6, 6)), imgs)
  want = _expected(_expected(imgs, [4, 5], [4, 5], (255, 255, 255)), [4, 5], [5, 4], (0, 0, 0))
  np.testing.assert_array_equal(out, want)
  _raises("checkerboard.cell 0", T.make_checkerboard_trigger, (6, 6), cell=0)
  _raises("unknown trigger color 'mauve'", T.make_checkerboard_trigger, (6, 6), color2="mauve")


def test_noise_patch_exact_pixels_and_seeds():
  hw = (9, 7)
  imgs = _images(hw)
  key = jax.random.key(4)
  trig = T.trigger_from_config(dict(kind="noise_patch", size=3, position="center"), hw, key)
  box = np.asarray(jax.random.randint(key, (3, 3, 3), 0, 256))
  want = imgs.copy()
  want[:, 3:6, 2:5] = box  # center of 9x7: rows (9-3)//2 = 3, cols (7-3)//2 = 2
  np.testing.assert_array_equal(_apply(trig, imgs), want)
  assert box.std() > 30 and T.trigger_region(trig).sum() == 9
  seeded = [T.trigger_from_config(dict(kind="noise_patch", size=3, seed=5), hw, jax.random.key(k)) for k in (1, 2)]
  np.testing.assert_array_equal(seeded[0].pattern, seeded[1].pattern)  # trigger.seed fixes it
  other = T.trigger_from_config(dict(kind="noise_patch", size=3, position="center"), hw, jax.random.key(5))
  assert not np.array_equal(other.pattern, trig.pattern)


# --------------------------------------------------------------------------- registry


def test_config_sections_defaults_and_errors():
  assert T.default_config("wanet").to_dict() == dict(k=4, s=0.5, grid_rescale=1.0, cross_ratio=2.0)
  assert T.default_config("square").to_dict() == {}
  c = ml_collections.ConfigDict(dict(kind="wanet", size=0.1))
  _raises("needs the section trigger.wanet", T.trigger_from_config, c, (16, 16))
  _raises("default_config('wanet')", T.cross_ratio_from_config, c)
  T.ensure_section(c)
  c.wanet.s = 0.0
  T.ensure_section(c)  # an existing section is kept
  assert c.wanet.s == 0.0 and c.wanet.k == 4
  x = _images((16, 16))
  np.testing.assert_array_equal(_apply(T.trigger_from_config(c, (16, 16), jax.random.key(0)), x), x)  # s=0: identity
  c.wanet.cross_ratio = 1.5
  assert T.cross_ratio_from_config(c) == 1.5
  c.wanet.cross_ratio = -1.0
  _raises("wanet.cross_ratio -1.0", T.cross_ratio_from_config, c)
  partial = T.trigger_from_config(dict(kind="wanet", wanet=dict(s=1.0)), (16, 16), jax.random.key(3))
  full = T.make_wanet_trigger((16, 16), jax.random.key(3), k=4, s=1.0)  # missing fields take the defaults
  np.testing.assert_array_equal(partial.coords, full.coords)
  assert T.cross_ratio_from_config(dict(kind="square")) == 0.0
  # old flat keys point to their section; unknown kinds list the registered ones
  _raises("did you mean trigger.wanet.k", T.trigger_from_config, dict(kind="wanet", wanet_k=4), (16, 16))
  _raises("did you mean trigger.blend.alpha", T.trigger_from_config, dict(kind="blend", alpha=0.1), (16, 16))
  _raises("allowed: square, stripe, dots", T.trigger_from_config, dict(kind="diamond"), (16, 16))
  _raises("trigger.filter is 0.5", T.trigger_from_config, dict(kind="filter", filter=0.5), (16, 16))
  _raises("unknown field trigger.square.size", T.trigger_from_config, dict(kind="square", square=dict(size=3)),
          (16, 16))


def test_register_trigger_checks_names():
  build = lambda args: T.make_patch_trigger(args.image_hw)
  _raises("already registered", T.register_trigger("square"), build)
  _raises("'Bad-Name'", T.register_trigger, "Bad-Name")
  _raises("'size'", T.register_trigger, "size")  # would clash with the common fields
  _raises("'not ok'", T.register_trigger, "fine", defaults={"not ok": 1})
  assert "test_only_kind" not in T.trigger_kinds()
  try:
    T.register_trigger("test_only_kind")(build)
    assert T.trigger_kinds()[-1] == "test_only_kind"
    assert T.trigger_from_config(dict(kind="Test_Only_Kind"), (8, 8)).has_region
  finally:
    T.unregister_trigger("test_only_kind")
  assert "test_only_kind" not in T.trigger_kinds()


def test_old_flat_configs_upgrade_to_sections():
  old = dict(kind="wanet", size=0.1, position="bottom-right", color=[255, 255, 255], margin=0, pattern_path="",
             mask_path="", seed=-1, alpha=0.2, blend_pattern="noise", blend_region="full", wanet_k=3, wanet_s=0.7,
             wanet_grid_rescale=1.0, wanet_cross_ratio=1.5, filter_name="nashville", filter_strength=1.0,
             moire_opacity=0.5, moire_spacing=2.0, moire_angles=[0.0, 5.0], moire_perspective=0.15, ssba_path="")
  new = T.upgrade_flat_config(old)  # e.g. a config.json written before trigger sections
  assert new.to_dict() == dict(kind="wanet", size=0.1, position="bottom-right", color=[255, 255, 255], margin=0,
                               seed=-1, wanet=dict(k=3, s=0.7, grid_rescale=1.0, cross_ratio=1.5))
  assert T.cross_ratio_from_config(new) == 1.5
  blend = T.upgrade_flat_config(dict(old, kind="blend", alpha=0.4))
  assert blend.blend.to_dict() == dict(alpha=0.4, pattern="noise", region="full") and "wanet" not in blend
  assert T.upgrade_flat_config(new).to_dict() == new.to_dict()  # already sectioned: unchanged
  _raises("'colour'", T.upgrade_flat_config, dict(kind="square", colour="red"))
