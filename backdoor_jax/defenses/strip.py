"""STRIP: a triggered input keeps its (target) prediction when other images are blended onto it.

Each input is blended with ``num_overlays`` clean validation images,
``alpha * x + (1 - alpha) * v``; the mean entropy (nats) of the predictions is its
score, low entropy meaning "suspiciously stable". The threshold is the ``frr`` quantile
of the scores of clean validation inputs (a held-out half of the split; the other half
is the overlay pool), so about ``frr`` of clean inputs are rejected by construction.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from backdoor_jax import evaluate
from backdoor_jax.defenses import common, registry
from backdoor_jax.errors import ConfigError
from backdoor_jax.train import steps


def make_entropy_fn(ctx: common.DefenseContext, alpha: float):
  """Jitted ``entropy(variables, overlays (N, H, W, 3), x (B, H, W, 3)) -> (B,)`` mean prediction entropy."""
  apply, spec = ctx.apply_fn, ctx.run.input_spec

  def f(v, overlays, x):
    blend = alpha * x[:, None].astype(jnp.float32) + (1 - alpha) * overlays[None].astype(jnp.float32)
    b, n = blend.shape[:2]
    out = apply(v, steps.preprocess(None, blend.reshape((b * n,) + blend.shape[2:]), spec), train=False)
    logp = jax.nn.log_softmax(out, -1)
    ent = -jnp.sum(jnp.exp(logp) * logp, -1)
    return ent.reshape(b, n).mean(-1)
  return jax.jit(f)


def entropies(ctx: common.DefenseContext, fn, pool: np.ndarray, images: np.ndarray, n: int, seed: int) -> np.ndarray:
  """Scores of ``images``: a fresh seeded draw of ``n`` overlays from ``pool`` per batch."""
  rng = np.random.default_rng(seed)
  bs = max(1, int(ctx.config.strip.batch_size))
  out = []
  for s in range(0, len(images), bs):
    part = images[s:s + bs]
    k = len(part)
    if k < bs:
      part = np.concatenate([part, np.zeros((bs - k,) + part.shape[1:], part.dtype)])
    ov = pool[rng.choice(len(pool), size=n, replace=False)]
    out.append(np.asarray(fn(ctx.variables, jnp.asarray(ov), jnp.asarray(part)))[:k])
  return np.concatenate(out) if out else np.zeros((0,))


def run(ctx: common.DefenseContext, out_dir: str) -> dict[str, Any]:
  """STRIP detection rate on triggered test inputs at the chosen false-rejection rate."""
  cfg = ctx.config.strip
  if not 0 < float(cfg.frr) < 1:
    raise ConfigError(f"strip.frr={cfg.frr} is invalid; allowed: a fraction in (0, 1)")
  val = ctx.val_images
  half = len(val) // 2
  pool, calib = val[:half], val[half:]
  n = int(cfg.num_overlays)
  if not 1 <= n <= len(pool):
    raise ConfigError(f"strip.num_overlays={n} is invalid; allowed: 1 to {len(pool)} (half the validation split)")
  fn = make_entropy_fn(ctx, float(cfg.alpha))
  cap = int(cfg.max_inputs)
  pick = lambda m: np.sort(np.random.default_rng(ctx.seed).choice(m, size=min(cap, m), replace=False)) if cap else \
      np.arange(m)
  with common.Timer() as t:
    e_cal = entropies(ctx, fn, pool, calib, n, ctx.seed)
    thr = float(np.quantile(e_cal, float(cfg.frr)))
    clean_x = ctx.test_images[pick(len(ctx.test_images))]
    att_x = ctx.attack_images[pick(len(ctx.attack_images))]
    e_clean = entropies(ctx, fn, pool, clean_x, n, ctx.seed + 1)
    e_att = entropies(ctx, fn, pool, att_x, n, ctx.seed + 2)
  rec = {"threshold": thr, "frr_target": float(cfg.frr), "num_overlays": n, "alpha": float(cfg.alpha),
         "num_clean": int(len(e_clean)), "num_triggered": int(len(e_att)), "seconds": t.seconds}
  # Over an empty set (no triggered test image when every test image is of the target class)
  # a metric is None with a ``<metric>_reason``, never NaN.
  for key, values in (("detection_rate", e_att < thr), ("false_rejection_rate_test", e_clean < thr),
                      ("false_rejection_rate_val", e_cal < thr), ("entropy_clean_mean", e_clean),
                      ("entropy_triggered_mean", e_att)):
    rec[key], reason = evaluate.rate(values)
    if reason:
      rec[f"{key}_reason"] = reason
  from backdoor_jax.defenses import plots
  plots.entropy_histogram(f"{out_dir}/entropy.png", e_clean, e_att, thr)
  return rec


def summary(rec: dict[str, Any]) -> dict[str, Any]:
  """Summary-row part: detection rates at the threshold chosen on validation inputs (model unchanged)."""
  return {"detection_rate": rec["detection_rate"], "false_positive_rate": rec["false_rejection_rate_test"],
          "verdict": f"threshold {rec['threshold']:.3f} at FRR {rec['frr_target']:g} (validation)", "after": None}


registry.register(registry.Defense("strip", run, summary))
