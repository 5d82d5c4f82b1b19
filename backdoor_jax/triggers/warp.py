"""WaNet: an imperceptible warping trigger (Nguyen & Tran, ICLR 2021).

The warp field is built once from a PRNG key, on the host:

1. ``noise``: ``(k, k, 2)`` uniform in ``[-1, 1)``, divided by its mean absolute value;
2. upsampled to ``(H, W, 2)`` bicubically (cubic convolution with ``a = -0.75``,
   corner pixels aligned, edges replicated: PyTorch's ``bicubic``/``align_corners=True``);
3. ``grid = clip((identity + s * noise / H) * grid_rescale, -1, 1)``, where ``identity``
   holds normalised coordinates in ``[-1, 1]`` (x = column, y = row; ``-1``/``1`` are
   the centres of the first/last pixel) and ``H`` is the image height as published.

The trigger stores the grid in pixel units (``(row, col)`` per output pixel) and samples
the image bilinearly there. ``s = 0`` (with ``grid_rescale = 1``) is the identity,
bit-exactly. Defaults ``k = 4, s = 0.5, grid_rescale = 1`` are the published ones.

**Noise mode** (:func:`apply_noise_warp`): the "cross" samples get the trigger's grid
plus a per-image random offset ``uniform(-1, 1) / H`` (normalised units), clipped to the
image, and keep their labels, so the model learns that only the exact warp is the
trigger. The poisoning code draws the cross samples and their offsets once per run from
the run's key (see :mod:`backdoor_jax.poison`), instead of anew every epoch.

Config section ``trigger.wanet``: ``k`` (4), ``s`` (0.5), ``grid_rescale`` (1), and
``cross_ratio`` (2): noise-mode samples per poisoned sample, read by the poisoning code
through :func:`~backdoor_jax.triggers.cross_ratio_from_config`.
"""
from __future__ import annotations

import math
import numbers
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

from backdoor_jax.errors import ConfigError
from backdoor_jax.triggers.base import TriggerBase, apply_trigger
from backdoor_jax.triggers.registry import TriggerArgs, register_trigger

BICUBIC_A = -0.75  # PyTorch's cubic convolution coefficient (OpenCV uses the same)


@chex.dataclass(frozen=True)
class WarpTrigger(TriggerBase):
  """A WaNet warping trigger (pytree).

  Attributes:
    coords: ``(H, W, 2)`` float32 sampling positions in pixels, ``(row, col)`` for each
      output pixel, inside ``[0, H-1] x [0, W-1]``. A leading batch axis ``(B, H, W, 2)``
      warps each image of a ``(B, H, W, 3)`` batch with its own field (noise mode).
  """
  coords: jax.Array

  KIND = "wanet"

  @property
  def image_hw(self) -> tuple[int, int]:
    return tuple(self.coords.shape[-3:-1])

  @property
  def mask(self) -> jax.Array:
    """WaNet has no region; raises ConfigError (for code written for patch triggers)."""
    return self.region_mask()

  @property
  def has_cross_mode(self) -> bool:
    return True

  def apply_cross(self, images: jax.Array, keys: jax.Array) -> jax.Array:
    """Noise mode: :func:`apply_noise_warp` with per-image ``keys``."""
    return apply_noise_warp(self, images, keys=keys)

  def _apply_float(self, x: jax.Array) -> jax.Array:
    if self.coords.ndim == 4:
      if x.ndim != 4 or x.shape[0] != self.coords.shape[0]:
        raise ConfigError(f"a batch of {self.coords.shape[0]} warp fields needs images (B={self.coords.shape[0]}, "
                          f"H, W, 3); got {tuple(x.shape)}")
      return jax.vmap(bilinear_sample)(x, self.coords)
    if x.ndim == 3:
      return bilinear_sample(x, self.coords)
    return jax.vmap(bilinear_sample, in_axes=(0, None))(x, self.coords)


