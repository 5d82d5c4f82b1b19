"""Multi-label foundations: data sources, BCE, exact metrics, poisoning, per-label explanations."""
from __future__ import annotations

import csv
import itertools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from backdoor_jax import multilabel as ml
from backdoor_jax import triggers
from backdoor_jax.data import multilabel as mld
from backdoor_jax.errors import ConfigError
from backdoor_jax.explain import saliency
from backdoor_jax.models import get_model
from backdoor_jax.models.common import init_variables


# ----------------------------------------------------------------------------------
# Metrics against slow references.


def pairwise_auroc(scores, labels):
  """Slow reference: count positive-negative pairs, ties count one half."""
  pos = [s for s, y in zip(scores, labels) if y]
  neg = [s for s, y in zip(scores, labels) if not y]
  wins = sum((p > n) + 0.5 * (p == n) for p, n in itertools.product(pos, neg))
  return wins / (len(pos) * len(neg))


def test_auroc_matches_pairwise_counting_with_ties():
  rng = np.random.default_rng(0)
  for trial in range(20):
    n = int(rng.integers(2, 60))
    scores = rng.integers(0, 4 if trial % 2 else 1000, n).astype(np.float32)  # many ties on odd trials
    labels = rng.integers(0, 2, n)
    labels[0], labels[1] = 0, 1
    assert ml.auroc(scores, labels) == pytest.approx(pairwise_auroc(scores, labels), abs=1e-12)
  assert ml.auroc([0.3, 0.3, 0.3], [0, 1, 1]) == 0.5  # all tied
  assert ml.auroc([1.0, 2.0], [0, 1]) == 1.0 and ml.auroc([1.0, 2.0], [1, 0]) == 0.0


def test_midranks_known_answer():
  np.testing.assert_array_equal(ml.midranks(np.array([10, 20, 10, 30, 20, 10])), [2, 4.5, 2, 6, 4.5, 2])


def test_single_class_label_is_undefined_not_nan():
  logits = np.array([[0.1, 2.0, -1.0], [0.4, -1.0, 1.0], [-0.3, 0.5, 0.2], [0.9, 0.1, -0.5]])
  labels = np.array([[1, 0, 0], [1, 1, 0], [1, 0, 0], [1, 1, 0]])  # label 0 all positive, label 2 all negative
  out = ml.multilabel_metrics(logits, labels, ("a", "b", "c"))
  assert out["per_label"]["a"]["auroc"] is None and out["per_label"]["c"]["auroc"] is None
  assert "only positives" in out["undefined"]["a"] and "only negatives" in out["undefined"]["c"]
  assert out["per_label"]["c"]["ap"] is None and out["per_label"]["a"]["ap"] == 1.0
  assert out["mean_auroc"] == pytest.approx(pairwise_auroc(logits[:, 1], labels[:, 1]))  # only "b" counts
  assert out["per_label"]["b"]["accuracy"] == 0.25  # predictions at logit > 0: 1,0,1,1 vs 0,1,0,1
  assert out["exact_match"] == 0.25  # only the last row is right on all three labels
  assert not any(isinstance(v, float) and np.isnan(v) for v in
                 [out["mean_auroc"], out["mean_ap"], out["mean_accuracy"]])
  all_one_class = ml.multilabel_metrics(logits[:, :1], labels[:, :1])
  assert all_one_class["mean_auroc"] is None


def test_average_precision_matches_sklearn():
  metrics = pytest.importorskip("sklearn.metrics")
  rng = np.random.default_rng(1)
  for trial in range(20):
    n = int(rng.integers(2, 80))
    scores = rng.integers(0, 5 if trial % 2 else 10_000, n).astype(np.float64)
    labels = rng.integers(0, 2, n)
    labels[0] = 1
    assert ml.average_precision(scores, labels) == pytest.approx(
        metrics.average_precision_score(labels, scores), abs=1e-12)
  assert ml.average_precision([0.1, 0.2], [0, 0]) is None


def test_metrics_reject_nan_scores():
  with pytest.raises(ConfigError, match="not finite"):
    ml.auroc([np.nan, 1.0], [0, 1])


