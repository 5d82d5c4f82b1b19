"""Tests for dataset poisoning (backdoor_jax.poison)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from backdoor_jax import poison as P
from backdoor_jax.errors import ConfigError
from backdoor_jax.triggers import apply_trigger, make_patch_trigger

N, C, HW = 200, 10, (8, 8)
TARGET = 3


@pytest.fixture(scope="module")
def data():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 200, (N,) + HW + (3,)).astype(np.uint8)  # < 255: trigger always changes
  labels = (np.arange(N) % C).astype(np.int32)
  rng.shuffle(labels)
  trigger = make_patch_trigger(HW, size=2, position="bottom-right")
  return images, labels, trigger


def _key(seed=0):
  return jax.random.PRNGKey(seed)


def _trigger_pixels():
  m = np.zeros(HW, bool)
  m[6:, 6:] = True
  return m


# --------------------------------------------------------------------------- labels


def test_target_labels():
  y = np.array([0, 3, 9, 5], np.int64)
  np.testing.assert_array_equal(P.poison_target_labels(y, mode="all_to_one", target=3, num_classes=10),
                                [3, 3, 3, 3])
  out = P.poison_target_labels(jnp.asarray(y, jnp.int32), mode="all_to_all", target=None, num_classes=10)
  assert isinstance(out, np.ndarray)
  np.testing.assert_array_equal(out, [1, 4, 0, 6])
  assert P.poison_target_labels(y, mode="all_to_one", target=3, num_classes=10).dtype == np.int64


# -------------------------------------------------------------------------- indices


@pytest.mark.parametrize("rate,n", [(0.1, 20), (0.25, 50), (0.0, 0), (0.9, 180), (0.0025, 1),
                                    (0.0024, 0), (1, 180)])
def test_counts_all_to_one(data, rate, n):
  _, labels, _ = data
  if n == 180 and rate == 1:  # rate 1 asks for all 200 but only 180 are eligible
    with pytest.raises(ConfigError, match="only 180"):
      P.choose_poison_indices(_key(), labels, rate=rate, target=TARGET, mode="all_to_one", num_classes=C)
    return
  idx = P.choose_poison_indices(_key(), labels, rate=rate, target=TARGET, mode="all_to_one",
                                num_classes=C)
  assert idx.shape == (n,) and idx.dtype == np.int64
  assert np.all(np.diff(idx) > 0)  # sorted and unique
  assert np.all(labels[idx] != TARGET)
  assert idx.min(initial=0) >= 0 and idx.max(initial=0) < N


def test_rounding_half_up():
  labels = np.arange(10) % 2
  idx = P.choose_poison_indices(_key(), labels, rate=0.25, target=None, mode="all_to_all", num_classes=2)
  assert len(idx) == 3  # 2.5 -> 3


def test_all_to_all_pool_is_everything(data):
  _, labels, _ = data
  idx = P.choose_poison_indices(_key(), labels, rate=1.0, target=None, mode="all_to_all", num_classes=C)
  np.testing.assert_array_equal(idx, np.arange(N))
  idx = P.choose_poison_indices(_key(), labels, rate=0.5, target=TARGET, mode="all_to_all", num_classes=C)
  assert len(idx) == 100 and np.any(labels[idx] == TARGET)


def test_count_argument(data):
  _, labels, _ = data
  idx = P.choose_poison_indices(_key(), labels, count=7, target=TARGET, mode="all_to_one", num_classes=C)
  assert len(idx) == 7 and np.all(labels[idx] != TARGET)
  idx = P.choose_poison_indices(_key(), labels, count=np.int64(180), target=TARGET, mode="all_to_one",
                                num_classes=C)
  np.testing.assert_array_equal(idx, np.flatnonzero(labels != TARGET))
  assert len(P.choose_poison_indices(_key(), labels, count=0, target=TARGET, mode="all_to_one",
                                     num_classes=C)) == 0


def test_determinism_and_seed_dependence(data):
  _, labels, _ = data
  kw = dict(rate=0.1, target=TARGET, mode="all_to_one", num_classes=C)
  a = P.choose_poison_indices(_key(1), labels, **kw)
  b = P.choose_poison_indices(_key(1), jnp.asarray(labels), **kw)
  c = P.choose_poison_indices(_key(2), labels, **kw)
  d = P.choose_poison_indices(jax.random.key(1), labels, **kw)  # typed keys work too
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  assert len(d) == 20


def test_selection_is_roughly_uniform(data):
  _, labels, _ = data
  hits = np.zeros(N)
  for s in range(200):
    hits[P.choose_poison_indices(_key(s), labels, rate=0.1, target=TARGET, mode="all_to_one",
                                 num_classes=C)] += 1
  eligible = labels != TARGET
  assert hits[~eligible].sum() == 0
  # Each eligible sample is chosen with probability 20/180 ~ 0.111: 22.2 of 200 on average.
  assert 15 < hits[eligible].mean() < 30 and hits[eligible].min() > 5


# ------------------------------------------------------------------------ train set


@pytest.mark.parametrize("mode", P.POISON_MODES)
def test_train_set(data, mode):
  images, labels, trigger = data
  images_before, labels_before = images.copy(), labels.copy()
  kw = dict(rate=0.15, target=TARGET, mode=mode, num_classes=C)
  out_x, out_y, is_p = P.poison_train_set(_key(5), images, labels, trigger, **kw)
  idx = P.choose_poison_indices(_key(5), labels, **kw)
  # Inputs untouched; outputs are numpy of the input dtypes.
  np.testing.assert_array_equal(images, images_before)
  np.testing.assert_array_equal(labels, labels_before)
  assert isinstance(out_x, np.ndarray) and out_x.dtype == np.uint8 and out_x.shape == images.shape
  assert isinstance(out_y, np.ndarray) and out_y.dtype == labels.dtype
  assert is_p.dtype == bool and is_p.shape == (N,)
  np.testing.assert_array_equal(np.flatnonzero(is_p), idx)
  assert is_p.sum() == 30
  # Labels: poisoned -> attack label, others unchanged.
  want_y = labels.copy()
  want_y[idx] = TARGET if mode == "all_to_one" else (labels[idx] + 1) % C
  np.testing.assert_array_equal(out_y, want_y)
  # Images: clean ones bit-identical; poisoned ones changed exactly at the trigger pixels.
  np.testing.assert_array_equal(out_x[~is_p], images[~is_p])
  tp = _trigger_pixels()
  np.testing.assert_array_equal(out_x[is_p][:, ~tp], images[is_p][:, ~tp])
  assert (out_x[is_p][:, tp] == 255).all()
  np.testing.assert_array_equal(out_x[is_p], np.asarray(apply_trigger(trigger, images[is_p])))


def test_rate_zero_is_untouched(data):
  images, labels, trigger = data
  x, y, p = P.poison_train_set(_key(), images, labels, trigger, rate=0.0, target=TARGET,
                               mode="all_to_one", num_classes=C)
  np.testing.assert_array_equal(x, images)
  np.testing.assert_array_equal(y, labels)
  assert not p.any()
  assert not np.shares_memory(x, images)


def test_train_set_jax_inputs_float_images_and_chunks(data):
  images, labels, trigger = data
  kw = dict(count=33, target=TARGET, mode="all_to_one", num_classes=C)
  ref = P.poison_train_set(_key(3), images, labels, trigger, **kw)
  for chunk_size in (1, 7, 33, 5000):
    got = P.poison_train_set(_key(3), jnp.asarray(images), jnp.asarray(labels), trigger,
                             chunk_size=chunk_size, **kw)
    assert all(isinstance(g, np.ndarray) for g in got)
    for g, r in zip(got, ref):
      np.testing.assert_array_equal(g, r)
  xf, _, _ = P.poison_train_set(_key(3), images.astype(np.float32), labels, trigger, **kw)
  assert xf.dtype == np.float32
  np.testing.assert_array_equal(xf, ref[0].astype(np.float32))


# ------------------------------------------------------------------------- test set


def test_test_set_all_to_one(data):
  images, labels, trigger = data
  x, y, src = P.poison_test_set(images, labels, trigger, target=TARGET, mode="all_to_one",
                                num_classes=C, chunk_size=16)
  np.testing.assert_array_equal(src, np.flatnonzero(labels != TARGET))
  assert len(src) == 180 and src.dtype == np.int64
  assert not np.any(labels[src] == TARGET)
  assert (y == TARGET).all() and y.dtype == labels.dtype
  assert x.dtype == np.uint8
  np.testing.assert_array_equal(x, np.asarray(apply_trigger(trigger, images[src])))


def test_test_set_all_to_all(data):
  images, labels, trigger = data
  x, y, src = P.poison_test_set(jnp.asarray(images), labels, trigger, target=None, mode="all_to_all",
                                num_classes=C)
  np.testing.assert_array_equal(src, np.arange(N))
  np.testing.assert_array_equal(y, (labels + 1) % C)
  np.testing.assert_array_equal(x, np.asarray(apply_trigger(trigger, images)))


def test_test_set_empty_pool():
  trigger = make_patch_trigger(HW, size=2)
  images = np.zeros((4,) + HW + (3,), np.uint8)
  x, y, src = P.poison_test_set(images, np.full(4, 2), trigger, target=2, mode="all_to_one",
                                num_classes=3)
  assert x.shape == (0,) + HW + (3,) and y.shape == (0,) and src.shape == (0,)


# ---------------------------------------------------------------------------- errors


def _raises(match, fn, *args, **kwargs):
  with pytest.raises(ConfigError) as info:
    fn(*args, **kwargs)
  msg = str(info.value)
  assert "\n" not in msg and match in msg, msg


@pytest.mark.parametrize("rate", [-0.1, 1.5, 2, float("nan"), "0.1", True])
def test_bad_rate(data, rate):
  _, labels, _ = data
  _raises(repr(rate), P.choose_poison_indices, _key(), labels, rate=rate, target=TARGET,
          mode="all_to_one", num_classes=C)


@pytest.mark.parametrize("count", [-1, 2.0, True, "5"])
def test_bad_count(data, count):
  _, labels, _ = data
  _raises(repr(count), P.choose_poison_indices, _key(), labels, count=count, target=TARGET,
          mode="all_to_one", num_classes=C)


def test_rate_and_count_exclusive(data):
  _, labels, _ = data
  kw = dict(target=TARGET, mode="all_to_one", num_classes=C)
  _raises("exactly one", P.choose_poison_indices, _key(), labels, rate=0.1, count=3, **kw)
  _raises("exactly one", P.choose_poison_indices, _key(), labels, **kw)


def test_too_many(data):
  _, labels, _ = data
  kw = dict(target=TARGET, mode="all_to_one", num_classes=C)
  _raises("rate 0.95", P.choose_poison_indices, _key(), labels, rate=0.95, **kw)
  _raises("count 181", P.choose_poison_indices, _key(), labels, count=181, **kw)
  _raises("count 201", P.choose_poison_indices, _key(), labels, count=201, target=None,
          mode="all_to_all", num_classes=C)


@pytest.mark.parametrize("target", [-1, 10, None, 2.0, "3"])
def test_bad_target(data, target):
  images, labels, trigger = data
  for fn, args in [(P.choose_poison_indices, (_key(), labels)),
                   (P.poison_train_set, (_key(), images, labels, trigger))]:
    _raises(repr(target), fn, *args, rate=0.1, target=target, mode="all_to_one", num_classes=C)
  _raises(repr(target), P.poison_test_set, images, labels, trigger, target=target, mode="all_to_one",
          num_classes=C)
  _raises(repr(target), P.poison_target_labels, labels, target=target, mode="all_to_one", num_classes=C)
  if target is not None:  # all_to_all ignores only a missing target
    _raises(repr(target), P.poison_target_labels, labels, target=target, mode="all_to_all",
            num_classes=C)


def test_bad_mode_and_classes(data):
  images, labels, trigger = data
  _raises("'one_to_one'", P.poison_train_set, _key(), images, labels, trigger, rate=0.1, target=0,
          mode="one_to_one", num_classes=C)
  _raises("'one_to_one'", P.poison_test_set, images, labels, trigger, target=0, mode="one_to_one",
          num_classes=C)
  _raises("num_classes 1", P.poison_target_labels, np.zeros(3, int), target=0, mode="all_to_one",
          num_classes=1)


def test_bad_labels_and_shapes(data):
  images, labels, trigger = data
  kw = dict(rate=0.1, target=0, mode="all_to_one", num_classes=C)
  _raises("[0, 12]", P.choose_poison_indices, _key(), np.array([0, 12]), **kw)
  _raises("float", P.choose_poison_indices, _key(), np.array([0.0, 1.0]), **kw)
  _raises("(200, 8, 9, 3)", P.poison_train_set, _key(), np.zeros((N, 8, 9, 3), np.uint8), labels,
          trigger, **kw)
  _raises("199 labels", P.poison_train_set, _key(), images, labels[:199], trigger, **kw)
  _raises("chunk_size 0", P.poison_test_set, images, labels, trigger, target=0, mode="all_to_one",
          num_classes=C, chunk_size=0)


def test_bad_label_rank_and_trigger_type(data):
  images, labels, trigger = data
  _raises("(200, 1)", P.choose_poison_indices, _key(), labels[:, None], rate=0.1, target=0,
          mode="all_to_one", num_classes=C)
  with pytest.raises(TypeError, match="Trigger"):
    P.poison_test_set(images, labels, {"pattern": 1}, target=0, mode="all_to_one", num_classes=C)
