"""Total-variation denoising of the inputs (Chambolle's projection algorithm), swept over its weight.

``denoise(images, weight)`` solves ``min_u ||u - f||^2 / 2 + weight * TV(u)`` per image
and channel on [0, 1]-scaled pixels (isotropic TV, Neumann boundary), with Chambolle's
dual fixed-point iteration (step 1/8). It is pure ``jax.numpy`` and jit/vmap-able.
The weight is chosen on the validation split (the largest one whose accuracy is within
``max_val_drop`` of the undenoised model's); the test set gives the reported curves.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from backdoor_jax.defenses import common, registry
from backdoor_jax.errors import ConfigError


def _grad(u: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Forward differences along H and W of (B, H, W, C), zero at the last row / column."""
  gy = jnp.concatenate([u[:, 1:] - u[:, :-1], jnp.zeros_like(u[:, :1])], axis=1)
  gx = jnp.concatenate([u[:, :, 1:] - u[:, :, :-1], jnp.zeros_like(u[:, :, :1])], axis=2)
  return gy, gx


def _div(py: jax.Array, px: jax.Array) -> jax.Array:
  """Discrete divergence, the negative adjoint of :func:`_grad`."""
  dy = jnp.concatenate([py[:, :1], py[:, 1:-1] - py[:, :-2], -py[:, -2:-1]], axis=1)
  dx = jnp.concatenate([px[:, :, :1], px[:, :, 1:-1] - px[:, :, :-2], -px[:, :, -2:-1]], axis=2)
  return dy + dx


def denoise(images: jax.Array, weight: float, iterations: int = 50, tau: float = 0.125) -> jax.Array:
  """TV-denoised copies of pixel-unit images (B, H, W, C) in [0, 255]; ``weight`` is on the [0, 1] scale."""
  common.check_images(images)
  if weight <= 0:
    return images.astype(jnp.float32)
  f = images.astype(jnp.float32) / 255.0
  zeros = jnp.zeros_like(f)

  def body(_, p):
    py, px = p
    gy, gx = _grad(_div(py, px) - f / weight)
    norm = jnp.sqrt(gy ** 2 + gx ** 2)
    return (py + tau * gy) / (1 + tau * norm), (px + tau * gx) / (1 + tau * norm)

  py, px = jax.lax.fori_loop(0, int(iterations), body, (zeros, zeros))
  u = f - weight * _div(py, px)
  return jnp.clip(u, 0.0, 1.0) * 255.0


def run(ctx: common.DefenseContext, out_dir: str) -> dict[str, Any]:
  """Accuracy, ASR (and FSR) against the TV weight; weight chosen on the validation split."""
  cfg = ctx.config.tv_denoise
  weights = [float(w) for w in cfg.weights]
  if not weights or any(w < 0 for w in weights):
    raise ConfigError(f"tv_denoise.weights={tuple(cfg.weights)} is invalid; allowed: non-negative floats")
  if int(cfg.iterations) < 1:
    raise ConfigError(f"tv_denoise.iterations={cfg.iterations} is invalid; allowed: an int >= 1")
  weights = sorted(set(weights) | {0.0})
  curve = []
  with common.Timer() as t:
    for w in weights:
      tr = lambda x, w=w: denoise(x, w, int(cfg.iterations))
      name = f"tv{w:g}"
      val_acc = common.accuracy(common.logits(ctx, ctx.variables, ctx.val_images, tr, "logits/" + name),
                                ctx.val_labels)
      curve.append({"weight": w, "val_accuracy": val_acc, **common.evaluate(ctx, ctx.variables, tr, name)})
  base = curve[0]["val_accuracy"]
  chosen = [r for r in curve if r["val_accuracy"] >= base - float(cfg.max_val_drop)][-1]
  rec = {"curve": curve, "chosen_weight": chosen["weight"], "chosen": chosen, "before": curve[0],
         "iterations": int(cfg.iterations), "max_val_drop": float(cfg.max_val_drop), "seconds": t.seconds}
  from backdoor_jax.defenses import plots
  plots.curves(f"{out_dir}/curves.png", "weight", curve, chosen["weight"], "TV weight", "TV denoising (Chambolle)")
  x = ctx.attack_images[:6]
  if len(x):
    plots.denoised_examples(f"{out_dir}/examples.png", x, [np.asarray(denoise(jnp.asarray(x), w, int(cfg.iterations)))
                                                           for w in weights], weights)
  return rec


def summary(rec: dict[str, Any]) -> dict[str, Any]:
  """Summary-row part: the chosen weight, and the model behind the chosen denoiser."""
  return {"verdict": f"weight {rec['chosen_weight']:g} (validation)", "after": rec["chosen"]}


registry.register(registry.Defense("tv_denoise", run, summary))
