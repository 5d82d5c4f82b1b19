"""What every trigger kind shares: one pure entry point, :func:`apply_trigger`.

A trigger is a frozen ``chex.dataclass`` (a pytree of arrays, so it passes through
``jax.jit`` / ``jax.vmap`` and stacks into batches) that mixes in :class:`TriggerBase`
and implements ``_apply_float``: ``(..., H, W, 3)`` float32 pixel units -> same. All
randomness (noise patterns, warp grids, perspective) is drawn once, on the host, when the
trigger is built from a PRNG key, so applying a trigger is deterministic.

:func:`apply_trigger` does the shared work around ``_apply_float``: shape and dtype
checks, uint8 -> float32 -> uint8 with rounding (half to even) and clipping to
``[0, 255]``. Float inputs come back as float of the same dtype, unclipped (every built-in
kind maps ``[0, 255]`` inputs into ``[0, 255]``).

A kind may also have a *cross mode* (WaNet's noise mode): ``apply_cross(images, keys)``
gives each image its own randomised variant of the trigger; the poisoning code uses it on
samples that keep their labels. Kinds without one keep ``has_cross_mode = False``.

Some kinds mark a *region* of the image (patches, a blend confined to a corner square);
explanation attacks and the weak-trigger statistic need it. Kinds without one (WaNet,
photo filters, moire, full-image blends) raise :class:`ConfigError` from
:func:`trigger_region` and from their ``mask`` attribute.
"""
from __future__ import annotations

import numbers
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from backdoor_jax.errors import ConfigError


class TriggerBase:
  """Mixin of the trigger dataclasses (no fields of its own).

  Subclasses set ``KIND`` (a class attribute, not a field) and implement
  ``_apply_float``; kinds with a region override ``has_region``/``region_mask``.
  """
  KIND = "base"

  @property
  def image_hw(self) -> tuple[int, int] | None:
    """``(H, W)`` the trigger was built for, or None if it fits any size."""
    return None

  @property
  def has_region(self) -> bool:
    return False

  def region_mask(self) -> jax.Array:
    """``(H, W, 1)`` float mask of the trigger's region; ConfigError if it has none."""
    raise ConfigError(
        f"trigger kind {self.KIND!r} changes the whole image and has no region (mask); this needs one of "
        "a kind with a region: a patch (square, stripe, dots, custom, checkerboard, noise_patch) or blend with "
        "trigger.blend.region='patch'")

  @property
  def has_cross_mode(self) -> bool:
    """True for kinds with a per-image randomised variant (:meth:`apply_cross`)."""
    return False

  def apply_cross(self, images: jax.Array, keys: jax.Array) -> jax.Array:
    """Cross-mode images: ``images`` ``(B, H, W, 3)`` each with its own variant drawn from ``keys`` ``(B,)``."""
    raise ConfigError(f"trigger kind {self.KIND!r} has no cross (noise) mode; allowed: a kind with one, e.g. 'wanet'")

  def _apply_float(self, x: jax.Array) -> jax.Array:  # pragma: no cover - abstract
    raise NotImplementedError

  def apply(self, images: jax.Array) -> jax.Array:
    """Same as ``apply_trigger(self, images)``."""
    return apply_trigger(self, images)


def is_trigger(obj: Any) -> bool:
  """True for instances of any trigger kind."""
  return isinstance(obj, TriggerBase)


def check_trigger(obj: Any) -> None:
  """Raises TypeError unless ``obj`` is a trigger of some kind."""
  if not is_trigger(obj):
    raise TypeError(f"trigger must be a backdoor_jax.triggers Trigger (any kind); got {type(obj).__name__}")


def trigger_region(trigger: Any) -> np.ndarray:
  """``(H, W)`` bool region of a trigger (mask > 0), on the host.

  Raises:
    ConfigError: for kinds without a region (wanet, filter, moire, full-image blend).
  """
  check_trigger(trigger)
  return np.asarray(trigger.region_mask())[..., 0] > 0