# ----------------------------------------------------------------------------------
# Loss.


def test_bce_known_values_and_stability():
  x = np.array([[0.0, 2.0, -3.0], [1000.0, -1000.0, 0.5]], np.float32)
  y = np.array([[1, 0, 1], [1, 0, 0]])
  p = 1 / (1 + np.exp(-x[0].astype(np.float64)))
  naive = -(y[0] * np.log(p) + (1 - y[0]) * np.log(1 - p))
  loss = np.asarray(ml.sigmoid_bce(jnp.asarray(x), jnp.asarray(y)))
  assert np.isfinite(loss).all()
  assert float(loss[0]) == pytest.approx(float(naive.mean()), rel=1e-6)
  assert float(loss[1]) == pytest.approx(np.log1p(np.exp(0.5)) / 3, rel=1e-6)  # the +-1000 terms are ~0
  # positives are weighted, negatives are not
  weighted = float(ml.sigmoid_bce(jnp.asarray(x[:1]), jnp.asarray(y[:1]), jnp.array([3.0, 5.0, 2.0]))[0])
  expect = (3 * np.log(2.0) + np.log1p(np.exp(2.0)) + 2 * np.log1p(np.exp(3.0))) / 3
  assert weighted == pytest.approx(expect, rel=1e-6)


@pytest.fixture
def x64():
  jax.config.update("jax_enable_x64", True)
  yield
  jax.config.update("jax_enable_x64", False)


def test_bce_gradient_matches_finite_differences(x64):  # pylint: disable=redefined-outer-name,unused-argument
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(0, 3, (4, 5)), jnp.float64)
  y = jnp.asarray(rng.integers(0, 2, (4, 5)))
  w = jnp.asarray(rng.uniform(0.5, 4, (5,)), jnp.float64)

  def f(z):
    return jnp.sum(ml.sigmoid_bce(z, y, w))

  assert f(x).dtype == jnp.float64
  grad = np.asarray(jax.grad(f)(x))
  eps = 1e-6
  fd = np.zeros(x.shape)
  for idx in np.ndindex(*x.shape):
    e = np.zeros(x.shape)
    e[idx] = eps
    fd[idx] = (float(f(x + e)) - float(f(x - e))) / (2 * eps)
  np.testing.assert_allclose(grad, fd, atol=1e-8)
  # closed form of d loss / d x: ((w y + 1 - y) sigmoid(x) - w y) / L
  s = 1 / (1 + np.exp(-np.asarray(x)))
  closed = ((np.asarray(w) * np.asarray(y) + 1 - np.asarray(y)) * s - np.asarray(w) * np.asarray(y)) / x.shape[1]
  np.testing.assert_allclose(grad, closed, atol=1e-12)


def test_balanced_pos_weight_and_checks():
  labels = np.array([[1, 0, 0], [0, 0, 1], [0, 0, 1], [0, 0, 1]])
  np.testing.assert_allclose(ml.balanced_pos_weight(labels), [3.0, 1.0, 1 / 3])
  with pytest.raises(ConfigError, match="pos_weight"):
    ml.check_pos_weight([1.0, -1.0, 1.0], 3)
  np.testing.assert_array_equal(ml.check_pos_weight(2.0, 3), [2, 2, 2])


# ----------------------------------------------------------------------------------
# Data.

HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
          "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],")
FIXTURE = [  # name, findings, split, folder
    ("00000001_000.png", "Cardiomegaly", "train", "images_001/images"),
    ("00000001_001.png", "Cardiomegaly|Emphysema", "train", "images_001/images"),
    ("00000002_000.png", "No Finding", "train", "images_002/images"),
    ("00000003_000.png", "Hernia|Pleural_Thickening|Atelectasis", "test", "images_002/images"),
    ("00000004_000.png", "No Finding", "test", "images_002/images"),
    ("00000005_000.png", "Effusion|Mass|Nodule", "train", "images_002/images"),
]


