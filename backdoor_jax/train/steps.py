"""Jit-compiled train and evaluation steps for the classic (cross-entropy) backdoor.

Images enter as uint8 pixels; augmentation and normalisation run on the device inside
the step, so the host only gathers indices and copies bytes. The step's randomness is
``fold_in(base_key, state.step)``, so a resumed run draws exactly what an uninterrupted
one would.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from backdoor_jax.data import pipeline
from backdoor_jax.train import optim
from backdoor_jax.train.state import TrainState


class InputSpec(NamedTuple):
  """How a uint8 batch becomes model input."""
  mean: tuple[float, float, float]
  std: tuple[float, float, float]
  crop_padding: int = 0
  flip: bool = False


def preprocess(key: jax.Array | None, images: jax.Array, spec: InputSpec) -> jax.Array:
  """Augments (when ``key`` is given) and normalises a uint8 batch to float32."""
  if key is not None and (spec.crop_padding or spec.flip):
    images = pipeline.augment(key, images, crop_padding=spec.crop_padding, flip=spec.flip)
  return pipeline.normalize(images, spec.mean, spec.std)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy with integer labels."""
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels).mean()


def classification_sums(logits: jax.Array, labels: jax.Array, loss: jax.Array) -> dict[str, jax.Array]:
  """Batch sums of a single-label step: ``loss_sum``, ``correct`` (top-1), ``count``."""
  n = labels.shape[0]
  return {"loss_sum": loss * n, "correct": jnp.sum(jnp.argmax(logits, -1) == labels),
          "count": jnp.asarray(n, jnp.int32)}


def train_step_fn(spec: InputSpec, loss: Callable[[jax.Array, jax.Array], jax.Array] = cross_entropy,
                  sums: Callable[..., dict[str, jax.Array]] = classification_sums
                  ) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
  """The pure (unjitted) step ``step(state, images_uint8, labels, base_key) -> (state, metrics)``.

  ``loss(logits, labels)`` is the batch-mean loss (cross-entropy; the multi-label
  recipes pass sigmoid BCE) and ``sums(logits, labels, loss)`` the metric sums.
  :func:`make_train_step` jits it for one model; ``train.ensemble`` vmaps it over a
  stack of models, each with its own state, batch and ``base_key``.
  """
  loss_of = loss

  def step(state: TrainState, images: jax.Array, labels: jax.Array, base_key: jax.Array):
    chex.assert_rank(images, 4)
    chex.assert_type(labels, int)
    key = jax.random.fold_in(base_key, state.step)
    aug_key, drop_key = jax.random.split(key)
    x = preprocess(aug_key, images, spec)

    scale = optim.loss_scale(state.opt_state)  # 1 unless float16 compute

    def loss_fn(params):
      variables = {"params": params}
      mutable = []
      if state.batch_stats:
        variables["batch_stats"] = state.batch_stats
        mutable = ["batch_stats"]
      logits, updates = state.apply_fn(variables, x, train=True, mutable=mutable, rngs={"dropout": drop_key})
      value = loss_of(logits, labels)
      return value * scale, (value, logits, updates.get("batch_stats", state.batch_stats))

    (_, (value, logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state = state.apply_gradients(grads, keep_if_finite(state, grads, batch_stats))
    return state, sums(logits, labels, value)

  return step


def keep_if_finite(state: TrainState, grads: Any, new_stats: Any) -> Any:
  """With loss scaling, a step whose gradients overflowed keeps the old BatchNorm statistics too."""
  if isinstance(state.opt_state, optim.LossScaleState):
    finite = optim.all_finite(grads)
    return jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new_stats, state.batch_stats)
  return new_stats


def make_train_step(spec: InputSpec, base_key: jax.Array) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
  """Returns ``step(state, images_uint8, labels) -> (state, metrics)``, jitted, state donated.

  The metrics are device scalars (sums over the global batch): ``loss_sum``,
  ``correct``, ``count``; the caller accumulates them without a host round trip.
  """
  step = train_step_fn(spec)
  return jax.jit(lambda state, images, labels: step(state, images, labels, base_key), donate_argnums=(0,))


def make_eval_step(spec: InputSpec, apply_fn: Callable) -> Callable[..., dict[str, jax.Array]]:
  """Returns ``eval(variables, images_uint8, labels, valid) -> sums`` (jitted).

  ``valid`` masks the padding of the last batch, so every sample counts exactly once.
  Sums: ``correct`` (top-1), ``correct5`` (top-5), ``count``, and ``predictions``.
  """

  def evaluate(variables: dict[str, Any], images, labels, valid):
    logits = apply_fn(variables, preprocess(None, images, spec), train=False)
    pred = jnp.argmax(logits, -1)
    k = min(5, logits.shape[-1])
    top5 = jax.lax.top_k(logits, k)[1]
    valid = valid.astype(jnp.int32)
    return {"correct": jnp.sum((pred == labels) * valid),
            "correct5": jnp.sum(jnp.any(top5 == labels[:, None], -1) * valid),
            "count": jnp.sum(valid), "predictions": pred,
            "nonfinite": jnp.sum(~jnp.all(jnp.isfinite(logits), -1) * valid)}

  return jax.jit(evaluate)
