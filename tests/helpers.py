"""Shared test utilities: tiny configs and the location of ../shared/data."""
from __future__ import annotations

import os

import flax.linen as nn
import jax.numpy as jnp

from backdoor_jax.configs import badnets
from backdoor_jax.models.common import expose

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def shared_data(name: str) -> str:
  """Path of a file in the shared data folder beside the repo (or $BACKDOOR_JAX_SHARED_DATA)."""
  root = os.environ.get("BACKDOOR_JAX_SHARED_DATA", os.path.join(REPO, "..", "shared", "data"))
  return os.path.join(root, name)


def tiny_config(**overrides):
  """digits config cut down to seconds: 400 train / 200 test images, 2 epochs, narrow CNN."""
  c = badnets.get_config("digits")
  c.data.max_train = 400
  c.data.max_test = 200
  c.model.widths = (16, 32, 32)
  c.model.pool_after = (1, 2)
  c.train.epochs = 2
  c.train.batch_size = 32
  c.train.eval_batch_size = 64
  c.figures = False
  return apply_overrides(c, **overrides)


def apply_overrides(c, **overrides):
  """Sets dotted keys ('train.lr': 0.1) on a ConfigDict, as --config.KEY=VALUE would.

  ``trigger.kind`` is set first and brings its kind's default section (as the
  ``digits_KIND`` config variants do), so ``trigger.wanet.s`` can follow it.
  """
  if "trigger.kind" in overrides:
    badnets.use_trigger(c, overrides["trigger.kind"])
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


class Front(nn.Module):
  """First half of the hand-split test model."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3))(x))
    return nn.relu(nn.Conv(6, (3, 3), strides=2)(x))


class Back(nn.Module):
  """Second half of the hand-split test model."""

  @nn.compact
  def __call__(self, a):
    a = nn.relu(nn.Conv(5, (3, 3))(a))
    return nn.Dense(3)(jnp.mean(a, axis=(1, 2)))


class Split(nn.Module):
  """A net whose exposed layer 'mid' ((B, 4, 4, 6) for 8x8 inputs) separates two
  submodules that a slow reference can call apart."""

  @nn.compact
  def __call__(self, x, train=False):
    return Back(name="back")(expose(self, "mid", Front(name="front")(x)))
