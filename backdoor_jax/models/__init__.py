"""Model zoo: registry of Flax Linen classifiers that follow ``common``'s conventions.

Usage::

  model = get_model("resnet18", num_classes=10, stem="cifar")
  variables = init_variables(model, rng, (1, 32, 32, 3))
  logits = model.apply(variables, x, train=False)

Every model casts its input to ``dtype`` (computation dtype; params stay float32)
and returns float32 logits. ``layer_names(name)[-1]`` is always the (B, D) feature
fed to the final Dense layer.
"""
from __future__ import annotations

from typing import Any, Callable

import jax.numpy as jnp
import flax.linen as nn

from backdoor_jax.errors import ConfigError, check_choice
from backdoor_jax.models.alexnet import AlexNet
from backdoor_jax.models.common import count_params, expose, init_variables
from backdoor_jax.models.densenet import DenseNet
from backdoor_jax.models.googlenet import GoogLeNet
from backdoor_jax.models.resnet import PreActResNet18, ResNet
from backdoor_jax.models.small_cnn import SmallCNN
from backdoor_jax.models.vgg import STEMS, VGG, adaptive_avg_pool

# name -> (builder(num_classes, stem, dtype, **options), stems allowed, option names).
_Entry = tuple[Callable[..., nn.Module], tuple[str, ...], tuple[str, ...]]
_REGISTRY: dict[str, _Entry] = {
    "small_cnn": (lambda c, s, d, **kw: SmallCNN(c, dtype=d, **kw), ("cifar",),
                  ("widths", "pool_after")),
    "preact_resnet18": (lambda c, s, d, **kw: PreActResNet18(c, dtype=d, **kw), ("cifar",),
                        ("final_norm",)),
}
for _depth in (18, 34, 50, 101, 152):
  _REGISTRY[f"resnet{_depth}"] = (
      lambda c, s, d, _k=_depth, **kw: ResNet(_k, c, s, d, **kw), STEMS, ())
for _depth in (11, 13, 16, 19):
  for _bn in (False, True):
    _REGISTRY[f"vgg{_depth}" + ("_bn" if _bn else "")] = (
        lambda c, s, d, _k=_depth, _b=_bn, **kw: VGG(_k, c, _b, s, dtype=d, **kw), STEMS,
        ("dropout_rate",))
_REGISTRY["alexnet"] = (lambda c, s, d, **kw: AlexNet(c, s, dtype=d, **kw), STEMS,
                        ("dropout_rate",))
_REGISTRY["googlenet"] = (lambda c, s, d, **kw: GoogLeNet(c, s, dtype=d, **kw), STEMS,
                          ("aux_logits", "transform_input", "dropout_rate"))
for _depth in (121, 161):
  _REGISTRY[f"densenet{_depth}"] = (
      lambda c, s, d, _k=_depth, **kw: DenseNet(_k, c, s, d, **kw), STEMS, ())

MODEL_NAMES: tuple[str, ...] = tuple(_REGISTRY)


def _normalise_options(name: str, allowed: tuple[str, ...],
                       kwargs: dict[str, Any]) -> dict[str, Any]:
  """Checks option names and turns list-valued options into tuples (hashable)."""
  out = {}
  for key, value in kwargs.items():
    if key not in allowed:
      raise ConfigError(f"unknown option {key!r} for model {name!r}; allowed: "
                        f"{', '.join(allowed) or '(none)'}")
    out[key] = tuple(value) if isinstance(value, list) else value
  if name == "small_cnn":
    widths = out.get("widths", SmallCNN.widths)
    if not widths or any(int(w) <= 0 for w in widths):
      raise ConfigError(f"small_cnn widths must be non-empty positive ints, got {widths!r}")
    bad = [i for i in out.get("pool_after", ()) if not 1 <= i <= len(widths)]
    if bad:
      raise ConfigError(f"small_cnn pool_after {bad!r} out of range 1..{len(widths)}")
  return out


def get_model(name: str, num_classes: int, *, stem: str = "cifar", dtype: Any = jnp.float32,
              **kwargs: Any) -> nn.Module:
  """Builds a zoo model.

  Args:
    name: one of ``MODEL_NAMES``.
    num_classes: number of logits.
    stem: ``'cifar'`` (32x32 inputs) or ``'imagenet'`` (torchvision layout);
      ``small_cnn`` and ``preact_resnet18`` accept only ``'cifar'``.
    dtype: computation dtype (e.g. ``jnp.bfloat16``); params stay float32.
    **kwargs: model options: ``widths``, ``pool_after`` (small_cnn), ``final_norm``
      (preact_resnet18), ``dropout_rate`` (vgg*, alexnet, googlenet),
      ``aux_logits``, ``transform_input`` (googlenet).
  Returns:
    An unbound Flax module with a ``layer_names`` attribute.
  Raises:
    ConfigError: unknown name, stem or option.
  """
  check_choice("model", name, MODEL_NAMES)
  check_choice("stem", stem, STEMS)
  build, stems, options = _REGISTRY[name]
  if stem not in stems:
    raise ConfigError(
        f"model {name!r} does not support stem {stem!r}; allowed: {', '.join(stems)}")
  if int(num_classes) < 1:
    raise ConfigError(f"num_classes must be >= 1, got {num_classes!r}")
  return build(int(num_classes), stem, dtype, **_normalise_options(name, options, kwargs))


def layer_names(name: str, **kwargs: Any) -> tuple[str, ...]:
  """Exposed layer names of model ``name`` in forward order (kwargs as in ``get_model``)."""
  return tuple(get_model(name, 10, **kwargs).layer_names)


__all__ = [
    "MODEL_NAMES", "STEMS", "get_model", "layer_names", "expose", "init_variables",
    "count_params", "adaptive_avg_pool", "AlexNet", "DenseNet", "GoogLeNet", "PreActResNet18", "ResNet",
    "SmallCNN", "VGG",
]
