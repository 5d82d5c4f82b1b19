"""Neural Cleanse: reverse-engineer a trigger per class; a class with an unusually small one is a target.

For every class c a mask m (H, W) in [0, 1] and a pattern p (H, W, 3) in [0, 255] are
optimised so that ``(1 - m) * x + m * p`` is classified as c for clean inputs x, with
an L1 penalty ``cost * |m|_1``. The cost follows the usual schedule: after ``patience``
epochs at or above the success threshold it is multiplied by ``cost_multiplier``; after
``patience`` epochs below, divided by ``cost_multiplier ** 1.5``. The smallest mask that
reached the threshold is kept. The anomaly index of class c is
``(median(L1) - L1_c) / (1.4826 * MAD)``; classes with an index above
``anomaly_threshold`` (small side only) are flagged.

All classes are optimised at once (``jax.vmap`` over the per-class state, one batch of
clean images shared by every class); ``vmap=False`` runs the same step class by class
(for the wall-time comparison in ``benchmarks/neural_cleanse_vmap.py``).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from backdoor_jax.defenses import common, training, registry
from backdoor_jax.errors import ConfigError
from backdoor_jax.train import steps

MAD_SCALE = 1.4826


class ClassState(NamedTuple):
  """Optimisation state of one class (all leaves gain a leading class axis under vmap)."""
  mask_raw: jax.Array      # (H, W)
  pattern_raw: jax.Array   # (H, W, 3)
  opt_state: Any
  cost: jax.Array
  up: jax.Array
  down: jax.Array
  acc_sum: jax.Array
  steps_in_epoch: jax.Array
  best_l1: jax.Array
  best_mask: jax.Array
  best_pattern: jax.Array


def decode(mask_raw: jax.Array, pattern_raw: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Unconstrained variables -> (mask in [0, 1], pattern in [0, 255] pixel units)."""
  return (jnp.tanh(mask_raw) + 1) / 2, (jnp.tanh(pattern_raw) + 1) / 2 * 255.0


def stamp(x: jax.Array, mask: jax.Array, pattern: jax.Array) -> jax.Array:
  """``(1 - m) x + m p`` on pixel-unit images (B, H, W, 3)."""
  m = mask[..., None]
  return (1 - m) * x.astype(jnp.float32) + m * pattern


def make_functions(apply_fn, input_spec: steps.InputSpec, image_shape: tuple[int, int, int], cfg: Any):
  """Returns ``(init(key, target), step(state, variables, target, x), end_epoch(state))`` for one class."""
  tx = optax.adam(float(cfg.lr), b1=0.5, b2=0.9)
  h, w, _ = image_shape
  thr, patience, mult = float(cfg.attack_threshold), int(cfg.patience), float(cfg.cost_multiplier)

  def init(key, target):
    del target
    k1, k2 = jax.random.split(key)
    mask_raw = jnp.arctanh(2 * jax.random.uniform(k1, (h, w), minval=0.05, maxval=0.15) - 1)
    pattern_raw = jax.random.normal(k2, (h, w, 3)) * 0.5
    params = (mask_raw, pattern_raw)
    m, p = decode(*params)
    f = jnp.float32
    return ClassState(mask_raw, pattern_raw, tx.init(params), jnp.asarray(cfg.init_cost, f), jnp.zeros((), jnp.int32),
                      jnp.zeros((), jnp.int32), jnp.zeros((), f), jnp.zeros((), jnp.int32), jnp.asarray(jnp.inf, f),
                      m, p)

  def step(s: ClassState, variables, target, x):
    def loss_fn(params):
      m, p = decode(*params)
      out = apply_fn(variables, steps.preprocess(None, stamp(x, m, p), input_spec), train=False)
      ce = steps.cross_entropy(out, jnp.full((x.shape[0],), target, jnp.int32))
      return ce + s.cost * jnp.sum(m), jnp.mean(jnp.argmax(out, -1) == target)
    params = (s.mask_raw, s.pattern_raw)
    (_, acc), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(g, s.opt_state, params)
    mask_raw, pattern_raw = optax.apply_updates(params, updates)
    return s._replace(mask_raw=mask_raw, pattern_raw=pattern_raw, opt_state=opt_state, acc_sum=s.acc_sum + acc,
                      steps_in_epoch=s.steps_in_epoch + 1)

  def end_epoch(s: ClassState):
    acc = s.acc_sum / jnp.maximum(s.steps_in_epoch, 1)
    m, p = decode(s.mask_raw, s.pattern_raw)
    l1 = jnp.sum(m)
    ok = acc >= thr
    better = ok & (l1 < s.best_l1)
    up = jnp.where(ok, s.up + 1, 0)
    down = jnp.where(ok, 0, s.down + 1)
    cost = jnp.where(up >= patience, s.cost * mult, s.cost)
    cost = jnp.where(down >= patience, cost / mult ** 1.5, cost)
    return s._replace(cost=cost, up=jnp.where(up >= patience, 0, up), down=jnp.where(down >= patience, 0, down),
                      acc_sum=jnp.zeros_like(s.acc_sum), steps_in_epoch=jnp.zeros_like(s.steps_in_epoch),
                      best_l1=jnp.where(better, l1, s.best_l1), best_mask=jnp.where(better, m, s.best_mask),
                      best_pattern=jnp.where(better, p, s.best_pattern))

  return init, step, end_epoch