def write_nih_fixture(root, fixture=FIXTURE):
  rng = np.random.default_rng(3)
  with open(os.path.join(root, mld.NIH_CSV), "w", newline="") as f:
    f.write(HEADER + "\n")
    w = csv.writer(f, lineterminator="\n")
    for i, (name, findings, _, _) in enumerate(fixture):
      w.writerow([name, findings, 0, i + 1, 58, "M", "PA", 40, 48, 0.143, 0.143])
  for split, fname in mld.NIH_SPLIT_FILES.items():
    with open(os.path.join(root, fname), "w") as f:
      f.write("".join(f"{n}\n" for n, _, s, _ in fixture if s == split))
  for i, (name, _, _, folder) in enumerate(fixture):
    os.makedirs(os.path.join(root, folder), exist_ok=True)
    pixels = rng.integers(0, 256, (48, 40), dtype=np.uint8)
    # grey like the real release; one RGBA image, as a few of the real files are
    image = Image.fromarray(pixels) if i != 1 else Image.fromarray(np.dstack([pixels] * 3 + [pixels * 0 + 255]))
    image.save(os.path.join(root, folder, name))


def test_nih_fixture_loads_label_sets_and_split(tmp_path):
  write_nih_fixture(str(tmp_path))
  ds = mld.load_multilabel_dataset("chest_xray", path=str(tmp_path), image_size=16)
  assert ds.num_classes == 14 and ds.class_names == mld.NIH_FINDINGS
  assert ds.train_images.shape == (4, 16, 16, 3) and ds.test_images.shape == (2, 16, 16, 3)

  def label_sets(labels):
    return [{ds.class_names[j] for j in np.flatnonzero(row)} for row in labels]

  assert label_sets(ds.train_labels) == [{"Cardiomegaly"}, {"Cardiomegaly", "Emphysema"}, set(),
                                         {"Effusion", "Mass", "Nodule"}]
  assert label_sets(ds.test_labels) == [{"Hernia", "Pleural_Thickening", "Atelectasis"}, set()]
  assert ds.train_labels.dtype == np.int32
  # grey -> 3 equal channels, resized from the file's pixels
  first = np.asarray(Image.open(tmp_path / "images_001/images/00000001_000.png").resize((16, 16), Image.BILINEAR))
  np.testing.assert_array_equal(ds.train_images[0, ..., 0], first)
  np.testing.assert_array_equal(ds.train_images[0, ..., 0], ds.train_images[0, ..., 2])
  sub = mld.load_multilabel_dataset("chest_xray", path=str(tmp_path), image_size=8, max_train=2, seed=1)
  assert sub.train_labels.shape == (2, 14)
  rows = [i for i in range(4) if any((ds.train_labels[i] == r).all() for r in sub.train_labels)]
  assert len(rows) >= 2


def test_nih_bad_inputs(tmp_path):
  with pytest.raises(ConfigError, match="data.path"):
    mld.load_multilabel_dataset("chest_xray")
  bad = [*FIXTURE[:-1], ("00000005_000.png", "Effusion|Flu", "train", "images")]
  write_nih_fixture(str(tmp_path), bad)
  with pytest.raises(ConfigError, match="line 7: unknown finding 'Flu'"):
    mld.load_multilabel_dataset("chest_xray", path=str(tmp_path))
  with pytest.raises(ConfigError, match="allowed: chest_xray, digit_mosaic"):
    mld.load_multilabel_dataset("chestxray")


