"""Optimisers, learning-rate schedules and parameter freezing (all optax)."""
from __future__ import annotations

import re
from typing import Any, Callable, NamedTuple

import flax
import jax
import jax.numpy as jnp
import optax

from backdoor_jax.errors import ConfigError, check_choice

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine", "step")


def make_schedule(cfg: Any, steps_per_epoch: int) -> optax.Schedule:
  """Learning-rate schedule from ``cfg`` (train section) measured in optimizer steps.

  Keys: lr, schedule (constant / cosine / step), warmup_epochs, epochs,
  step_epochs (epochs at which 'step' multiplies by step_factor), step_factor.
  """
  check_choice("train.schedule", cfg.schedule, SCHEDULES)
  if cfg.lr <= 0:
    raise ConfigError(f"train.lr={cfg.lr} must be > 0")
  total = max(1, int(cfg.epochs * steps_per_epoch))
  warmup = int(round(cfg.get("warmup_epochs", 0) * steps_per_epoch))
  if warmup >= total:
    raise ConfigError(f"train.warmup_epochs={cfg.warmup_epochs} must be shorter than train.epochs={cfg.epochs}")
  if cfg.schedule == "constant":
    main = optax.constant_schedule(cfg.lr)
  elif cfg.schedule == "cosine":
    main = optax.cosine_decay_schedule(cfg.lr, decay_steps=total - warmup)
  else:
    boundaries = {int(e * steps_per_epoch) - warmup: cfg.get("step_factor", 0.1)
                  for e in cfg.get("step_epochs", ())}
    main = optax.piecewise_constant_schedule(cfg.lr, {b: f for b, f in boundaries.items() if b > 0})
  if not warmup:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), main], [warmup])


def param_path(path: tuple[Any, ...]) -> str:
  """'layer4/conv1/kernel' style name of a parameter from its pytree key path."""
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def trainable_mask(params: Any, pattern: str) -> Any:
  """Pytree of bools: True where the parameter path matches the regex ``pattern``."""
  try:
    rx = re.compile(pattern)
  except re.error as e:
    raise ConfigError(f"train.trainable={pattern!r} is not a valid regular expression: {e}") from None
  mask = flax.traverse_util.path_aware_map(lambda p, _: bool(rx.search("/".join(p))), flax.core.unfreeze(params))
  if not any(flax.traverse_util.flatten_dict(mask).values()):
    raise ConfigError(f"train.trainable={pattern!r} matches no parameter; example names: "
                      + ", ".join("/".join(k) for k in list(flax.traverse_util.flatten_dict(mask))[:5]))
  return mask


class LossScaleState(NamedTuple):
  """State of :func:`dynamic_loss_scale`: the current scale and the steps since a change."""
  scale: jax.Array       # float32 scalar the loss is multiplied by
  good_steps: jax.Array  # int32: consecutive steps with finite gradients
  inner: Any             # the wrapped optimiser's state


def dynamic_loss_scale(inner: optax.GradientTransformation, init_scale: float = 2.0 ** 15,
                       period: int = 2000, factor: float = 2.0,
                       min_scale: float = 1.0) -> optax.GradientTransformation:
  """Dynamic loss scaling around ``inner``, for float16 compute.

  The train step multiplies its loss by :func:`loss_scale` (so float16 gradients do not
  underflow) and hands the scaled gradients to this transformation, which divides them
  by the scale again. If any gradient is not finite the step is skipped (zero update,
  ``inner``'s state unchanged) and the scale is divided by ``factor`` (not below
  ``min_scale``); after ``period`` finite steps in a row it is multiplied by ``factor``.
  """

  def init(params):
    return LossScaleState(jnp.asarray(init_scale, jnp.float32), jnp.zeros((), jnp.int32), inner.init(params))

  def update(grads, state, params=None):
    grads = jax.tree_util.tree_map(lambda g: g / state.scale.astype(g.dtype), grads)
    finite = all_finite(grads)
    updates, new_inner = inner.update(grads, state.inner, params)
    updates = jax.tree_util.tree_map(lambda u: jnp.where(finite, u, jnp.zeros_like(u)), updates)
    new_inner = jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new_inner, state.inner)
    good = jnp.where(finite, state.good_steps + 1, 0)
    grow = good >= period
    scale = jnp.where(finite, jnp.where(grow, state.scale * factor, state.scale),
                      jnp.maximum(state.scale / factor, min_scale))
    return updates, LossScaleState(scale, jnp.where(grow, 0, good), new_inner)

  return optax.GradientTransformation(init, update)


def all_finite(tree: Any) -> jax.Array:
  """True when every element of every leaf is finite (a bool scalar)."""
  leaves = jax.tree_util.tree_leaves(tree)
  return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else jnp.asarray(True)


def loss_scale(opt_state: Any) -> jax.Array | float:
  """The factor a step multiplies its loss by: the dynamic scale for float16 runs, else 1."""
  return opt_state.scale if isinstance(opt_state, LossScaleState) else 1.0


def make_optimizer(cfg: Any, steps_per_epoch: int, params: Any) -> tuple[optax.GradientTransformation, Callable]:
  """Builds the optimiser described by ``cfg`` (train section).

  Parameters whose path does not match ``cfg.trainable`` get zero updates (and no
  optimiser state beyond optax's bookkeeping), which is how transfer learning freezes
  a backbone. With ``cfg.dtype == 'float16'`` the whole optimiser is wrapped in
  :func:`dynamic_loss_scale`.

  Returns:
    (optax transformation, learning-rate schedule)
  """
  check_choice("train.optimizer", cfg.optimizer, OPTIMIZERS)
  schedule = make_schedule(cfg, steps_per_epoch)
  wd = cfg.get("weight_decay", 0.0)
  if cfg.optimizer == "sgd":
    tx = optax.chain(optax.add_decayed_weights(wd) if wd else optax.identity(),
                     optax.sgd(schedule, momentum=cfg.get("momentum", 0.9) or None,
                               nesterov=cfg.get("nesterov", False)))
  elif cfg.optimizer == "adam":
    tx = optax.chain(optax.add_decayed_weights(wd) if wd else optax.identity(), optax.adam(schedule))
  else:
    tx = optax.adamw(schedule, weight_decay=wd)
  if cfg.get("grad_clip", 0):
    tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), tx)
  pattern = cfg.get("trainable", ".*")
  if pattern not in (".*", ""):
    mask = trainable_mask(params, pattern)
    labels = jax.tree_util.tree_map(lambda m: "train" if m else "freeze", mask)
    tx = optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)
  if cfg.get("dtype", "float32") == "float16":
    tx = dynamic_loss_scale(tx, init_scale=float(cfg.get("loss_scale_init", 2.0 ** 15)))
  return tx, schedule


def count_trainable(params: Any, pattern: str) -> int:
  """How many scalar parameters ``pattern`` leaves trainable."""
  leaves = jax.tree_util.tree_leaves(params)
  if pattern in (".*", ""):
    return int(sum(x.size for x in leaves))
  mask = jax.tree_util.tree_leaves(trainable_mask(params, pattern))
  return int(sum(x.size for x, m in zip(leaves, mask) if m))
