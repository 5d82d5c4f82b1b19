"""Faithfulness and sanity metrics of explanation maps, as pure, jit-compiled JAX functions.

Perturbation metrics (does removing what the map calls relevant change the prediction?):

* :func:`deletion` / :func:`insertion` (RISE, Petsiuk et al. 2018): pixels are removed
  from (inserted into) the image in the order of the map, most relevant first, in
  ``n_steps`` equal chunks; the curve is the target-class score after each chunk and
  its area (trapezoid over the fraction of pixels) is the metric. A faithful map gives
  a *low* deletion AUC and a *high* insertion AUC. Pixel flipping (Bach et al. 2015) is
  ``deletion`` with ``n_steps = H * W / pixels_per_step``.
* :func:`region_perturbation` (Samek et al. 2017): the same with non-overlapping k x k
  patches ranked by their summed relevance; :func:`aopc` summarises it.
* :func:`road` (Rong et al. 2022, "remove and debias"): the removed pixels are filled by
  *noisy linear imputation* (each one the weighted mean of its 8 neighbours, solved
  jointly as a sparse linear system, plus Gaussian noise), so the removal itself leaks
  no shape; MoRF (most relevant first) should drop fast, LeRF (least relevant first)
  slowly.

Sanity checks (does the map depend on what it claims to explain?):

* :func:`randomization_test` (Adebayo et al. 2018): re-initialise the parameters layer
  by layer from the top down (cascading) and compare the maps with the original ones;
  a map that does not change with the model is not an explanation of it.
* :func:`random_logit_test` (Sixt et al. 2020): compare the map of the true class with
  the map of a random other class.

Conventions: ``logits_fn(x) -> (B, K)`` (or, with ``variables``, ``logits_fn(variables,
x)``; pass the same callable each time so the jit cache is reused) takes the images in
whatever space the perturbation should happen in (normally the normalised model inputs,
so the ``zeros`` baseline is the dataset mean colour). Images are float (B, H, W, C),
maps (B, H, W) with larger = more relevant, targets (B,) int. A map's ties are broken by
pixel index (row-major), so a constant map removes pixels in reading order.

The ROAD imputation is solved with Jacobi-preconditioned conjugate gradients on the full
pixel grid (``jax.scipy.sparse.linalg.cg``, fixed shapes, vmapped over images and
channels) instead of the reference's sparse direct solve; the system is symmetric
positive definite whenever at least one pixel is kept (with none kept it returns zeros).
``benchmarks/faithfulness_crosscheck.py`` measured, on 32x32 GTSRB images with 10-90% of
the pixels removed, imputed values within 1.4e-5 of the exact sparse solve (scipy
``spsolve``, as pytorch-grad-cam does it) at the default ``tol=1e-6``, and ROAD scores within
2.4e-7 of pytorch-grad-cam's; deletion / insertion curves within 1.2e-7 of Quantus'.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

from backdoor_jax.errors import ConfigError, check_choice
from backdoor_jax.explain.imputation import noisy_linear_impute

LogitsFn = Callable[..., jax.Array]
MapsFn = Callable[[Any, jax.Array, jax.Array], jax.Array]


class Curve(NamedTuple):
  """A perturbation curve.

  Attributes:
    fractions: (S,) fraction of the pixels removed (deletion, ROAD, region
      perturbation) or inserted (insertion) at each point.
    scores: (B, S) target-class score (softmax probability or logit) at each point.
    auc: (B,) trapezoidal area under ``scores`` over ``fractions``.
  """
  fractions: jax.Array
  scores: jax.Array
  auc: jax.Array


# ----------------------------------------------------------------------------- scores

def widen(x: jax.Array) -> jax.Array:
  """At least float32 (bf16 -> f32; f64 stays)."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))  # bf16 -> f32; f64 stays


def _probability(logits: jax.Array, targets: jax.Array) -> jax.Array:
  return jnp.take_along_axis(jax.nn.softmax(widen(logits), -1), targets[:, None], -1)[:, 0]


def _logit(logits: jax.Array, targets: jax.Array) -> jax.Array:
  return jnp.take_along_axis(widen(logits), targets[:, None], -1)[:, 0]


SCORES: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {"probability": _probability, "logit": _logit}


# ----------------------------------------------------------------------------- baselines

def _gaussian_blur(images: jax.Array, sigma: float) -> jax.Array:
  """Separable Gaussian blur of (B, H, W, C) images with reflected borders."""
  radius = max(1, int(np.ceil(2.0 * sigma)))
  t = np.arange(-radius, radius + 1, dtype=np.float64)
  k = np.exp(-0.5 * (t / sigma) ** 2)
  k = jnp.asarray(k / k.sum(), images.dtype)
  r = min(radius, images.shape[1] - 1, images.shape[2] - 1)
  if r < radius:  # reflect padding needs a side longer than the radius: use edge padding then
    x = jnp.pad(images, ((0, 0), (radius, radius), (radius, radius), (0, 0)), mode="edge")
  else:
    x = jnp.pad(images, ((0, 0), (radius, radius), (radius, radius), (0, 0)), mode="reflect")
  n = 2 * radius + 1
  h, w = images.shape[1:3]
  x = sum(k[i] * x[:, i:i + h, :, :] for i in range(n))
  return sum(k[i] * x[:, :, i:i + w, :] for i in range(n))