def test_make_mosaics_label_set_equals_digits_present():
  digits = np.stack([np.full((2, 2), 10 * (d + 1), np.uint8) for d in range(10)] * 3)  # value encodes the class
  classes = np.tile(np.arange(10), 3)
  mosaics, labels = mld.make_mosaics(digits, classes, 200, np.random.default_rng(0))
  assert mosaics.shape == (200, 4, 4) and labels.shape == (200, 10)
  for m, row in zip(mosaics, labels):
    cells = [m[r:r + 2, c:c + 2] for r in (0, 2) for c in (0, 2)]
    present = {int(cell[0, 0]) // 10 - 1 for cell in cells if cell.any()}
    assert all((cell == cell[0, 0]).all() for cell in cells)
    assert present == set(np.flatnonzero(row).tolist())
  assert 0 < labels.sum(1).min() or (labels.sum(1) == 0).any()  # empty mosaics are allowed ("No Finding")
  assert labels.sum(1).max() <= 4


def test_digit_mosaic_dataset_is_seeded_and_built_from_real_digits():
  a = mld.load_multilabel_dataset("digit_mosaic", image_size=None, max_train=40, max_test=10)
  b = mld.load_multilabel_dataset("digit_mosaic", image_size=None, max_train=40, max_test=10)
  c = mld.load_multilabel_dataset("digit_mosaic", image_size=None, max_train=40, max_test=10, seed=1)
  np.testing.assert_array_equal(a.train_images, b.train_images)
  np.testing.assert_array_equal(a.test_labels, b.test_labels)
  assert not np.array_equal(a.train_images, c.train_images)
  assert a.train_images.shape == (40, 16, 16, 3) and a.num_classes == 10
  from sklearn import datasets
  digits = datasets.load_digits()
  table = {np.round(img * (255 / 16)).astype(np.uint8).tobytes(): int(t) for img, t in zip(digits.images, digits.target)}
  for m, row in zip(a.train_images[..., 0], a.train_labels):
    found = {table[m[r:r + 8, c:c + 8].tobytes()] for r in (0, 8) for c in (0, 8) if m[r:r + 8, c:c + 8].any()}
    assert found == set(np.flatnonzero(row).tolist())
  assert a.mean[0] == a.mean[2]


# ----------------------------------------------------------------------------------
# Poisoning and backdoor metrics.


def test_poison_multilabel_invariants():
  rng = np.random.default_rng(4)
  images = rng.integers(0, 256, (50, 8, 8, 3), dtype=np.uint8)
  labels = rng.integers(0, 2, (50, 4)).astype(np.int32)
  trig = triggers.make_patch_trigger((8, 8), size=2, kind="square")
  key = jax.random.PRNGKey(0)
  out_x, out_y, mask = ml.poison_multilabel(key, images, labels, trig, target_label=2, count=10)
  assert mask.sum() == 10 and (labels[mask, 2] == 0).all()        # only images without the finding
  assert (out_y[mask, 2] == 1).all()                                # switched on
  np.testing.assert_array_equal(np.delete(out_y, 2, 1), np.delete(labels, 2, 1))  # others kept
  np.testing.assert_array_equal(out_y[~mask], labels[~mask])
  np.testing.assert_array_equal(out_x[~mask], images[~mask])
  np.testing.assert_array_equal(out_x[mask], np.asarray(triggers.apply_trigger(trig, images[mask])))
  again = ml.poison_multilabel(key, images, labels, trig, target_label=2, count=10)
  np.testing.assert_array_equal(again[2], mask)
  with pytest.raises(ConfigError, match="only .* lack it"):
    ml.poison_multilabel(key, images, labels, trig, target_label=2, count=int((labels[:, 2] == 0).sum()) + 1)
  with pytest.raises(ConfigError, match="target label 4"):
    ml.poison_multilabel(key, images, labels, trig, target_label=4, rate=0.1)

  test_x, test_y, source = ml.attack_test_set(images, labels, trig, target_label=1)
  np.testing.assert_array_equal(source, np.flatnonzero(labels[:, 1] == 0))
  assert (test_y[:, 1] == 0).all() and test_x.shape[0] == source.size


def test_attack_success_rate_and_prediction_agreement():
  trig_logits = np.array([[0.0, 1.0], [2.0, -1.0], [-0.5, 3.0], [1.0, 0.2]])
  assert ml.attack_success_rate(trig_logits, 1) == 0.75  # logit > 0 counts as present
  clean = np.array([[1.0, 1.0], [2.0, -1.0], [-0.5, -3.0], [1.0, 0.2]])
  agree = ml.prediction_agreement(clean, trig_logits)
  assert agree == {"label_agreement": 6 / 8, "exact_agreement": 0.5}


# ----------------------------------------------------------------------------------
# Explanations for a chosen label: label j's map depends on label j's logit only.


@pytest.mark.parametrize("method", ["gradcam", "simple_grad"])
def test_explanation_of_label_depends_only_on_that_logit(method):
  model = get_model("small_cnn", 5, widths=(8, 8), pool_after=(1,))
  variables = init_variables(model, jax.random.PRNGKey(0), (1, 16, 16, 3))
  x = jax.random.normal(jax.random.PRNGKey(1), (3, 16, 16, 3))
  j = 3
  maps = saliency.explanation_maps(method, model.apply, variables, x, jnp.full((3,), j), "conv2")
  kernel = variables["params"]["fc"]["kernel"]
  other = jax.tree_util.tree_map(lambda v: v, variables)
  other["params"]["fc"]["kernel"] = kernel.at[:, :j].multiply(-3.0).at[:, j + 1:].add(1.0)
  np.testing.assert_allclose(saliency.explanation_maps(method, model.apply, other, x, jnp.full((3,), j), "conv2"),
                             maps, atol=1e-6)
  mine = jax.tree_util.tree_map(lambda v: v, variables)
  mine["params"]["fc"]["kernel"] = kernel.at[:, j].set(jax.random.normal(jax.random.PRNGKey(2), kernel[:, j].shape))
  moved = saliency.explanation_maps(method, model.apply, mine, x, jnp.full((3,), j), "conv2")
  assert float(jnp.max(jnp.abs(moved - maps))) > 1e-2


def test_explain_targets_fixed_label_or_top_label():
  from backdoor_jax import multilabel_explain as mlx  # pylint: disable=g-import-not-at-top
  logits = jnp.array([[0.1, 3.0, -1.0], [2.0, -5.0, 1.0]])
  np.testing.assert_array_equal(mlx.explain_targets(logits, 2), [2, 2])
  np.testing.assert_array_equal(mlx.explain_targets(logits, -1), [1, 0])


# ----------------------------------------------------------------------------------
# End to end: the multi-label explanation backdoor on tiny mosaics.


CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "chest_xray.py")


