"""Sanity checks of explanations and the map similarities they are scored with.

``randomization_test`` (cascading re-initialisation from the top layer down) and
``random_logit_test`` (maps of a random other class) ask whether maps depend on what
they should; ``similarities`` (Spearman with average ranks for ties, SSIM as in
scikit-image, Pearson) compares (B, H, W) maps. The perturbation metrics (deletion,
insertion, ROAD, region perturbation) are in ``explain.faithfulness``.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import chex
import jax
import jax.numpy as jnp

from backdoor_jax.errors import ConfigError, check_choice
from backdoor_jax.explain.faithfulness import MapsFn, check_int, widen


class SanityResult(NamedTuple):
  """Similarities of maps to the original ones (randomisation / random-logit tests).

  Attributes:
    similarity: name -> (B,) (random logit) or (L, B) (randomisation, one row per step).
    labels: what each row is: the layers randomised so far (randomisation) or the
      random classes (random logit, (B,)).
  """
  similarity: dict[str, jax.Array]
  labels: Any


# ----------------------------------------------------------------------------- similarities

def rank_average_ties(x: jax.Array) -> jax.Array:
  """1-based ranks along the last axis, ties given their average rank (scipy's ``rankdata``)."""
  s = jnp.sort(x, axis=-1)
  lo = jax.vmap(lambda a, v: jnp.searchsorted(a, v, side="left"))(s.reshape(-1, s.shape[-1]),
                                                                  x.reshape(-1, x.shape[-1]))
  hi = jax.vmap(lambda a, v: jnp.searchsorted(a, v, side="right"))(s.reshape(-1, s.shape[-1]),
                                                                   x.reshape(-1, x.shape[-1]))
  return ((lo + hi + 1) / 2.0).reshape(x.shape).astype(jnp.float32)


def pearson(a: jax.Array, b: jax.Array) -> jax.Array:
  """Per-image Pearson correlation of (B, H, W) maps; 0 where either map is constant."""
  a = widen(a.reshape(a.shape[0], -1))
  b = widen(b.reshape(b.shape[0], -1))
  a = a - a.mean(-1, keepdims=True)
  b = b - b.mean(-1, keepdims=True)
  den = jnp.sqrt(jnp.sum(a * a, -1) * jnp.sum(b * b, -1))
  ok = den > 1e-12 * jnp.maximum(1.0, jnp.max(jnp.abs(a), -1) * jnp.max(jnp.abs(b), -1))
  return jnp.where(ok, jnp.sum(a * b, -1) / jnp.where(ok, den, 1.0), 0.0)


def spearman(a: jax.Array, b: jax.Array) -> jax.Array:
  """Per-image Spearman rank correlation (average ranks for ties); 0 where a map is constant."""
  flat = lambda m: m.reshape(m.shape[0], -1)
  return pearson(rank_average_ties(flat(a)), rank_average_ties(flat(b)))


def ssim(a: jax.Array, b: jax.Array, data_range: float = 1.0, win_size: int = 7) -> jax.Array:
  """Per-image mean SSIM of (B, H, W) maps (scikit-image's defaults: uniform 7x7 window,
  sample covariance, K1 = 0.01, K2 = 0.03, mean over the windows that fit inside the image)."""
  a, b = widen(a), widen(b)
  win = min(win_size, a.shape[1], a.shape[2])
  win -= (win + 1) % 2  # odd
  npx = win * win
  box = lambda x: jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, win, win), (1, 1, 1), "VALID") / npx
  ua, ub = box(a), box(b)
  cov = npx / (npx - 1) if npx > 1 else 1.0
  va, vb, vab = cov * (box(a * a) - ua * ua), cov * (box(b * b) - ub * ub), cov * (box(a * b) - ua * ub)
  c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
  s = ((2 * ua * ub + c1) * (2 * vab + c2)) / ((ua * ua + ub * ub + c1) * (va + vb + c2))
  return jnp.mean(s, axis=(1, 2))


SIMILARITIES: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
    "spearman": spearman, "pearson": pearson, "ssim": ssim}


def similarities(a: jax.Array, b: jax.Array, names: Sequence[str] = ("spearman", "ssim", "pearson")
                 ) -> dict[str, jax.Array]:
  """``{name: (B,)}`` similarities of two batches of maps (SSIM assumes maps in [0, 1])."""
  for n in names:
    check_choice("similarity", n, SIMILARITIES)
  chex.assert_equal_shape([a, b])
  chex.assert_rank(a, 3)
  return {n: SIMILARITIES[n](a, b) for n in names}


# ----------------------------------------------------------------------------- sanity checks

def _redraw(key: jax.Array, leaf: jax.Array) -> jax.Array:
  """A leaf re-drawn as Gaussian with the leaf's own mean and std (constant leaves unchanged)."""
  leaf = jnp.asarray(leaf)
  if not jnp.issubdtype(leaf.dtype, jnp.floating):
    return leaf
  return leaf.mean() + leaf.std() * jax.random.normal(key, leaf.shape, leaf.dtype)


def _check_layer_names(params: Any, layers: Sequence[str]) -> list[str]:
  names = list(params)
  for layer in layers:
    if layer not in params:
      raise ConfigError(f"unknown layer {layer!r} to randomise; valid: {', '.join(names)}")
  return names


