"""Map metrics (IoU, energy, pointing game, FSR / CR, regions) and overlay figures."""
import jax
import jax.numpy as jnp
import matplotlib.image
import numpy as np
import pytest

from backdoor_jax import triggers
from backdoor_jax.errors import ConfigError
from backdoor_jax.explain import metrics, overlay

TOP_LEFT_2x2 = np.zeros((4, 4), bool)
TOP_LEFT_2x2[:2, :2] = True


def _maps(*arrays):
  return jnp.asarray(np.stack(arrays).astype(np.float32))


def test_iou_known_answers():
  exact = TOP_LEFT_2x2.astype(np.float32)
  extra = exact.copy()
  extra[3, 3] = 0.9                      # one more pixel: 4 / 5
  half = np.zeros((4, 4), np.float32)
  half[0, :2] = 1.0                      # half of the region: 2 / 4
  at_threshold = exact * 0.5             # strictly above the threshold only: empty -> 0 / 4
  outside = np.zeros((4, 4), np.float32)
  outside[3, :] = 1.0                    # disjoint: 0
  got = metrics.iou(_maps(exact, extra, half, at_threshold, outside), TOP_LEFT_2x2)
  np.testing.assert_allclose(got, [1.0, 0.8, 0.5, 0.0, 0.0], rtol=1e-6)
  assert got.shape == (5,) and got.dtype == jnp.float32
  # a lower threshold takes the 0.5 map in
  np.testing.assert_allclose(metrics.iou(_maps(at_threshold), TOP_LEFT_2x2, threshold=0.4), [1.0])


def test_iou_empty_sets_and_region_forms():
  zero = np.zeros((4, 4), np.float32)
  empty = np.zeros((4, 4), bool)
  # both empty -> 0 (documented); empty map vs. a region -> 0; a map vs. an empty region -> 0
  np.testing.assert_array_equal(metrics.iou(_maps(zero), empty), [0.0])
  np.testing.assert_array_equal(metrics.iou(_maps(zero), TOP_LEFT_2x2), [0.0])
  np.testing.assert_array_equal(metrics.iou(_maps(TOP_LEFT_2x2.astype(np.float32)), empty), [0.0])
  # per-image (B, H, W) regions and numeric masks (> 0)
  maps = _maps(TOP_LEFT_2x2.astype(np.float32), TOP_LEFT_2x2.astype(np.float32))
  regions = np.stack([TOP_LEFT_2x2, ~TOP_LEFT_2x2])
  np.testing.assert_allclose(metrics.iou(maps, regions), [1.0, 0.0])
  np.testing.assert_allclose(metrics.iou(maps, regions.astype(np.float32)), [1.0, 0.0])
  with pytest.raises(AssertionError):
    metrics.iou(maps, np.ones((3, 3), bool))


def test_energy_in_region_known_answers():
  ones = np.ones((4, 4), np.float32)
  inside = TOP_LEFT_2x2.astype(np.float32) * 0.3
  zero = np.zeros((4, 4), np.float32)
  mixed = ones.copy()
  mixed[:2, :2] = 3.0                    # 12 inside of 24 in all
  got = metrics.energy_in_region(_maps(ones, inside, zero, mixed), TOP_LEFT_2x2)
  np.testing.assert_allclose(got, [0.25, 1.0, 0.0, 0.5], rtol=1e-6)
  assert not np.any(np.isnan(got))
  np.testing.assert_array_equal(metrics.energy_in_region(_maps(ones), np.zeros((4, 4), bool)), [0.0])


def test_pointing_game_known_answers_and_ties():
  hit = np.zeros((4, 4), np.float32)
  hit[1, 1] = 1.0
  miss = np.zeros((4, 4), np.float32)
  miss[3, 3] = 1.0
  # a tie between (0, 3) (outside) and (1, 0) (inside): the first in row-major order wins
  tie_out_first = np.zeros((4, 4), np.float32)
  tie_out_first[0, 3] = tie_out_first[1, 0] = 1.0
  tie_in_first = np.zeros((4, 4), np.float32)
  tie_in_first[0, 1] = tie_in_first[3, 3] = 1.0
  got = metrics.pointing_game(_maps(hit, miss, tie_out_first, tie_in_first), TOP_LEFT_2x2)
  np.testing.assert_array_equal(got, [True, False, False, True])
  assert got.dtype == jnp.bool_
  # a constant map points at pixel (0, 0)
  zero = _maps(np.zeros((4, 4), np.float32))
  assert bool(metrics.pointing_game(zero, TOP_LEFT_2x2)[0])
  assert not bool(metrics.pointing_game(zero, ~TOP_LEFT_2x2)[0])


