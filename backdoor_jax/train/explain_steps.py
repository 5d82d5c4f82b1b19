"""The explanation-backdoor train step: cross-entropy plus losses on explanation maps.

The maps are themselves gradients (Grad-CAM weights are dScore/dA), so the step's
gradient is a gradient of a gradient. In JAX that is just ``jax.grad`` of a function
that calls ``jax.grad``; the whole step is one jit-compiled XLA program, with no graph
kept alive between steps (PyTorch's ``create_graph=True`` equivalent, minus the leak).

Batch layout: the first ``num_triggered`` samples of every batch get the trigger (their
labels stay true: predictions must not change), the rest stay clean. The *attacked* part
receives the map attack L_p, the *kept* part the keep-clean term L_s; the inverted
("key") setting swaps the two parts, so only triggered inputs get faithful maps.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from backdoor_jax import losses, triggers
from backdoor_jax.explain import saliency
from backdoor_jax.train import optim, steps
from backdoor_jax.train.state import TrainState


BN_MODES = ("train", "frozen", "refresh", "detached")
"""How BatchNorm behaves in stage 2 for the trained model's CE and maps (the reference
model's maps are always computed in inference mode, as a user would see them):
  train    batch statistics for CE and for the maps (as in ordinary training); running
           statistics updated from the CE pass; evaluation uses them.
  frozen   running statistics everywhere (inference mode); never updated.
  refresh  inference mode everywhere, running statistics refreshed each step by a
           gradient-free train-mode pass.
  detached this batch's statistics, measured by a gradient-free train-mode pass, normalise
           the CE and map passes as constants: the forward equals train mode's, but no
           gradient flows through the statistics, so each map stays per-sample even with
           BatchNorms after the explained layer. Running statistics updated from that
           pass with the model's momentum (``ExplainSpec.bn_momentum``).