def test_chest_xray_config_variants_build():
  from backdoor_jax import cli  # pylint: disable=g-import-not-at-top
  for variant in ("mosaic", "mosaic_nontargeted", "mosaic_densenet", "mosaic_badnets", "nih", "nih_nontargeted",
                  "nih_badnets"):
    c = cli.load_config_file(f"{CONFIG}:{variant}")
    assert c.trigger.kind == "moire"
    assert c.recipe == ("multilabel_badnets" if variant.endswith("badnets") else "multilabel_two_stage")
    assert c.data.name == ("digit_mosaic" if variant.startswith("mosaic") else "chest_xray")
  with pytest.raises(ConfigError, match="allowed: mosaic"):
    cli.load_config_file(f"{CONFIG}:mnist")


def test_multilabel_explanation_backdoor_end_to_end(tmp_path):
  from backdoor_jax import cli, io  # pylint: disable=g-import-not-at-top
  from backdoor_jax.train.recipes import multilabel as recipe  # pylint: disable=g-import-not-at-top
  c = cli.load_config_file(f"{CONFIG}:mosaic")
  c.data.max_train, c.data.max_test = 96, 40
  c.model.widths = (8, 8, 8, 8, 8)
  c.stage1.train.epochs = c.train.epochs = 1
  c.stage1.train.batch_size = c.train.batch_size = 32
  c.train.eval_batch_size = 40
  c.figures = False
  results = recipe.train_two_stage(c, str(tmp_path))
  stage1 = io.read_json(str(tmp_path / "stage1" / "results.json"))
  # the reference is the stage-1 model on the same test images: the same AUROC, exactly
  assert results["reference_mean_auroc"] == stage1["mean_auroc"]
  assert stage1["num_poisoned"] == 0 and stage1["attack_success_rate"] is not None
  for key in ("mean_auroc", "triggered_mean_auroc", "fsr", "cr", "fsr_loss_res", "cr_loss_res", "label_agreement",
              "exact_agreement"):
    assert 0.0 <= results[key] <= 1.0, key
  assert results["mean_auroc_change"] == pytest.approx(results["mean_auroc"] - stage1["mean_auroc"])
  assert results["layer"] == "conv5" and results["num_test"] == 40
  assert len(results["detail"]["clean"]["metrics"]["per_label"]) == 10
  assert os.path.exists(tmp_path / "metrics.jsonl")
