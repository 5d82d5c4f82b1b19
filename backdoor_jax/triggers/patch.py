"""BadNets-style patch triggers: a small pattern pasted (or blended) into each image.

Images are ``(B, H, W, 3)`` (or a single ``(H, W, 3)``) arrays in pixel units
``[0, 255]``, either ``uint8`` or floating point. A :class:`Trigger` is a pytree of two
full-image arrays, so it can be passed through ``jax.jit`` / ``jax.vmap`` and stacked
into a batch of triggers (see :func:`stack_triggers`).

All checking of user input happens in :func:`make_patch_trigger` and
:func:`~backdoor_jax.triggers.trigger_from_config`, on the host, and raises
:class:`backdoor_jax.errors.ConfigError` with a one-line message.

Geometry of the built-in kinds (``s`` is the patch side in pixels, see ``size``):

* ``'square'``: a solid ``s x s`` square of ``color`` (default white, bottom-right).
* ``'stripe'``: a horizontal bar ``t`` rows high and ``s`` columns wide, with
  ``t = max(1, s // 3)``, filled with ``color`` (default red, top-left). The bar is
  the patch, i.e. ``position`` places the ``t x s`` box.
* ``'dots'``: three ``d x d`` dots, ``d = max(1, s // 3)``, inside an ``s x s`` box
  forming a triangle: one in each bottom corner of the box (rows ``s-d .. s-1``,
  columns ``0 .. d-1`` and ``s-d .. s-1``) and one at the top middle (rows
  ``0 .. d-1``, columns ``c .. c+d-1`` with ``c = (s - d) // 2``). Default red,
  bottom-right. For ``s = 3`` this is the pixels (2, 0), (2, 2), (0, 1) of the box.
* ``'custom'``: a user pattern ``(h, w, 3)`` with an optional mask ``(h, w)`` or
  ``(h, w, 1)`` (default all ones; fractional values blend), placed at ``position``
  (default bottom-right). ``size`` and ``color`` are ignored.
"""
from __future__ import annotations

import math
import numbers
import re
from typing import Any, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

from backdoor_jax.errors import ConfigError, check_choice
from backdoor_jax.triggers.base import TriggerBase, apply_trigger, check_image_hw, load_npy, mix  # noqa: F401
from backdoor_jax.triggers.registry import TriggerArgs, register_trigger

TRIGGER_KINDS = ("square", "stripe", "dots", "custom")  # the patch kinds (all kinds: triggers.trigger_kinds())
POSITIONS = ("top-left", "top-right", "bottom-left", "bottom-right", "center")

COLORS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "yellow": (255, 255, 0),
    "blue": (0, 0, 255),
}

# Colour and position used when the caller passes ``None`` for them.
KIND_DEFAULTS: dict[str, dict[str, Any]] = {
    "square": {"color": "white", "position": "bottom-right"},
    "stripe": {"color": "red", "position": "top-left"},
    "dots": {"color": "red", "position": "bottom-right"},
    "custom": {"color": None, "position": "bottom-right"},
}


@chex.dataclass(frozen=True)
class Trigger(TriggerBase):
  """A patch trigger as two full-image arrays (a pytree; stackable for ``vmap``).

  Applying it computes ``images * (1 - mask) + pattern * mask`` (see
  :func:`~backdoor_jax.triggers.apply_trigger`); pixels where the mask is 0 come back
  bit-identical.

  Attributes:
    pattern: ``(H, W, 3)`` float32 in ``[0, 255]``: the pixels to paste (zero where
      ``mask`` is zero).
    mask: ``(H, W, 1)`` float32 in ``[0, 1]``: 1 where the trigger replaces the image,
      0 where the image is kept, fractional values blend.
  """
  pattern: jax.Array
  mask: jax.Array

  KIND = "patch"

  @property
  def image_hw(self) -> tuple[int, int]:
    chex.assert_rank([self.pattern, self.mask], 3)
    return tuple(self.pattern.shape[:2])

  @property
  def has_region(self) -> bool:
    return True

  def region_mask(self) -> jax.Array:
    return self.mask

  def _apply_float(self, x: jax.Array) -> jax.Array:
    return mix(x, self.pattern, self.mask)


