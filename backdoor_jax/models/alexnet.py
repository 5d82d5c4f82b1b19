"""AlexNet in torchvision's layout, plus a CIFAR variant.

Parameter names mirror torchvision's indices: convs ``features_0/3/6/8/10``, Linears
``classifier_1/4/6``. Exposed: every ReLU / max-pool output in ``features``
(``features_1, 2, 4, 5, 7, 9, 11, 12``) and the classifier ReLUs
(``classifier_2``, ``classifier_5``; the latter is the (B, D) input of the last Dense).

Stems:
  * ``imagenet``: torchvision exactly (11x11/4 first conv, adaptive avg pool 6x6,
    Dropout-Linear(9216, 4096)-ReLU-Dropout-Linear(4096, 4096)-ReLU-Linear(4096, C)).
  * ``cifar``: ``features_0`` is a 3x3/1 conv (padding 1), other features unchanged,
    so a 32x32 input ends in a 3x3x256 map; adaptive avg pool 3x3, and the same
    classifier with 1024 hidden units: Linear(2304, 1024), Linear(1024, 1024).
Flattening uses torch's (C, H, W) order.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

from backdoor_jax.errors import check_choice
from backdoor_jax.models.common import expose
from backdoor_jax.models.vgg import STEMS, adaptive_avg_pool, conv_init, flatten_chw

# (torch index, features, kernel, stride, padding); None marks a 3x3/2 max-pool.
_FEATURES = ((0, 64, 11, 4, 2), (2, None), (3, 192, 5, 1, 2), (5, None),
             (6, 384, 3, 1, 1), (8, 256, 3, 1, 1), (10, 256, 3, 1, 1), (12, None))


class AlexNet(nn.Module):
  """AlexNet (torchvision) or its CIFAR variant.

  Attributes:
    num_classes: number of logits.
    stem: ``'imagenet'`` or ``'cifar'``.
    dropout_rate: dropout before the two hidden Linears.
    dtype: computation dtype; params stay float32.
  """
  num_classes: int = 10
  stem: str = "cifar"
  dropout_rate: float = 0.5
  dtype: Any = jnp.float32

  @property
  def layer_names(self) -> tuple[str, ...]:
    """Exposed names in forward order."""
    return ("features_1", "features_2", "features_4", "features_5", "features_7", "features_9",
            "features_11", "features_12", "classifier_2", "classifier_5")

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    check_choice("stem", self.stem, STEMS)
    imagenet = self.stem == "imagenet"
    x = x.astype(self.dtype)
    for spec in _FEATURES:
      idx, features = spec[0], spec[1]
      if features is None:
        x = expose(self, f"features_{idx}", nn.max_pool(x, (3, 3), strides=(2, 2)))
        continue
      _, _, k, s, p = spec
      if idx == 0 and not imagenet:
        k, s, p = 3, 1, 1
      x = nn.Conv(features, (k, k), strides=(s, s), padding=((p, p), (p, p)),
                  kernel_init=conv_init, dtype=self.dtype, name=f"features_{idx}")(x)
      x = expose(self, f"features_{idx + 1}", nn.relu(x))
    x = flatten_chw(adaptive_avg_pool(x, 6 if imagenet else 3))
    hidden = 4096 if imagenet else 1024
    for i in (1, 4):
      x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
      x = nn.Dense(hidden, dtype=self.dtype, name=f"classifier_{i}")(x)
      x = expose(self, f"classifier_{i + 1}", nn.relu(x))
    x = nn.Dense(self.num_classes, dtype=self.dtype, name="classifier_6")(x)
    return x.astype(jnp.float32)