def bilinear_sample(image: jax.Array, coords: jax.Array) -> jax.Array:
  """Samples ``image`` ``(H, W, C)`` bilinearly at ``coords`` ``(h, w, 2)`` (row, col) in pixels.

  Positions are clamped to the image (edge pixels repeat). Differentiable in both
  arguments (almost everywhere in ``coords``).
  """
  h, w = image.shape[0], image.shape[1]
  r = jnp.clip(coords[..., 0], 0.0, h - 1.0)
  c = jnp.clip(coords[..., 1], 0.0, w - 1.0)
  r0, c0 = jnp.floor(r), jnp.floor(c)
  fr, fc = (r - r0)[..., None], (c - c0)[..., None]
  r0i, c0i = r0.astype(jnp.int32), c0.astype(jnp.int32)
  r1i, c1i = jnp.minimum(r0i + 1, h - 1), jnp.minimum(c0i + 1, w - 1)
  top = image[r0i, c0i] * (1.0 - fc) + image[r0i, c1i] * fc
  bottom = image[r1i, c0i] * (1.0 - fc) + image[r1i, c1i] * fc
  return top * (1.0 - fr) + bottom * fr


def _cubic_weight(d: np.ndarray, a: float = BICUBIC_A) -> np.ndarray:
  d = np.abs(d)
  near = ((a + 2) * d - (a + 3)) * d * d + 1
  far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
  return np.where(d <= 1, near, np.where(d < 2, far, 0.0))


