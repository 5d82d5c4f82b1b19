"""ResNet-18/34/50/101/152 (torchvision v1.5) and PreAct-ResNet-18 (BackdoorBench).

ResNet parameter names mirror torchvision with ``_`` for ``.``: ``conv1``, ``bn1``,
``layer{s}_{b}`` blocks holding ``conv1``/``bn1``/``conv2``/``bn2`` (+ ``conv3``/``bn3``
for Bottleneck) and ``downsample_conv``/``downsample_bn``, and ``fc``.
Exposed names: ``stem``, ``layer1`` .. ``layer4`` (stage outputs) and ``pool``
(global average pool, (B, C)).

Stems: ``imagenet`` = 7x7/2 conv + BN + ReLU + 3x3/2 max-pool (padding 1);
``cifar`` = 3x3/1 conv + BN + ReLU, no max-pool.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

from backdoor_jax.errors import check_choice
from backdoor_jax.models.common import expose
from backdoor_jax.models.vgg import STEMS, batch_norm, conv_init

RESNET_CONFIGS: dict[int, tuple[str, tuple[int, ...]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}


def conv(features: int, kernel: int, stride: int, dtype: Any, name: str) -> nn.Conv:
  """Bias-free conv with torch-style symmetric padding ``kernel // 2``."""
  p = kernel // 2
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((p, p), (p, p)),
                 use_bias=False, kernel_init=conv_init, dtype=dtype, name=name)


class ResidualBlock(nn.Module):
  """torchvision BasicBlock (``bottleneck=False``) or Bottleneck (stride on the 3x3)."""
  planes: int
  stride: int = 1
  bottleneck: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    out_ch = self.planes * (4 if self.bottleneck else 1)
    if self.bottleneck:
      y = nn.relu(batch_norm(train, self.dtype, "bn1")(
          conv(self.planes, 1, 1, self.dtype, "conv1")(x)))
      y = nn.relu(batch_norm(train, self.dtype, "bn2")(
          conv(self.planes, 3, self.stride, self.dtype, "conv2")(y)))
      y = batch_norm(train, self.dtype, "bn3")(conv(out_ch, 1, 1, self.dtype, "conv3")(y))
    else:
      y = nn.relu(batch_norm(train, self.dtype, "bn1")(
          conv(self.planes, 3, self.stride, self.dtype, "conv1")(x)))
      y = batch_norm(train, self.dtype, "bn2")(conv(self.planes, 3, 1, self.dtype, "conv2")(y))
    if self.stride != 1 or x.shape[-1] != out_ch:
      x = conv(out_ch, 1, self.stride, self.dtype, "downsample_conv")(x)
      x = batch_norm(train, self.dtype, "downsample_bn")(x)
    return nn.relu(y + x)


class ResNet(nn.Module):
  """torchvision ResNet (v1.5).

  Attributes:
    depth: 18, 34, 50, 101 or 152.
    num_classes: number of logits.
    stem: ``'cifar'`` or ``'imagenet'``.
    dtype: computation dtype; params stay float32.
  """
  depth: int = 18
  num_classes: int = 10
  stem: str = "cifar"
  dtype: Any = jnp.float32

  @property
  def layer_names(self) -> tuple[str, ...]:
    """Exposed names in forward order."""
    return ("stem", "layer1", "layer2", "layer3", "layer4", "pool")

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    check_choice("stem", self.stem, STEMS)
    kind, stages = RESNET_CONFIGS[self.depth]
    x = x.astype(self.dtype)
    if self.stem == "imagenet":
      x = conv(64, 7, 2, self.dtype, "conv1")(x)
    else:
      x = conv(64, 3, 1, self.dtype, "conv1")(x)
    x = nn.relu(batch_norm(train, self.dtype, "bn1")(x))
    if self.stem == "imagenet":
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    x = expose(self, "stem", x)
    for s, n_blocks in enumerate(stages):
      for b in range(n_blocks):
        stride = 2 if (s > 0 and b == 0) else 1
        x = ResidualBlock(64 * 2**s, stride, kind == "bottleneck", self.dtype,
                          name=f"layer{s + 1}_{b}")(x, train)
      x = expose(self, f"layer{s + 1}", x)
    x = expose(self, "pool", jnp.mean(x, axis=(1, 2)))
    x = nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(x)
    return x.astype(jnp.float32)


class PreActBlock(nn.Module):
  """Pre-activation basic block (BackdoorBench's ``PreActBlock``)."""
  planes: int
  stride: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    out = nn.relu(batch_norm(train, self.dtype, "bn1")(x))
    if self.stride != 1 or x.shape[-1] != self.planes:
      shortcut = conv(self.planes, 1, self.stride, self.dtype, "shortcut_0")(out)
    else:
      shortcut = x
    out = conv(self.planes, 3, self.stride, self.dtype, "conv1")(out)
    out = nn.relu(batch_norm(train, self.dtype, "bn2")(out))
    out = conv(self.planes, 3, 1, self.dtype, "conv2")(out)
    return out + shortcut


class PreActResNet18(nn.Module):
  """Pre-activation ResNet-18 for small images (CIFAR stem only).

  Same blocks and names as BackdoorBench's ``PreActResNet18`` (``conv1``,
  ``layer{s}_{b}`` with ``bn1``/``conv1``/``bn2``/``conv2``/``shortcut_0``, ``linear``).
  With ``final_norm=True`` (default, as in He et al. 2016) a BatchNorm ``final_bn``
  + ReLU follows layer4, and the ``layer4`` exposure is taken after it so that
  Grad-CAM maps are meaningful; ``final_norm=False`` is exactly BackdoorBench's net
  (layer4 exposes the raw residual sum).

  Attributes:
    num_classes: number of logits.
    final_norm: add BN + ReLU after layer4.
    dtype: computation dtype; params stay float32.
  """
  num_classes: int = 10
  final_norm: bool = True
  dtype: Any = jnp.float32

  @property
  def layer_names(self) -> tuple[str, ...]:
    """Exposed names in forward order."""
    return ("stem", "layer1", "layer2", "layer3", "layer4", "pool")

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = x.astype(self.dtype)
    x = expose(self, "stem", conv(64, 3, 1, self.dtype, "conv1")(x))
    for s in range(4):
      for b in range(2):
        stride = 2 if (s > 0 and b == 0) else 1
        x = PreActBlock(64 * 2**s, stride, self.dtype, name=f"layer{s + 1}_{b}")(x, train)
      if s == 3 and self.final_norm:
        x = nn.relu(batch_norm(train, self.dtype, "final_bn")(x))
      x = expose(self, f"layer{s + 1}", x)
    x = expose(self, "pool", jnp.mean(x, axis=(1, 2)))
    x = nn.Dense(self.num_classes, dtype=self.dtype, name="linear")(x)
    return x.astype(jnp.float32)