def test_jit_equals_eager():
  maps = jax.random.uniform(jax.random.key(0), (6, 9, 7))
  region = jax.random.uniform(jax.random.key(1), (9, 7)) > 0.7
  per_image = jax.random.uniform(jax.random.key(2), (6, 9, 7)) > 0.5
  for fn in (lambda m, r: metrics.iou(m, r, 0.3), metrics.energy_in_region, metrics.pointing_game):
    for r in (region, per_image):
      np.testing.assert_array_equal(jax.jit(fn)(maps, r), fn(maps, r))
  losses = jax.random.uniform(jax.random.key(3), (11,))
  for fn in (metrics.fooling_success_rate, metrics.correct_rate):
    assert float(jax.jit(fn)(losses, 0.4)) == float(fn(losses, 0.4))
  ious = jax.random.uniform(jax.random.key(4), (11,))
  eager, jitted = metrics.iou_summary(ious), jax.jit(metrics.iou_summary)(ious)
  for k in ("mean", "median", "std", "gt_05"):
    np.testing.assert_allclose(jitted[k], eager[k], rtol=1e-6)


def test_rates_and_summary():
  losses = jnp.array([0.1, 0.5, 0.9])
  assert float(metrics.fooling_success_rate(losses, 0.5)) == pytest.approx(1 / 3)  # 0.5 is not below
  assert float(metrics.correct_rate(losses, 0.5)) == pytest.approx(2 / 3)
  for t in (0.0, 0.3, 0.5, 1.0):  # on the same losses the two criteria are complements
    assert float(metrics.fooling_success_rate(losses, t) + metrics.correct_rate(losses, t)) == pytest.approx(1.0)
  empty = jnp.zeros((0,))
  assert float(metrics.fooling_success_rate(empty, 0.5)) == 0.0
  assert float(metrics.correct_rate(empty, 0.5)) == 0.0
  s = metrics.iou_summary(jnp.array([0.0, 0.5, 0.6, 1.0]))
  assert float(s["mean"]) == pytest.approx(0.525)
  assert float(s["median"]) == pytest.approx(0.55)
  assert float(s["std"]) == pytest.approx(float(np.std([0.0, 0.5, 0.6, 1.0])), rel=1e-6)
  assert float(s["gt_05"]) == pytest.approx(0.5)  # 0.5 itself is not > 0.5
  assert {k: float(v) for k, v in metrics.iou_summary(empty).items()} == {
      "mean": 0.0, "median": 0.0, "std": 0.0, "gt_05": 0.0}


def test_region_from_trigger():
  trig = triggers.make_patch_trigger((16, 12), kind="square", size=3.0, position="bottom-right")
  region = np.asarray(metrics.region_from_trigger(trig))
  expected = np.zeros((16, 12), bool)
  expected[13:, 9:] = True
  np.testing.assert_array_equal(region, expected)
  dots = np.asarray(metrics.region_from_trigger(triggers.make_patch_trigger((16, 16), kind="dots", size=6.0)))
  assert dots.sum() == 3 * 2 * 2  # three 2x2 dots, not the whole box


@pytest.mark.parametrize("corner,rows,cols", [("top-left", slice(0, 2), slice(0, 2)),
                                              ("top-right", slice(0, 2), slice(6, 8)),
                                              ("bottom-left", slice(6, 8), slice(0, 2)),
                                              ("bottom-right", slice(6, 8), slice(6, 8))])
def test_square_region_corners(corner, rows, cols):
  expected = np.zeros((8, 8), bool)
  expected[rows, cols] = True
  np.testing.assert_array_equal(metrics.square_region((8, 8), corner=corner, fraction=0.25), expected)


