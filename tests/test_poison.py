"""Tests for dataset poisoning (backdoor_jax.poison)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from backdoor_jax import clean_label
from backdoor_jax import poison as P
from backdoor_jax.errors import ConfigError
from backdoor_jax.triggers import apply_trigger, make_patch_trigger
from backdoor_jax import triggers as T

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


@pytest.mark.parametrize("mode", ["all_to_one", "all_to_all"])
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


# ------------------------------------------------------------------ poisoning variants


def test_clean_label_poisons_only_target_class_and_keeps_labels(data):
  images, labels, trigger = data
  kw = dict(count=12, target=TARGET, mode="clean_label", num_classes=C)
  x, y, is_p = P.poison_train_set(_key(1), images, labels, trigger, **kw)
  np.testing.assert_array_equal(y, labels)  # label-consistent
  assert is_p.sum() == 12 and (labels[is_p] == TARGET).all()
  np.testing.assert_array_equal(x[is_p], np.asarray(apply_trigger(trigger, images[is_p])))
  np.testing.assert_array_equal(x[~is_p], images[~is_p])
  # The pool is the 20 target-class samples; the test set is every non-target image.
  with pytest.raises(ConfigError, match="count 21.*only 20 are eligible.*clean_label"):
    P.choose_poison_indices(_key(), labels, **dict(kw, count=21))
  tx, ty, src = P.poison_test_set(images, labels, trigger, target=TARGET, mode="clean_label", num_classes=C)
  np.testing.assert_array_equal(src, np.flatnonzero(labels != TARGET))
  assert (ty == TARGET).all()


def test_clean_label_perturbation_runs_before_the_trigger(data):
  images, labels, trigger = data
  calls = []

  def perturb(x, y):
    calls.append((x.copy(), y.copy()))
    return np.full_like(x, 7)

  x, _, is_p = P.poison_train_set(_key(1), images, labels, trigger, count=5, target=TARGET, mode="clean_label",
                                  num_classes=C, perturb=perturb)
  assert len(calls) == 1 and (calls[0][1] == TARGET).all()
  np.testing.assert_array_equal(x[is_p], np.asarray(apply_trigger(trigger, np.full_like(images[is_p], 7))))


def test_pgd_perturbation_raises_surrogate_loss_within_budget():
  rng = np.random.default_rng(0)
  y = rng.integers(0, 3, 90).astype(np.int32)
  means = np.array([40.0, 128.0, 215.0])
  x = np.clip(means[y][:, None, None, None] + rng.normal(0, 20, (90, 4, 4, 3)), 0, 255).astype(np.uint8)
  logits_fn = clean_label.fit_linear_surrogate(x, y, 3, _key(0), steps=100)
  pgd = clean_label.make_pgd_perturbation(logits_fn, eps=16.0, steps=5)
  adv = pgd(x, y)
  assert adv.dtype == np.uint8 and np.abs(adv.astype(int) - x).max() <= 16
  ce = lambda im: float(jnp.mean(-jax.nn.log_softmax(logits_fn(jnp.asarray(im, jnp.float32)))[np.arange(90), y]))
  assert ce(adv) > ce(x) + 0.1
  for bad in (0.0, -1.0, 300.0):
    _raises(repr(bad), clean_label.make_pgd_perturbation, logits_fn, eps=bad)


def test_count_and_rate_give_the_same_samples(data):
  _, labels, _ = data
  kw = dict(target=TARGET, mode="all_to_one", num_classes=C)
  np.testing.assert_array_equal(P.choose_poison_indices(_key(4), labels, rate=0.1, **kw),
                                P.choose_poison_indices(_key(4), labels, count=20, **kw))


def test_wanet_noise_mode_cross_samples_are_fixed_and_keep_labels(data):
  images, labels, _ = data
  wanet = T.make_wanet_trigger(HW, _key(9), k=4, s=1.0)
  kw = dict(count=10, target=TARGET, mode="all_to_one", num_classes=C)
  x, y, is_p = P.poison_train_set(_key(2), images, labels, wanet, cross_ratio=2, **kw)
  x2, y2, is_p2 = P.poison_train_set(_key(2), images, labels, wanet, cross_ratio=2, chunk_size=3, **kw)
  for a, b in ((x, x2), (y, y2), (is_p, is_p2)):  # deterministic, whatever the chunking
    np.testing.assert_array_equal(a, b)
  idx = P.choose_poison_indices(_key(2), labels, **kw)
  np.testing.assert_array_equal(np.flatnonzero(is_p), idx)  # cross_ratio does not move the poisoned set
  cross = P.choose_cross_indices(jax.random.fold_in(_key(2), 1), N, idx, 2)
  assert len(cross) == 20 and not np.intersect1d(cross, idx).size
  np.testing.assert_array_equal(y[cross], labels[cross])  # cross samples keep their labels
  changed = np.flatnonzero(np.any(x != images, axis=(1, 2, 3)))
  assert set(changed) <= set(idx) | set(cross) and len(set(changed) & set(cross)) >= 18
  # Cross images differ from the exact warp (their field has random noise).
  exact = np.asarray(apply_trigger(wanet, images[cross]))
  assert np.mean(x[cross] != exact) > 0.2
  with pytest.raises(ConfigError, match="needs a kind with one, e.g. 'wanet'; got a 'patch' trigger"):
    P.poison_train_set(_key(2), images, labels, make_patch_trigger(HW, size=2), cross_ratio=2, **kw)
  _raises("cross_ratio -1", P.poison_train_set, _key(2), images, labels, wanet, cross_ratio=-1, **kw)
  _raises("only 190", P.poison_train_set, _key(2), images, labels, wanet, cross_ratio=50, **kw)


@pytest.mark.parametrize("kind", ["blend", "filter", "moire", "wanet"])
def test_every_trigger_kind_poisons(data, kind):
  images, labels, _ = data
  trig = T.trigger_from_config({"kind": kind, kind: {}}, HW, _key(0))  # the kind's section, all defaults
  x, y, is_p = P.poison_train_set(_key(0), images, labels, trig, count=7, target=TARGET, mode="all_to_one",
                                  num_classes=C)
  np.testing.assert_array_equal(x[is_p], np.asarray(apply_trigger(trig, images[is_p])))
  assert (y[is_p] == TARGET).all()
  tx, _, src = P.poison_test_set(images, labels, trig, target=TARGET, mode="all_to_one", num_classes=C,
                                 apply=False)
  np.testing.assert_array_equal(tx, images[src])  # training-time-only trigger: clean attack test set


# ------------------------------------------------------------- build_experiment options


def _experiment(**overrides):
  from backdoor_jax import experiment as loop
  from tests import helpers
  return loop, loop.build_experiment(helpers.tiny_config(**overrides))


def test_experiment_wanet_noise_mode_and_weak_mask():
  loop, exp = _experiment(**{"trigger.kind": "wanet", "poison.count": 20})
  changed = np.any(exp.train_images != exp.dataset.train_images, axis=(1, 2, 3))
  cross = changed & ~exp.is_poisoned
  assert exp.is_poisoned.sum() == 20 and 30 <= cross.sum() <= 40  # 40 cross samples; flat ones may not change
  np.testing.assert_array_equal(exp.train_labels[~exp.is_poisoned], exp.dataset.train_labels[~exp.is_poisoned])
  _, again = _experiment(**{"trigger.kind": "wanet", "poison.count": 20})
  np.testing.assert_array_equal(again.train_images, exp.train_images)  # fixed for the run, from the seed
  weak = loop.weak_trigger_mask(exp)
  assert weak.shape == exp.test_source_index.shape and weak.mean() < 0.5


def test_experiment_phases():
  _, train_only = _experiment(**{"poison.phase": "train_only", "trigger.kind": "filter"})
  np.testing.assert_array_equal(train_only.test_triggered,
                                train_only.dataset.test_images[train_only.test_source_index])
  assert train_only.is_poisoned.sum() == 40
  _, test_only = _experiment(**{"poison.phase": "test_only"})
  assert not test_only.is_poisoned.any()
  np.testing.assert_array_equal(test_only.train_images, test_only.dataset.train_images)
  assert not np.array_equal(test_only.test_triggered, test_only.dataset.test_images[test_only.test_source_index])
  with pytest.raises(ConfigError, match="'sometimes'"):
    _experiment(**{"poison.phase": "sometimes"})


def test_experiment_trigger_before_resizing():
  loop, exp = _experiment(**{"poison.apply_at_size": 8, "trigger.size": 2})
  assert exp.trigger.image_hw == (8, 8) and exp.train_images.shape[1:] == (32, 32, 3)
  p = exp.train_images[exp.is_poisoned]
  assert (p[:, -8:, -8:] > 200).all(axis=-1).mean() > 0.5  # the 2 px square became a blurred 8 px corner
  assert loop.weak_trigger_mask(exp).shape == exp.test_source_index.shape
