"""The one layer API of the explanation code: which layers a model exposes, in which order.

Every zoo model marks its named layers with ``expose`` (``models/common.py``). Training,
``launch/explain.py`` and the defenses all ask the same three questions, answered here:

* :func:`layer_info`: the exposed layers in *forward* (execution) order, their shapes
  and the number of classes, from one abstract evaluation (no compute);
* :func:`default_layer`: the one default-layer rule, the deepest spatial layer whose
  map is at least ``min_size`` x ``min_size`` (4 by default: a smaller map has cells
  too coarse to localise anything);
* :func:`resolve_layers` / :func:`choose_layer`: requested names checked against the
  spatial layers, with a one-line :class:`~backdoor_jax.errors.ConfigError` listing
  the valid ones.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from backdoor_jax.errors import ConfigError
from backdoor_jax.models.common import INTERMEDIATES, PERTURBATIONS

ApplyFn = Callable[..., Any]
DEFAULT_MIN_SIZE = 4


class LayerInfo(NamedTuple):
  """What one abstract forward pass tells about a model on these inputs.

  Attributes:
    order: exposed layer names in execution (forward) order.
    shapes: layer name -> activation shape (batch axis first), in forward order.
    num_classes: number of logits.
  """
  order: tuple[str, ...]
  shapes: dict[str, tuple[int, ...]]
  num_classes: int

  @property
  def spatial(self) -> tuple[str, ...]:
    """Rank-4 (B, h, w, K) layers in forward order."""
    return tuple(n for n in self.order if len(self.shapes[n]) == 4)


def plain_variables(variables: Any) -> dict[str, Any]:
  """``variables`` without the perturbation and intermediate collections (what ``apply`` takes)."""
  return {k: v for k, v in variables.items() if k not in (PERTURBATIONS, INTERMEDIATES)}


def layer_info(apply_fn: ApplyFn, variables: Any, images: Any) -> LayerInfo:
  """Exposed layers in the order the model runs them, with shapes (no compute).

  ``jax.eval_shape`` hands dicts back with sorted keys (VGG's ``features_10`` would come
  before ``features_2``, ResNet's ``stem`` last), so the names are read inside the
  trace, where Flax's sown collection still has insertion (= forward) order.

  Args:
    apply_fn: ``model.apply`` of a zoo model.
    variables: model variables.
    images: a (B, H, W, C) batch, or anything with ``.shape`` and ``.dtype``
      (e.g. ``jax.ShapeDtypeStruct``); only its shape and dtype are used.
  Returns:
    LayerInfo(order, shapes, num_classes).
  """
  order: list[str] = []

  def run(v, x):
    logits, state = apply_fn(v, x, train=False, mutable=[INTERMEDIATES])
    order.extend(state.get(INTERMEDIATES, {}).keys())
    return logits, state.get(INTERMEDIATES, {})

  logits, inter = jax.eval_shape(run, plain_variables(variables), images)
  shapes = {k: tuple(v[0].shape) for k, v in inter.items()}
  seen = [k for k in dict.fromkeys(order) if k in shapes]
  if len(seen) != len(shapes):  # not traced this time: fall back to the sorted keys
    seen = list(shapes)
  return LayerInfo(tuple(seen), {k: shapes[k] for k in seen}, int(logits.shape[-1]))


def layer_info_for_shape(apply_fn: ApplyFn, variables: Any, image_shape: Sequence[int]) -> LayerInfo:
  """:func:`layer_info` for one float32 image of ``image_shape`` (H, W, C)."""
  return layer_info(apply_fn, variables, jax.ShapeDtypeStruct((1,) + tuple(image_shape), jnp.float32))


def _need_spatial(info: LayerInfo, what: str) -> tuple[str, ...]:
  if not info.spatial:
    raise ConfigError(f"{what} needs a spatial (B, h, w, K) layer; the model exposes none "
                      f"(layers: {', '.join(info.order) or 'none'})")
  return info.spatial


def default_layer(info: LayerInfo, min_size: int = DEFAULT_MIN_SIZE, what: str = "Grad-CAM") -> str:
  """The deepest spatial layer whose map is at least ``min_size`` x ``min_size``.

  ``min_size=1`` gives the deepest spatial layer whatever its size.

  Raises:
    ConfigError: no spatial layer, or none large enough (lists the spatial layers).
  """
  spatial = _need_spatial(info, what)
  big = [n for n in spatial if min(info.shapes[n][1:3]) >= int(min_size)]
  if not big:
    raise ConfigError(f"no layer has a map of at least {min_size}x{min_size} for {what}; name one of "
                      f"{', '.join(f'{n} ({info.shapes[n][1]}x{info.shapes[n][2]})' for n in spatial)}")
  return big[-1]


def resolve_layers(info: LayerInfo, layers: str | Sequence[str], what: str = "Grad-CAM") -> list[str]:
  """Validates spatial layer names; ``'all'`` means every spatial layer in forward order.

  Args:
    info: from :func:`layer_info`.
    layers: a name, a sequence of names (kept in the given order) or ``'all'``.
    what: what the layers are for (in the message).
  Raises:
    ConfigError: an unknown or non-spatial layer (lists the valid ones).
  """
  spatial = info.spatial
  names = list(spatial) if layers == "all" else ([layers] if isinstance(layers, str) else list(layers))
  for name in names:
    if name not in spatial:
      why = f" (layer {name!r} is not a spatial layer: shape {info.shapes[name]})" if name in info.shapes else ""
      raise ConfigError(f"unknown layer {name!r} for {what}{why}; valid (spatial) layers: {', '.join(spatial)}")
  return names


def choose_layer(info: LayerInfo, requested: str | None, min_size: int = DEFAULT_MIN_SIZE,
                 what: str = "Grad-CAM") -> str:
  """``requested`` (checked) or, when empty/None, :func:`default_layer`."""
  if requested:
    (name,) = resolve_layers(info, requested, what)
    return name
  return default_layer(info, min_size, what)