def stack_triggers(triggers: Sequence[Any]) -> Any:
  """Stacks same-kind, same-size triggers into one batched trigger for ``jax.vmap``.

  Example: ``jax.vmap(apply_trigger, in_axes=(0, None))(stack_triggers(ts), images)``.

  Args:
    triggers: non-empty sequence of triggers of one kind for the same image size.
  Returns:
    A trigger of that kind whose arrays have a leading axis ``T`` (for patches:
    ``pattern`` ``(T, H, W, 3)`` and ``mask`` ``(T, H, W, 1)``).
  """
  if not triggers:
    raise ConfigError("stack_triggers needs at least one trigger; got an empty sequence")
  kinds = sorted({type(t).__name__ for t in triggers})
  if len(kinds) != 1:
    raise ConfigError(f"cannot stack triggers of different kinds {kinds}; allowed: one kind per stack")
  shapes = {tuple(tuple(np.shape(x)) for x in jax.tree.leaves(t)) for t in triggers}
  if len(shapes) != 1:
    sizes = sorted({tuple(t.image_hw) if t.image_hw else () for t in triggers})
    raise ConfigError(f"cannot stack triggers of different image sizes {sizes}")
  return jax.tree.map(lambda *xs: jnp.stack(xs), *triggers)


# ----------------------------------------------------------------------------------
# Host-side parsing / validation.


def _is_int(x: Any) -> bool:
  return isinstance(x, numbers.Integral) and not isinstance(x, (bool, np.bool_))


def _round_half_up(x: float) -> int:
  return int(math.floor(x + 0.5))


def patch_side(size: Any, image_hw: tuple[int, int]) -> int:
  """Resolves ``size`` to a patch side in pixels (not yet checked against the image).

  Args:
    size: a float in ``(0, 1)`` is a fraction of the shorter image side, giving
      ``max(1, round(size * side))`` pixels (halves round up); a number ``>= 1`` must be
      integer-valued and is a pixel count (``3`` and ``3.0`` both mean 3 px).
    image_hw: ``(H, W)``.
  Returns:
    The side in pixels (>= 1).
  Raises:
    ConfigError: for non-numbers, non-finite or non-positive values, and non-integer
      pixel counts.
  """
  h, w = check_image_hw(image_hw)
  allowed = "a fraction in (0, 1) of the shorter image side or an integer pixel count >= 1"
  if (isinstance(size, (bool, np.bool_)) or not isinstance(size, numbers.Real)
      or not math.isfinite(float(size)) or size <= 0):
    raise ConfigError(f"trigger size {size!r} is invalid for a {h}x{w} image; allowed: {allowed}")
  if size < 1:
    return max(1, _round_half_up(float(size) * min(h, w)))
  if float(size) != math.floor(float(size)):
    raise ConfigError(f"trigger size {size!r} is not a whole number of pixels (image {h}x{w}); "
                      f"allowed: {allowed}")
  return int(size)


def _parse_int_pair(text: str) -> tuple[int, int] | None:
  m = re.fullmatch(r"\s*[\(\[]?\s*(-?\d+)\s*,\s*(-?\d+)\s*[\)\]]?\s*", text)
  return (int(m.group(1)), int(m.group(2))) if m else None


def _normalize_name(text: str) -> str:
  return text.strip().lower().replace("_", "-")


