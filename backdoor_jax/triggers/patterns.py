"""Pattern patches: an ``s x s`` box filled with a pattern instead of one solid colour.

Both are patch triggers (:class:`~backdoor_jax.triggers.Trigger`, with a region) placed
like a square: ``size``, ``position`` (default bottom-right) and ``margin`` as for
``'square'``; ``s`` is the patch side from ``size``.

* ``'checkerboard'``: box pixel ``(i, j)`` gets ``color`` (default white) when
  ``(i // cell + j // cell)`` is even and ``trigger.checkerboard.color2`` (default black)
  otherwise; ``cell`` (default 1) is the side of one checker square in pixels. The
  top-left pixel of the box always has ``color``.
* ``'noise_patch'``: seeded uniform noise, ``jax.random.randint(key, (s, s, 3), 0, 256)``
  drawn once from the trigger key (``trigger.seed``, or the run's key); ``color`` is not
  used.
"""
from __future__ import annotations

import numbers

import jax
import numpy as np

from backdoor_jax.errors import ConfigError
from backdoor_jax.triggers.base import check_image_hw
from backdoor_jax.triggers.patch import Trigger, check_margin, parse_color, parse_position, patch_side, place_box
from backdoor_jax.triggers.registry import TriggerArgs, register_trigger

DEFAULT_POSITION = "bottom-right"


def checkerboard_box(side: int, cell: int, color: tuple[int, int, int], color2: tuple[int, int, int]) -> np.ndarray:
  """``(side, side, 3)`` float64 checkerboard (module docstring)."""
  idx = np.arange(side) // cell
  even = (idx[:, None] + idx[None, :]) % 2 == 0
  return np.where(even[..., None], np.asarray(color, np.float64), np.asarray(color2, np.float64))


def make_checkerboard_trigger(image_hw: tuple[int, int], *, size: float = 0.1, position=None, color=None,
                              color2=(0, 0, 0), cell: int = 1, margin: int = 0) -> Trigger:
  """Builds a checkerboard patch; arguments as for ``make_patch_trigger(kind='square')`` plus ``color2`` and ``cell``.

  Raises:
    ConfigError: for any invalid value (e.g. ``cell`` not an int >= 1).
  """
  hw = check_image_hw(image_hw)
  if not isinstance(cell, numbers.Integral) or isinstance(cell, bool) or cell < 1:
    raise ConfigError(f"trigger checkerboard.cell {cell!r} is invalid; allowed: an int >= 1 (pixels)")
  side = patch_side(size, hw)
  box = checkerboard_box(side, int(cell), parse_color("white" if color is None else color), parse_color(color2))
  pos = parse_position(DEFAULT_POSITION if position is None else position)
  return place_box(box, np.ones((side, side)), hw, pos, check_margin(margin), f"size={size!r}")


def make_noise_patch_trigger(image_hw: tuple[int, int], key: jax.Array, *, size: float = 0.1, position=None,
                             margin: int = 0) -> Trigger:
  """Builds a seeded uniform-noise patch (module docstring); arguments as for a square.

  Raises:
    ConfigError: for any invalid value.
  """
  hw = check_image_hw(image_hw)
  side = patch_side(size, hw)
  box = np.asarray(jax.random.randint(key, (side, side, 3), 0, 256), np.float64)
  pos = parse_position(DEFAULT_POSITION if position is None else position)
  return place_box(box, np.ones((side, side)), hw, pos, check_margin(margin), f"size={size!r}")


@register_trigger("checkerboard", defaults={"color2": (0, 0, 0), "cell": 1})
def build_checkerboard(args: TriggerArgs) -> Trigger:
  """checkerboard: common ``size``/``position``/``color``/``margin``, ``trigger.checkerboard.color2``, ``cell``."""
  return make_checkerboard_trigger(args.image_hw, size=args.size, position=args.position, color=args.color,
                                   color2=args.options["color2"], cell=args.options["cell"], margin=args.margin)


@register_trigger("noise_patch")
def build_noise_patch(args: TriggerArgs) -> Trigger:
  """noise_patch: common ``size``/``position``/``margin``; the noise comes from the trigger key."""
  return make_noise_patch_trigger(args.image_hw, args.key, size=args.size, position=args.position,
                                  margin=args.margin)
