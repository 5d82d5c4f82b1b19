"""Faithfulness and sanity metrics: known answers on constructed models, slow references."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse
import scipy.sparse.linalg
import scipy.stats

from backdoor_jax import models
from backdoor_jax.errors import ConfigError
from backdoor_jax.explain import faithfulness as F
from backdoor_jax.explain import imputation
from backdoor_jax.explain import sanity as S
from backdoor_jax.explain.gradcam import gradcam_maps

B, H, W, C = 4, 8, 8, 3
REGION = np.zeros((H, W), bool)
REGION[1:4, 2:5] = True  # 9 pixels
WEIGHT = jnp.asarray(REGION, jnp.float32)


def region_logits(x):
  """Class 0's logit is the sum of the region's pixels (all channels); class 1's is 0."""
  s = jnp.sum(x * WEIGHT[None, :, :, None], axis=(1, 2, 3))
  return jnp.stack([s, jnp.zeros_like(s)], -1)


def images(seed=0):
  return jax.random.uniform(jax.random.key(seed), (B, H, W, C), minval=0.1, maxval=1.0)


def maps_of(kind, seed=1):
  jitter = 0.01 * jax.random.uniform(jax.random.key(seed), (B, H, W))
  good = jnp.broadcast_to(WEIGHT, (B, H, W)) + jitter
  return {"good": good, "bad": 1.0 - good, "random": jax.random.uniform(jax.random.key(seed + 7), (B, H, W))}[kind]


TARGETS = jnp.zeros((B,), jnp.int32)


