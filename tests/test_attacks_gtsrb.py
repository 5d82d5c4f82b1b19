"""Label-consistent attack pieces: four-corner pattern, PGD, adversarial surrogate, variants."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from backdoor_jax import adversarial, clean_label, experiment, poison, triggers
from backdoor_jax.configs import badnets
from backdoor_jax.data import load_dataset
from backdoor_jax.errors import ConfigError
from backdoor_jax.train import steps
from backdoor_jax.triggers.four_corner import make_four_corner_trigger

W, K = 255.0, 0.0


def test_four_corner_exact_pixels():
  t = make_four_corner_trigger((32, 32), size=3)
  top_left = np.array([[W, K, W], [K, W, K], [W, K, W]])  # (i + j) even -> white, corner white
  pattern, mask = np.asarray(t.pattern), np.asarray(t.mask)[..., 0]
  expected = np.zeros((32, 32))
  for rows in (slice(0, 3), slice(29, 32)):
    for cols in (slice(0, 3), slice(29, 32)):
      expected[rows, cols] = top_left  # symmetric 3x3: mirroring keeps it
  assert mask.sum() == 36 and set(np.unique(mask)) == {0.0, 1.0}
  np.testing.assert_array_equal(mask, (np.abs(np.indices((32, 32)) - 15.5).min(0) >= 13).astype(float))
  for ch in range(3):
    np.testing.assert_array_equal(pattern[..., ch], expected)
  img = np.full((1, 32, 32, 3), 100, np.uint8)
  out = np.asarray(triggers.apply_trigger(t, img))[0]
  np.testing.assert_array_equal(out[..., 0], np.where(mask > 0, expected, 100))


def test_four_corner_mirrored_flip_invariant_amplitude_and_errors():
  t = make_four_corner_trigger((20, 24), size=4, margin=1, color="red", color2="blue")
  p = np.asarray(t.pattern)
  np.testing.assert_array_equal(p[1, 1], [255, 0, 0])
  np.testing.assert_array_equal(p[1, 2], [0, 0, 255])
  np.testing.assert_array_equal(p[1, 22], [255, 0, 0])  # mirrored: the outer corner pixel keeps color
  np.testing.assert_array_equal(p[18, 22], [255, 0, 0])
  imgs = np.random.default_rng(0).integers(0, 256, (3, 20, 24, 3)).astype(np.uint8)
  flip = lambda x: x[:, :, ::-1]
  np.testing.assert_array_equal(flip(np.asarray(triggers.apply_trigger(t, imgs))),
                                np.asarray(triggers.apply_trigger(t, flip(imgs))))
  half = make_four_corner_trigger((32, 32), size=3, amplitude=0.5)
  out = np.asarray(triggers.apply_trigger(half, np.full((1, 32, 32, 3), 100.0, np.float32)))[0]
  assert out[0, 0, 0] == pytest.approx(177.5) and out[0, 1, 0] == pytest.approx(50.0) and out[5, 5, 0] == 100.0
  with pytest.raises(ConfigError, match="too large for four corner"):
    make_four_corner_trigger((32, 32), size=16, margin=1)
  with pytest.raises(ConfigError, match="amplitude"):
    make_four_corner_trigger((32, 32), amplitude=0.0)


def test_pgd_known_answer_on_a_linear_model():
  # Two classes, logits = x . w_c: the gradient sign of the loss of class 0 is sign(w1 - w0)
  # everywhere, so PGD ends exactly at x0 + eps * sign(w1 - w0), clipped to [0, 255].
  rng = np.random.default_rng(1)
  w = jnp.asarray(1e-4 * rng.normal(size=(4 * 4 * 3, 2)), jnp.float32)  # unsaturated softmax
  fn = lambda x: x.reshape(x.shape[0], -1) @ w
  x0 = jnp.asarray(rng.uniform(0, 255, (5, 4, 4, 3)).round(), jnp.float32).at[0, 0, 0, 0].set(250.0)
  out = adversarial.pgd(fn, x0, jnp.zeros(5, jnp.int32), eps=16.0, steps=3, step_size=8.0)
  direction = np.sign(np.asarray(w[:, 1] - w[:, 0])).reshape(4, 4, 3)
  np.testing.assert_allclose(np.asarray(out), np.clip(np.asarray(x0) + 16.0 * direction, 0, 255), atol=1e-4)
  start = adversarial.pgd(fn, x0, jnp.zeros(5, jnp.int32), eps=16.0, steps=1, step_size=1.0, key=jax.random.key(0))
  assert float(jnp.max(jnp.abs(start - x0))) <= 16.0 + 1e-4


def _toy(n=96, seed=0):
  rng = np.random.default_rng(seed)
  labels = np.arange(n) % 3
  images = rng.integers(0, 60, (n, 32, 32, 3)) + 60 * labels[:, None, None, None]
  return images.astype(np.uint8), labels.astype(np.int32)


def test_label_consistent_keeps_labels_and_poisons_half_the_target_class_within_eps():
  images, labels = _toy()
  fn = clean_label.fit_linear_surrogate(images, labels, 3, jax.random.key(0), steps=20)
  perturb = clean_label.make_pgd_perturbation(fn, eps=16.0, steps=4)
  trig = make_four_corner_trigger((32, 32), size=3)
  n_target = int(np.sum(labels == 1))
  x, y, is_p = poison.poison_train_set(jax.random.key(3), images, labels, trig, count=n_target // 2, target=1,
                                       mode="clean_label", num_classes=3, perturb=perturb)
  np.testing.assert_array_equal(y, labels)  # every label untouched
  assert is_p.sum() == n_target // 2 and np.all(labels[is_p] == 1)
  np.testing.assert_array_equal(x[~is_p], images[~is_p])
  corners = np.asarray(trig.mask)[..., 0] > 0
  diff = np.abs(x[is_p].astype(int) - images[is_p].astype(int))
  assert diff[:, ~corners].max() <= 16 and diff[:, ~corners].max() >= 8  # PGD moved them, within eps
  np.testing.assert_array_equal(x[is_p][:, corners], np.broadcast_to(np.asarray(trig.pattern)[corners],
                                                                    x[is_p][:, corners].shape))


def test_adversarial_surrogate_trains_once_and_is_cached(tmp_path):
  images, labels = _toy(64)
  spec = steps.InputSpec(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
  cfg = adversarial.AdvTrainConfig(widths=(4, 8), epochs=1, batch_size=32, eps=4.0, steps=1)
  path = str(tmp_path / "sur.msgpack")
  fn = adversarial.load_or_train_surrogate(path, images, labels, 3, jax.random.key(0), spec, cfg)
  probe = jnp.asarray(images[:4], jnp.float32)
  again = adversarial.load_or_train_surrogate(path, images, labels, 3, jax.random.key(9), spec, cfg)
  np.testing.assert_array_equal(np.asarray(fn(probe)), np.asarray(again(probe)))  # read back, not retrained
  assert np.all(np.isfinite(np.asarray(fn(probe))))
  with pytest.raises(ConfigError, match="other settings or data"):
    adversarial.load_or_train_surrogate(path, images[::-1], labels, 3, jax.random.key(0), spec, cfg)
  with pytest.raises(ConfigError, match="surrogate eps"):
    adversarial.adversarial_train(images, labels, 3, jax.random.key(0), spec,
                                  adversarial.AdvTrainConfig(eps=0.0))
  with pytest.raises(ConfigError, match="poison.surrogate 'robust'"):
    clean_label.surrogate_from_config({"surrogate": "robust"}, images, labels, 3, jax.random.key(0), spec)


@pytest.mark.parametrize("base", ["digits", "gtsrb"])
def test_label_consistent_variants_poison_at_most_half_of_the_target_class(base):
  c = badnets.get_config(f"{base}_label_consistent")
  assert c.trigger.kind == "four_corner" and c.poison.mode == "clean_label" and c.poison.surrogate == "adversarial"
  assert c.poison.adv_eps == 16.0
  if base == "digits":
    labels = load_dataset("digits", image_size=8, seed=0).train_labels
  else:  # class counts of the full GTSRB training set (39,209 images; class 2 has 2,250)
    labels = np.repeat([2, 0], [2250, 39209 - 2250])
  n = poison.num_poison_samples(len(labels), rate=c.poison.rate)
  assert 0 < n <= np.sum(labels == c.poison.target) / 2


def test_poisoned_training_set_is_fixed_for_the_run():
  # The perturbed, triggered set is built once (from the run's key) and read every epoch:
  # two builds of the same config give the same bytes, and only target-class samples change.
  c = badnets.get_config("digits_label_consistent")
  c.data.max_train, c.data.max_test = 300, 50
  c.poison.surrogate = "linear"
  a, b = experiment.build_experiment(c), experiment.build_experiment(c)
  np.testing.assert_array_equal(a.train_images, b.train_images)
  np.testing.assert_array_equal(a.is_poisoned, b.is_poisoned)
  np.testing.assert_array_equal(a.train_labels, a.dataset.train_labels)
  assert a.is_poisoned.any() and np.all(a.train_labels[a.is_poisoned] == c.poison.target)