def parse_position(position: Any) -> str | tuple[int, int]:
  """Parses a position: a name from :data:`POSITIONS` or a ``(row, col)`` pair.

  Args:
    position: a name (case-insensitive, ``_`` allowed for ``-``), a list/tuple of two
      ints, or a string ``"row,col"`` (optionally in brackets).
  Returns:
    The canonical name or an int pair.
  Raises:
    ConfigError: for anything else.
  """
  if isinstance(position, str):
    pair = _parse_int_pair(position)
    if pair is not None:
      return pair
    name = _normalize_name(position)
    if name not in POSITIONS:
      raise ConfigError(f"unknown trigger position {position!r}; allowed: {', '.join(POSITIONS)}, "
                        "or an explicit (row, col) pair / 'row,col' string")
    return name
  if isinstance(position, (list, tuple, np.ndarray)) and len(position) == 2 and all(
      _is_int(v) for v in position):
    return int(position[0]), int(position[1])
  raise ConfigError(f"trigger position {position!r} is invalid; allowed: {', '.join(POSITIONS)}, "
                    "or an explicit (row, col) pair of ints / 'row,col' string")


def parse_color(color: Any) -> tuple[int, int, int]:
  """Parses a colour: a name from :data:`COLORS`, an RGB triple of ints in 0..255, or "r,g,b".

  Raises:
    ConfigError: for anything else.
  """
  allowed = f"an RGB triple of ints in 0..255, 'r,g,b', or one of {', '.join(COLORS)}"
  value = color
  if isinstance(color, str):
    name = color.strip().lower()
    if name in COLORS:
      return COLORS[name]
    parts = [p.strip() for p in name.strip("()[] ").split(",")]
    if len(parts) == 3 and all(re.fullmatch(r"-?\d+", p) for p in parts):
      value = tuple(int(p) for p in parts)
    else:
      raise ConfigError(f"unknown trigger color {color!r}; allowed: {allowed}")
  if isinstance(value, np.ndarray):
    value = value.tolist()
  if (not isinstance(value, (list, tuple)) or len(value) != 3
      or not all(_is_int(v) and 0 <= v <= 255 for v in value)):
    raise ConfigError(f"trigger color {color!r} is invalid; allowed: {allowed}")
  return int(value[0]), int(value[1]), int(value[2])


def check_margin(margin: Any) -> int:
  if not _is_int(margin) or margin < 0:
    raise ConfigError(f"trigger margin {margin!r} is invalid; allowed: an int >= 0 (pixels)")
  return int(margin)


def _origin(position: str | tuple[int, int], box_hw: tuple[int, int], image_hw: tuple[int, int],
            margin: int, size_desc: str) -> tuple[int, int]:
  """Top-left pixel of a ``box_hw`` patch; checks that it lies inside the image."""
  (bh, bw), (h, w) = box_hw, image_hw
  if isinstance(position, tuple):
    r, c = position
    if not (0 <= r <= h - bh and 0 <= c <= w - bw):
      raise ConfigError(
          f"trigger position {position!r} puts the {bh}x{bw} px patch ({size_desc}) outside the "
          f"{h}x{w} image; allowed: row in [0, {h - bh}], col in [0, {w - bw}]")
    return r, c
  need_m = margin if position != "center" else 0
  if bh + need_m > h or bw + need_m > w:
    raise ConfigError(
        f"trigger of {bh}x{bw} px ({size_desc}) with margin {need_m} does not fit in the {h}x{w} "
        "image; allowed: patch side + margin <= the image side")
  if position == "center":
    return (h - bh) // 2, (w - bw) // 2
  vert, horiz = position.split("-")
  r = margin if vert == "top" else h - bh - margin
  c = margin if horiz == "left" else w - bw - margin
  return r, c


def _as_float_array(x: Any, what: str) -> np.ndarray:
  try:
    arr = np.asarray(x, dtype=np.float64)
  except (TypeError, ValueError) as e:
    raise ConfigError(f"trigger {what} could not be read as a numeric array ({e})") from None
  if not np.all(np.isfinite(arr)):
    raise ConfigError(f"trigger {what} contains non-finite values; allowed: finite numbers")
  return arr


