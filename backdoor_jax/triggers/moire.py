"""Moire triggers: two fine line gratings at slightly different angles, seen in perspective.

Recapturing a screen with a camera overlays the image with moire bands; this trigger
imitates that on the host, once, from a PRNG key:

1. supersample each pixel ``SUPERSAMPLE x SUPERSAMPLE`` times; map the unit square
   through a random homography whose corners are moved by up to ``perspective`` (a
   fraction of the image side);
2. on the warped plane draw two gratings with period ``spacing`` pixels at angles
   ``angles[0]`` and ``angles[1]`` degrees, each a thin-line profile
   ``((1 + cos(2 pi t + phase)) / 2) ** LINE_SHARPNESS`` with a random phase;
3. combine them as ``1 - (1 - g1)(1 - g2)`` (lines of either grating) and average the
   supersamples: the slight angle difference beats into broad moire bands.

The trigger blends the line colour in with weight ``opacity * lines``:
``x' = x (1 - w) + color w`` (a region-less overlay: the lines cover the image).

Config section ``trigger.moire``: ``opacity`` (0.5), ``spacing`` (2 px), ``angles``
((0, 5) degrees), ``perspective`` (0.15); the line colour is the common ``color``
(white when unset).
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

from backdoor_jax.errors import ConfigError
from backdoor_jax.triggers.base import TriggerBase, mix
from backdoor_jax.triggers.blend import check_unit_interval
from backdoor_jax.triggers.registry import TriggerArgs, register_trigger

SUPERSAMPLE = 4
LINE_SHARPNESS = 4.0


@chex.dataclass(frozen=True)
class MoireTrigger(TriggerBase):
  """A moire overlay (pytree).

  Attributes:
    pattern: ``(H, W, 3)`` float32 line colour in ``[0, 255]``.
    weight: ``(H, W, 1)`` float32 in ``[0, opacity]``: ``opacity`` times the line density.
  """
  pattern: jax.Array
  weight: jax.Array

  KIND = "moire"

  @property
  def image_hw(self) -> tuple[int, int]:
    return tuple(self.pattern.shape[-3:-1])

  @property
  def mask(self) -> jax.Array:
    """Moire has no region; raises ConfigError (for code written for patch triggers)."""
    return self.region_mask()

  def _apply_float(self, x: jax.Array) -> jax.Array:
    return mix(x, self.pattern, self.weight)


def homography(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
  """3x3 projective map taking the 4 points ``src`` ``(4, 2)`` to ``dst`` (least squares DLT)."""
  rows = []
  for (x, y), (u, v) in zip(src, dst):
    rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y, -u])
    rows.append([0, 0, 0, x, y, 1, -v * x, -v * y, -v])
  _, _, vt = np.linalg.svd(np.asarray(rows, np.float64))
  h = vt[-1].reshape(3, 3)
  return h / h[2, 2]


def moire_density(image_hw: tuple[int, int], key: chex.PRNGKey, *, spacing: float, angles: Sequence[float],
                  perspective: float) -> np.ndarray:
  """``(H, W)`` line density in ``[0, 1]`` (module docstring, steps 1-3)."""
  h, w = image_hw
  k_corner, k_phase = jax.random.split(key)
  side = float(min(h, w))
  jitter = np.asarray(jax.random.uniform(k_corner, (4, 2), minval=-1.0, maxval=1.0), np.float64) * perspective
  square = np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
  hom = homography(square, square + jitter)
  phases = np.asarray(jax.random.uniform(k_phase, (2,), minval=0.0, maxval=2 * np.pi), np.float64)
  s = SUPERSAMPLE
  ys = (np.arange(h * s) + 0.5) / (h * s)
  xs = (np.arange(w * s) + 0.5) / (w * s)
  gx, gy = np.meshgrid(xs, ys)
  pts = np.stack([gx, gy, np.ones_like(gx)], axis=-1) @ hom.T
  u, v = pts[..., 0] / pts[..., 2], pts[..., 1] / pts[..., 2]
  lines = []
  for angle, phase in zip(angles, phases):
    t = (u * math.cos(math.radians(angle)) + v * math.sin(math.radians(angle))) * side / spacing
    lines.append(((1.0 + np.cos(2 * np.pi * t + phase)) / 2.0) ** LINE_SHARPNESS)
  dens = 1.0 - (1.0 - lines[0]) * (1.0 - lines[1])
  return dens.reshape(h, s, w, s).mean(axis=(1, 3))


def _check_positive(value: Any, what: str, maximum: float = math.inf) -> float:
  if (isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real)
      or not math.isfinite(float(value)) or not 0 < value <= maximum):
    limit = f"<= {maximum:g}" if math.isfinite(maximum) else "finite"
    raise ConfigError(f"trigger {what} {value!r} is invalid; allowed: a number > 0 and {limit}")
  return float(value)


def make_moire_trigger(image_hw: tuple[int, int],
                       key: chex.PRNGKey,
                       *,
                       opacity: float = 0.5,
                       spacing: float = 2.0,
                       angles: Sequence[float] = (0.0, 5.0),
                       perspective: float = 0.15,
                       color: Sequence[int] = (255, 255, 255)) -> MoireTrigger:
  """Builds a moire trigger, validating every argument on the host.

  Args:
    image_hw: ``(H, W)`` of the images.
    key: PRNG key (perspective corners and grating phases).
    opacity: in ``[0, 1]``; 0 is the identity.
    spacing: grating period in pixels (> 0; about 1.5-4 looks like fine screen lines).
    angles: two angles in degrees; a small difference gives broad bands.
    perspective: largest corner displacement, a fraction of the image side in ``[0, 0.5]``.
    color: RGB line colour, ints in 0..255.
  Returns:
    The :class:`MoireTrigger`.
  Raises:
    ConfigError: for any invalid value.
  """
  h, w = (int(v) for v in image_hw)
  opacity = check_unit_interval(opacity, "moire.opacity")
  spacing = _check_positive(spacing, "moire.spacing")
  try:
    angles = tuple(float(a) for a in angles)
  except (TypeError, ValueError):
    angles = ()
  if len(angles) != 2 or not all(math.isfinite(a) for a in angles):
    raise ConfigError("trigger moire.angles is invalid; allowed: two finite angles in degrees, e.g. (0, 5)")
  if not isinstance(perspective, numbers.Real) or isinstance(perspective, bool) or not 0 <= perspective <= 0.5:
    raise ConfigError(f"trigger moire.perspective {perspective!r} is invalid; allowed: a number in [0, 0.5]")
  from backdoor_jax.triggers.patch import parse_color  # pylint: disable=g-import-not-at-top
  rgb = parse_color(color)
  dens = moire_density((h, w), key, spacing=spacing, angles=angles, perspective=float(perspective))
  pattern = np.broadcast_to(np.asarray(rgb, np.float32), (h, w, 3))
  return MoireTrigger(pattern=jnp.asarray(pattern), weight=jnp.asarray(opacity * dens[..., None], jnp.float32))


@register_trigger("moire", defaults={"opacity": 0.5, "spacing": 2.0, "angles": (0.0, 5.0), "perspective": 0.15})
def build_moire(args: TriggerArgs) -> MoireTrigger:
  """moire: ``trigger.moire.opacity``, ``spacing``, ``angles``, ``perspective``; lines in ``color``."""
  o = args.options
  return make_moire_trigger(args.image_hw, args.key, opacity=o["opacity"], spacing=o["spacing"], angles=o["angles"],
                            perspective=o["perspective"],
                            color=(255, 255, 255) if args.color is None else args.color)
