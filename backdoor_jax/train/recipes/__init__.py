"""Training recipes: each module builds a task for ``train.engine.fit`` and registers itself.

``run(config, workdir)`` trains the recipe that ``config.recipe`` names (default ``badnets``).
"""
from __future__ import annotations

import copy
from typing import Any

from backdoor_jax.train.recipes import registry
from backdoor_jax.train.recipes import badnets  # noqa: F401  (registers "badnets")
from backdoor_jax.train.recipes import explanation  # noqa: F401  (registers "two_stage", "single_stage")
from backdoor_jax.train.recipes import multilabel  # noqa: F401  (registers "multilabel_badnets", "multilabel_two_stage")
from backdoor_jax.train.recipes.registry import Recipe, get, names, register  # noqa: F401


def run(config: Any, workdir: str | None) -> dict[str, Any]:
  """Trains ``config`` with its recipe and returns the results record; ``config`` is not modified."""
  from backdoor_jax import config_checks
  config_checks.check_config(config)  # NaN / inf, out-of-range seeds, negative rates, ... (one line each)
  recipe = registry.get(config.get("recipe", "badnets"))
  return recipe.train(copy.deepcopy(config), workdir)