BASELINES: dict[str, Callable[..., jax.Array]] = {
    "zeros": lambda images, blur_sigma: jnp.zeros_like(images),
    "mean": lambda images, blur_sigma: jnp.broadcast_to(jnp.mean(images, axis=(1, 2), keepdims=True), images.shape),
    "blur": lambda images, blur_sigma: _gaussian_blur(images, blur_sigma),
}


def make_baseline(images: jax.Array, baseline: str | jax.Array = "zeros", blur_sigma: float = 5.0) -> jax.Array:
  """The image that removed pixels take their values from, (B, H, W, C).

  Args:
    images: (B, H, W, C) float images.
    baseline: ``'zeros'``, ``'mean'`` (per-image, per-channel mean), ``'blur'``
      (Gaussian blur, ``blur_sigma`` pixels; RISE's insertion start) or an array
      broadcastable to the images.
    blur_sigma: standard deviation of the blur in pixels.
  Raises:
    ConfigError: an unknown baseline name, a non-positive sigma, or an array that does
      not broadcast.
  """
  if isinstance(baseline, str):
    check_choice("baseline", baseline, BASELINES)
    if not blur_sigma > 0:
      raise ConfigError(f"blur_sigma={blur_sigma} must be > 0")
    return BASELINES[baseline](images, float(blur_sigma))
  baseline = jnp.asarray(baseline, images.dtype)
  try:
    return jnp.broadcast_to(baseline, images.shape)
  except ValueError:
    raise ConfigError(f"baseline of shape {baseline.shape} does not broadcast to the images {images.shape}") from None


# ----------------------------------------------------------------------------- checks and ranks

def _check(images: jax.Array, maps: jax.Array, targets: jax.Array) -> None:
  chex.assert_rank(images, 4)
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise ConfigError(f"images must be float model inputs; got dtype {images.dtype}")
  if maps.shape != images.shape[:3]:
    raise ConfigError(f"maps must have shape {images.shape[:3]} (B, H, W) like the images; got {maps.shape}")
  if targets.shape != images.shape[:1]:
    raise ConfigError(f"targets must have shape ({images.shape[0]},); got {targets.shape}")


def check_int(what: str, value: Any, lo: int) -> int:
  """``value`` as an int >= ``lo``, else ConfigError naming ``what``."""
  if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < lo:
    raise ConfigError(f"{what}={value!r} must be an integer >= {lo}")
  return int(value)


def pixel_ranks(maps: jax.Array, most_relevant_first: bool = True) -> jax.Array:
  """Position of every pixel in the removal order, (B, H, W) int32 in [0, H*W).

  Ties are broken by the flat pixel index (stable sort), so equal values go in reading order.
  """
  flat = widen(maps.reshape(maps.shape[0], -1))
  order = jnp.argsort(-flat if most_relevant_first else flat, axis=-1, stable=True)
  return jnp.argsort(order, axis=-1, stable=True).astype(jnp.int32).reshape(maps.shape)


def _model(logits_fn: LogitsFn, variables: Any) -> Callable[[jax.Array], jax.Array]:
  return (lambda x: logits_fn(x)) if variables is None else (lambda x: logits_fn(variables, x))


@functools.partial(jax.jit, static_argnames=("logits_fn", "score", "steps_per_call", "insert"))
def _ranked_curve(logits_fn: LogitsFn, variables: Any, images: jax.Array, replacement: jax.Array,
                  ranks: jax.Array, counts: jax.Array, targets: jax.Array, score: str, steps_per_call: int,
                  insert: bool) -> jax.Array:
  """Scores (B, S) after replacing every pixel with rank < counts[s] (or, inserting, keeping only those)."""
  f = _model(logits_fn, variables)

  def one(count):
    hit = (ranks < count)[..., None]
    x = jnp.where(hit, images, replacement) if insert else jnp.where(hit, replacement, images)
    return SCORES[score](f(x), targets)

  return jax.lax.map(one, counts, batch_size=steps_per_call).T


def _trapezoid(scores: jax.Array, fractions: jax.Array) -> jax.Array:
  if fractions.shape[0] < 2:
    return jnp.zeros(scores.shape[:1], scores.dtype)
  return jnp.trapezoid(scores, fractions, axis=-1)


