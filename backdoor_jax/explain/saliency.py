"""One entry point for every explanation method a training loss or evaluation can use."""
from __future__ import annotations

from typing import Any, Callable

import jax

from backdoor_jax.errors import check_choice
from backdoor_jax.explain.gradcam import gradcam_maps
from backdoor_jax.explain.methods import gradcam_pp, simple_grad
from backdoor_jax.explain.vbp import visual_backprop

METHODS = ("gradcam", "gradcam_pp", "simple_grad", "vbp")


def explanation_maps(method: str, apply_fn: Callable, variables: Any, x: jax.Array,
                     targets: jax.Array | None, layer: str) -> jax.Array:
  """(B, H, W) input-size maps in [0, 1] of ``method``.

  ``layer`` is used by the Grad-CAM family; SimpleGrad explains the input and
  VisualBackProp uses every exposed spatial layer (neither uses ``targets``' layer).
  """
  check_choice("explanation method", method, METHODS)
  if method == "gradcam":
    return gradcam_maps(apply_fn, variables, x, targets, layer)
  if method == "gradcam_pp":
    return gradcam_pp(apply_fn, variables, x, targets, layer)[layer].maps
  if method == "simple_grad":
    return simple_grad(apply_fn, variables, x, targets).maps
  return visual_backprop(apply_fn, variables, x)
