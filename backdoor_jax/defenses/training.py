"""Training inside a defense: fine-tuning a (pruned) model, unlearning, retraining from scratch.

Every loop runs through the training engine (``train.engine.fit``) in memory, with the
run's input normalisation; nothing is written to the work dir.
"""
from __future__ import annotations

import copy
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from backdoor_jax import models
from backdoor_jax.data import pipeline
from backdoor_jax.defenses.common import DefenseContext
from backdoor_jax.errors import ConfigError
from backdoor_jax.train import engine, feed, optim, state as state_lib, steps
from backdoor_jax.train import mesh as mesh_lib


def finetune(ctx: DefenseContext, variables: Any, images: np.ndarray, labels: np.ndarray, *, epochs: int,
             lr: float, batch_size: int, seed: int,
             batch_transform: Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array]] | None = None
             ) -> dict[str, Any]:
  """Fine-tunes every parameter with cross-entropy (Adam); BatchNorm statistics stay frozen.

  ``variables`` may carry a prune mask (kept). ``batch_transform(key, x_pixels, y)``
  may rewrite a batch (e.g. stamp a reversed trigger on a part of it). Runs through the
  training engine in memory (no files).
  """
  if epochs <= 0:
    return variables
  if batch_size > len(labels):
    raise ConfigError(f"fine-tuning batch_size={batch_size} exceeds the {len(labels)} validation samples; "
                      "allowed: at most the validation size")
  apply, spec = ctx.apply_fn, ctx.run.input_spec
  rest = {k: v for k, v in variables.items() if k != "params"}
  tx = optax.adam(lr)
  state = state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"], batch_stats={},
                               opt_state=tx.init(variables["params"]), apply_fn=apply, tx=tx)
  base = jax.random.key(seed)

  def step(state, x, y):
    x = x.astype(jnp.float32)
    if batch_transform is not None:
      x, y = batch_transform(jax.random.fold_in(base, state.step), x, y)

    def loss_fn(p):
      return steps.cross_entropy(apply({**rest, "params": p}, steps.preprocess(None, x, spec), train=False), y)
    loss, g = jax.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(g, state.batch_stats), {"loss_sum": loss * y.shape[0],
                                                         "count": jnp.asarray(y.shape[0], jnp.int32)}

  state = _fit_in_memory(state, jax.jit(step, donate_argnums=(0,)), images, labels, batch_size, seed, epochs)
  return {**rest, "params": state.params}


def retrain(ctx: DefenseContext, images: np.ndarray, labels: np.ndarray, epochs: int) -> dict[str, Any]:
  """Trains the run's model from scratch on (filtered) ``images`` with the run's own train config."""
  c = ctx.run.config
  tc = copy.deepcopy(c.train)
  if epochs:
    tc.epochs = int(epochs)
  if len(labels) < tc.batch_size:
    raise ConfigError(f"only {len(labels)} training samples are left; fewer than train.batch_size={tc.batch_size}")
  spec = steps.InputSpec(mean=tuple(ctx.run.input_spec.mean), std=tuple(ctx.run.input_spec.std),
                         crop_padding=int(c.data.crop_padding), flip=bool(c.data.flip))
  root = jax.random.key(ctx.seed)
  init_key, step_key = jax.random.fold_in(root, 1), jax.random.fold_in(root, 2)
  spe = pipeline.num_train_steps(len(labels), tc.batch_size)
  state = state_lib.create_train_state(ctx.run.model, optim.make_optimizer(tc, spe, _init_params(ctx, init_key))[0],
                                       init_key, (1,) + tuple(ctx.run.image_shape))
  state = _fit_in_memory(state, steps.make_train_step(spec, step_key), images, labels, int(tc.batch_size), ctx.seed,
                         int(tc.epochs))
  return state.variables


def _fit_in_memory(state: Any, step: Callable[..., Any], images: np.ndarray, labels: np.ndarray, batch_size: int,
                   seed: int, epochs: int) -> Any:
  """``epochs`` epochs of ``step`` over seeded shuffles of (images, labels), on one device, no files."""
  mesh = mesh_lib.make_mesh(jax.local_devices()[:1])
  state = jax.tree_util.tree_map(jnp.copy, state)  # the step donates its state: never the caller's arrays
  batches = feed.ArrayFeed(feed.process_data(images, labels), mesh, batch_size, seed)
  state, _ = engine.fit(engine.Task(state=mesh_lib.replicate(mesh, state), step=step, feed=batches),
                        engine.RunSpec(workdir=None, epochs=epochs, progress=False, name="defense fine-tuning"))
  return state


def _init_params(ctx: DefenseContext, key: jax.Array) -> Any:
  return models.init_variables(ctx.run.model, key, (1,) + tuple(ctx.run.image_shape))["params"]
