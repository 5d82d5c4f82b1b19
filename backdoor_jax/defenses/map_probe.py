"""Map Probe: a model-only detector of explanation backdoors (no reference model, no poisoned data).

An explanation backdoor is a small input patch that moves the Grad-CAM map into a target
region *away from the patch* while the prediction stays. Map Probe stamps small probe
patches (``patch_size`` pixels; solid colours at the corners of the RGB cube plus
seeded random-noise patches) at every position of a grid (``patch_stride``) on clean
validation images and measures, for every candidate region r (the four corner squares
and the centre square, ``region_fraction`` of the side) that the patch does not touch,
the *lift*: the fraction of images whose map lands in r (IoU(map > 0.5, r) > 0.5) with
the prediction unchanged, minus the same fraction without a patch. A clean model's map
follows evidence, so a tiny patch rarely pulls it into a remote region on most images;
a backdoored model's does. The score of the model is the largest lift; it is flagged
when the score exceeds ``lift_threshold``. The (pattern, position, region) that gave it
localise the attack: the region is its target region, the position its trigger.

Scope: the probe dictionary holds solid colours and random noise, so a trigger unlike
all of them (a blend, a warp) may be missed; the probe is first-order (Grad-CAM forward
and backward passes only) and every (pattern, position) pair is evaluated in jitted,
fixed-size chunks.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_dict

from backdoor_jax.defenses import common, registry
from backdoor_jax.errors import ConfigError, check_choice
from backdoor_jax.explain import layers as layers_lib
from backdoor_jax.explain import metrics as map_metrics
from backdoor_jax.explain import saliency
from backdoor_jax.train import steps

REGIONS = map_metrics.CORNERS + ("center",)
COLOURS = {"black": (0, 0, 0), "white": (255, 255, 255), "red": (255, 0, 0), "green": (0, 255, 0),
           "blue": (0, 0, 255), "yellow": (255, 255, 0), "cyan": (0, 255, 255), "magenta": (255, 0, 255)}


def defaults() -> config_dict.ConfigDict:
  """Default settings of the ``map_probe`` section."""
  c = config_dict.ConfigDict()
  c.regions = REGIONS          # candidate target regions (corner names, 'center')
  c.region_fraction = 0.25     # side of each square region, as a fraction of the image side
  c.method = "gradcam"         # explanation method probed
  c.layer = ""                 # '' = the default Grad-CAM layer (deepest map at least 4x4)
  c.patch_size = 4             # probe patch side, pixels
  c.patch_stride = 4           # grid of probe positions, pixels
  c.noise_patterns = 4         # seeded uniform-noise probe patterns besides the 8 solid colours
  c.num_images = 16            # clean validation images each probe is stamped on
  c.chunk = 16                 # probes per jitted call (x num_images images)
  c.lift_threshold = 0.5       # flag the model when a probe's lift exceeds it
  return c


def region_masks(names: Any, image_hw: tuple[int, int], fraction: float) -> np.ndarray:
  """(R, H, W) bool masks of the named square regions (corners via ``square_region``, or 'center').

  Raises:
    ConfigError: an unknown region name.
  """
  h, w = image_hw
  out = []
  for name in names:
    check_choice("map_probe region", name, REGIONS)
    if name == "center":
      side = max(1, int(round(float(fraction) * min(h, w))))
      m = np.zeros((h, w), bool)
      m[(h - side) // 2:(h - side) // 2 + side, (w - side) // 2:(w - side) // 2 + side] = True
    else:
      m = np.asarray(map_metrics.square_region((h, w), name, fraction), bool)
    out.append(m)
  return np.stack(out)


def probe_patterns(size: int, noise: int, seed: int) -> tuple[list[str], np.ndarray]:
  """Names and (K, size, size, 3) uint8 probe patterns: the 8 solid colours, then ``noise`` noise patches."""
  names = list(COLOURS) + [f"noise{i}" for i in range(noise)]
  solid = np.broadcast_to(np.asarray(list(COLOURS.values()), np.uint8)[:, None, None, :], (len(COLOURS), size, size, 3))
  rnd = np.random.default_rng(seed).integers(0, 256, (noise, size, size, 3)).astype(np.uint8)
  return names, np.concatenate([solid, rnd])


def grid_positions(image_hw: tuple[int, int], size: int, stride: int) -> np.ndarray:
  """(P, 2) top-left corners of the probe grid; the last row / column touches the border."""
  h, w = image_hw
  rows = sorted(set(range(0, h - size + 1, stride)) | {h - size})
  cols = sorted(set(range(0, w - size + 1, stride)) | {w - size})
  return np.asarray([(r, c) for r in rows for c in cols], np.int32)


def nearest_position(top_left: Any, size: int, image_hw: tuple[int, int]) -> str:
  """Corner name or 'center' nearest to the centre of a ``size`` patch at ``top_left``."""
  h, w = image_hw
  r, c = top_left[0] + (size - 1) / 2, top_left[1] + (size - 1) / 2
  anchors = {"top-left": (0, 0), "top-right": (0, w - 1), "bottom-left": (h - 1, 0),
             "bottom-right": (h - 1, w - 1), "center": ((h - 1) / 2, (w - 1) / 2)}
  return min(anchors, key=lambda k: (anchors[k][0] - r) ** 2 + (anchors[k][1] - c) ** 2)


def probe_rates(apply_fn, variables, input_spec: steps.InputSpec, images: np.ndarray, regions: np.ndarray,
                patterns: np.ndarray, positions: np.ndarray, *, method: str, layer: str, chunk: int
                ) -> tuple[np.ndarray, np.ndarray]:
  """Hit rates of every probe: ``(rates (K, P, R), base (R,))``.

  ``rates[k, p, r]``: fraction of ``images`` that, with pattern k stamped at position p,
  keep their prediction and have their map in region r (IoU(map > 0.5, r) > 0.5);
  ``base[r]``: the same without a patch.
  """
  common.check_images(images)
  n, (h, w) = len(images), images.shape[1:3]
  size = patterns.shape[1]
  region_j = jnp.asarray(regions)
  x0 = jnp.asarray(images, jnp.float32)

  def hits(v, x, pred):
    xin = steps.preprocess(None, x, input_spec)
    out = apply_fn(v, xin, train=False)
    maps = saliency.explanation_maps(method, apply_fn, v, xin, pred, layer)
    iou = jax.vmap(lambda r: map_metrics.iou(maps, r, threshold=0.5))(region_j)  # (R, B)
    return ((iou > 0.5) & (jnp.argmax(out, -1) == pred)[None]).astype(jnp.float32)

  @jax.jit
  def clean(v):
    pred = jnp.argmax(apply_fn(v, steps.preprocess(None, x0, input_spec), train=False), -1)
    return pred, jnp.mean(hits(v, x0, pred), axis=1)

  @jax.jit
  def probe(v, pred, pats, tops):
    def stamp(pat, top):
      return jax.lax.dynamic_update_slice(x0, jnp.broadcast_to(pat.astype(jnp.float32), (n, size, size, 3)),
                                          (0, top[0], top[1], 0))
    x = jax.vmap(stamp)(pats, tops).reshape((-1, h, w, 3))                    # (c * N, H, W, 3)
    hit = hits(v, x, jnp.tile(pred, pats.shape[0]))                           # (R, c * N)
    return jnp.mean(hit.reshape((hit.shape[0], pats.shape[0], n)), axis=2).T  # (c, R)

  pred, base = clean(variables)
  k_idx, p_idx = np.meshgrid(np.arange(len(patterns)), np.arange(len(positions)), indexing="ij")
  k_idx, p_idx = k_idx.ravel(), p_idx.ravel()
  out = np.zeros((len(k_idx), len(regions)), np.float32)
  for s in range(0, len(k_idx), chunk):
    sel = np.arange(s, s + chunk) % len(k_idx)  # fixed-size chunks (the last one wraps around)
    got = np.asarray(jax.device_get(probe(variables, pred, jnp.asarray(patterns[k_idx[sel]]),
                                          jnp.asarray(positions[p_idx[sel]]))))
    out[sel[:min(chunk, len(k_idx) - s)]] = got[:min(chunk, len(k_idx) - s)]
  return out.reshape(len(patterns), len(positions), len(regions)), np.asarray(jax.device_get(base))


def lifts(rates: np.ndarray, base: np.ndarray, regions: np.ndarray, positions: np.ndarray, size: int) -> np.ndarray:
  """(K, P, R) lift of each probe over the unpatched rate; -1 where the patch touches the region."""
  touch = np.stack([[regions[r, t[0]:t[0] + size, t[1]:t[1] + size].any() for r in range(len(regions))]
                    for t in positions])  # (P, R)
  return np.where(touch[None], -1.0, rates - base[None, None])


def detect(apply_fn, variables, input_spec: steps.InputSpec, images: np.ndarray, cfg: Any, layer: str,
           seed: int) -> dict[str, Any]:
  """Runs the probe; returns the score (largest lift), the best probe and the per-region best lifts."""
  for k in ("patch_size", "patch_stride", "num_images", "chunk"):
    if int(cfg[k]) < 1:
      raise ConfigError(f"map_probe.{k}={cfg[k]} is invalid; allowed: an int >= 1")
  if int(cfg.noise_patterns) < 0:
    raise ConfigError(f"map_probe.noise_patterns={cfg.noise_patterns} is invalid; allowed: an int >= 0")
  hw = tuple(images.shape[1:3])
  size = int(cfg.patch_size)
  if size >= min(hw):
    raise ConfigError(f"map_probe.patch_size={size} does not fit the {hw[0]}x{hw[1]} images; allowed: 1 to "
                      f"{min(hw) - 1}")
  names = tuple(cfg.regions)
  regions = region_masks(names, hw, float(cfg.region_fraction))
  pnames, patterns = probe_patterns(size, int(cfg.noise_patterns), seed)
  positions = grid_positions(hw, size, int(cfg.patch_stride))
  pick = np.sort(np.random.default_rng(seed).choice(len(images), size=min(int(cfg.num_images), len(images)),
                                                    replace=False))
  rates, base = probe_rates(apply_fn, variables, input_spec, images[pick], regions, patterns, positions,
                            method=str(cfg.method), layer=layer, chunk=int(cfg.chunk))
  lift = lifts(rates, base, regions, positions, size)
  k, p, r = np.unravel_index(int(np.argmax(lift)), lift.shape)
  return {"score": float(lift[k, p, r]), "region": names[r], "pattern": pnames[k],
          "position": positions[p].tolist(), "position_name": nearest_position(positions[p], size, hw),
          "hit_rate": float(rates[k, p, r]), "base_rate": base.tolist(),
          "region_lift": dict(zip(names, lift.max(axis=(0, 1)).tolist())),
          "pattern_lift": dict(zip(pnames, lift.max(axis=(1, 2)).tolist())), "regions": list(names),
          "probes": int(len(patterns) * len(positions)), "images": int(len(pick))}


def run(ctx: common.DefenseContext, out_dir: str) -> dict[str, Any]:
  """Map Probe on a trained run: score, verdict, flagged region and trigger position (vs the truth when known)."""
  del out_dir
  cfg = ctx.config.map_probe
  layer = layers_lib.choose_layer(common.layer_info(ctx), cfg.layer, what="map_probe.layer")
  with common.Timer() as t:
    found = detect(ctx.apply_fn, ctx.variables, ctx.run.input_spec, ctx.val_images, cfg, layer, ctx.seed)
  flagged = found["score"] > float(cfg.lift_threshold)
  rec = {"layer": layer, **found, "detected": bool(flagged), "lift_threshold": float(cfg.lift_threshold),
         **_truth(ctx), "seconds": t.seconds}
  if rec["true_target_region"] is not None:
    rec["finds_target_region"] = bool(flagged and found["region"] == rec["true_target_region"])
    rec["finds_trigger_position"] = bool(flagged and found["position_name"] == rec["true_trigger_position"])
  return rec


def _truth(ctx: common.DefenseContext) -> dict[str, Any]:
  """The run's target region / trigger position when it is a corner-target explanation backdoor."""
  c = ctx.run.config
  if not ctx.is_explanation_run or c.explain.get("target") != "corner":
    return {"true_target_region": None, "true_trigger_position": None}
  return {"true_target_region": str(c.explain.target_corner), "true_trigger_position": str(c.trigger.position)}


def summary(rec: dict[str, Any]) -> dict[str, Any]:
  """Summary-row part: the verdict, the region the map moves to and the probe that moved it."""
  how = (f"a {rec['pattern']} patch near {rec['position_name']} moves the map to {rec['region']} on "
         f"{rec['hit_rate']:.2f} of images (lift {rec['score']:.2f})")
  verdict = f"explanation backdoor: {how}" if rec["detected"] else f"no explanation backdoor (best probe: {how})"
  if rec["true_target_region"] is not None:
    verdict += (f"; true target {rec['true_target_region']}: "
                f"{'found' if rec.get('finds_target_region') else 'missed'}")
  return {"verdict": verdict, "after": None}


registry.register(registry.Defense("map_probe", run, summary, defaults=defaults))
