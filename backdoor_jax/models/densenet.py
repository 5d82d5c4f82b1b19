"""DenseNet-121/161 in torchvision's layout.

Parameters sit at the top level under torchvision's module path with ``_`` for ``.``:
``features_conv0``/``features_norm0`` (stem),
``features_denseblock{b}_denselayer{l}_{norm1,conv1,norm2,conv2}``,
``features_transition{t}_{norm,conv}``, ``features_norm5`` and ``classifier``. Convs are
bias-free; every BatchNorm has ``norm`` in its name.

Exposed names: ``stem`` (after the stem), ``denseblock1`` .. ``denseblock4`` (block
outputs), ``transition1`` .. ``transition3`` (after their average pool), ``norm5``
(after its ReLU: the usual Grad-CAM layer) and ``pool`` ((B, C) global average).

Stems:
  * ``imagenet``: torchvision exactly (7x7/2 conv, BN, ReLU, 3x3/2 max-pool).
  * ``cifar``: ``conv0`` is a 3x3/1 conv and the max-pool is skipped, so a 32x32 input
    reaches ``denseblock4`` at 4x4.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

from backdoor_jax.errors import check_choice
from backdoor_jax.models.common import expose
from backdoor_jax.models.vgg import STEMS, batch_norm

# depth -> (growth rate, layers per block, stem width), as torchvision.
DENSENET_CONFIGS: dict[int, tuple[int, tuple[int, ...], int]] = {
    121: (32, (6, 12, 24, 16), 64),
    161: (48, (6, 12, 36, 24), 96),
}
BN_SIZE = 4  # bottleneck width = BN_SIZE * growth rate.

# torchvision's kaiming_normal_ (fan_in, ReLU gain) for DenseNet convs.
_conv_init = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


def _conv(features: int, kernel: int, stride: int, padding: int, dtype: Any, name: str) -> nn.Conv:
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((padding, padding), (padding, padding)), use_bias=False,
                 kernel_init=_conv_init, dtype=dtype, name=name)


def dense_layer(x: jax.Array, growth: int, name: str, train: bool, dtype: Any) -> jax.Array:
  """BN-ReLU-1x1 conv-BN-ReLU-3x3 conv; returns only the ``growth`` new channels."""
  y = nn.relu(batch_norm(train, dtype, f"{name}_norm1")(x))
  y = _conv(BN_SIZE * growth, 1, 1, 0, dtype, f"{name}_conv1")(y)
  y = nn.relu(batch_norm(train, dtype, f"{name}_norm2")(y))
  return _conv(growth, 3, 1, 1, dtype, f"{name}_conv2")(y)


def transition(x: jax.Array, features: int, name: str, train: bool, dtype: Any) -> jax.Array:
  """BN-ReLU-1x1 conv (halving channels)-2x2 average pool."""
  x = nn.relu(batch_norm(train, dtype, f"{name}_norm")(x))
  x = _conv(features, 1, 1, 0, dtype, f"{name}_conv")(x)
  return nn.avg_pool(x, (2, 2), strides=(2, 2))


class DenseNet(nn.Module):
  """torchvision DenseNet (``memory_efficient`` and ``drop_rate`` do not change the math
  of a pretrained net in inference; dropout is not implemented).

  Attributes:
    depth: 121 or 161.
    num_classes: number of logits.
    stem: ``'imagenet'`` or ``'cifar'``.
    dtype: computation dtype; params stay float32.
  """
  depth: int = 121
  num_classes: int = 1000
  stem: str = "imagenet"
  dtype: Any = jnp.float32

  @property
  def layer_names(self) -> tuple[str, ...]:
    """Exposed names in forward order."""
    names = ["stem"]
    for b in range(1, 5):
      names.append(f"denseblock{b}")
      if b < 4:
        names.append(f"transition{b}")
    return tuple(names) + ("norm5", "pool")

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    check_choice("stem", self.stem, STEMS)
    growth, blocks, width = DENSENET_CONFIGS[self.depth]
    d = self.dtype
    x = x.astype(d)
    if self.stem == "imagenet":
      x = _conv(width, 7, 2, 3, d, "features_conv0")(x)
    else:
      x = _conv(width, 3, 1, 1, d, "features_conv0")(x)
    x = nn.relu(batch_norm(train, d, "features_norm0")(x))
    if self.stem == "imagenet":
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    x = expose(self, "stem", x)
    channels = width
    for b, n_layers in enumerate(blocks, start=1):
      for i in range(1, n_layers + 1):
        new = dense_layer(x, growth, f"features_denseblock{b}_denselayer{i}", train, d)
        x = jnp.concatenate([x, new], axis=-1)
      channels += n_layers * growth
      x = expose(self, f"denseblock{b}", x)
      if b < len(blocks):
        channels //= 2
        x = expose(self, f"transition{b}", transition(x, channels, f"features_transition{b}", train, d))
    x = expose(self, "norm5", nn.relu(batch_norm(train, d, "features_norm5")(x)))
    x = expose(self, "pool", jnp.mean(x, axis=(1, 2)))
    x = nn.Dense(self.num_classes, dtype=d, bias_init=nn.initializers.zeros, name="classifier")(x)
    return x.astype(jnp.float32)
