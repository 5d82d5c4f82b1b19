"""Does an input size fit a model? Checked by tracing, before any data is loaded or trained.

A model whose feature maps shrink to nothing (a 7x7 image through three 2x2 max-pools)
still runs: the global average pool over an empty map gives NaN logits, argmax gives
class 0, and a backdoor run would report a perfect attack. :func:`check_input_size`
traces the model once (``jax.make_jaxpr``, no computation) and refuses an input for
which any value of the forward pass has a zero-sized dimension, or for which tracing
fails (a kernel larger than its input), naming the smallest square size that works.
"""
from __future__ import annotations

import functools
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import flax.linen as nn

from backdoor_jax.errors import ConfigError

MAX_SEARCH_SIZE = 1024


def _avals(jaxpr: Any) -> Iterator[Any]:
  """Abstract values of every equation's outputs, sub-jaxprs (scan, cond, remat) included."""
  for eqn in jaxpr.eqns:
    for v in eqn.outvars:
      yield v.aval
    for param in eqn.params.values():
      for sub in (param if isinstance(param, (tuple, list)) else (param,)):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          yield from _avals(inner)


@functools.lru_cache(maxsize=64)
def _fits(model: nn.Module, image_shape: tuple[int, ...]) -> bool:
  def init(x):
    key = jax.random.key(0)
    return model.init({"params": key, "dropout": key}, x, train=False)
  try:
    closed = jax.make_jaxpr(init)(jax.ShapeDtypeStruct((1,) + image_shape, jnp.float32))
  except Exception:  # pylint: disable=broad-except  (negative sizes raise TypeError/ValueError in the layers)
    return False
  return not any(0 in getattr(a, "shape", ()) for a in _avals(closed.jaxpr))


def smallest_square_size(model: nn.Module, channels: int = 3, limit: int = MAX_SEARCH_SIZE) -> int | None:
  """The smallest side ``s`` for which ``(s, s, channels)`` inputs fit ``model`` (None above ``limit``)."""
  high = 1
  while not _fits(model, (high, high, channels)):
    if high >= limit:
      return None
    high = min(2 * high, limit)
  low = high // 2  # does not fit (or 0)
  while high - low > 1:
    mid = (low + high) // 2
    if _fits(model, (mid, mid, channels)):
      high = mid
    else:
      low = mid
  return high


def check_input_size(model: nn.Module, image_shape: tuple[int, int, int], name: str | None = None) -> None:
  """Raises ConfigError when ``(H, W, C)`` inputs make ``model``'s maps shrink to nothing.

  Args:
    model: a zoo model (unbound Flax module).
    image_shape: ``(H, W, C)`` of one input image.
    name: the model's config name for the message (default: its class name).

  Raises:
    ConfigError: naming the input size and the smallest square size that works.
  """
  image_shape = tuple(int(d) for d in image_shape)
  if _fits(model, image_shape):
    return
  what = name or type(model).__name__
  smallest = smallest_square_size(model, image_shape[-1])
  hint = (f"the smallest square input it accepts is {smallest}x{smallest} (set data.image_size >= {smallest})"
          if smallest else f"no square input up to {MAX_SEARCH_SIZE}x{MAX_SEARCH_SIZE} fits it")
  raise ConfigError(f"{image_shape[0]}x{image_shape[1]} inputs are too small for model {what}: its feature maps "
                    f"shrink to nothing (the logits would be NaN); {hint}")