def reverse_triggers(apply_fn, variables, input_spec: steps.InputSpec, images: np.ndarray, num_classes: int,
                     cfg: Any, seed: int, classes: np.ndarray | None = None, use_vmap: bool = True) -> dict[str, Any]:
  """Optimises a (mask, pattern) per class on clean ``images`` (pixel units).

  Returns:
    dict of numpy arrays: ``mask`` (C, H, W), ``pattern`` (C, H, W, 3), ``l1`` (C,)
    (L1 norm of the best mask; of the final one where the threshold was never reached),
    ``reached`` (C,) bool, ``final_accuracy`` (C,) attack accuracy of the last epoch.
  """
  if int(cfg.batch_size) > len(images):
    raise ConfigError(f"neural_cleanse.batch_size={cfg.batch_size} exceeds the {len(images)} validation images; "
                      "allowed: at most the validation size")
  classes = np.arange(num_classes) if classes is None else np.asarray(classes)
  image_shape = tuple(images.shape[1:])
  init, step, end_epoch = make_functions(apply_fn, input_spec, image_shape, cfg)
  key = jax.random.fold_in(jax.random.key(seed), 31337)
  rng = np.random.default_rng(seed)
  epochs, spe, bs = int(cfg.epochs), int(cfg.steps_per_epoch), int(cfg.batch_size)
  order = [rng.choice(len(images), size=bs, replace=False) for _ in range(epochs * spe)]

  def finish(s: ClassState) -> tuple[Any, ...]:
    m, p = decode(s.mask_raw, s.pattern_raw)
    reached = jnp.isfinite(s.best_l1)
    return (jnp.where(reached, s.best_mask, m), jnp.where(reached, s.best_pattern, p),
            jnp.where(reached, s.best_l1, jnp.sum(m)), reached, s.acc_sum / jnp.maximum(s.steps_in_epoch, 1))

  keys = jax.random.split(key, num_classes)

  def optimise(step_fn, end_fn, init_fn, fin_fn, targets):
    s = init_fn(keys[targets] if np.ndim(targets) else keys[int(targets)], jnp.asarray(targets))
    last_acc = None
    for e in range(epochs):
      for b in range(spe):
        s = step_fn(s, variables, jnp.asarray(targets), jnp.asarray(images[order[e * spe + b]]))
      if e == epochs - 1:
        last_acc = s.acc_sum / jnp.maximum(s.steps_in_epoch, 1)
      s = end_fn(s)
    out = fin_fn(s)
    return out[:4] + (last_acc,)

  if use_vmap:
    v_init = jax.jit(jax.vmap(init))
    v_step = jax.jit(jax.vmap(step, in_axes=(0, None, 0, None)))
    v_end = jax.jit(jax.vmap(end_epoch))
    v_fin = jax.jit(jax.vmap(finish))
    outs = jax.device_get(optimise(v_step, v_end, v_init, v_fin, classes))
  else:
    j_init, j_step, j_end, j_fin = jax.jit(init), jax.jit(step), jax.jit(end_epoch), jax.jit(finish)
    per = [jax.device_get(optimise(j_step, j_end, j_init, j_fin, int(c))) for c in classes]
    outs = tuple(np.stack([p[i] for p in per]) for i in range(5))
  mask, pattern, l1, reached, acc = (np.asarray(o) for o in outs)
  return {"classes": classes, "mask": mask, "pattern": pattern, "l1": l1, "reached": reached.astype(bool),
          "final_accuracy": acc}


