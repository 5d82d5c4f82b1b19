"""The train state: everything a step reads and writes, as one pytree."""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from backdoor_jax.models.common import init_variables


class TrainState(struct.PyTreeNode):
  """Parameters, BatchNorm statistics and optimiser state.

  ``apply_fn`` and ``tx`` are static (not leaves), so the state can be checkpointed,
  sharded and donated as a plain pytree.
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  apply_fn: Callable = struct.field(pytree_node=False)
  tx: optax.GradientTransformation = struct.field(pytree_node=False)

  @property
  def variables(self) -> dict[str, Any]:
    """The Flax variables for ``apply_fn`` (params and, if any, batch_stats)."""
    if self.batch_stats:
      return {"params": self.params, "batch_stats": self.batch_stats}
    return {"params": self.params}

  def apply_gradients(self, grads: Any, batch_stats: Any) -> "TrainState":
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
    return self.replace(step=self.step + 1, params=optax.apply_updates(self.params, updates),
                        batch_stats=batch_stats, opt_state=opt_state)


def create_train_state(model: nn.Module, tx: optax.GradientTransformation, rng: jax.Array,
                       input_shape: tuple[int, ...], variables: dict[str, Any] | None = None) -> TrainState:
  """Initialises (or adopts ``variables``) and wraps a model and optimiser into a state."""
  if variables is None:
    variables = init_variables(model, rng, input_shape)
  params = variables["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params),
                    apply_fn=model.apply, tx=tx)


def checkpoint_tree(state: TrainState) -> dict[str, Any]:
  """The leaves of ``state`` that a checkpoint stores."""
  return {"step": state.step, "params": state.params, "batch_stats": state.batch_stats,
          "opt_state": state.opt_state}


def from_checkpoint_tree(state: TrainState, tree: dict[str, Any]) -> TrainState:
  return state.replace(step=tree["step"], params=tree["params"], batch_stats=tree["batch_stats"],
                       opt_state=tree["opt_state"])
