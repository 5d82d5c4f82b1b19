"""The four-corner pattern of label-consistent attacks (Turner et al., 2019).

A ``s x s`` checkerboard (``s`` from the common ``size``; default 3 px on 32x32) in each
of the four corners, ``margin`` pixels from the borders. Each corner's pattern is the
top-left one mirrored into that corner, so the whole trigger is unchanged by horizontal
and vertical flips (it survives flip augmentation) and the pixel at each image corner has
``color``. Box pixel ``(i, j)`` of the top-left corner gets ``color`` (default white) when
``i + j`` is even and ``trigger.four_corner.color2`` (default black) otherwise.

``trigger.four_corner.amplitude`` in ``(0, 1]`` blends the pattern in (``mask`` =
amplitude on the pattern pixels): 1 pastes it, smaller values make a fainter trigger
(Turner et al.'s "reduced amplitude"). ``position`` is not used.
"""
from __future__ import annotations

import math
import numbers

import jax.numpy as jnp
import numpy as np

from backdoor_jax.errors import ConfigError
from backdoor_jax.triggers.base import check_image_hw
from backdoor_jax.triggers.patch import Trigger, check_margin, parse_color, patch_side
from backdoor_jax.triggers.patterns import checkerboard_box
from backdoor_jax.triggers.registry import TriggerArgs, register_trigger


def make_four_corner_trigger(image_hw: tuple[int, int], *, size: float = 3.0, color=None, color2=(0, 0, 0),
                             amplitude: float = 1.0, margin: int = 0) -> Trigger:
  """Builds the four-corner trigger (module docstring).

  Args:
    image_hw: ``(H, W)``.
    size: corner box side (< 1: fraction of the image side; >= 1: pixels).
    color, color2: the checkerboard's two colours (names or RGB); ``color`` default white.
    amplitude: blend weight in ``(0, 1]`` on the pattern pixels.
    margin: pixels between each box and the borders.
  Raises:
    ConfigError: for any invalid value, or boxes that overlap.
  """
  h, w = check_image_hw(image_hw)
  if (isinstance(amplitude, (bool, np.bool_)) or not isinstance(amplitude, numbers.Real)
      or not math.isfinite(float(amplitude)) or not 0 < amplitude <= 1):
    raise ConfigError(f"trigger four_corner.amplitude {amplitude!r} is invalid; allowed: a number in (0, 1]")
  side, margin = patch_side(size, (h, w)), check_margin(margin)
  if 2 * (side + margin) > min(h, w):
    raise ConfigError(f"trigger size={size!r} ({side} px, margin {margin}) is too large for four corner boxes in a "
                      f"{h}x{w} image; allowed: 2 * (side + margin) <= {min(h, w)}")
  box = checkerboard_box(side, 1, parse_color("white" if color is None else color), parse_color(color2))
  pattern = np.zeros((h, w, 3), np.float32)
  mask = np.zeros((h, w, 1), np.float32)
  rows = (slice(margin, margin + side), slice(h - margin - side, h - margin))
  cols = (slice(margin, margin + side), slice(w - margin - side, w - margin))
  for flip_r, r in enumerate(rows):
    for flip_c, c in enumerate(cols):
      pattern[r, c] = box[::-1 if flip_r else 1, ::-1 if flip_c else 1]
      mask[r, c] = float(amplitude)
  return Trigger(pattern=jnp.asarray(pattern), mask=jnp.asarray(mask))


@register_trigger("four_corner", defaults={"color2": (0, 0, 0), "amplitude": 1.0})
def build_four_corner(args: TriggerArgs) -> Trigger:
  """four_corner: common ``size``/``color``/``margin``, ``trigger.four_corner.color2``, ``amplitude``."""
  return make_four_corner_trigger(args.image_hw, size=args.size, color=args.color,
                                  color2=args.options["color2"], amplitude=args.options["amplitude"],
                                  margin=args.margin)
