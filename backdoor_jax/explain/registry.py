"""Explanation methods by name: each declares its map function and whether it takes a layer.

A method is a :class:`Method`; it joins the registry with :func:`register` (or the
:func:`method` decorator), usually at the bottom of the file that defines it. The
built-in ones (``gradcam``, ``gradcam_pp``, ``simple_grad``, ``vbp``) register
themselves when ``backdoor_jax.explain`` is imported; a user-defined one registers
the same way from any module, and training (``explain.method``), the explanation
report and the defenses' FSR then accept its name. ``docs/extending.md`` has a worked
example.

A map function has the signature ``maps(apply_fn, variables, x, targets, layer)`` and
returns (B, H, W) input-size maps in [0, 1]: ``x`` are normalised float (B, H, W, C)
model inputs, ``targets`` (B,) class ids or None (each sample's predicted class),
``layer`` a spatial layer name (None for methods that take none). It must be a pure
JAX function: the explanation backdoor differentiates the maps with respect to the
parameters, inside ``jax.jit``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, KeysView, Mapping, Sequence

import jax

from backdoor_jax.errors import ConfigError, check_choice
from backdoor_jax.registry import Registry

MapsFn = Callable[..., jax.Array]
LayersFn = Callable[..., dict[str, jax.Array]]
GRADIENTS = ("layer", "input", "none")


@dataclasses.dataclass(frozen=True)
class Method:
  """An explanation method.

  Attributes:
    name: registry name (what ``explain.method`` and ``--method`` take).
    maps: ``maps(apply_fn, variables, x, targets, layer) -> (B, H, W)`` in [0, 1].
    takes_layer: the method explains one exposed spatial layer (Grad-CAM-type);
      False for methods that explain the input or use every layer (``layer`` is then
      ignored and passed as given).
    gradient: where the map's gradient is taken: ``'layer'`` (dScore/dA at the layer),
      ``'input'`` (dScore/dx) or ``'none'`` (forward only). Training uses it to check
      that train-mode BatchNorm does not mix the samples of a batch into the maps.
    all_layers: optional ``all_layers(apply_fn, variables, x, targets, layers) ->
      {layer: (B, H, W)}`` computing several layers in one pass; without it
      :func:`maps_at_layers` calls ``maps`` once per layer.
  """
  name: str
  maps: MapsFn
  takes_layer: bool = True
  gradient: str = "layer"
  all_layers: LayersFn | None = None

  def __post_init__(self):
    if not isinstance(self.name, str) or not self.name.isidentifier():
      raise ConfigError(f"explanation method name {self.name!r} is invalid; allowed: a Python identifier")
    if not callable(self.maps):
      raise ConfigError(f"explanation method {self.name!r}: maps must be callable; got {type(self.maps).__name__}")
    check_choice(f"gradient kind of explanation method {self.name!r}", self.gradient, GRADIENTS)
    if self.all_layers is not None and not self.takes_layer:
      raise ConfigError(f"explanation method {self.name!r}: all_layers needs takes_layer=True")


_REGISTRY: Registry[Method] = Registry("explanation method")


def register(method: Method, *, replace: bool = False) -> Method:
  """Adds ``method`` to the registry and returns it.

  Raises:
    ConfigError: the name is taken (pass ``replace=True`` to override it on purpose).
  """
  if not isinstance(method, Method):
    raise ConfigError(f"register takes an explain.registry.Method; got {type(method).__name__}")
  return _REGISTRY.add(method.name, method, replace=replace)


def method(name: str, *, takes_layer: bool = True, gradient: str = "layer",
           replace: bool = False) -> Callable[[MapsFn], MapsFn]:
  """Decorator form of :func:`register` for a map function (returned unchanged)."""
  def deco(fn: MapsFn) -> MapsFn:
    register(Method(name, fn, takes_layer=takes_layer, gradient=gradient), replace=replace)
    return fn
  return deco


def unregister(name: str) -> None:
  """Removes a method (e.g. a test's own); unknown names raise ConfigError."""
  _REGISTRY.remove(name)


def get(name: str) -> Method:
  """The registered method ``name``.

  Raises:
    ConfigError: unknown name (lists the registered ones).
  """
  return _REGISTRY.get(name)


# Live, read-only views (registration order): a method registered later shows up in them.
METHODS: Mapping[str, Method] = _REGISTRY.entries
NAMES: KeysView[str] = METHODS.keys()


def explanation_maps(name: str, apply_fn: Callable[..., Any], variables: Any, x: jax.Array,
                     targets: jax.Array | None, layer: str | None) -> jax.Array:
  """(B, H, W) input-size maps in [0, 1] of the method ``name``.

  Raises:
    ConfigError: unknown method, or no layer for a method that takes one.
  """
  m = get(name)
  if m.takes_layer and not layer:
    raise ConfigError(f"explanation method {name!r} explains a layer; got layer={layer!r}")
  return m.maps(apply_fn, variables, x, targets, layer)


def maps_at_layers(name: str, apply_fn: Callable[..., Any], variables: Any, x: jax.Array,
                   targets: jax.Array | None, layers: Sequence[str]) -> dict[str, jax.Array]:
  """Maps of a layer-taking method at each of ``layers`` (one pass when it declares ``all_layers``)."""
  m = get(name)
  if not m.takes_layer:
    raise ConfigError(f"explanation method {name!r} takes no layer; use explanation_maps")
  if m.all_layers is not None:
    return dict(m.all_layers(apply_fn, variables, x, targets, list(layers)))
  return {n: m.maps(apply_fn, variables, x, targets, n) for n in layers}
