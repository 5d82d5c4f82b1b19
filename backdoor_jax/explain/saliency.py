"""One entry point for every explanation method a training loss or evaluation can use.

The methods live in ``explain/registry.py`` (each declares its name, whether it takes a
layer and its map function); ``METHODS`` is a live view of the registered names, so a
method registered later (also one defined outside the library) is accepted too.
"""
from __future__ import annotations

from typing import Any, Callable

import jax

from backdoor_jax.explain import registry

METHODS = registry.NAMES


def explanation_maps(method: str, apply_fn: Callable, variables: Any, x: jax.Array,
                     targets: jax.Array | None, layer: str | None) -> jax.Array:
  """(B, H, W) input-size maps in [0, 1] of ``method`` (a registered name).

  ``layer`` is used by the methods that take one (the Grad-CAM family); SimpleGrad
  explains the input and VisualBackProp uses every exposed spatial layer.

  Raises:
    ConfigError: unknown method (lists the registered ones).
  """
  return registry.explanation_maps(method, apply_fn, variables, x, targets, layer)
