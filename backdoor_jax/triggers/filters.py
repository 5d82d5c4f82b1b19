"""Photo-filter triggers: an Instagram-style colour effect is the trigger.

The ``'nashville'`` filter, as in the CSSgram / pilgram recipes used by filter-trigger
papers, on pixel values in ``[0, 1]``, clipping to ``[0, 1]`` after every step:

1. ``x1 = x + 0.56 * (min(x, warm) - x)``: darken against the warm tone
   ``warm = (247, 176, 153) / 255``, mixed in at opacity 0.56;
2. ``x2 = x1 + 0.4 * (max(x1, blue) - x1)``: lighten against ``blue = (0, 70, 150) / 255``
   at opacity 0.4;
3. ``sepia(0.2)``, 4. ``contrast(1.2)``, 5. ``brightness(1.05)``, 6. ``saturate(1.2)`` with
   the W3C Filter Effects definitions (:data:`SEPIA`, :func:`saturate_matrix`;
   contrast is ``(x - 0.5) * c + 0.5``, brightness is ``x * b``).

The trigger output is ``(1 - strength) * x + strength * nashville(x)``. Everything is a
smooth array function almost everywhere (min/max/clip), so it can be differentiated.
Unlike pilgram it never rounds to 8 bits between steps; results differ from it by at
most a few levels of 255.

Config section ``trigger.filter``: ``name`` (``'nashville'``), ``strength`` (1).
"""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np

from backdoor_jax.errors import check_choice
from backdoor_jax.triggers.base import TriggerBase
from backdoor_jax.triggers.blend import check_unit_interval
from backdoor_jax.triggers.registry import TriggerArgs, register_trigger

FILTER_NAMES = ("nashville",)

NASHVILLE_WARM = (247.0, 176.0, 153.0)   # darken tone (pixel units)
NASHVILLE_WARM_OPACITY = 0.56
NASHVILLE_BLUE = (0.0, 70.0, 150.0)      # lighten tone (pixel units)
NASHVILLE_BLUE_OPACITY = 0.4
NASHVILLE_SEPIA = 0.2
NASHVILLE_CONTRAST = 1.2
NASHVILLE_BRIGHTNESS = 1.05
NASHVILLE_SATURATE = 1.2

# W3C Filter Effects sepia(1) matrix; sepia(a) = (1 - a) * I + a * SEPIA.
SEPIA = np.array([[0.393, 0.769, 0.189],
                  [0.349, 0.686, 0.168],
                  [0.272, 0.534, 0.131]])
# Luminance weights of the W3C saturate() matrix.
LUMA = np.array([0.213, 0.715, 0.072])


def sepia_matrix(amount: float) -> np.ndarray:
  """3x3 colour matrix of CSS ``sepia(amount)`` (rows: output channel)."""
  return (1.0 - amount) * np.eye(3) + amount * SEPIA


def saturate_matrix(amount: float) -> np.ndarray:
  """3x3 colour matrix of CSS ``saturate(amount)``: ``luma + amount * (I - luma)``."""
  luma = np.broadcast_to(LUMA, (3, 3))
  return luma + amount * (np.eye(3) - luma)


def _matrix(x: jax.Array, m: np.ndarray) -> jax.Array:
  return jnp.clip(jnp.einsum("...c,oc->...o", x, jnp.asarray(m, jnp.float32)), 0.0, 1.0)


def nashville(x: jax.Array) -> jax.Array:
  """The nashville filter on ``(..., 3)`` float values in ``[0, 1]`` (module docstring)."""
  warm = jnp.asarray(NASHVILLE_WARM, jnp.float32) / 255.0
  blue = jnp.asarray(NASHVILLE_BLUE, jnp.float32) / 255.0
  x = x + NASHVILLE_WARM_OPACITY * (jnp.minimum(x, warm) - x)
  x = x + NASHVILLE_BLUE_OPACITY * (jnp.maximum(x, blue) - x)
  x = _matrix(x, sepia_matrix(NASHVILLE_SEPIA))
  x = jnp.clip((x - 0.5) * NASHVILLE_CONTRAST + 0.5, 0.0, 1.0)
  x = jnp.clip(x * NASHVILLE_BRIGHTNESS, 0.0, 1.0)
  return _matrix(x, saturate_matrix(NASHVILLE_SATURATE))


@chex.dataclass(frozen=True)
class FilterTrigger(TriggerBase):
  """A photo-filter trigger (pytree); fits images of any size.

  Attributes:
    strength: 0-d float32 in ``[0, 1]``: 0 is the identity, 1 the full filter.
  """
  strength: jax.Array

  KIND = "filter"

  @property
  def mask(self) -> jax.Array:
    """Filters have no region; raises ConfigError (for code written for patch triggers)."""
    return self.region_mask()

  def _apply_float(self, x: jax.Array) -> jax.Array:
    s = jnp.asarray(self.strength, jnp.float32)
    return (1.0 - s) * x + s * (nashville(x / 255.0) * 255.0)


def make_filter_trigger(name: str = "nashville", strength: float = 1.0) -> FilterTrigger:
  """Builds a photo-filter trigger.

  Args:
    name: one of :data:`FILTER_NAMES`.
    strength: in ``[0, 1]``; the output is ``(1 - strength) x + strength filter(x)``.
  Raises:
    ConfigError: for an unknown name or a strength outside ``[0, 1]``.
  """
  check_choice("trigger filter.name", name, FILTER_NAMES)
  strength = check_unit_interval(strength, "filter.strength")
  return FilterTrigger(strength=jnp.asarray(strength, jnp.float32))


@register_trigger("filter", defaults={"name": "nashville", "strength": 1.0})
def build_filter(args: TriggerArgs) -> FilterTrigger:
  """filter: ``trigger.filter.name``, ``strength``."""
  return make_filter_trigger(args.options["name"], args.options["strength"])