def randomize_layers(variables: Any, layers: Sequence[str], key: jax.Array,
                     random_variables: Any | None = None) -> Any:
  """``variables`` with the parameters of ``layers`` (top-level names in ``params``) re-initialised.

  Args:
    variables: ``{'params': {layer: ...}, 'batch_stats'?: ...}``.
    layers: top-level module names to re-initialise.
    key: PRNG key (folded with the layer's position in ``params``), used when
      ``random_variables`` is None: each leaf is re-drawn from a Gaussian with its own
      mean and standard deviation.
    random_variables: a fresh initialisation of the same model (e.g. ``model.init``
      with another seed); the layer's subtree is taken from it, in every collection
      that has it (params and BatchNorm statistics).
  Raises:
    ConfigError: a layer name that is not a top-level entry of ``params``.
  """
  params = variables["params"]
  names = _check_layer_names(params, layers)
  out = {c: dict(v) if isinstance(v, dict) or hasattr(v, "items") else v for c, v in variables.items()}
  for layer in layers:
    if random_variables is not None:
      for c, tree in random_variables.items():
        if c in out and hasattr(tree, "items") and layer in tree:
          out[c][layer] = tree[layer]
    else:
      sub = jax.random.fold_in(key, names.index(layer))
      leaves, treedef = jax.tree_util.tree_flatten(params[layer])
      keys = jax.random.split(sub, max(1, len(leaves)))
      out["params"][layer] = jax.tree_util.tree_unflatten(treedef, [_redraw(k, l) for k, l in zip(keys, leaves)])
  return out


def randomization_test(maps_fn: MapsFn, variables: Any, images: jax.Array, targets: jax.Array, *,
                       layers: Sequence[str] | None = None, key: jax.Array | None = None,
                       random_variables: Any | None = None, cascade: bool = True,
                       similarity: Sequence[str] = ("spearman", "ssim", "pearson")) -> SanityResult:
  """Model-parameter randomisation test (cascading from the top layer down by default).

  Args:
    maps_fn: ``maps_fn(variables, images, targets) -> (B, H, W)`` maps (jit-compiled
      here once; the randomised variables have the original's structure).
    variables: the trained model's variables.
    images: (B, H, W, C) model inputs.
    targets: (B,) classes explained (the same for every model).
    layers: top-level parameter names from the output layer down; default the order of
      ``variables['params']`` reversed (Flax inits in call order; give it explicitly
      for restored checkpoints whose keys may be sorted).
    key: PRNG key for the re-draws (needed without ``random_variables``).
    random_variables: a fresh initialisation to take re-initialised layers from.
    cascade: True = step i randomises layers[0..i]; False = only layers[i].
    similarity: names from :data:`SIMILARITIES`.
  Returns:
    SanityResult with ``similarity[name]`` of shape (L + 1, B): row 0 is the intact
    model (1 for any non-constant map), row i + 1 after randomising ``labels[i + 1]``;
    ``labels`` = ``('none',) + layers``. Low similarity = the map depends on the parameters.
  Raises:
    ConfigError: unknown layers or similarity names, no key and no random_variables.
  """
  if layers is None:
    layers = list(reversed(list(variables["params"])))
  layers = list(layers)
  if key is None and random_variables is None:
    raise ConfigError("randomization_test needs a PRNG key or random_variables")
  key = jax.random.key(0) if key is None else key
  _check_layer_names(variables["params"], layers)
  for n in similarity:
    check_choice("similarity", n, SIMILARITIES)
  images, targets = jnp.asarray(images), jnp.asarray(targets, jnp.int32)
  jitted = jax.jit(maps_fn)
  base = jitted(variables, images, targets)
  rows = [similarities(base, base, similarity)]
  for i in range(len(layers)):
    chosen = layers[:i + 1] if cascade else [layers[i]]
    maps = jitted(randomize_layers(variables, chosen, key, random_variables), images, targets)
    rows.append(similarities(base, maps, similarity))
  sim = {n: jnp.stack([r[n] for r in rows]) for n in similarity}
  return SanityResult(sim, ("none",) + tuple(layers))


def random_logit_test(maps_fn: MapsFn, variables: Any, images: jax.Array, targets: jax.Array, num_classes: int,
                      key: jax.Array, *, similarity: Sequence[str] = ("spearman", "ssim", "pearson")
                      ) -> SanityResult:
  """Random-logit test: similarity of the map of ``targets`` to that of a random other class.

  Returns:
    SanityResult with ``similarity[name]`` (B,) and ``labels`` the random classes (B,).
    Low similarity = the map depends on the class explained.
  Raises:
    ConfigError: fewer than 2 classes, unknown similarity names.
  """
  num_classes = check_int("num_classes", num_classes, 2)
  for n in similarity:
    check_choice("similarity", n, SIMILARITIES)
  images, targets = jnp.asarray(images), jnp.asarray(targets, jnp.int32)
  other = (targets + jax.random.randint(key, targets.shape, 1, num_classes)) % num_classes
  jitted = jax.jit(maps_fn)
  return SanityResult(similarities(jitted(variables, images, targets), jitted(variables, images, other), similarity),
                      other)
