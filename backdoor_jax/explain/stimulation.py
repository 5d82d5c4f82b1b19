"""Feature-map stimulation: edit chosen channels of one layer, finish the forward pass, explain it.

"Run the model to layer L, replace A_L by A'_L, continue from L" is done without splitting
the model, through the zero perturbation every zoo model adds at its exposed layers
(``models/common.py``): a first forward pass gives A = A_L, and a second pass is run with
the perturbation A' - A at L, so the model sees A + (A' - A) = A' there. Grad-CAM of
that stimulated pass needs dScore/dA at the CAM layer *with the stimulation present*,
hence ``activations_and_gradients_with``: ``core.activations_and_gradients`` plus
fixed (not differentiated) perturbations.

Exactness: for untouched channels and for ``scale`` with value 1 the perturbation is
exactly 0, and nulled/zeroed values are A - A = 0 exactly, so those passes reproduce
the plain model bit for bit; replacing with a value v gives A + (v - A), v up to one
rounding.

Gradients (with respect to parameters, images and an array ``value``): the first-pass A
is *not* stopped, so the edited activation A_2 + (A'(A_1) - A_1), with A_1 == A_2 the
same function of the parameters, has derivative dA'/dtheta: exactly the derivative of
the stimulated network (s dA/dtheta for scaled channels, 0 for replaced or nulled
values, dA/dtheta elsewhere). Inside the pass, the Grad-CAM gradient dScore/dA_cam is
exact for CAM layers at or after L; for a CAM layer before L the perturbation would act
as a fixed offset (back-propagating through replaced channels as if unedited), so such
layers are refused.
"""
from __future__ import annotations

from typing import Any, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

from backdoor_jax.errors import ConfigError, check_choice
from backdoor_jax.explain import core
from backdoor_jax.explain.gradcam import cam_from, finish
from backdoor_jax.explain import layers as layers_lib
from backdoor_jax.explain.methods import check_channels
from backdoor_jax.models.common import INTERMEDIATES, PERTURBATIONS

MODES = ("scale", "replace")


def activations_and_gradients_with(apply_fn: core.ApplyFn, variables: Any, images: jax.Array,
                                   targets: jax.Array | None, layers: Sequence[str],
                                   shapes: dict[str, tuple[int, ...]], fixed: dict[str, jax.Array],
                                   read: Sequence[str] = ()) -> dict[str, Any]:
  """``core.activations_and_gradients`` on a pass with extra fixed perturbations.

  Args:
    apply_fn: ``model.apply``.
    variables: model variables.
    images: (B, H, W, C) inputs.
    targets: (B,) class ids, or None for each sample's predicted class *in this pass*.
    layers: layers whose A and dScore/dA are wanted.
    shapes: activation shapes (``layers.layer_info(...).shapes``).
    fixed: layer -> array added to that activation (full activation shape). Not
      differentiated by the inner gradient; outer transformations see it normally.
    read: further layers whose (perturbed) activations are returned.
  Returns:
    dict with ``logits``, ``targets``, ``activations`` (layers + read, as the model saw
    them, i.e. including the fixed perturbations) and ``gradients`` (layers).
  """
  chex.assert_rank(images, 4)
  base = layers_lib.plain_variables(variables)
  zeros = {n: jnp.zeros(shapes[n], images.dtype) for n in layers}
  wanted = list(dict.fromkeys(list(layers) + list(read)))

  def score(z):
    pert = dict(fixed)
    for n, v in z.items():
      pert[n] = pert[n] + v if n in pert else v
    logits, state = apply_fn({**base, PERTURBATIONS: pert}, images, train=False, mutable=[INTERMEDIATES])
    s, t = core.select_scores(logits, targets)
    return jnp.sum(s), (logits, t, {n: state[INTERMEDIATES][n][0] for n in wanted})

  grads, (logits, t, acts) = jax.grad(score, has_aux=True)(zeros)
  return {"logits": logits, "targets": t, "activations": acts, "gradients": grads}


def _region_mask(region: Any, batch: int, h: int, w: int) -> jax.Array | None:
  """None, a (top, left, bottom, right) box or a bool (h, w) / (B, h, w) mask -> (B|1, h, w) bool."""
  if region is None:
    return None
  if isinstance(region, (tuple, list)) and np.ndim(region) == 1:
    if len(region) != 4 or not all(isinstance(v, (int, np.integer)) for v in region):
      raise ConfigError(f"region box must be 4 ints (top, left, bottom, right); got {region!r}")
    top, left, bottom, right = (int(v) for v in region)
    if not (0 <= top < bottom <= h and 0 <= left < right <= w):
      raise ConfigError(f"region box {tuple(region)} must satisfy 0 <= top < bottom <= {h} and "
                        f"0 <= left < right <= {w} (layer resolution)")
    m = np.zeros((1, h, w), bool)
    m[:, top:bottom, left:right] = True
    return jnp.asarray(m)
  shape = tuple(np.shape(region))
  if shape not in ((h, w), (batch, h, w)):
    raise ConfigError(f"region mask must have shape ({h}, {w}) or ({batch}, {h}, {w}) (layer "
                      f"resolution); got {shape}")
  dtype = region.dtype if hasattr(region, "dtype") else np.asarray(region).dtype
  if dtype != jnp.bool_:
    raise ConfigError(f"region mask must be boolean; got dtype {dtype}")
  m = jnp.asarray(region)
  return m[None] if m.ndim == 2 else m


