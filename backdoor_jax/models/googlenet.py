"""GoogLeNet (Inception v1) in torchvision's layout, auxiliary heads optional.

Parameters sit at the top level under torchvision's module path with ``_`` for ``.``
(so the exposed names below stay free): each ``BasicConv2d`` ``P`` is ``P_conv``
(bias-free) + ``P_bn`` (BatchNorm, epsilon 1e-3), e.g. ``conv1_conv``,
``inception3a_branch2_1_bn``, ``aux1_conv_conv``; Linears are ``fc``, ``aux1_fc1``,
``aux1_fc2``. Like torchvision, the "5x5" branch uses a 3x3 kernel.

Exposed names: ``conv1``, ``maxpool1``, ``conv2``, ``conv3``, ``maxpool2``, every
inception output, ``maxpool3``, ``maxpool4`` (in forward order) and ``pool`` (the
(B, 1024) global average, input of ``fc``).

Stems:
  * ``imagenet``: torchvision exactly (7x7/2 conv, ceil-mode max-pools).
  * ``cifar``: ``conv1`` is a 3x3/1 conv and ``maxpool1``/``maxpool2`` are skipped, so a
    32x32 input reaches ``inception3a`` at 32x32, ``inception4a`` at 16x16 and
    ``inception5a`` at 8x8.

Auxiliary heads (``aux_logits=True``) exist only to hold imported weights and to train
with torchvision's auxiliary loss: in training they run after ``inception4a`` and
``inception4d`` and sow their logits into the ``aux_logits`` collection (``aux1`` then
``aux2``); the module still returns the main logits only.

``transform_input=True`` reproduces torchvision's input conversion for its pretrained
weights (inputs normalised with ImageNet mean/std are re-normalised to mean/std 0.5).
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

from backdoor_jax.errors import check_choice
from backdoor_jax.models.common import expose
from backdoor_jax.models.vgg import STEMS, adaptive_avg_pool, flatten_chw

AUX_COLLECTION = "aux_logits"

# name -> (ch1x1, ch3x3red, ch3x3, ch5x5red, ch5x5, pool_proj) as in torchvision.
INCEPTION_CONFIGS: dict[str, tuple[int, ...]] = {
    "inception3a": (64, 96, 128, 16, 32, 32),
    "inception3b": (128, 128, 192, 32, 96, 64),
    "inception4a": (192, 96, 208, 16, 48, 64),
    "inception4b": (160, 112, 224, 24, 64, 64),
    "inception4c": (128, 128, 256, 24, 64, 64),
    "inception4d": (112, 144, 288, 32, 64, 64),
    "inception4e": (256, 160, 320, 32, 128, 128),
    "inception5a": (256, 160, 320, 32, 128, 128),
    "inception5b": (384, 192, 384, 48, 128, 128),
}

# torchvision's truncated normal (std 0.01, cut at +-2) for GoogLeNet convs and Linears.
_trunc_init = nn.initializers.truncated_normal(0.01)


def max_pool_ceil(x: jax.Array, window: int, stride: int, padding: int = 0) -> jax.Array:
  """torch ``MaxPool2d(window, stride, padding, ceil_mode=True)`` on NHWC.

  The last window may overhang the input on the bottom/right (padded with -inf), but
  never starts in the right padding, as in torch.
  """
  def extra(n: int) -> tuple[int, int]:
    out = math.ceil((n + 2 * padding - window) / stride) + 1
    if (out - 1) * stride >= n + padding:
      out -= 1
    return padding, max(0, (out - 1) * stride + window - n - padding)

  return nn.max_pool(x, (window, window), strides=(stride, stride),
                     padding=(extra(x.shape[1]), extra(x.shape[2])))


def basic_conv(x: jax.Array, features: int, kernel: int, name: str, train: bool, dtype: Any,
               stride: int = 1, padding: int = 0) -> jax.Array:
  """torchvision ``BasicConv2d`` as ``{name}_conv`` (bias-free) + ``{name}_bn`` (eps 1e-3) + ReLU.

  Called inside the top-level module's compact ``__call__``, so the parameters sit at the
  top level under torchvision's dotted path with ``_`` for ``.``.
  """
  p = padding
  x = nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((p, p), (p, p)),
              use_bias=False, kernel_init=_trunc_init, dtype=dtype, name=f"{name}_conv")(x)
  x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-3, dtype=dtype,
                   name=f"{name}_bn")(x)
  return nn.relu(x)


def inception(x: jax.Array, config: tuple[int, ...], name: str, train: bool, dtype: Any) -> jax.Array:
  """torchvision ``Inception`` block: four branches concatenated on channels."""
  c1, c3r, c3, c5r, c5, pp = config
  b1 = basic_conv(x, c1, 1, f"{name}_branch1", train, dtype)
  b2 = basic_conv(x, c3r, 1, f"{name}_branch2_0", train, dtype)
  b2 = basic_conv(b2, c3, 3, f"{name}_branch2_1", train, dtype, padding=1)
  b3 = basic_conv(x, c5r, 1, f"{name}_branch3_0", train, dtype)
  b3 = basic_conv(b3, c5, 3, f"{name}_branch3_1", train, dtype, padding=1)  # 3x3, as torchvision.
  b4 = basic_conv(max_pool_ceil(x, 3, 1, 1), pp, 1, f"{name}_branch4_1", train, dtype)
  return jnp.concatenate([b1, b2, b3, b4], axis=-1)


def inception_aux(x: jax.Array, num_classes: int, name: str, train: bool, dtype: Any) -> jax.Array:
  """torchvision ``InceptionAux``: 4x4 adaptive pool, 1x1 conv, Linear-ReLU-Dropout-Linear."""
  x = basic_conv(adaptive_avg_pool(x, 4), 128, 1, f"{name}_conv", train, dtype)
  x = nn.Dense(1024, kernel_init=_trunc_init, dtype=dtype, name=f"{name}_fc1")(flatten_chw(x))
  x = nn.Dropout(0.7, deterministic=not train)(nn.relu(x))
  return nn.Dense(num_classes, kernel_init=_trunc_init, dtype=dtype, name=f"{name}_fc2")(x)


class GoogLeNet(nn.Module):
  """GoogLeNet (torchvision layout).

  Attributes:
    num_classes: number of logits.
    stem: ``'imagenet'`` or ``'cifar'``.
    aux_logits: build the two auxiliary heads (torchvision's ``aux_logits=True``).
    transform_input: torchvision's re-normalisation of ImageNet-normalised inputs.
    dropout_rate: dropout before ``fc`` (torchvision: 0.2).
    dtype: computation dtype; params stay float32.
  """
  num_classes: int = 1000
  stem: str = "imagenet"
  aux_logits: bool = False
  transform_input: bool = False
  dropout_rate: float = 0.2
  dtype: Any = jnp.float32

  @property
  def layer_names(self) -> tuple[str, ...]:
    """Exposed names in forward order."""
    pools = {"inception3b": "maxpool3", "inception4e": "maxpool4"}
    names = ["conv1", "conv2", "conv3"] if self.stem == "cifar" else [
        "conv1", "maxpool1", "conv2", "conv3", "maxpool2"]
    for block in INCEPTION_CONFIGS:
      names.append(block)
      if block in pools:
        names.append(pools[block])
    return tuple(names) + ("pool",)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    check_choice("stem", self.stem, STEMS)
    imagenet = self.stem == "imagenet"
    d = self.dtype
    if self.transform_input:
      scale = jnp.array([0.229, 0.224, 0.225]) / 0.5
      shift = (jnp.array([0.485, 0.456, 0.406]) - 0.5) / 0.5
      x = x * scale + shift
    x = x.astype(d)
    if imagenet:
      x = expose(self, "conv1", basic_conv(x, 64, 7, "conv1", train, d, stride=2, padding=3))
      x = expose(self, "maxpool1", max_pool_ceil(x, 3, 2))
    else:
      x = expose(self, "conv1", basic_conv(x, 64, 3, "conv1", train, d, padding=1))
    x = expose(self, "conv2", basic_conv(x, 64, 1, "conv2", train, d))
    x = expose(self, "conv3", basic_conv(x, 192, 3, "conv3", train, d, padding=1))
    if imagenet:
      x = expose(self, "maxpool2", max_pool_ceil(x, 3, 2))
    run_aux = self.aux_logits and (train or self.is_initializing())
    for block, config in INCEPTION_CONFIGS.items():
      x = expose(self, block, inception(x, config, block, train, d))
      if run_aux and block in ("inception4a", "inception4d"):
        head = "aux1" if block == "inception4a" else "aux2"
        aux = inception_aux(x, self.num_classes, head, train, d)
        self.sow(AUX_COLLECTION, head, aux.astype(jnp.float32))
      if block == "inception3b":
        x = expose(self, "maxpool3", max_pool_ceil(x, 3, 2))
      elif block == "inception4e":
        x = expose(self, "maxpool4", max_pool_ceil(x, 2, 2))
    x = expose(self, "pool", jnp.mean(x, axis=(1, 2)))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    x = nn.Dense(self.num_classes, kernel_init=_trunc_init, dtype=d, name="fc")(x)
    return x.astype(jnp.float32)