def numpy_deletion(x, m, n_steps, insert=False):
  """Slow reference: a loop over the steps, pixels sorted by the map (stable), zero baseline."""
  x, m = np.asarray(x, np.float64), np.asarray(m, np.float64)
  n = H * W
  out = np.zeros((B, n_steps + 1))
  for b in range(B):
    order = np.argsort(-m[b].ravel(), kind="stable")
    for s in range(n_steps + 1):
      hit = np.zeros(n, bool)
      hit[order[:(s * n) // n_steps]] = True
      hit = hit.reshape(H, W)
      img = np.where(hit[..., None], x[b], 0.0) if insert else np.where(hit[..., None], 0.0, x[b])
      out[b, s] = np.sum(img * REGION[..., None])
  return out


def test_deletion_and_insertion_match_a_slow_reference_and_mirror_each_other():
  x, m = images(), maps_of("random")
  d = F.deletion(region_logits, x, m, TARGETS, n_steps=16, score="logit", baseline="zeros")
  i = F.insertion(region_logits, x, m, TARGETS, n_steps=16, score="logit", baseline="zeros")
  np.testing.assert_allclose(d.scores, numpy_deletion(x, m, 16), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(i.scores, numpy_deletion(x, m, 16, insert=True), rtol=1e-5, atol=1e-5)
  # A linear model with a zero baseline: deleted + inserted = the whole image at every step.
  full = np.asarray(region_logits(x)[:, 0])
  np.testing.assert_allclose(d.scores + i.scores, np.broadcast_to(full[:, None], d.scores.shape), rtol=1e-5)
  np.testing.assert_allclose(d.fractions, np.arange(17) / 16)
  np.testing.assert_allclose(d.auc, np.trapezoid(np.asarray(d.scores), np.asarray(d.fractions)), rtol=1e-6)
  # jit- and vmap-able over a leading axis (here two image sets).
  two = jax.jit(jax.vmap(lambda a, b: F.deletion(region_logits, a, b, TARGETS, n_steps=16, score="logit").auc))(
      jnp.stack([x, 2 * x]), jnp.stack([m, m]))
  np.testing.assert_allclose(two, np.stack([d.auc, 2 * d.auc]), rtol=1e-5)


def test_deleting_the_region_first_gives_the_lowest_deletion_and_highest_insertion_auc():
  x = images()
  res = {k: (F.deletion(region_logits, x, maps_of(k), TARGETS, n_steps=16),
             F.insertion(region_logits, x, maps_of(k), TARGETS, n_steps=16, baseline="zeros"))
         for k in ("good", "random", "bad")}
  dele = {k: np.asarray(v[0].auc) for k, v in res.items()}
  ins = {k: np.asarray(v[1].auc) for k, v in res.items()}
  assert np.all(dele["good"] < dele["random"]) and np.all(dele["random"] < dele["bad"])
  assert np.all(ins["good"] > ins["random"]) and np.all(ins["random"] > ins["bad"])
  # The good map removes the whole region within the first 9 / 64 of the pixels: the
  # logit is then 0 against 0, a probability of exactly one half, for the rest.
  good = np.asarray(res["good"][0].scores)
  np.testing.assert_allclose(good[:, 3:], 0.5, atol=1e-6)


def test_baselines_and_bad_settings():
  x = images()
  np.testing.assert_allclose(F.make_baseline(x, "mean")[:, 0, 0], jnp.mean(x, axis=(1, 2)), rtol=1e-6)
  blur = F.make_baseline(jnp.ones((1, H, W, 1)), "blur", blur_sigma=2.0)
  np.testing.assert_allclose(blur, 1.0, rtol=1e-6)  # a blur keeps a constant image
  with pytest.raises(ConfigError, match="baseline"):
    F.deletion(region_logits, x, maps_of("good"), TARGETS, baseline="black")
  with pytest.raises(ConfigError, match="maps must have shape"):
    F.deletion(region_logits, x, maps_of("good")[:, :4], TARGETS)
  with pytest.raises(ConfigError, match="score"):
    F.insertion(region_logits, x, maps_of("good"), TARGETS, score="prob")
  with pytest.raises(ConfigError, match="patch_size=3"):
    F.region_perturbation(region_logits, x, maps_of("good"), TARGETS, patch_size=3)
  with pytest.raises(ConfigError, match="fractions"):
    F.road(region_logits, x, maps_of("good"), TARGETS, fractions=(0.5, 1.0), noise=0.0)


def test_region_perturbation_ranks_patches_and_orders_aopc():
  m = jnp.zeros((1, H, W)).at[0, 4:6, 2:4].set(1.0).at[0, 0:2, 6:8].set(0.5)
  ranks = np.asarray(F.region_ranks(m, 2))
  assert (ranks[0, 4:6, 2:4] == 0).all() and (ranks[0, 0:2, 6:8] == 1).all() and ranks.max() == 15
  x = images()
  a = {k: np.asarray(F.aopc(F.region_perturbation(region_logits, x, maps_of(k), TARGETS, patch_size=2,
                                                  score="logit")))
       for k in ("good", "random", "bad")}
  assert np.all(a["good"] > a["random"]) and np.all(a["random"] > a["bad"])


def dense_impute(img, removed):
  """Slow reference: ROAD's linear system assembled entry by entry and solved exactly."""
  h, w = removed.shape
  idx = -np.ones((h, w), int)
  unknown = np.argwhere(removed)
  idx[removed] = np.arange(len(unknown))
  a = scipy.sparse.lil_matrix((len(unknown), len(unknown)))
  rhs = np.zeros((len(unknown), img.shape[-1]))
  for row, (i, j) in enumerate(unknown):
    for di in (-1, 0, 1):
      for dj in (-1, 0, 1):
        ii, jj = i + di, j + dj
        if (di, dj) == (0, 0) or not (0 <= ii < h and 0 <= jj < w):
          continue
        wt = 1 / 12 if di and dj else 1 / 6
        a[row, row] += wt
        if removed[ii, jj]:
          a[row, idx[ii, jj]] -= wt
        else:
          rhs[row] += wt * img[ii, jj]
  out = img.copy()
  out[removed] = scipy.sparse.linalg.spsolve(a.tocsc(), rhs).reshape(len(unknown), -1)
  return out


def test_linear_imputation_is_exact_on_a_ramp_and_matches_a_dense_solve():
  yy, xx = np.meshgrid(np.arange(H), np.arange(W), indexing="ij")
  ramp = np.stack([0.3 * yy + 0.7 * xx + 1.0, -0.2 * yy + 0.1 * xx], -1)[None]
  removed = np.zeros((1, H, W), bool)
  removed[0, 2:6, 1:7] = True  # interior: every removed pixel has all 8 neighbours
  out = imputation.linear_impute(jnp.asarray(ramp, jnp.float32), jnp.asarray(removed))
  np.testing.assert_allclose(out, ramp, atol=1e-4)
  rng = np.random.default_rng(0)
  img = rng.uniform(size=(2, H, W, 2))
  rem = rng.uniform(size=(2, H, W)) < 0.7  # border pixels too, most of the image
  got = np.asarray(imputation.linear_impute(jnp.asarray(img, jnp.float32), jnp.asarray(rem)))
  want = np.stack([dense_impute(img[b], rem[b]) for b in range(2)])
  np.testing.assert_allclose(got, want, atol=1e-4)
  noisy = imputation.noisy_linear_impute(jnp.asarray(img, jnp.float32), jnp.asarray(rem), jax.random.key(3), noise=0.5)
  np.testing.assert_array_equal(np.asarray(noisy)[~rem], img[~rem].astype(np.float32))  # kept pixels untouched
  assert np.std(np.asarray(noisy)[rem] - got[rem]) > 0.3


def test_road_morf_drops_faster_than_lerf_for_a_faithful_map():
  # Bright region on a dark image: imputing the region from its dark neighbours removes it.
  x = jnp.where(jnp.asarray(REGION)[None, :, :, None], 1.0, 0.05) * jnp.ones((B, H, W, C))
  x = x + 0.01 * jax.random.uniform(jax.random.key(4), x.shape)
  m = maps_of("good")
  kw = dict(fractions=(0.1, 0.3, 0.5), score="logit", key=jax.random.key(0))
  morf = F.road(region_logits, x, m, TARGETS, order="morf", **kw)
  lerf = F.road(region_logits, x, m, TARGETS, order="lerf", **kw)
  full = np.asarray(region_logits(x)[:, 0])
  morf_s = np.asarray(morf.scores)
  assert np.all(morf_s[:, 1] < 0.1 * full)  # 30% covers the 9 region pixels: all imputed from dark neighbours
  assert np.all(morf_s[:, 0] < 0.7 * full)  # 10%: 6 of them
  np.testing.assert_allclose(lerf.scores, np.broadcast_to(full[:, None], (B, 3)), rtol=0.05)
  assert np.all(morf.auc < lerf.auc)


def test_similarities_against_scipy_and_a_windowed_ssim_loop():
  rng = np.random.default_rng(1)
  a = rng.uniform(size=(3, H, W)).astype(np.float32)
  b = (a + 0.3 * rng.uniform(size=a.shape)).astype(np.float32)
  a[0, :4] = 0.0  # ties
  b[0, 2:5] = 0.0
  sp = np.asarray(S.spearman(jnp.asarray(a), jnp.asarray(b)))
  np.testing.assert_allclose(sp, [scipy.stats.spearmanr(a[i].ravel(), b[i].ravel())[0] for i in range(3)],
                             atol=1e-5)
  pe = np.asarray(S.pearson(jnp.asarray(a), jnp.asarray(b)))
  np.testing.assert_allclose(pe, [scipy.stats.pearsonr(a[i].ravel(), b[i].ravel())[0] for i in range(3)], atol=1e-5)
  want = []
  for i in range(3):
    vals = []
    for r in range(H - 6):
      for c in range(W - 6):
        p, q = a[i, r:r + 7, c:c + 7].astype(np.float64).ravel(), b[i, r:r + 7, c:c + 7].astype(np.float64).ravel()
        cov = np.cov(p, q)  # sample (n - 1) covariance, as scikit-image's default
        vals.append((2 * p.mean() * q.mean() + 1e-4) * (2 * cov[0, 1] + 9e-4)
                    / ((p.mean() ** 2 + q.mean() ** 2 + 1e-4) * (cov[0, 0] + cov[1, 1] + 9e-4)))
    want.append(np.mean(vals))
  np.testing.assert_allclose(S.ssim(jnp.asarray(a), jnp.asarray(b)), want, atol=1e-5)
  same = S.similarities(jnp.asarray(a), jnp.asarray(a))
  for v in same.values():
    np.testing.assert_allclose(v, 1.0, atol=1e-5)
  const = S.similarities(jnp.zeros((1, H, W)), jnp.asarray(a[:1]), ("spearman", "pearson"))
  assert float(const["spearman"][0]) == 0.0 and float(const["pearson"][0]) == 0.0


@pytest.fixture(scope="module")
def tiny_cnn():
  model = models.get_model("small_cnn", 3, widths=(4, 6), pool_after=(1,))
  variables = models.init_variables(model, jax.random.key(0), (1, 8, 8, 3))
  return model, variables


def test_randomization_test_on_gradcam(tiny_cnn):
  model, variables = tiny_cnn
  x = images()
  maps_fn = lambda v, xs, t: gradcam_maps(model.apply, v, xs, t, "conv1")
  t = jnp.argmax(model.apply(variables, x, train=False), -1)
  layers = list(reversed(list(variables["params"])))
  assert layers[0] == "fc"
  res = S.randomization_test(maps_fn, variables, x, t, layers=layers, key=jax.random.key(5))
  assert res.labels == ("none",) + tuple(layers)
  for name, sim in res.similarity.items():
    sim = np.asarray(sim)
    assert sim.shape == (len(layers) + 1, B)
    np.testing.assert_allclose(sim[0], 1.0, atol=1e-5, err_msg=name)  # nothing randomised
    assert np.mean(sim[1]) < 0.999, name  # a new last layer changes Grad-CAM's channel weights
  # Re-initialising from a fresh init replaces the layer's subtree (params and BatchNorm statistics).
  fresh = models.init_variables(model, jax.random.key(9), (1, 8, 8, 3))
  rand = S.randomize_layers(variables, ["fc"], jax.random.key(0), fresh)
  assert rand["params"]["fc"] is fresh["params"]["fc"]
  assert rand["params"]["block1"] is variables["params"]["block1"]
  with pytest.raises(ConfigError, match="unknown layer 'head'"):
    S.randomization_test(maps_fn, variables, x, t, layers=["head"], key=jax.random.key(0))


def test_random_logit_test_separates_class_specific_maps():
  # Gradient x input of a linear model whose classes read disjoint halves of the image.
  wts = jnp.stack([jnp.zeros((H, W)).at[:, :W // 2].set(1.0), jnp.zeros((H, W)).at[:, W // 2:].set(1.0)])

  def maps_fn(v, x, t):
    return jnp.sum(x, -1) * v[t]  # (B, H, W)

  x = images()
  res = S.random_logit_test(maps_fn, wts, x, TARGETS, 2, jax.random.key(0))
  np.testing.assert_array_equal(res.labels, 1)  # the only other class
  assert np.all(np.asarray(res.similarity["pearson"]) < 0)
  same = S.random_logit_test(lambda v, x, t: jnp.sum(x, -1), wts, x, TARGETS, 2, jax.random.key(0))
  np.testing.assert_allclose(same.similarity["spearman"], 1.0, atol=1e-5)


def test_report_batches_every_image_and_writes_files(tmp_path):
  from backdoor_jax import faithfulness_report as fr

  params = {"params": {"lin": {"w": WEIGHT + 0.05 * jax.random.uniform(jax.random.key(8), (H, W))},
                        "out": {"b": jnp.zeros(2)}}}

  def apply_fn(v, x):
    s = jnp.sum(x * v["params"]["lin"]["w"][None, :, :, None], axis=(1, 2, 3))
    return jnp.stack([s, 3.0 * jnp.ones_like(s)], -1) + v["params"]["out"]["b"]

  def maps_fn(v, x, t):
    return jnp.sum(x, -1) * v["params"]["lin"]["w"]  # gradient x input of class 0

  raw = np.asarray(jax.random.randint(jax.random.key(6), (6, H, W, C), 0, 256), np.uint8)
  preprocess = lambda u: u.astype(jnp.float32) / 255.0
  s = fr.FaithfulnessSettings(n_steps=4, road_fractions=(0.2, 0.5), patch_size=2, n_regions=3, batch_size=4)
  rec = fr.evaluate_faithfulness(apply_fn, params, preprocess, raw, np.zeros(6, int), maps_fn, settings=s,
                                 layers=["out", "lin"])
  x = preprocess(jnp.asarray(raw))
  pred = jnp.argmax(apply_fn(params, x), -1)
  direct = F.deletion(apply_fn, x, maps_fn(params, x, pred), pred, n_steps=4, variables=params)
  assert rec["count"] == 6  # 2 batches of 4, the last one padded and masked
  np.testing.assert_allclose(rec["deletion"]["auc"]["mean"], float(np.mean(direct.auc)), rtol=1e-5)
  np.testing.assert_allclose(rec["deletion"]["mean_curve"], np.mean(np.asarray(direct.scores), 0), rtol=1e-5)
  assert rec["randomization"]["layers"] == ["none", "out", "lin"]
  sp = rec["randomization"]["spearman"]
  np.testing.assert_allclose(sp[:2], 1.0, atol=1e-5)  # the bias does not enter the maps
  assert sp[2] < 0.9
  assert len(rec["road_morf"]["mean_curve"]) == 2 and len(rec["region_perturbation"]["fractions"]) == 4
  out = fr.write_faithfulness_report(str(tmp_path), {"m": {"clean": rec}})
  assert (tmp_path / "faithfulness.json").exists() and (tmp_path / "faithfulness_curves.png").exists()
  assert [r["images"] for r in fr.summary_rows(out)] == ["clean"]