def _cam_layers(info: layers_lib.LayerInfo, layer: str, cam_layer: str | Sequence[str] | None) -> list[str]:
  """CAM layers (default: the stimulated one; ``'all'``: every spatial layer from it on)."""
  start = info.order.index(layer)
  after = [n for n in info.spatial if info.order.index(n) >= start]
  if cam_layer is None:
    return [layer]
  if cam_layer == "all":
    return after
  names = layers_lib.resolve_layers(info, cam_layer, "Grad-CAM")
  for n in names:
    if n not in after:
      raise ConfigError(f"cam_layer {n!r} runs before the stimulated layer {layer!r}; "
                        f"allowed: {', '.join(after)}")
  return names


def stimulate(apply_fn: core.ApplyFn, variables: Any, images: jax.Array, layer: str,
              channels: int | Sequence[int], *, mode: str = "scale", value: float | jax.Array,
              region: Any = None, targets: jax.Array | None = None,
              cam_layer: str | Sequence[str] | None = None, eps: float = 1e-8) -> dict[str, Any]:
  """Stimulates feature maps of ``layer`` and explains the resulting forward pass.

  For each chosen channel k: ``scale`` sets A'_k = value * A_k, ``replace`` sets
  A'_k = value; with a ``region`` this happens only inside it and the rest of channel k
  is set to 0. Other channels are untouched.

  Args:
    apply_fn: ``model.apply`` of a zoo model.
    variables: model variables; BatchNorm in inference mode.
    images: (B, H, W, C) normalised float inputs.
    layer: the spatial layer L to edit.
    channels: a channel index, a list of distinct indices of L, or None (all channels).
    mode: ``'scale'`` or ``'replace'``.
    value: scale factor or replacement value: a scalar, or an array broadcastable to
      (B, h, w, len(channels)) (e.g. (len(channels),) for one value per channel).
    region: None (whole channels), a box ``(top, left, bottom, right)`` (half-open, in
      L's resolution), or a bool mask of shape (h, w) or (B, h, w) at L's resolution.
    targets: (B,) class ids, or None for each sample's predicted class under stimulation.
    cam_layer: Grad-CAM layer(s) of the stimulated pass: None (= ``layer``), a name or a
      list of names at or after ``layer`` in forward order, or ``'all'`` (every spatial
      layer from ``layer`` on).
    eps: Grad-CAM normalisation epsilon.
  Returns:
    dict with ``logits`` (B, classes) of the stimulated pass, ``targets`` (B,) the
    explained classes, ``cams`` (layer -> CamResult, as ``gradcam``; forward order when
    called eagerly, key-sorted through ``jax.jit``) and ``activation`` (B, h, w, K): A'
    at L as the model saw it.
  Raises:
    ConfigError: unknown layer, channel out of range or repeated, bad mode, value
      shape, region, cam_layer before ``layer``, images or targets.
  """
  check_choice("stimulation mode", mode, MODES)
  info = core.check_inputs(apply_fn, variables, images, targets)
  if not isinstance(layer, str):
    raise ConfigError(f"stimulate takes one layer name; got {layer!r}")
  (name,) = layers_lib.resolve_layers(info, layer, "stimulation")
  b, h, w, k = info.shapes[name]
  chans = check_channels(channels, k, name)
  cams = _cam_layers(info, name, cam_layer)
  mask = _region_mask(region, b, h, w)
  value = jnp.asarray(value)
  try:
    np.broadcast_shapes(value.shape, (b, h, w, len(chans)))
  except ValueError:
    raise ConfigError(f"value of shape {value.shape} does not broadcast to (B, h, w, channels) = "
                      f"{(b, h, w, len(chans))}") from None

  _, state = apply_fn(layers_lib.plain_variables(variables), images, train=False, mutable=[INTERMEDIATES])
  a = state[INTERMEDIATES][name][0]  # carries gradients on purpose (see module docstring)
  idx = jnp.asarray(chans, jnp.int32)
  sel = jnp.take(a, idx, axis=-1)
  new = value * sel if mode == "scale" else jnp.broadcast_to(value, sel.shape)
  if mask is not None:
    new = jnp.where(mask[..., None], new, 0)
  edited = a.at[..., idx].set(new.astype(a.dtype))
  out = activations_and_gradients_with(apply_fn, variables, images, targets, cams, info.shapes,
                                       {name: edited - a}, read=[name])
  size = images.shape[1:3]
  return {
      "logits": out["logits"],
      "targets": out["targets"],
      "cams": {n: finish(cam_from(out["activations"][n], out["gradients"][n]), size, eps) for n in cams},
      "activation": out["activations"][name],
  }

