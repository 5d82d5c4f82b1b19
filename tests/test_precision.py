"""float16 compute with dynamic loss scaling."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from ml_collections import config_dict

from backdoor_jax import models
from backdoor_jax.train import optim, state as state_lib, steps


def test_loss_scale_unscales_skips_and_grows():
  params = {"w": jnp.array([1.0, 2.0])}
  tx = optim.dynamic_loss_scale(optax.sgd(0.1), init_scale=8.0, period=2)
  st = tx.init(params)
  # Scaled gradients in, the inner optimiser's update of the true gradient out.
  upd, st = tx.update({"w": jnp.array([8.0, -16.0])}, st, params)
  np.testing.assert_allclose(upd["w"], [-0.1, 0.2], rtol=1e-6)
  assert float(st.scale) == 8.0 and int(st.good_steps) == 1
  upd, st = tx.update({"w": jnp.array([8.0, 8.0])}, st, params)  # second finite step: the scale doubles
  assert float(st.scale) == 16.0 and int(st.good_steps) == 0
  upd, st = tx.update({"w": jnp.array([jnp.inf, 1.0])}, st, params)  # overflow: skip, halve
  np.testing.assert_array_equal(upd["w"], [0.0, 0.0])
  assert float(st.scale) == 8.0 and int(st.good_steps) == 0
  adam = optim.dynamic_loss_scale(optax.adam(1e-3), init_scale=4.0, min_scale=2.0)
  s0 = adam.init(params)
  _, s1 = adam.update({"w": jnp.array([jnp.nan, 0.0])}, s0, params)
  _, s2 = adam.update({"w": jnp.array([jnp.nan, 0.0])}, s1, params)
  assert int(s2.inner[0].count) == 0  # a skipped step leaves the inner state alone
  assert float(s2.scale) == 2.0       # and the scale stops at min_scale
  assert optim.loss_scale(s2) is s2.scale and optim.loss_scale(params) == 1.0


def test_float16_step_recovers_from_an_overflowing_scale():
  cfg = config_dict.ConfigDict({"optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "schedule": "constant",
                                "dtype": "float16", "loss_scale_init": 2.0 ** 40,
                                "epochs": 1, "warmup_epochs": 0.0})
  model = models.get_model("small_cnn", 10, dtype=jnp.float16, widths=(8, 8), pool_after=(1,))
  variables = models.init_variables(model, jax.random.key(0), (1, 16, 16, 3))
  tx, _ = optim.make_optimizer(cfg, 10, variables["params"])
  state = state_lib.create_train_state(model, tx, None, None, variables=variables)
  step = steps.make_train_step(steps.InputSpec((0.5,) * 3, (0.25,) * 3), jax.random.key(1))
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.integers(0, 255, (16, 16, 16, 3), dtype=np.uint8))
  y = jnp.asarray(rng.integers(0, 10, (16,)), jnp.int32)
  first = jax.tree_util.tree_map(np.asarray, state.params)
  scales, losses = [], []
  for _ in range(40):
    state, m = step(state, x, y)
    scales.append(float(state.opt_state.scale))
    losses.append(float(m["loss_sum"] / m["count"]))
  assert scales[0] == 2.0 ** 39  # 2^40 overflows float16 gradients: skipped, halved
  assert min(scales) < 2.0 ** 24 and len(set(scales[-5:])) == 1  # settled on a scale that fits
  moved = max(float(np.abs(np.asarray(a) - b).max()) for a, b in zip(
      jax.tree_util.tree_leaves(state.params), jax.tree_util.tree_leaves(first)))
  assert moved > 0 and all(np.isfinite(jax.tree_util.tree_leaves(jax.tree_util.tree_map(np.asarray, state.params))[0]).flat)
  assert losses[-1] < losses[0]  # trains once the scale fits
  assert {x.dtype for x in jax.tree_util.tree_leaves(state.params)} == {jnp.dtype(jnp.float32)}