def _custom_box(pattern: Any, mask: Any) -> tuple[np.ndarray, np.ndarray]:
  """Validates a custom pattern/mask; returns ``(h, w, 3)`` pattern and ``(h, w)`` mask."""
  pat = _as_float_array(pattern, "pattern")
  if pat.ndim != 3 or pat.shape[2] != 3 or pat.shape[0] < 1 or pat.shape[1] < 1:
    raise ConfigError(f"custom trigger pattern has shape {pat.shape}; allowed: (h, w, 3)")
  if pat.min() < 0 or pat.max() > 255:
    raise ConfigError(f"custom trigger pattern has values in [{pat.min():g}, {pat.max():g}]; "
                      "allowed: pixel units in [0, 255]")
  if mask is None:
    msk = np.ones(pat.shape[:2])
  else:
    msk = _as_float_array(mask, "mask")
    if msk.ndim == 3 and msk.shape[2] == 1:
      msk = msk[..., 0]
    if msk.shape != pat.shape[:2]:
      raise ConfigError(f"custom trigger mask has shape {np.shape(mask)}; allowed: "
                        f"{pat.shape[:2]} or {pat.shape[:2] + (1,)} to match the pattern")
    if msk.min() < 0 or msk.max() > 1:
      raise ConfigError(f"custom trigger mask has values in [{msk.min():g}, {msk.max():g}]; "
                        "allowed: [0, 1]")
    if not np.any(msk > 0):
      raise ConfigError("custom trigger mask is all zero; allowed: at least one pixel > 0")
  return pat, msk