def test_square_region_shapes_and_errors():
  r = np.asarray(metrics.square_region((10, 6), corner="bottom-right", fraction=0.5))  # side 3 of the short side
  assert r.shape == (10, 6) and r.sum() == 9 and r[7:, 3:].all()
  assert np.asarray(metrics.square_region((4, 4), fraction=1.0)).all()
  for bad in (0.0, -0.1, 1.5, 0.01):  # 0.01 of 8 px rounds to an empty square
    with pytest.raises(ConfigError, match="fraction"):
      metrics.square_region((8, 8), fraction=bad)
  with pytest.raises(ConfigError, match="middle"):
    metrics.square_region((8, 8), corner="middle")


def test_overlay_known_answers():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (5, 7, 3)).astype(np.uint8)
  m = rng.uniform(size=(5, 7))
  np.testing.assert_array_equal(overlay.overlay(image, m, alpha=0.0), image)
  full = overlay.overlay(image, np.zeros((5, 7)), alpha=1.0)  # jet(0) is dark blue: (0, 0, 127.5)
  assert full.dtype == np.uint8 and full.shape == (5, 7, 3)
  assert (full[..., :2] == 0).all() and (np.abs(full[..., 2].astype(int) - 128) <= 1).all()
  half = overlay.overlay(image, m, alpha=0.5)
  assert half.dtype == np.uint8 and half.shape == image.shape
  grey = overlay.overlay(image[..., 0], m, alpha=0.0)  # (H, W) grey -> RGB
  np.testing.assert_array_equal(grey, np.repeat(image[..., :1], 3, -1))
  with pytest.raises(ValueError, match="map shape"):
    overlay.overlay(image, np.zeros((4, 4)))
  with pytest.raises(ValueError, match="alpha"):
    overlay.overlay(image, m, alpha=1.5)
  with pytest.raises(ValueError, match="uint8"):
    overlay.overlay(image.astype(np.float32), m)


def test_grid_figure_writes_png(tmp_path):
  img = np.zeros((8, 8, 3), np.uint8)
  img[2:6, 2:6] = 255
  path = tmp_path / "sub" / "grid.png"
  overlay.grid_figure(str(path), ["a", "b"], ["x", "y", "z"], [[img] * 3, [img, None, img[..., 0]]], title="t",
                      captions=[["1", ("2", "red"), None], ["", "", "3"]])
  data = path.read_bytes()
  assert data[:8] == b"\x89PNG\r\n\x1a\n"
  h, w = matplotlib.image.imread(str(path)).shape[:2]
  assert w > 200 and h > 100
  assert [p.name for p in path.parent.iterdir()] == ["grid.png"]  # no temporary files left behind
  with pytest.raises(ValueError, match="cells"):
    overlay.grid_figure(str(path), ["a"], ["x", "y"], [[img]])
  with pytest.raises(ValueError, match="captions"):
    overlay.grid_figure(str(path), ["a"], ["x"], [[img]], captions=[["1", "2"]])


def test_grid_figure_shows_every_cell_whole(tmp_path):
  """Each cell's right edge stays visible: neighbouring axes must not cover it.

  Regression: with long row labels, tight_layout let each image axes overlap its right
  neighbour, so a bottom-right trigger vanished from the 'image' column.
  """
  img = np.zeros((32, 32, 3), np.uint8)
  img[:, -4:] = (255, 255, 0)  # a yellow stripe on the right edge of every cell
  rows = [f"triggered #{i} (gradcam)" for i in range(6)]
  path = tmp_path / "grid.png"
  overlay.grid_figure(str(path), rows, ["image", "before (reference)", "after (attacked)"],
                      [[img] * 3 for _ in rows], title="t")
  png = matplotlib.image.imread(str(path))[..., :3]
  yellow = (png[..., 0] > 0.9) & (png[..., 1] > 0.9) & (png[..., 2] < 0.1)
  line = yellow[np.argmax(yellow.sum(axis=1))]  # a row of pixels through the first stripes
  edges = np.flatnonzero(np.diff(line.astype(int)))
  widths = edges[1::2] - edges[0::2]
  assert len(widths) == 3, widths
  assert widths.min() >= 0.75 * widths.max(), widths