def _prepare(images, maps, targets, score, steps_per_call):
  images, maps, targets = jnp.asarray(images), jnp.asarray(maps), jnp.asarray(targets, jnp.int32)
  _check(images, maps, targets)
  check_choice("score", score, SCORES)
  check_int("steps_per_call", steps_per_call, 1)
  return images, maps, targets


# ----------------------------------------------------------------------------- deletion / insertion

def _rise(logits_fn, images, maps, targets, n_steps, baseline, score, blur_sigma, variables, steps_per_call,
          insert) -> Curve:
  images, maps, targets = _prepare(images, maps, targets, score, steps_per_call)
  n_steps = check_int("n_steps", n_steps, 1)
  n = images.shape[1] * images.shape[2]
  counts = (np.arange(n_steps + 1) * n) // n_steps
  replacement = make_baseline(images, baseline, blur_sigma)
  scores = _ranked_curve(logits_fn, variables, images, replacement, pixel_ranks(maps), jnp.asarray(counts, jnp.int32),
                         targets, score, steps_per_call, insert)
  fractions = jnp.asarray(counts / n, jnp.float32)
  return Curve(fractions, scores, _trapezoid(scores, fractions))


def deletion(logits_fn: LogitsFn, images: jax.Array, maps: jax.Array, targets: jax.Array, *, n_steps: int = 32,
             baseline: str | jax.Array = "zeros", score: str = "probability", blur_sigma: float = 5.0,
             variables: Any = None, steps_per_call: int = 1) -> Curve:
  """Deletion curve: the most relevant pixels are replaced by the baseline first.

  Args:
    logits_fn: ``logits_fn(x) -> (B, K)``, or ``logits_fn(variables, x)`` with ``variables``.
    images: (B, H, W, C) float images (the space the baseline lives in).
    maps: (B, H, W) relevance, larger = more relevant.
    targets: (B,) class whose score is tracked.
    n_steps: chunks; step s removes the first ``floor(s * H * W / n_steps)`` pixels.
    baseline: ``'zeros'``, ``'mean'``, ``'blur'`` or an array (see :func:`make_baseline`).
    score: ``'probability'`` (softmax) or ``'logit'``.
    blur_sigma: for ``baseline='blur'``.
    variables: passed to ``logits_fn`` as its first argument when given (traced, not baked in).
    steps_per_call: curve points evaluated per model call (``lax.map`` batch size;
      memory grows with it).
  Returns:
    Curve with ``n_steps + 1`` points (fraction 0 = the intact image); lower AUC = more faithful.
  Raises:
    ConfigError: bad shapes, dtypes or settings.
  """
  return _rise(logits_fn, images, maps, targets, n_steps, baseline, score, blur_sigma, variables, steps_per_call,
               insert=False)


def insertion(logits_fn: LogitsFn, images: jax.Array, maps: jax.Array, targets: jax.Array, *, n_steps: int = 32,
              baseline: str | jax.Array = "blur", score: str = "probability", blur_sigma: float = 5.0,
              variables: Any = None, steps_per_call: int = 1) -> Curve:
  """Insertion curve: starting from the baseline, the most relevant pixels are restored first.

  The mirror of :func:`deletion` (same arguments; RISE starts from a blurred image, the
  default here). Higher AUC = more faithful.
  """
  return _rise(logits_fn, images, maps, targets, n_steps, baseline, score, blur_sigma, variables, steps_per_call,
               insert=True)


# ----------------------------------------------------------------------------- region perturbation

