"""Recipes by name: ``config.recipe`` selects the function that trains it.

A recipe is one module that builds a ``train.engine.Task`` from its config and calls
``engine.fit``; it registers itself here with the result keys its summary line prints.
User code registers its own recipe the same way (see docs/extending.md).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

from backdoor_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Recipe:
  name: str
  train: Callable[[Any, str | None], dict[str, Any]]   # (config, workdir) -> results
  summary: tuple[str, ...]                             # results keys of the launcher's summary line


_RECIPES: dict[str, Recipe] = {}


def register(name: str, train: Callable[[Any, str | None], dict[str, Any]], summary: tuple[str, ...] = ()) -> Recipe:
  """Registers ``train(config, workdir) -> results`` as recipe ``name`` (replacing an earlier one)."""
  recipe = Recipe(name, train, tuple(summary))
  _RECIPES[name] = recipe
  return recipe


def names() -> tuple[str, ...]:
  return tuple(sorted(_RECIPES))


def get(name: str) -> Recipe:
  """The recipe registered as ``name``.

  Raises:
    ConfigError: no such recipe (the message lists the registered ones).
  """
  if name not in _RECIPES:
    raise ConfigError(f"unknown recipe {name!r}; allowed: {', '.join(names())}")
  return _RECIPES[name]
