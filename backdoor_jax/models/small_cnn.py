"""Plain conv-BN-ReLU CNN (the traffic-sign model of the trojan literature).

Layer ``i`` (1-based) is a 3x3 conv (padding 1, with bias) + BatchNorm + ReLU in a
submodule ``block{i}`` (params ``block{i}/conv``, ``block{i}/bn``); its ReLU output is
exposed as ``conv{i}`` *before* the optional 2x2 max-pool. Then a global average pool
(exposed as ``pool``, (B, C)) and a Dense ``fc``.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

from backdoor_jax.models.common import expose
from backdoor_jax.models.vgg import batch_norm, conv_init


class ConvBNReLU(nn.Module):
  """3x3 conv + BatchNorm + ReLU."""
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = nn.Conv(self.features, (3, 3), padding=((1, 1), (1, 1)), kernel_init=conv_init,
                dtype=self.dtype, name="conv")(x)
    return nn.relu(batch_norm(train, self.dtype, "bn")(x))


class SmallCNN(nn.Module):
  """Configurable plain CNN.

  Attributes:
    num_classes: number of logits.
    widths: output channels of each conv layer.
    pool_after: 1-based indices of the layers followed by a 2x2/2 max-pool.
    dtype: computation dtype; params stay float32.
  """
  num_classes: int = 10
  widths: tuple[int, ...] = (32, 64, 128, 64, 32)
  pool_after: tuple[int, ...] = (2, 3)
  dtype: Any = jnp.float32

  @property
  def layer_names(self) -> tuple[str, ...]:
    """Exposed names in forward order."""
    return tuple(f"conv{i + 1}" for i in range(len(self.widths))) + ("pool",)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = x.astype(self.dtype)
    for i, width in enumerate(self.widths, start=1):
      x = expose(self, f"conv{i}", ConvBNReLU(width, self.dtype, name=f"block{i}")(x, train))
      if i in self.pool_after:
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = expose(self, "pool", jnp.mean(x, axis=(1, 2)))
    x = nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(x)
    return x.astype(jnp.float32)