def bicubic_matrix(n_out: int, n_in: int) -> np.ndarray:
  """``(n_out, n_in)`` matrix of 1-D bicubic upsampling with aligned corners, edges replicated."""
  m = np.zeros((n_out, n_in))
  scale = (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
  for i in range(n_out):
    src = i * scale
    i0 = int(math.floor(src))
    t = src - i0
    for tap in range(-1, 3):
      m[i, min(max(i0 + tap, 0), n_in - 1)] += _cubic_weight(np.asarray(tap - t))
  return m


def upsample_bicubic(x: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
  """Upsamples ``(h, w, C)`` to ``(H, W, C)`` bicubically (aligned corners), in float64."""
  mh = bicubic_matrix(out_hw[0], x.shape[0])
  mw = bicubic_matrix(out_hw[1], x.shape[1])
  return np.einsum("ih,hwc,jw->ijc", mh, np.asarray(x, np.float64), mw)


def _check_real(value: Any, what: str, *, minimum: float, strict: bool) -> float:
  bad = (isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real)
         or not math.isfinite(float(value)) or (value <= minimum if strict else value < minimum))
  if bad:
    raise ConfigError(f"trigger {what} {value!r} is invalid; allowed: a finite number "
                      f"{'>' if strict else '>='} {minimum:g}")
  return float(value)


def make_wanet_trigger(image_hw: tuple[int, int],
                       key: chex.PRNGKey,
                       *,
                       k: int = 4,
                       s: float = 0.5,
                       grid_rescale: float = 1.0) -> WarpTrigger:
  """Builds a WaNet trigger (module docstring), validating every argument on the host.

  Args:
    image_hw: ``(H, W)`` of the images.
    key: PRNG key for the ``k x k`` control noise.
    k: control grid side, an int in ``[2, min(H, W)]``.
    s: warp strength ``>= 0``; 0 is the identity.
    grid_rescale: factor ``> 0`` on the grid before clipping (1 keeps the borders).
  Returns:
    The :class:`WarpTrigger`.
  Raises:
    ConfigError: for any invalid value.
  """
  h, w = (int(v) for v in image_hw)
  if not isinstance(k, numbers.Integral) or isinstance(k, (bool, np.bool_)) or not 2 <= k <= min(h, w):
    raise ConfigError(f"trigger wanet.k {k!r} is invalid for a {h}x{w} image; allowed: an int in [2, {min(h, w)}]")
  s = _check_real(s, "wanet.s", minimum=0.0, strict=False)
  grid_rescale = _check_real(grid_rescale, "wanet.grid_rescale", minimum=0.0, strict=True)
  ins = np.asarray(jax.random.uniform(key, (int(k), int(k), 2), minval=-1.0, maxval=1.0), np.float64)
  ins = ins / np.mean(np.abs(ins))
  noise = upsample_bicubic(ins, (h, w))  # channel 0: x (column) offset, channel 1: y (row) offset
  ident_x = np.broadcast_to(np.linspace(-1.0, 1.0, w)[None, :], (h, w))
  ident_y = np.broadcast_to(np.linspace(-1.0, 1.0, h)[:, None], (h, w))
  gx = np.clip((ident_x + s * noise[..., 0] / h) * grid_rescale, -1.0, 1.0)
  gy = np.clip((ident_y + s * noise[..., 1] / h) * grid_rescale, -1.0, 1.0)
  coords = np.stack([(gy + 1.0) / 2.0 * (h - 1), (gx + 1.0) / 2.0 * (w - 1)], axis=-1)
  snapped = np.round(coords)
  coords = np.where(np.abs(coords - snapped) < 1e-9, snapped, coords)  # s = 0 is exactly the identity
  return WarpTrigger(coords=jnp.asarray(coords, jnp.float32))


def noise_warp_coords(trigger: WarpTrigger, keys: jax.Array) -> jax.Array:
  """Noise-mode fields, one per key: the trigger's grid plus ``uniform(-1, 1) / H``, clipped.

  Args:
    trigger: a single-field :class:`WarpTrigger`.
    keys: ``(n,)`` PRNG keys, one per image (so a sample's field does not depend on
      how the data is chunked).
  Returns:
    ``(n, H, W, 2)`` float32 sampling positions.
  """
  if trigger.coords.ndim != 3:
    raise ConfigError(f"noise warps need a single warp field (H, W, 2); got {tuple(trigger.coords.shape)}")
  h, w = trigger.image_hw
  u = jax.vmap(lambda k: jax.random.uniform(k, (h, w, 2), minval=-1.0, maxval=1.0))(keys)
  half = jnp.asarray([(h - 1) / 2.0, (w - 1) / 2.0], jnp.float32)  # normalised -> pixel units
  coords = trigger.coords[None] + u / h * half
  return jnp.stack([jnp.clip(coords[..., 0], 0.0, h - 1.0), jnp.clip(coords[..., 1], 0.0, w - 1.0)], axis=-1)


def apply_noise_warp(trigger: WarpTrigger, images: jax.Array, key: chex.PRNGKey | None = None, *,
                     keys: jax.Array | None = None) -> jax.Array:
  """WaNet noise mode: warps each of ``images`` ``(B, H, W, 3)`` with its own randomised field.

  Args:
    trigger: a single-field :class:`WarpTrigger`.
    images: ``(B, H, W, 3)``, uint8 or float (same dtype rules as ``apply_trigger``).
    key: one PRNG key, split into ``B``; or give ``keys``.
    keys: ``(B,)`` per-image keys instead of ``key``.
  Returns:
    The warped images, same shape and dtype. Deterministic from the key(s).
  """
  images = jnp.asarray(images)
  if images.ndim != 4:
    raise ConfigError(f"noise warps need a batch (B, H, W, 3); got images of shape {tuple(images.shape)}")
  if (key is None) == (keys is None):
    raise ConfigError("apply_noise_warp needs exactly one of key and keys")
  if keys is None:
    keys = jax.random.split(key, images.shape[0])
  return apply_trigger(WarpTrigger(coords=noise_warp_coords(trigger, keys)), images)


def _cross_ratio(options) -> float:
  return _check_real(options["cross_ratio"], "wanet.cross_ratio", minimum=0.0, strict=False)


@register_trigger("wanet", defaults={"k": 4, "s": 0.5, "grid_rescale": 1.0, "cross_ratio": 2.0},
                  cross_ratio=_cross_ratio)
def build_wanet(args: TriggerArgs) -> WarpTrigger:
  """wanet: ``trigger.wanet.k``, ``s``, ``grid_rescale``, ``cross_ratio`` (module docstring)."""
  o = args.options
  return make_wanet_trigger(args.image_hw, args.key, k=o["k"], s=o["s"], grid_rescale=o["grid_rescale"])
