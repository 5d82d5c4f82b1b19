"""Blended (transparent) triggers: ``x' = (1 - a) x + a t`` with ``a = alpha * mask``.

``t`` is a full-image pattern: a seeded uniform-noise image (integers 0..255 per pixel
and channel, drawn once from a PRNG key) or an image file (``.png``/``.jpg`` read with
PIL and resized bilinearly to ``(H, W)``, or an ``.npy`` array ``(H, W, 3)`` in
``[0, 255]``). Without a mask the whole image is blended and the trigger has no region;
with one (e.g. a corner square from ``trigger.blend.region = 'patch'``) only the masked
pixels change and the mask is the region.

Config section ``trigger.blend``: ``alpha`` (0.2), ``pattern`` (``'noise'``, an image file
or ``.npy``), ``region`` (``'full'``, or ``'patch'``: a square from the common ``size`` /
``position`` / ``margin``).
"""
from __future__ import annotations

import math
import numbers
import os
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

from backdoor_jax.errors import ConfigError, check_choice
from backdoor_jax.triggers.base import TriggerBase, load_npy, mix
from backdoor_jax.triggers.patch import make_patch_trigger
from backdoor_jax.triggers.registry import TriggerArgs, register_trigger

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
BLEND_REGIONS = ("full", "patch")


@chex.dataclass(frozen=True)
class BlendTrigger(TriggerBase):
  """A blended trigger (pytree).

  Attributes:
    pattern: ``(H, W, 3)`` float32 in ``[0, 255]``, the image blended in.
    weight: ``(H, W, 1)`` float32 in ``[0, 1]``: ``alpha`` times the mask.
    region: ``(H, W, 1)`` float32 mask of the blended pixels, or None for a full-image
      blend (no region).
  """
  pattern: jax.Array
  weight: jax.Array
  region: Any = None

  KIND = "blend"

  @property
  def image_hw(self) -> tuple[int, int]:
    return tuple(self.pattern.shape[-3:-1])

  @property
  def has_region(self) -> bool:
    return self.region is not None

  def region_mask(self) -> jax.Array:
    if self.region is None:
      return TriggerBase.region_mask(self)
    return self.region

  @property
  def mask(self) -> jax.Array:
    """The region (for code written for patch triggers); ConfigError without one."""
    return self.region_mask()

  def _apply_float(self, x: jax.Array) -> jax.Array:
    return mix(x, self.pattern, self.weight)


def check_unit_interval(value: Any, what: str) -> float:
  """Returns ``value`` as a float, or raises ConfigError unless it is a number in [0, 1]."""
  if (isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real)
      or not math.isfinite(float(value)) or not 0 <= value <= 1):
    raise ConfigError(f"trigger {what} {value!r} is invalid; allowed: a number in [0, 1]")
  return float(value)


def noise_pattern(key: chex.PRNGKey, image_hw: tuple[int, int]) -> np.ndarray:
  """``(H, W, 3)`` float32 uniform integers in ``[0, 255]`` drawn from ``key``."""
  return np.asarray(jax.random.randint(key, tuple(image_hw) + (3,), 0, 256), np.float32)


def load_pattern_image(path: Any, image_hw: tuple[int, int]) -> np.ndarray:
  """Reads an image file (png/jpg/bmp, or .npy ``(H, W, 3)`` in [0, 255]) as ``(H, W, 3)`` float32."""
  path = os.fspath(path)
  h, w = image_hw
  if path.lower().endswith(".npy"):
    arr = load_npy(path, "blend.pattern").astype(np.float64)
    if arr.shape != (h, w, 3) or not np.all(np.isfinite(arr)) or arr.min() < 0 or arr.max() > 255:
      raise ConfigError(f"blend pattern {path!r} has shape {arr.shape}; allowed: ({h}, {w}, 3) with "
                        "finite values in [0, 255] (or an image file, resized automatically)")
    return arr.astype(np.float32)
  if not path.lower().endswith(IMAGE_SUFFIXES):
    raise ConfigError(f"blend pattern {path!r} is not an image; allowed: 'noise', a .npy array or a file "
                      f"ending in {', '.join(IMAGE_SUFFIXES)}")
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(path) as im:
      im = im.convert("RGB").resize((w, h), Image.Resampling.BILINEAR)
      return np.asarray(im, np.float32)
  except OSError as e:
    raise ConfigError(f"blend pattern {path!r} could not be read: {e}") from None


def make_blend_trigger(image_hw: tuple[int, int],
                       *,
                       alpha: float = 0.2,
                       pattern: Any = "noise",
                       key: chex.PRNGKey | None = None,
                       mask: Any = None) -> BlendTrigger:
  """Builds a blended trigger, validating every argument on the host.

  Args:
    image_hw: ``(H, W)`` of the images.
    alpha: blend weight in ``[0, 1]``; 0 leaves images unchanged, 1 replaces the
      (masked) pixels by the pattern.
    pattern: ``'noise'`` (seeded uniform noise from ``key``), a path (image file or
      ``.npy``), or an array ``(H, W, 3)`` in ``[0, 255]``.
    key: PRNG key for the noise pattern (required for ``'noise'``).
    mask: optional ``(H, W)`` or ``(H, W, 1)`` array in ``[0, 1]``; None blends the
      whole image (and the trigger then has no region).
  Returns:
    The :class:`BlendTrigger`.
  Raises:
    ConfigError: for any invalid value.
  """
  h, w = (int(v) for v in image_hw)
  alpha = check_unit_interval(alpha, "blend.alpha")
  if isinstance(pattern, str) and pattern.strip().lower() == "noise":
    if key is None:
      raise ConfigError("blend pattern 'noise' needs a PRNG key; got key=None")
    pat = noise_pattern(key, (h, w))
  elif isinstance(pattern, (str, os.PathLike)):
    pat = load_pattern_image(pattern, (h, w))
  else:
    pat = np.asarray(pattern, np.float64)
    if pat.shape != (h, w, 3) or not np.all(np.isfinite(pat)) or pat.min() < 0 or pat.max() > 255:
      raise ConfigError(f"blend pattern array has shape {pat.shape}; allowed: ({h}, {w}, 3) with finite "
                        "values in [0, 255]")
  region = None
  if mask is None:
    m = np.ones((h, w, 1), np.float32)
  else:
    m = np.asarray(mask, np.float64)
    if m.ndim == 2:
      m = m[..., None]
    if m.shape != (h, w, 1) or not np.all(np.isfinite(m)) or m.min() < 0 or m.max() > 1:
      raise ConfigError(f"blend mask has shape {np.shape(mask)}; allowed: ({h}, {w}) or ({h}, {w}, 1) "
                        "with values in [0, 1]")
    m = m.astype(np.float32)
    region = jnp.asarray(m)
  return BlendTrigger(pattern=jnp.asarray(pat, jnp.float32), weight=jnp.asarray(alpha * m, jnp.float32),
                      region=region)


@register_trigger("blend", defaults={"alpha": 0.2, "pattern": "noise", "region": "full"})
def build_blend(args: TriggerArgs) -> BlendTrigger:
  """blend: ``trigger.blend.alpha``, ``pattern``, ``region`` (module docstring)."""
  region = args.options["region"]
  check_choice("trigger blend.region", region, BLEND_REGIONS)
  mask = None
  if region == "patch":
    mask = make_patch_trigger(args.image_hw, kind="square", size=args.size, position=args.position,
                              margin=args.margin).mask
  return make_blend_trigger(args.image_hw, alpha=args.options["alpha"], pattern=args.options["pattern"],
                            key=args.key, mask=mask)