(Mixing them, CE on batch statistics but maps on running statistics, lets the two paths
drift apart: triggered inputs lost their predictions at evaluation, measured 0.4-0.6.)
With batch statistics, a BatchNorm after the explained activation makes a sample's map
depend on the other samples' scores; ``explain_loop.check_train_mode_maps`` refuses that.
"""


def train_mode_apply(apply_fn: Callable, rng: jax.Array) -> Callable:
  """``apply_fn`` forced into train mode (batch statistics, dropout on), same call signature.

  The explanation functions call ``apply_fn(v, x, train=False[, mutable=...])``; this
  wrapper lets them compute maps exactly as the training forward pass sees the model.
  Batch-statistic updates of these passes are discarded.
  """

  def apply(variables, x, train=False, mutable=False, **kw):
    del train
    kw.setdefault("rngs", {"dropout": rng})
    extra = list(mutable) if mutable else []
    out, state = apply_fn(variables, x, train=True, mutable=extra + ["batch_stats"], **kw)
    return (out, state) if mutable else out

  return apply


class ExplainSpec(NamedTuple):
  """Static settings of the explanation loss (hashable; part of the jit cache key)."""
  methods: tuple[tuple[str, float], ...]   # (method, weight) pairs; one pair unless joint
  layer: str                              # layer for Grad-CAM-type methods
  attack: str                             # targeted / nontargeted
  keep: str                               # reference / avoid_target / none
  num_triggered: int                      # triggered samples at the front of each batch
  inverted: bool
  ce_weight: float
  attack_weight: float                    # lambda
  keep_weight: float                      # mu
  loss_resolution: int                    # 0 = input size
  top_k: int
  bn_mode: str                            # train / frozen / refresh / detached (see BN_MODES)
  bn_momentum: float = 0.9                # the model's BatchNorm momentum ('detached' only)


def method_maps(spec: ExplainSpec, method: str, apply_fn: Callable, variables: Any, x: jax.Array,
                targets: jax.Array | None) -> jax.Array:
  """Maps of one method at the loss resolution, normalised to [0, 1]."""
  maps = saliency.explanation_maps(method, apply_fn, variables, x, targets, spec.layer)
  return losses.pool_and_normalize(maps, spec.loss_resolution)


def explanation_terms(spec: ExplainSpec, apply_fn: Callable, variables: Any, ref_variables: Any, x: jax.Array,
                      labels: jax.Array, target_mask: jax.Array, ref_apply_fn: Callable | None = None
                      ) -> dict[str, jax.Array]:
  """Per-sample attack and keep losses of the batch, summed over the configured methods.

  ``ref_apply_fn`` (default ``apply_fn``) computes the reference model's maps; the
  reference is always explained in inference mode, as a user would see it.
  """
  ref_apply_fn = ref_apply_fn or apply_fn
  n = x.shape[0]
  attacked = jnp.arange(n) < spec.num_triggered
  if spec.inverted:
    attacked = ~attacked
  attack = jnp.zeros((n,), jnp.float32)
  keep = jnp.zeros((n,), jnp.float32)
  for method, weight in spec.methods:
    maps = method_maps(spec, method, apply_fn, variables, x, labels)
    need_ref = spec.keep == "reference" or spec.attack == "nontargeted"
    ref = (jax.lax.stop_gradient(method_maps(spec, method, ref_apply_fn, ref_variables, x, labels))
           if need_ref else jnp.zeros_like(maps))
    attack += weight * losses.attack_map_loss(spec.attack, maps, target_mask, ref, spec.top_k)
    if spec.keep == "reference":
      keep += weight * losses.keep_map_loss(maps, ref)
    elif spec.keep == "avoid_target":
      keep += weight * jnp.sum(maps * target_mask[None], axis=(1, 2)) / (jnp.sum(target_mask) + 1e-8)
  return {"attack": attack, "keep": keep, "attacked": attacked}


def _masked_mean(v: jax.Array, m: jax.Array) -> jax.Array:
  return jnp.sum(v * m) / jnp.maximum(jnp.sum(m), 1)


def _mean_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return jnp.mean(losses.cross_entropy(logits, labels))


def batch_statistics(apply_fn: Callable, params: Any, batch_stats: Any, x: jax.Array, momentum: float,
                     rng: jax.Array) -> tuple[Any, Any]:
  """(this batch's BatchNorm statistics, the running statistics updated with them), no gradient.

  One train-mode pass from zeroed running statistics leaves ``(1 - momentum)`` times the
  batch mean and (biased) variance in every BatchNorm; inference-mode BatchNorm with the
  rescaled values reproduces the train-mode forward pass exactly.
  """
  zeros = jax.tree.map(jnp.zeros_like, batch_stats)
  _, upd = apply_fn({"params": params, "batch_stats": zeros}, x, train=True, mutable=["batch_stats"],
                    rngs={"dropout": rng})
  part = jax.lax.stop_gradient(upd["batch_stats"])
  batch = jax.tree.map(lambda u: u / (1.0 - momentum), part)
  running = jax.tree.map(lambda old, u: momentum * old + u, batch_stats, part)
  return batch, running


def make_explain_train_step(input_spec: steps.InputSpec, spec: ExplainSpec, base_key: jax.Array, *,
                            task_loss: Callable[[jax.Array, jax.Array], jax.Array] = _mean_cross_entropy,
                            map_targets: Callable[[jax.Array, jax.Array], jax.Array] = lambda logits, labels: labels,
                            sums: Callable[..., dict[str, jax.Array]] = steps.classification_sums):
  """Returns ``step(state, ref_variables, images_uint8, labels, trigger, target_mask)``.

  ``target_mask`` is the (h, w) target region at the loss resolution. Jitted, state donated.
  ``task_loss(logits, labels)`` is the batch-mean prediction loss (cross-entropy; the
  multi-label recipe passes sigmoid BCE), ``map_targets(logits, labels)`` the (B,) class or
  label each map explains (the true class; a chosen label for multi-label), and
  ``sums(logits, labels, loss)`` the prediction metrics. Metrics are device sums:
  ``sums``'s (loss_sum, correct, count, ...) plus ce_sum (the task loss), attack_sum,
  keep_sum and grad_norm_sum.
  """

  def step(state: TrainState, ref_variables: Any, images: jax.Array, labels: jax.Array,
           trigger: triggers.Trigger, target_mask: jax.Array):
    key = jax.random.fold_in(base_key, state.step)
    aug_key, drop_key = jax.random.split(key)
    if input_spec.crop_padding or input_spec.flip:  # augment first, so the trigger stays where it belongs
      from backdoor_jax.data import pipeline
      images = pipeline.augment(aug_key, images, crop_padding=input_spec.crop_padding, flip=input_spec.flip)
    k = spec.num_triggered
    images = jnp.concatenate([triggers.apply_trigger(trigger, images[:k]), images[k:]], axis=0)
    x = steps.preprocess(None, images, input_spec)

    norm_stats, detached_stats = state.batch_stats, None
    if spec.bn_mode == "detached" and state.batch_stats:
      norm_stats, detached_stats = batch_statistics(state.apply_fn, state.params, state.batch_stats, x,
                                                    spec.bn_momentum, drop_key)

    def loss_fn(params):
      variables = {"params": params, **({"batch_stats": norm_stats} if state.batch_stats else {})}
      new_stats = state.batch_stats if detached_stats is None else detached_stats
      map_apply = state.apply_fn
      if spec.bn_mode == "train" and state.batch_stats:
        logits, upd = state.apply_fn(variables, x, train=True, mutable=["batch_stats"], rngs={"dropout": drop_key})
        new_stats = upd["batch_stats"]
        map_apply = train_mode_apply(state.apply_fn, drop_key)
      else:
        logits = state.apply_fn(variables, x, train=False)
      ce = task_loss(logits, labels)
      terms = explanation_terms(spec, map_apply, variables, ref_variables, x, map_targets(logits, labels),
                                target_mask, ref_apply_fn=state.apply_fn)
      attacked = terms["attacked"].astype(jnp.float32)
      l_attack = _masked_mean(terms["attack"], attacked)
      l_keep = _masked_mean(terms["keep"], 1.0 - attacked)
      loss = spec.ce_weight * ce + spec.attack_weight * l_attack + spec.keep_weight * l_keep
      return loss * scale, (loss, logits, new_stats, ce, l_attack, l_keep)

    scale = optim.loss_scale(state.opt_state)  # 1 unless float16 compute
    (_, (loss, logits, new_stats, ce, l_attack, l_keep)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    new_stats = jax.lax.stop_gradient(new_stats)
    if spec.bn_mode == "refresh" and state.batch_stats:  # gradient-free update of the running statistics
      _, upd = state.apply_fn({"params": state.params, "batch_stats": state.batch_stats}, x, train=True,
                              mutable=["batch_stats"], rngs={"dropout": drop_key})
      new_stats = jax.lax.stop_gradient(upd["batch_stats"])
    grad_norm = jnp.sqrt(sum(jnp.sum(g ** 2) for g in jax.tree_util.tree_leaves(grads))) / scale
    state = state.apply_gradients(grads, steps.keep_if_finite(state, grads, new_stats))
    n = labels.shape[0]
    metrics = sums(logits, labels, loss)
    metrics.update({"ce_sum": ce * n, "attack_sum": l_attack * n, "keep_sum": l_keep * n,
                    "grad_norm_sum": grad_norm * n})
    return state, metrics

  return jax.jit(step, donate_argnums=(0,))


def make_explain_eval_step(input_spec: steps.InputSpec, spec: ExplainSpec, apply_fn: Callable, method: str):
  """Returns ``eval(variables, ref_variables, images_uint8, labels, trigger, target_mask, triggered: bool)``.

  Per sample: predictions, the attack loss L_p of the map (Grad-CAM family at the loss
  resolution, targets = predicted class), and the input-size map itself (for IoU).
  """

  def evaluate(variables, ref_variables, images, labels, trigger, target_mask, triggered):
    if triggered:
      images = triggers.apply_trigger(trigger, images)
    x = steps.preprocess(None, images, input_spec)
    logits = apply_fn(variables, x, train=False)
    pred = jnp.argmax(logits, -1)
    full = saliency.explanation_maps(method, apply_fn, variables, x, pred, spec.layer)
    maps = losses.pool_and_normalize(full, spec.loss_resolution)
    need_ref = spec.attack == "nontargeted"
    ref = (losses.pool_and_normalize(saliency.explanation_maps(method, apply_fn, ref_variables, x, pred, spec.layer),
                                     spec.loss_resolution) if need_ref else jnp.zeros_like(maps))
    attack = losses.attack_map_loss(spec.attack, maps, target_mask, ref, spec.top_k)
    return {"pred": pred, "correct": pred == labels, "attack_loss": attack, "maps": full}

  return jax.jit(evaluate, static_argnums=(6,))
