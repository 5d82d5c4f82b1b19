"""Conventions shared by every model in the zoo.

Every model is a Flax Linen module called as ``model.apply(variables, x, train=...)``
with ``x`` a float32 NHWC batch (already normalised) and returns logits ``(B, C)``.

Named layers: at each point a model exposes, it calls ``expose(self, name, x)`` in its
*top-level* module, which
  * adds a zero "perturbation" (collection ``perturbations``) so that the gradient of
    any scalar with respect to that perturbation equals d scalar / d activation, and
  * sows the activation into the ``intermediates`` collection.
Both are no-ops unless the caller asks for them, so plain training pays nothing.
The model class lists its exposed names, in forward order, in ``layer_names``.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

PERTURBATIONS = "perturbations"
INTERMEDIATES = "intermediates"


def expose(module: nn.Module, name: str, x: jax.Array) -> jax.Array:
  """Marks ``x`` as the activation called ``name``; returns it (plus a zero perturbation).

  The perturbation exists only where the caller supplies it (or at init), so asking for
  d/dA at one layer does not back-propagate to the layers below it.
  """
  if module.is_mutable_collection(PERTURBATIONS) or module.has_variable(PERTURBATIONS, name):
    x = module.perturb(name, x, collection=PERTURBATIONS)
  module.sow(INTERMEDIATES, name, x)
  return x


def init_variables(model: nn.Module, rng: jax.Array, input_shape: tuple[int, ...]) -> dict[str, Any]:
  """Initialises a model and keeps only ``params`` (and ``batch_stats`` when present).

  Args:
    model: a zoo model.
    rng: PRNG key.
    input_shape: (B, H, W, C) of a dummy input.
  Returns:
    variables dict with ``params`` and, for models with BatchNorm, ``batch_stats``.
  """
  variables = model.init({"params": rng, "dropout": rng}, jnp.zeros(input_shape, jnp.float32), train=False)
  return {k: v for k, v in variables.items() if k in ("params", "batch_stats")}


def count_params(params: Any) -> int:
  """Number of scalar parameters in a pytree."""
  return int(sum(x.size for x in jax.tree_util.tree_leaves(params)))
