"""L-infinity PGD and PGD adversarial training (Madry et al., 2018) of a zoo model.

The robust model is the surrogate of the label-consistent attack (Turner et al., 2019):
PGD against an adversarially trained network moves an image towards other classes in a
way that also confuses a *different* network trained later, so the poisoned target-class
images are hard to learn from their content and the model leans on the trigger. PGD
against a non-robust surrogate (e.g. :func:`backdoor_jax.clean_label.fit_linear_surrogate`)
transfers poorly.

Everything is in pixel units: images are floats in ``[0, 255]``, ``eps`` and step sizes
are pixels of 255. Training reuses the classic train step
(:func:`backdoor_jax.train.steps.train_step_fn`) on the adversarial batch; the attack
itself reads the model with BatchNorm in inference mode. A trained surrogate can be
cached to a file (:func:`load_or_train_surrogate`) so it is trained once.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import os
import time
import zlib
from typing import Any, Callable

from absl import logging
import chex
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax

from backdoor_jax import models
from backdoor_jax.data import pipeline
from backdoor_jax.errors import ConfigError
from backdoor_jax.train import state as state_lib
from backdoor_jax.train import steps

LogitsFn = Callable[[jax.Array], jax.Array]  # float pixels (B, H, W, 3) in [0, 255] -> (B, C)


def check_eps(eps: Any, what: str = "adversarial eps") -> float:
  """``eps`` as a float in ``(0, 255]`` (pixel units); ConfigError otherwise."""
  if (isinstance(eps, (bool, np.bool_)) or not isinstance(eps, numbers.Real) or not math.isfinite(float(eps))
      or not 0 < eps <= 255):
    raise ConfigError(f"{what} {eps!r} is invalid; allowed: a number in (0, 255] (pixel units)")
  return float(eps)


def check_steps(n: Any, what: str = "adversarial steps") -> int:
  """``n`` as an int >= 1; ConfigError otherwise."""
  if not isinstance(n, numbers.Integral) or isinstance(n, (bool, np.bool_)) or n < 1:
    raise ConfigError(f"{what} {n!r} is invalid; allowed: an int >= 1")
  return int(n)


def pgd(logits_fn: LogitsFn, x0: jax.Array, labels: jax.Array, *, eps: float, steps: int, step_size: float,
        key: chex.PRNGKey | None = None) -> jax.Array:
  """Untargeted L-infinity PGD: ``steps`` signed-gradient ascent steps on the cross-entropy.

  Args:
    logits_fn: float pixels ``(B, H, W, 3)`` in ``[0, 255]`` -> logits ``(B, C)``.
    x0: ``(B, H, W, 3)`` float pixels.
    labels: ``(B,)`` true labels (their loss is increased).
    eps: L-infinity radius in pixels.
    steps: iterations (a static int).
    step_size: pixels per step.
    key: when given, a uniform random start in the eps-ball (as in adversarial training).
  Returns:
    ``(B, H, W, 3)`` float32 images within ``eps`` of ``x0`` and inside ``[0, 255]``.
  """
  chex.assert_rank(x0, 4)
  x0 = x0.astype(jnp.float32)

  def project(x):
    return jnp.clip(jnp.clip(x, x0 - eps, x0 + eps), 0.0, 255.0)

  def loss(x):
    return optax.softmax_cross_entropy_with_integer_labels(logits_fn(x).astype(jnp.float32), labels).sum()

  def body(x, _):
    return project(x + step_size * jnp.sign(jax.grad(loss)(x))), None

  start = x0 if key is None else project(x0 + jax.random.uniform(key, x0.shape, minval=-eps, maxval=eps))
  x, _ = jax.lax.scan(body, start, None, length=steps)
  return x


def model_logits_fn(apply_fn: Callable, variables: Any, spec: steps.InputSpec) -> LogitsFn:
  """``logits_fn`` of a zoo model on float pixels (inference mode, the run's normalisation)."""
  return lambda x: apply_fn(variables, pipeline.normalize(x, spec.mean, spec.std), train=False)


@dataclasses.dataclass(frozen=True)
class AdvTrainConfig:
  """PGD adversarial training settings (pixel units)."""
  model: str = "small_cnn"
  widths: tuple[int, ...] = (32, 64, 128, 128)
  epochs: int = 3
  batch_size: int = 128
  lr: float = 2e-3
  eps: float = 8.0
  steps: int = 4
  step_size: float = 0.0  # 0: 2.5 * eps / steps


def _check_adv_config(cfg: AdvTrainConfig) -> tuple[float, int, float]:
  eps = check_eps(cfg.eps, "surrogate eps")
  n = check_steps(cfg.steps, "surrogate steps")
  check_steps(cfg.epochs, "surrogate epochs")
  check_steps(cfg.batch_size, "surrogate batch_size")
  return eps, n, float(cfg.step_size) or 2.5 * eps / n


def adversarial_train(images: Any, labels: Any, num_classes: int, key: chex.PRNGKey, spec: steps.InputSpec,
                      cfg: AdvTrainConfig = AdvTrainConfig()) -> tuple[Callable, dict[str, Any]]:
  """PGD adversarial training of a zoo model on ``images`` (every batch fully adversarial).

  Args:
    images: ``(N, H, W, 3)`` uint8 training images.
    labels: ``(N,)`` labels in ``[0, num_classes)``.
    num_classes: number of classes.
    key: PRNG key (init, shuffling, random starts).
    spec: the input normalisation (no augmentation is applied).
    cfg: model and attack settings.
  Returns:
    ``(apply_fn, variables)`` of the trained model.
  Raises:
    ConfigError: for invalid settings.
  """
  eps, n_steps, alpha = _check_adv_config(cfg)
  images, labels = np.asarray(images), np.asarray(labels).astype(np.int32)
  chex.assert_rank(images, 4)
  opts = {"widths": tuple(cfg.widths)} if cfg.model == "small_cnn" else {}
  model = models.get_model(cfg.model, int(num_classes), **opts)
  init_key, perm_key, step_key = jax.random.split(key, 3)
  tx = optax.adam(cfg.lr)
  state = state_lib.create_train_state(model, tx, init_key, (1,) + images.shape[1:])
  spec = spec._replace(crop_padding=0, flip=False)
  plain_step = steps.train_step_fn(spec)

  @jax.jit
  def step(state, x, y):
    k = jax.random.fold_in(step_key, state.step)
    x_adv = pgd(model_logits_fn(state.apply_fn, state.variables, spec), x.astype(jnp.float32), y,
                eps=eps, steps=n_steps, step_size=alpha, key=k)
    return plain_step(state, x_adv, y, step_key)

  bs = min(int(cfg.batch_size), len(labels))
  for epoch in range(int(cfg.epochs)):
    t0, correct, count = time.time(), 0, 0
    order = np.asarray(jax.random.permutation(jax.random.fold_in(perm_key, epoch), len(labels)))
    for start in range(0, len(order) - bs + 1, bs):
      idx = order[start:start + bs]
      state, m = step(state, jnp.asarray(images[idx]), jnp.asarray(labels[idx]))
      correct, count = correct + m["correct"], count + m["count"]
    logging.info("adversarial training (eps %g px, %d PGD steps) epoch %d/%d: accuracy on PGD images %.3f, %.0f s",
                 eps, n_steps, epoch + 1, cfg.epochs, float(correct) / max(int(count), 1), time.time() - t0)
  return model.apply, state.variables


def _meta(cfg: AdvTrainConfig, num_classes: int, images: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
  """What a cached surrogate was trained for: its settings and a CRC-32 of the training data."""
  crc = zlib.crc32(np.ascontiguousarray(labels).tobytes(), zlib.crc32(np.ascontiguousarray(images).tobytes()))
  return {"config": dataclasses.asdict(cfg) | {"widths": list(cfg.widths)}, "num_classes": int(num_classes),
          "image_shape": [int(v) for v in images.shape[1:]], "num_train": len(labels), "data_crc32": int(crc)}


def load_or_train_surrogate(path: str, images: Any, labels: Any, num_classes: int, key: chex.PRNGKey,
                            spec: steps.InputSpec, cfg: AdvTrainConfig = AdvTrainConfig()) -> LogitsFn:
  """The robust surrogate's ``logits_fn``: loaded from ``path`` when it holds one for these settings,
  else trained with :func:`adversarial_train` and written there (``''``: not cached).

  Raises:
    ConfigError: when ``path`` holds a surrogate of other settings (the message names them).
  """
  images, labels = np.asarray(images), np.asarray(labels)
  meta = _meta(cfg, num_classes, images, labels)
  opts = {"widths": tuple(cfg.widths)} if cfg.model == "small_cnn" else {}
  model = models.get_model(cfg.model, int(num_classes), **opts)
  if path and os.path.exists(path):
    with open(path, "rb") as f:
      stored = flax.serialization.msgpack_restore(f.read())
    if stored.get("meta") != flax.serialization.msgpack_restore(flax.serialization.msgpack_serialize(meta)):
      raise ConfigError(f"poison.surrogate_path={path!r} holds a surrogate of other settings or data "
                        f"({stored.get('meta')}); allowed: a file written for {meta}, or a new path")
    variables = stored["variables"]
  else:
    _, variables = adversarial_train(images, labels, num_classes, key, spec, cfg)
    if path:
      os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
      payload = flax.serialization.msgpack_serialize({"meta": meta, "variables": jax.device_get(variables)})
      tmp = f"{path}.tmp"
      with open(tmp, "wb") as f:
        f.write(payload)
      os.replace(tmp, path)
  return model_logits_fn(model.apply, variables, spec)