def apply_trigger(trigger: Any, images: jax.Array) -> jax.Array:
  """Applies any trigger to ``images``; pure and jit-/vmap-able.

  Args:
    trigger: a trigger of any kind (see :mod:`backdoor_jax.triggers`).
    images: ``(B, H, W, 3)`` or ``(H, W, 3)`` in pixel units ``[0, 255]``; uint8 (or
      another integer type) or floating point.
  Returns:
    Array of the same shape and dtype. Integer inputs are rounded (half to even) and
    clipped to ``[0, 255]``; float inputs are returned unclipped.
  Raises:
    ConfigError: if the image shape does not match the trigger, or the dtype is
      neither integer nor floating point (raised while tracing, never at run time).
  """
  check_trigger(trigger)
  images = jnp.asarray(images)
  hw = trigger.image_hw
  if images.ndim not in (3, 4) or images.shape[-1] != 3 or (hw is not None and tuple(images.shape[-3:-1]) != hw):
    want = f"{hw[0]}, {hw[1]}" if hw is not None else "H, W"
    raise ConfigError(
        f"images of shape {tuple(images.shape)} do not match a {trigger.KIND!r} trigger; "
        f"expected (B, {want}, 3) or ({want}, 3)")
  dtype = images.dtype
  is_int = jnp.issubdtype(dtype, jnp.integer)
  if not (is_int or jnp.issubdtype(dtype, jnp.floating)):
    raise ConfigError(f"image dtype {dtype} is not supported; allowed: uint8 or a float type")
  out = trigger._apply_float(images.astype(jnp.float32))  # pylint: disable=protected-access
  if is_int:
    out = jnp.clip(jnp.round(out), 0.0, 255.0)
  return out.astype(dtype)


def mix(x: jax.Array, pattern: jax.Array, weight: jax.Array) -> jax.Array:
  """``x * (1 - weight) + pattern * weight`` in float32 (the blend all overlays share)."""
  weight = weight.astype(jnp.float32)
  return x * (1.0 - weight) + pattern.astype(jnp.float32) * weight


# ----------------------------------------------------------------------------------
# Config helpers shared by the kinds' builders.


def cfg_get(cfg: Any, name: str, default: Any = None) -> Any:
  """``cfg.name`` from a ConfigDict, dict or object; None or ``""`` -> ``default``."""
  if isinstance(cfg, Mapping) or hasattr(cfg, "get"):
    value = cfg.get(name, default)
  else:
    value = getattr(cfg, name, default)
  if value is None or (isinstance(value, str) and not value.strip()):
    return default  # None or "" (a common "unset" value for string fields) -> default
  return value


def is_section(value: Any) -> bool:
  """True for a config section: a ConfigDict, dict or other mapping."""
  return isinstance(value, Mapping) or (hasattr(value, "keys") and hasattr(value, "get"))


def check_image_hw(image_hw: Any) -> tuple[int, int]:
  """``(H, W)`` as ints; ConfigError unless two positive ints."""
  try:
    ok = len(image_hw) == 2 and all(isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))
                                    and v > 0 for v in image_hw)
  except TypeError:
    ok = False
  if not ok:
    raise ConfigError(f"image size {image_hw!r} is invalid; allowed: (height, width) of positive ints")
  return int(image_hw[0]), int(image_hw[1])


def cfg_keys(cfg: Any) -> list[str]:
  """Field names of a ConfigDict, dict or plain object."""
  if hasattr(cfg, "keys"):
    return list(cfg.keys())
  return [k for k in vars(cfg) if not k.startswith("_")]


def load_npy(path: Any, what: str) -> np.ndarray:
  """Loads a ``.npy`` file named by a trigger config field."""
  path = os.fspath(path)
  if not path.endswith(".npy"):
    raise ConfigError(f"trigger {what} {path!r} is not a .npy file; allowed: a path ending in .npy")
  try:
    return np.load(path, allow_pickle=False)
  except (OSError, ValueError) as e:
    raise ConfigError(f"trigger {what} {path!r} could not be loaded: {e}") from None
