"""SSBA-style sample-specific invisible triggers (Li et al., ICCV 2021), small and in JAX.

A StegaStamp-like encoder hides a fixed bit string in each image as a bounded residual;
a decoder learns to read the bits back. Each poisoned image gets its *own* residual
(a function of the image), so there is no shared patch to find.

* :class:`StegaEncoder`: ``(image in [0, 1], bits)`` -> residual in pixel units,
  ``max_residual * tanh(.)``; the bits enter as a dense map upsampled to the image.
* :class:`StegaDecoder`: image -> bit logits.
* :func:`backdoor_jax.triggers.ssba_train.train_encoder_file` trains both on clean
  images with random bit strings (a resumable job, see :mod:`ssba_train`).
* :class:`SSBATrigger`: the encoder's parameters plus the fixed bit string (a pytree,
  jit-able like every trigger): ``x' = clip(x + encoder(x, bits), 0, 255)``.

Trained encoders are saved with :func:`save_encoder` (``.npz``) and loaded by
``trigger_from_config`` (``kind='ssba'``, section ``trigger.ssba.path``). Train one with
``python launch/train_ssba.py``.
"""
from __future__ import annotations

import io
import json
import os
from typing import Any

import chex
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from backdoor_jax.errors import ConfigError
from backdoor_jax.io import write_bytes_atomic
from backdoor_jax.triggers.base import TriggerBase
from backdoor_jax.triggers.registry import TriggerArgs, register_trigger


class StegaEncoder(nn.Module):
  """Image + bits -> residual (pixel units, bounded by ``max_residual``)."""
  features: int = 32
  max_residual: float = 8.0

  @nn.compact
  def __call__(self, x: jax.Array, bits: jax.Array) -> jax.Array:
    h, w = x.shape[-3], x.shape[-2]
    s = nn.Dense(3 * (h // 4) * (w // 4))(bits * 2.0 - 1.0)
    s = s.reshape(s.shape[:-1] + (h // 4, w // 4, 3))
    s = jax.image.resize(s, s.shape[:-3] + (h, w, 3), "nearest")
    y = jnp.concatenate([x - 0.5, s], axis=-1)
    for _ in range(3):
      y = nn.relu(nn.Conv(self.features, (3, 3))(y))
    y = jnp.concatenate([y, x - 0.5], axis=-1)
    y = nn.Conv(3, (1, 1))(y)
    return self.max_residual * jnp.tanh(y)


class StegaDecoder(nn.Module):
  """Image -> bit logits."""
  num_bits: int
  features: int = 32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = x - 0.5
    for f in (self.features, self.features, 2 * self.features):
      y = nn.relu(nn.Conv(f, (3, 3), strides=2)(y))
    return nn.Dense(self.num_bits)(y.reshape(y.shape[:-3] + (-1,)))


@chex.dataclass(frozen=True)
class SSBATrigger(TriggerBase):
  """Sample-specific invisible trigger (pytree).

  Attributes:
    params: the :class:`StegaEncoder` parameters.
    bits: ``(L,)`` float32 0/1, the hidden bit string.
    max_residual: 0-d float32, the encoder's residual bound (pixel units).

  The image size is fixed by the encoder's dense layer (checked when loading).
  """
  params: Any
  bits: jax.Array
  max_residual: jax.Array

  KIND = "ssba"

  @property
  def mask(self) -> jax.Array:
    """SSBA has no region; raises ConfigError (for code written for patch triggers)."""
    return self.region_mask()

  def _apply_float(self, x: jax.Array) -> jax.Array:
    features = self.params["Conv_0"]["kernel"].shape[-1]
    enc = StegaEncoder(features=features, max_residual=1.0)  # bound applied below (a traced leaf)
    bits = jnp.broadcast_to(self.bits, x.shape[:-3] + self.bits.shape)
    residual = enc.apply({"params": self.params}, x / 255.0, bits) * self.max_residual
    return jnp.clip(x + residual, 0.0, 255.0)


def save_encoder(path: str, encoder_params: Any, *, bits: np.ndarray, image_hw: tuple[int, int],
                 max_residual: float, info: dict[str, Any] | None = None,
                 decoder_params: Any = None) -> None:
  """Writes an encoder (parameters, bit string, image size, bound) to an ``.npz`` file, atomically.

  ``info`` values are numbers or strings (a dict is stored as JSON); ``decoder_params``
  (optional) are kept under ``decoder/`` for re-evaluating the file.
  """
  def flat(tree, prefix):
    items = flax.traverse_util.flatten_dict(flax.core.unfreeze(tree), sep="/").items()
    return {f"{prefix}/{k}": np.asarray(v) for k, v in items}
  extra = {f"info/{k}": np.asarray(json.dumps(v, sort_keys=True) if isinstance(v, dict) else v)
           for k, v in (info or {}).items()}
  if decoder_params is not None:
    extra.update(flat(decoder_params, "decoder"))
  buf = io.BytesIO()
  np.savez(buf, **flat(encoder_params, "params"), bits=np.asarray(bits, np.float32),
           image_hw=np.asarray(image_hw, np.int32), max_residual=np.asarray(max_residual, np.float32),
           **extra)
  write_bytes_atomic(path, buf.getvalue())


def load_ssba_trigger(path: Any, image_hw: tuple[int, int]) -> SSBATrigger:
  """Reads an encoder written by :func:`save_encoder` as a trigger for ``image_hw`` images.

  Raises:
    ConfigError: for a missing/unreadable file or an encoder trained for another size.
  """
  path = os.fspath(path)
  if not path.endswith(".npz"):
    raise ConfigError(f"trigger ssba.path {path!r} is not an .npz file; allowed: an encoder written by "
                      "launch/train_ssba.py")
  try:
    with np.load(path, allow_pickle=False) as f:
      arrays = {k: f[k] for k in f.files}
  except (OSError, ValueError) as e:
    raise ConfigError(f"trigger ssba.path {path!r} could not be loaded: {e}") from None
  hw = tuple(int(v) for v in arrays["image_hw"])
  if hw != tuple(image_hw):
    raise ConfigError(f"SSBA encoder {path!r} was trained for {hw[0]}x{hw[1]} images; the data is "
                      f"{image_hw[0]}x{image_hw[1]}; allowed: train one for this size")
  params = flax.traverse_util.unflatten_dict(
      {k[len("params/"):]: jnp.asarray(v) for k, v in arrays.items() if k.startswith("params/")}, sep="/")
  return SSBATrigger(params=params, bits=jnp.asarray(arrays["bits"], jnp.float32),
                     max_residual=jnp.asarray(arrays["max_residual"], jnp.float32))


@register_trigger("ssba", defaults={"path": ""})
def build_ssba(args: TriggerArgs) -> SSBATrigger:
  """ssba: ``trigger.ssba.path``, an encoder ``.npz`` written by ``launch/train_ssba.py``."""
  if not args.options["path"]:
    raise ConfigError("trigger kind 'ssba' needs trigger.ssba.path; allowed: an encoder .npz written by "
                      "launch/train_ssba.py")
  return load_ssba_trigger(args.options["path"], args.image_hw)