def region_ranks(maps: jax.Array, patch_size: int) -> jax.Array:
  """Rank of every pixel's k x k patch when patches are ordered by summed relevance, (B, H, W).

  Patches tile the map without overlap; ties go in reading order of the patches.
  """
  b, h, w = maps.shape
  k = patch_size
  sums = maps.reshape(b, h // k, k, w // k, k).sum(axis=(2, 4))
  ranks = pixel_ranks(sums)
  return jnp.repeat(jnp.repeat(ranks, k, axis=1), k, axis=2)


def region_perturbation(logits_fn: LogitsFn, images: jax.Array, maps: jax.Array, targets: jax.Array, *,
                        patch_size: int = 4, n_regions: int | None = None, baseline: str | jax.Array = "zeros",
                        score: str = "probability", blur_sigma: float = 5.0, variables: Any = None,
                        steps_per_call: int = 1) -> Curve:
  """Region perturbation: the most relevant k x k patches are replaced by the baseline, one per step.

  Args:
    patch_size: side k of the patches; must divide H and W (``1`` = pixel flipping).
    n_regions: patches perturbed (default all); the curve has ``n_regions + 1`` points.
    (others as in :func:`deletion`)
  Returns:
    Curve over the fraction of pixels perturbed; summarise with :func:`aopc`.
  Raises:
    ConfigError: a patch size that does not tile the image, bad settings.
  """
  images, maps, targets = _prepare(images, maps, targets, score, steps_per_call)
  k = check_int("patch_size", patch_size, 1)
  h, w = images.shape[1:3]
  if h % k or w % k:
    raise ConfigError(f"patch_size={k} must divide the image size {h}x{w}")
  total = (h // k) * (w // k)
  n_regions = total if n_regions is None else check_int("n_regions", n_regions, 1)
  if n_regions > total:
    raise ConfigError(f"n_regions={n_regions} exceeds the {total} patches of size {k} in a {h}x{w} image")
  counts = np.arange(n_regions + 1)
  replacement = make_baseline(images, baseline, blur_sigma)
  scores = _ranked_curve(logits_fn, variables, images, replacement, region_ranks(maps, k),
                         jnp.asarray(counts, jnp.int32), targets, score, steps_per_call, False)
  fractions = jnp.asarray(counts / total, jnp.float32)
  return Curve(fractions, scores, _trapezoid(scores, fractions))


def aopc(curve: Curve) -> jax.Array:
  """Area over the perturbation curve: mean over the points of (score at 0 - score), (B,)."""
  return jnp.mean(curve.scores[:, :1] - curve.scores, axis=-1)


# ----------------------------------------------------------------------------- ROAD
# (the noisy linear imputation is in explain/imputation.py)

ROAD_ORDERS = ("morf", "lerf")


def road_removed(maps: jax.Array, fraction: float, order: str = "morf") -> jax.Array:
  """(B, H, W) bool: the ``round(fraction * H * W)`` most (``morf``) or least (``lerf``) relevant pixels."""
  check_choice("ROAD order", order, ROAD_ORDERS)
  n = maps.shape[1] * maps.shape[2]
  count = int(round(float(fraction) * n))
  return pixel_ranks(maps, most_relevant_first=order == "morf") < count


def road(logits_fn: LogitsFn, images: jax.Array, maps: jax.Array, targets: jax.Array, *,
         fractions: Sequence[float] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9), order: str = "morf",
         noise: float = 0.01, key: jax.Array | None = None, score: str = "probability", variables: Any = None,
         tol: float = 1e-6, maxiter: int = 1000) -> Curve:
  """ROAD: score after removing a fraction of the pixels and imputing them (noisy linear).

  Args:
    logits_fn, images, maps, targets, score, variables: as in :func:`deletion`.
    fractions: fractions of the pixels removed (each ``round(f * H * W)`` pixels).
    order: ``'morf'`` (most relevant first: a faithful map drops fast) or ``'lerf'``
      (least relevant first: a faithful map keeps the score).
    noise: standard deviation of the Gaussian noise added to imputed values (needs ``key``).
    key: PRNG key of the noise (folded with the fraction's index); may be None when noise is 0.
    tol, maxiter: CG settings of the imputation.
  Returns:
    Curve over ``fractions`` (its ``auc`` spans only the given fractions).
  Raises:
    ConfigError: bad order, fractions outside [0, 1), a missing key with noise > 0, bad shapes.
  """
  images, maps, targets = _prepare(images, maps, targets, score, 1)
  check_choice("ROAD order", order, ROAD_ORDERS)
  fr = [float(f) for f in fractions]
  if not fr or any(not 0.0 <= f < 1.0 for f in fr):
    raise ConfigError(f"ROAD fractions must be a non-empty list of values in [0, 1); got {list(fractions)}")
  if noise < 0:
    raise ConfigError(f"ROAD noise={noise} must be >= 0")
  if noise > 0 and key is None:
    raise ConfigError("ROAD with noise > 0 needs a PRNG key (or noise=0)")
  n = images.shape[1] * images.shape[2]
  counts = jnp.asarray([int(round(f * n)) for f in fr], jnp.int32)
  key = jax.random.key(0) if key is None else key
  ranks = pixel_ranks(maps, most_relevant_first=order == "morf")
  scores = _road_curve(logits_fn, variables, images, ranks, targets, counts, key, jnp.float32(noise), score,
                       float(tol), int(maxiter))
  fractions_arr = jnp.asarray(fr, jnp.float32)
  return Curve(fractions_arr, scores, _trapezoid(scores, fractions_arr))


@functools.partial(jax.jit, static_argnames=("logits_fn", "score", "maxiter"))
def _road_curve(logits_fn, variables, images, ranks, targets, counts, key, noise, score, tol, maxiter):
  """(B, P) scores after removing the pixels of rank < ``counts[p]`` and imputing them."""
  f = _model(logits_fn, variables)

  def one(args):
    i, count = args
    x = noisy_linear_impute(images, ranks < count, jax.random.fold_in(key, i), noise, tol=tol, maxiter=maxiter)
    return SCORES[score](f(x), targets)

  return jax.lax.map(one, (jnp.arange(counts.shape[0]), counts)).T