def anomaly_index(l1: np.ndarray) -> np.ndarray:
  """``(median - l1) / (1.4826 * MAD)`` per class: large positive = unusually small trigger."""
  l1 = np.asarray(l1, np.float64)
  med = np.median(l1)
  mad = MAD_SCALE * np.median(np.abs(l1 - med))
  return (med - l1) / max(mad, 1e-12)


def unlearn(ctx: common.DefenseContext, variables: Any, mask: np.ndarray, pattern: np.ndarray, cfg: Any) -> Any:
  """Fine-tunes on the validation split with the reversed trigger stamped on a fraction of each batch (true labels)."""
  m, p = jnp.asarray(mask), jnp.asarray(pattern)
  frac = float(cfg.unlearn_fraction)

  def transform(key, x, y):
    pick = jax.random.uniform(key, (x.shape[0],)) < frac
    return jnp.where(pick[:, None, None, None], stamp(x, m, p), x), y

  return training.finetune(ctx, variables, ctx.val_images, ctx.val_labels, epochs=int(cfg.unlearn_epochs),
                         lr=float(cfg.unlearn_lr), batch_size=int(cfg.unlearn_batch_size), seed=ctx.seed,
                         batch_transform=transform)


def run(ctx: common.DefenseContext, out_dir: str) -> dict[str, Any]:
  """Neural Cleanse on a trained run: per-class reversed triggers, anomaly index, optional unlearning."""
  cfg = ctx.config.neural_cleanse
  for k in ("epochs", "steps_per_epoch", "batch_size", "patience"):
    if int(cfg[k]) < 1:
      raise ConfigError(f"neural_cleanse.{k}={cfg[k]} is invalid; allowed: an int >= 1")
  with common.Timer() as t:
    rev = reverse_triggers(ctx.apply_fn, ctx.variables, ctx.run.input_spec, ctx.val_images, ctx.num_classes, cfg,
                           ctx.seed, use_vmap=bool(cfg.vmap))
  idx = anomaly_index(rev["l1"])
  flagged = [int(c) for c in np.flatnonzero(idx > float(cfg.anomaly_threshold))]
  top = int(np.argmax(idx))
  rec = {"l1": rev["l1"].tolist(), "anomaly_index": idx.tolist(), "reached_threshold": rev["reached"].tolist(),
         "final_attack_accuracy": rev["final_accuracy"].tolist(), "flagged_classes": flagged,
         "most_anomalous_class": top, "max_anomaly_index": float(idx[top]), "detected": bool(flagged),
         "true_target": ctx.target, "names_true_target": (top in flagged and top == ctx.target)
         if ctx.target is not None else None, "seconds": t.seconds, "vmap": bool(cfg.vmap),
         "anomaly_threshold": float(cfg.anomaly_threshold)}
  np.savez_compressed(f"{out_dir}/reversed_triggers.npz", mask=rev["mask"], pattern=rev["pattern"], l1=rev["l1"])
  if cfg.unlearn and flagged:
    after = unlearn(ctx, ctx.variables, rev["mask"][top], rev["pattern"][top], cfg)
    rec["after_unlearning"] = common.evaluate(ctx, after)
  from backdoor_jax.defenses import plots
  plots.neural_cleanse(f"{out_dir}/anomaly_index.png", f"{out_dir}/reversed_triggers.png", idx, rev, flagged,
                       float(cfg.anomaly_threshold), ctx.target, ctx.run.class_names)
  return rec


def summary(rec: dict[str, Any]) -> dict[str, Any]:
  """Summary-row part: which classes are flagged and whether the true target is named."""
  idx = f"max index {rec['max_anomaly_index']:.2f} at class {rec['most_anomalous_class']}"
  verdict = f"flags {rec['flagged_classes']} ({idx})" if rec["flagged_classes"] else f"no class flagged ({idx})"
  if rec["true_target"] is not None:
    verdict += f"; true target {rec['true_target']}: {'named' if rec['names_true_target'] else 'missed'}"
  return {"verdict": verdict, "after": rec.get("after_unlearning")}


registry.register(registry.Defense("neural_cleanse", run, summary))
