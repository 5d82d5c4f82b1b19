"""VGG-11/13/16/19 (with and without BatchNorm), plus layer helpers shared by the zoo.

Parameter names mirror torchvision's module indices with ``_`` for ``.``:
``features_N`` (conv / BatchNorm) and ``classifier_N`` (Linear). Every ReLU and
max-pool output in ``features`` is exposed as ``features_N``; the classifier ReLUs
are exposed as ``classifier_N`` (imagenet stem) and the flattened 512-d feature as
``pool`` (cifar stem). The last exposed name is always the (B, D) input of the
final Dense layer.

Stems:
  * ``imagenet``: torchvision layout. features -> adaptive avg pool 7x7 -> flatten
    (torch's C,H,W order) -> Linear(25088, 4096) -> ReLU -> Dropout(0.5) ->
    Linear(4096, 4096) -> ReLU -> Dropout(0.5) -> Linear(4096, C).
  * ``cifar``: same features; adaptive avg pool to 1x1 (the identity on the 1x1x512
    map a 32x32 input yields, and a global mean for larger inputs) -> flatten ->
    Linear(512, C) named ``classifier``.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import jax
import jax.numpy as jnp
import flax.linen as nn

from backdoor_jax.errors import check_choice
from backdoor_jax.models.common import expose

STEMS = ("cifar", "imagenet")

# torchvision's kaiming_normal_(mode="fan_out", nonlinearity="relu") for conv kernels.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

VGG_CONFIGS: dict[int, tuple[Any, ...]] = {
    11: (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    13: (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    16: (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
    19: (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
         512, 512, 512, 512, "M"),
}


def batch_norm(train: bool, dtype: Any, name: str) -> nn.BatchNorm:
  """BatchNorm with torchvision's momentum / epsilon; params stay float32."""
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                      dtype=dtype, name=name)


def _pool_matrix(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) averaging matrix of torch's adaptive pooling along one axis.

  Output ``i`` averages inputs ``floor(i * n_in / n_out)`` .. ``ceil((i + 1) * n_in / n_out) - 1``.
  """
  m = np.zeros((n_out, n_in), np.float32)
  for i in range(n_out):
    start = (i * n_in) // n_out
    end = -((-(i + 1) * n_in) // n_out)
    m[i, start:end] = 1.0 / (end - start)
  return m


def adaptive_avg_pool(x: jax.Array, output_size: int | tuple[int, int]) -> jax.Array:
  """torch.nn.AdaptiveAvgPool2d on an NHWC batch (static shapes, any input size).

  Args:
    x: (B, H, W, C) array.
    output_size: ``s`` or ``(out_h, out_w)``.
  Returns:
    (B, out_h, out_w, C) array; regions follow torch's start/end rule, so an input
    smaller than the output is replicated.
  """
  out_h, out_w = (output_size, output_size) if isinstance(output_size, int) else output_size
  _, h, w, _ = x.shape
  if (h, w) == (out_h, out_w):
    return x
  mh = jnp.asarray(_pool_matrix(h, out_h), x.dtype)
  mw = jnp.asarray(_pool_matrix(w, out_w), x.dtype)
  return jnp.einsum("ih,jw,bhwc->bijc", mh, mw, x)


def flatten_chw(x: jax.Array) -> jax.Array:
  """Flattens NHWC to (B, C*H*W) in torch's (C, H, W) order, so imported Linear
  weights need only a transpose."""
  return jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)


def vgg_feature_names(cfg: Sequence[Any], batch_norm_: bool) -> tuple[str, ...]:
  """Exposed ``features_N`` names (every ReLU and max-pool) for a VGG config."""
  names, idx = [], 0
  for v in cfg:
    if v == "M":
      names.append(f"features_{idx}")
      idx += 1
    else:
      idx += 2 if batch_norm_ else 1
      names.append(f"features_{idx}")
      idx += 1
  return tuple(names)


class VGG(nn.Module):
  """VGG network in torchvision's layout.

  Attributes:
    depth: 11, 13, 16 or 19.
    num_classes: number of logits.
    batch_norm: whether each conv is followed by BatchNorm (the ``_bn`` variants).
    stem: ``'imagenet'`` (torchvision classifier) or ``'cifar'`` (Linear(512, C)).
    dropout_rate: dropout in the imagenet classifier.
    dtype: computation dtype; params stay float32.
  """
  depth: int = 16
  num_classes: int = 10
  batch_norm: bool = False
  stem: str = "cifar"
  dropout_rate: float = 0.5
  dtype: Any = jnp.float32

  @property
  def layer_names(self) -> tuple[str, ...]:
    """Exposed names in forward order."""
    names = vgg_feature_names(VGG_CONFIGS[self.depth], self.batch_norm)
    if self.stem == "imagenet":
      return names + ("classifier_1", "classifier_4")
    return names + ("pool",)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    check_choice("stem", self.stem, STEMS)
    x = x.astype(self.dtype)
    idx = 0
    for v in VGG_CONFIGS[self.depth]:
      if v == "M":
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = expose(self, f"features_{idx}", x)
        idx += 1
        continue
      x = nn.Conv(v, (3, 3), padding=((1, 1), (1, 1)), kernel_init=conv_init,
                  dtype=self.dtype, name=f"features_{idx}")(x)
      idx += 1
      if self.batch_norm:
        x = batch_norm(train, self.dtype, f"features_{idx}")(x)
        idx += 1
      x = expose(self, f"features_{idx}", nn.relu(x))
      idx += 1

    dense_init = nn.initializers.normal(0.01)  # torchvision's VGG Linear init.
    if self.stem == "imagenet":
      x = flatten_chw(adaptive_avg_pool(x, 7))
      for i in (0, 3):
        x = nn.Dense(4096, kernel_init=dense_init, dtype=self.dtype, name=f"classifier_{i}")(x)
        x = expose(self, f"classifier_{i + 1}", nn.relu(x))
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
      x = nn.Dense(self.num_classes, kernel_init=dense_init, dtype=self.dtype,
                   name="classifier_6")(x)
    else:
      x = expose(self, "pool", flatten_chw(adaptive_avg_pool(x, 1)))
      x = nn.Dense(self.num_classes, kernel_init=dense_init, dtype=self.dtype,
                   name="classifier")(x)
    return x.astype(jnp.float32)