def _shape_mask(kind: str, side: int) -> np.ndarray:
  """Box mask for a built-in kind with patch side ``side``."""
  if kind == "square":
    return np.ones((side, side))
  thick = max(1, side // 3)
  if kind == "stripe":
    return np.ones((thick, side))
  box = np.zeros((side, side))  # dots
  box[side - thick:, :thick] = 1
  box[side - thick:, side - thick:] = 1
  top = (side - thick) // 2
  box[:thick, top:top + thick] = 1
  return box


def make_patch_trigger(image_hw: tuple[int, int],
                       *,
                       kind: str = "square",
                       size: float = 0.1,
                       position: str | Sequence[int] | None = None,
                       color: str | Sequence[int] | None = None,
                       margin: int = 0,
                       pattern: Any = None,
                       mask: Any = None) -> Trigger:
  """Builds a patch trigger, validating every argument on the host.

  Args:
    image_hw: ``(H, W)`` of the images the trigger will be applied to.
    kind: one of :data:`TRIGGER_KINDS` (geometry in the module docstring).
    size: patch side; a float in ``(0, 1)`` is a fraction of the shorter image side
      (``max(1, round(size * side))`` px, halves up; 0.1 on 32 -> 3 px), a value
      ``>= 1`` must be integer-valued and is pixels (``3`` or ``3.0`` -> 3 px). For
      ``'stripe'`` it is the bar's width; ignored for ``'custom'``.
    position: one of :data:`POSITIONS`, an explicit ``(row, col)`` of the patch's
      top-left pixel, or the string ``"row,col"``. ``None`` -> the kind's default
      (:data:`KIND_DEFAULTS`: top-left for stripes, bottom-right otherwise).
    color: RGB triple of ints 0..255, ``"r,g,b"``, or a name in :data:`COLORS`.
      ``None`` -> the kind's default (white square, red stripe and dots). Ignored for
      ``'custom'``.
    margin: pixels between the patch and the image border for the four named corners;
      ignored for ``'center'`` and explicit positions.
    pattern: ``'custom'`` only: ``(h, w, 3)`` array in ``[0, 255]``.
    mask: ``'custom'`` only: ``(h, w)`` or ``(h, w, 1)`` array in ``[0, 1]``
      (default all ones).
  Returns:
    A :class:`Trigger` with full-image ``(H, W, 3)`` pattern and ``(H, W, 1)`` mask.
  Raises:
    ConfigError: naming the bad value and what is allowed.
  """
  h, w = check_image_hw(image_hw)
  if isinstance(kind, str) and kind.strip().lower() in TRIGGER_KINDS:
    kind = kind.strip().lower()
  check_choice("trigger kind", kind, TRIGGER_KINDS)
  margin = check_margin(margin)
  pos = parse_position(KIND_DEFAULTS[kind]["position"] if position is None else position)

  if kind == "custom":
    if pattern is None:
      raise ConfigError("trigger kind 'custom' needs a pattern (h, w, 3) array or trigger.custom.pattern_path; got None")
    box_pat, box_mask = _custom_box(pattern, mask)
    size_desc = "custom pattern"
  else:
    if pattern is not None or mask is not None:
      raise ConfigError(f"pattern/mask are only allowed with kind 'custom'; got kind {kind!r}")
    rgb = parse_color(KIND_DEFAULTS[kind]["color"] if color is None else color)
    side = patch_side(size, (h, w))
    box_mask = _shape_mask(kind, side)
    box_pat = np.broadcast_to(np.asarray(rgb, np.float64), box_mask.shape + (3,))
    size_desc = f"size={size!r}"

  return place_box(box_pat, box_mask, (h, w), pos, margin, size_desc)


def place_box(box_pattern: np.ndarray, box_mask: np.ndarray, image_hw: tuple[int, int],
              position: str | tuple[int, int], margin: int, size_desc: str) -> Trigger:
  """Pastes an ``(h, w, 3)`` pattern with its ``(h, w)`` mask at a parsed position as a full-image :class:`Trigger`.

  Args:
    box_pattern: ``(h, w, 3)`` pixel values in ``[0, 255]``.
    box_mask: ``(h, w)`` in ``[0, 1]``; the pattern is zeroed where it is 0.
    image_hw: ``(H, W)``, checked.
    position: from :func:`parse_position`.
    margin: from the border, for the named corners.
    size_desc: how the box's size was asked for (for error messages).
  Raises:
    ConfigError: when the box does not fit in the image at that position.
  """
  h, w = image_hw
  bh, bw = box_mask.shape
  r, c = _origin(position, (bh, bw), (h, w), margin, size_desc)
  full_mask = np.zeros((h, w, 1), np.float32)
  full_pat = np.zeros((h, w, 3), np.float32)
  full_mask[r:r + bh, c:c + bw, 0] = box_mask
  full_pat[r:r + bh, c:c + bw] = box_pattern * (box_mask[..., None] > 0)
  return Trigger(pattern=jnp.asarray(full_pat), mask=jnp.asarray(full_mask))


def build_shape(args: TriggerArgs) -> Trigger:
  """square / stripe / dots from the common settings ``size``, ``position``, ``color``, ``margin``."""
  return make_patch_trigger(args.image_hw, kind=args.kind, size=args.size, position=args.position,
                            color=args.color, margin=args.margin)


for _kind in ("square", "stripe", "dots"):
  register_trigger(_kind)(build_shape)


@register_trigger("custom", defaults={"pattern_path": "", "mask_path": ""})
def build_custom(args: TriggerArgs) -> Trigger:
  """custom: ``trigger.custom.pattern_path`` (``.npy`` ``(h, w, 3)``) and ``mask_path`` (``.npy`` ``(h, w)``,
  optional), placed at ``position`` with ``margin`` (``size`` and ``color`` are not used)."""
  pattern_path, mask_path = args.options["pattern_path"], args.options["mask_path"]
  pattern = load_npy(pattern_path, "custom.pattern_path") if pattern_path else None
  mask = load_npy(mask_path, "custom.mask_path") if mask_path else None
  return make_patch_trigger(args.image_hw, kind="custom", size=args.size, position=args.position,
                            margin=args.margin, pattern=pattern, mask=mask)
