"""Clean-label poisoning helpers: a surrogate classifier and PGD against it.

A label-consistent attack (Turner et al. 2019) first makes the target-class images hard
to learn from their content, with L-inf PGD against a surrogate model, and only then adds
the trigger. ``poison.surrogate`` picks the surrogate (:data:`SURROGATES`);
:func:`make_pgd_perturbation` turns its logits function into the batch perturbation that
``poison.poison_train_set(..., perturb=...)`` applies to the rows it poisons.
"""
from __future__ import annotations

from typing import Any, Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from backdoor_jax import adversarial
from backdoor_jax.errors import check_choice
from backdoor_jax.poison import DEFAULT_CHUNK_SIZE, Perturbation



def fit_linear_surrogate(images: Any, labels: Any, num_classes: int, key: chex.PRNGKey, *,
                         steps: int = 300, lr: float = 1e-2) -> Callable[[jax.Array], jax.Array]:
  """Trains multinomial logistic regression on pixels (full batch, Adam) as a PGD surrogate.

  Cheap (seconds on a CPU for 32x32 datasets) and deterministic from ``key``. A deep
  surrogate makes stronger clean-label perturbations; any ``logits_fn`` works with
  :func:`make_pgd_perturbation`.

  Args:
    images: ``(N, H, W, 3)`` clean training images in ``[0, 255]``.
    labels: ``(N,)`` labels.
    num_classes: number of classes.
    key: PRNG key for the initial weights.
    steps: optimisation steps.
    lr: Adam learning rate.
  Returns:
    ``logits_fn(images_float (B, H, W, 3) in [0, 255]) -> (B, C)``, jit-able.
  """
  x = jnp.asarray(np.asarray(images), jnp.float32).reshape(len(labels), -1) / 255.0
  y = jnp.asarray(np.asarray(labels))
  mean, std = x.mean(0), x.std(0) + 1e-3
  params = {"w": 0.01 * jax.random.normal(key, (x.shape[1], num_classes)), "b": jnp.zeros((num_classes,))}
  opt = optax.adam(lr)

  def logits(p, flat):
    return ((flat - mean) / std) @ p["w"] + p["b"]

  @jax.jit
  def train(p):
    def body(carry, _):
      p, s = carry
      g = jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(logits(p, x), y).mean())(p)
      u, s = opt.update(g, s, p)
      return (optax.apply_updates(p, u), s), None
    (p, _), _ = jax.lax.scan(body, (p, opt.init(p)), None, length=steps)
    return p

  params = train(params)
  return lambda imgs: logits(params, imgs.reshape(imgs.shape[0], -1) / 255.0)


def make_pgd_perturbation(logits_fn: Callable[[jax.Array], jax.Array], *, eps: float, steps: int = 10,
                          step_size: float | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Perturbation:
  """Returns an untargeted L-infinity PGD perturbation for clean-label poisoning.

  Each image moves by at most ``eps`` (pixel units) to *increase* the surrogate's loss
  on its true label, making its content harder to learn so the trigger carries it.

  Args:
    logits_fn: ``images_float (B, H, W, 3) in [0, 255] -> (B, C)`` logits.
    eps: L-infinity budget in pixel units (e.g. 8 or 16 of 255); must be > 0.
    steps: PGD iterations (>= 1).
    step_size: per-step size; default ``2.5 * eps / steps``.
    chunk_size: images per jitted call.
  Returns:
    ``perturb(images, labels) -> images`` (same dtype; integer images are rounded).
  Raises:
    ConfigError: for a non-positive ``eps`` or ``steps``.
  """
  eps, steps = adversarial.check_eps(eps), adversarial.check_steps(steps)
  alpha = float(step_size) if step_size is not None else 2.5 * eps / steps
  attack = jax.jit(lambda x0, y: adversarial.pgd(logits_fn, x0, y, eps=eps, steps=steps, step_size=alpha))

  def perturb(images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    out = np.empty_like(images)
    for start in range(0, images.shape[0], chunk_size):
      part = images[start:start + chunk_size]
      adv = np.asarray(attack(jnp.asarray(part, jnp.float32), jnp.asarray(labels[start:start + chunk_size])))
      out[start:start + chunk_size] = np.clip(np.round(adv), 0, 255) if np.issubdtype(images.dtype, np.integer) else adv
    return out

  return perturb


def _linear_surrogate(images: np.ndarray, labels: np.ndarray, num_classes: int, key: chex.PRNGKey,
                      spec: Any, options: Any) -> Callable[[jax.Array], jax.Array]:
  del spec, options
  return fit_linear_surrogate(images, labels, num_classes, key)


def _adversarial_surrogate(images: np.ndarray, labels: np.ndarray, num_classes: int, key: chex.PRNGKey,
                           spec: Any, options: Any) -> Callable[[jax.Array], jax.Array]:
  fields = {f: options.get(f"surrogate_{f}") for f in ("model", "widths", "epochs", "eps", "steps", "step_size", "lr")}
  cfg = adversarial.AdvTrainConfig(**{f: (tuple(v) if f == "widths" else v) for f, v in fields.items()
                                      if v is not None})
  return adversarial.load_or_train_surrogate(options.get("surrogate_path", "") or "", images, labels, num_classes,
                                             key, spec, cfg)


# poison.surrogate -> builder(images, labels, num_classes, key, input_spec, poison_options) -> logits_fn.
# 'linear': logistic regression on pixels (seconds; its PGD barely transfers: a cheap smoke test of the
# clean-label path). 'adversarial': a PGD-adversarially trained zoo model (Turner et al.; slow, cached
# at poison.surrogate_path; settings poison.surrogate_{model,widths,epochs,eps,steps,step_size,lr}).
SURROGATES: dict[str, Callable[..., Callable[[jax.Array], jax.Array]]] = {
    "linear": _linear_surrogate, "adversarial": _adversarial_surrogate}


def surrogate_from_config(options: Any, images: Any, labels: Any, num_classes: int, key: chex.PRNGKey,
                          spec: Any) -> Callable[[jax.Array], jax.Array]:
  """The clean-label PGD surrogate named by ``options.surrogate`` (default ``'linear'``); see :data:`SURROGATES`.

  Args:
    options: the ``poison`` config section (``surrogate``, ``surrogate_*``).
    images, labels: the clean training set (uint8 pixels, int labels).
    num_classes: number of classes.
    key: PRNG key for the surrogate's training.
    spec: the run's input normalisation (:class:`backdoor_jax.train.steps.InputSpec`).
  Returns:
    ``logits_fn(float pixels (B, H, W, 3) in [0, 255]) -> (B, C)``.
  Raises:
    ConfigError: for an unknown surrogate or bad settings.
  """
  name = options.get("surrogate", "linear") or "linear"
  check_choice("poison.surrogate", name, tuple(SURROGATES))
  return SURROGATES[name](np.asarray(images), np.asarray(labels), num_classes, key, spec, options)
