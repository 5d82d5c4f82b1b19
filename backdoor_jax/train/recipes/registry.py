"""Recipes by name: ``config.recipe`` selects the function that trains it.

A recipe is one module that builds a ``train.engine.Task`` from its config and calls
``engine.fit``; it registers itself here with the result keys its summary line prints.
User code registers its own recipe the same way (see docs/extending.md).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

from backdoor_jax.registry import Registry


@dataclasses.dataclass(frozen=True)
class Recipe:
  name: str
  train: Callable[[Any, str | None], dict[str, Any]]   # (config, workdir) -> results
  summary: tuple[str, ...]                             # results keys of the launcher's summary line


_RECIPES: Registry[Recipe] = Registry("recipe")


def register(name: str, train: Callable[[Any, str | None], dict[str, Any]], summary: tuple[str, ...] = (),
             *, replace: bool = False) -> Recipe:
  """Registers ``train(config, workdir) -> results`` as recipe ``name``.

  Raises:
    ConfigError: the name is taken (pass ``replace=True`` to override it on purpose).
  """
  return _RECIPES.add(name, Recipe(name, train, tuple(summary)), replace=replace)


def unregister(name: str) -> None:
  _RECIPES.remove(name)


def names() -> tuple[str, ...]:
  return _RECIPES.names()


def get(name: str) -> Recipe:
  """The recipe registered as ``name``; ConfigError listing the registered ones when there is none."""
  return _RECIPES.get(name)
