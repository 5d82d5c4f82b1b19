"""Import torchvision ``state_dict`` files into the Flax zoo (imagenet stem).

Usage::

  result = import_torchvision("resnet50", "resnet50.pth", num_classes=37)
  logits = result.model.apply(result.variables, x, train=False)
  result.skipped   # torch keys left out (here fc.weight / fc.bias: a fresh 37-way head)

Files: ``.safetensors`` is read with the ``safetensors`` package (no torch needed);
``.pth`` / ``.pt`` / ``.bin`` need torch and are always opened with
``torch.load(..., weights_only=True)``, which refuses arbitrary pickled objects.

Every architecture has an explicit table (:func:`torch_mapping`) of
``(torch module path, flax module path, kind)`` rows with kind ``conv``, ``bn`` or
``linear``. The layout conversions live in :func:`_to_flax`:
  * conv ``weight`` (O, I, H, W) -> ``kernel`` (H, W, I, O); ``bias`` unchanged;
  * linear ``weight`` (O, I) -> ``kernel`` (I, O); ``bias`` unchanged (the zoo flattens
    conv maps in torch's (C, H, W) order, so no permutation of inputs is needed);
  * BatchNorm ``weight``/``bias`` -> params ``scale``/``bias``; ``running_mean``/
    ``running_var`` -> batch_stats ``mean``/``var``; ``num_batches_tracked`` is dropped.

Only the classifier head may differ from the file (another number of classes): it
then keeps its fresh initialisation and its keys are reported in ``skipped``; the
auxiliary heads of a GoogLeNet file are skipped when the model has none. Any other
missing, unexpected or mis-shaped key is a ConfigError naming the first few.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import numpy as np
import flax

from backdoor_jax.errors import ConfigError, check_choice
from backdoor_jax.models import get_model
from backdoor_jax.models.common import init_variables
from backdoor_jax.models.densenet import DENSENET_CONFIGS
from backdoor_jax.models.googlenet import INCEPTION_CONFIGS
from backdoor_jax.models.resnet import RESNET_CONFIGS
from backdoor_jax.models.vgg import VGG_CONFIGS

ARCHS: tuple[str, ...] = (
    *(f"resnet{d}" for d in RESNET_CONFIGS),
    *(f"vgg{d}{bn}" for d in VGG_CONFIGS for bn in ("", "_bn")),
    "alexnet", "googlenet", *(f"densenet{d}" for d in DENSENET_CONFIGS))
TORCH_SUFFIXES = (".pth", ".pt", ".bin")
SAFETENSORS_SUFFIX = ".safetensors"

_BN_LEAVES = {"weight": ("params", "scale"), "bias": ("params", "bias"),
              "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}
_MAX_LISTED = 5

Row = tuple[str, tuple[str, ...], str]  # (torch module path, flax module path, kind)


# --- the per-architecture tables ------------------------------------------------------------

def _flat(torch_path: str, kind: str) -> Row:
  """A row whose flax module is the torch path with ``_`` for ``.`` (top-level module)."""
  return torch_path, (torch_path.replace(".", "_"),), kind


def _resnet_rows(depth: int) -> list[Row]:
  kind, stages = RESNET_CONFIGS[depth]
  bottleneck = kind == "bottleneck"
  rows = [("conv1", ("conv1",), "conv"), ("bn1", ("bn1",), "bn")]
  for s, n_blocks in enumerate(stages, start=1):
    for b in range(n_blocks):
      t, f = f"layer{s}.{b}", f"layer{s}_{b}"
      for i in range(1, 4 if bottleneck else 3):
        rows += [(f"{t}.conv{i}", (f, f"conv{i}"), "conv"), (f"{t}.bn{i}", (f, f"bn{i}"), "bn")]
      if b == 0 and (bottleneck or s > 1):
        rows += [(f"{t}.downsample.0", (f, "downsample_conv"), "conv"),
                 (f"{t}.downsample.1", (f, "downsample_bn"), "bn")]
  return rows + [("fc", ("fc",), "linear")]


def _vgg_rows(depth: int, batch_norm: bool) -> list[Row]:
  rows, idx = [], 0
  for v in VGG_CONFIGS[depth]:
    if v == "M":
      idx += 1
      continue
    rows.append(_flat(f"features.{idx}", "conv"))
    if batch_norm:
      rows.append(_flat(f"features.{idx + 1}", "bn"))
    idx += 3 if batch_norm else 2
  return rows + [_flat(f"classifier.{i}", "linear") for i in (0, 3, 6)]


def _alexnet_rows() -> list[Row]:
  return ([_flat(f"features.{i}", "conv") for i in (0, 3, 6, 8, 10)]
          + [_flat(f"classifier.{i}", "linear") for i in (1, 4, 6)])


def _basic_conv(path: str) -> list[Row]:
  return [_flat(f"{path}.conv", "conv"), _flat(f"{path}.bn", "bn")]


def _googlenet_rows(aux_logits: bool) -> list[Row]:
  rows = _basic_conv("conv1") + _basic_conv("conv2") + _basic_conv("conv3")
  for block in INCEPTION_CONFIGS:
    for branch in ("branch1", "branch2.0", "branch2.1", "branch3.0", "branch3.1", "branch4.1"):
      rows += _basic_conv(f"{block}.{branch}")
  if aux_logits:
    for head in ("aux1", "aux2"):
      rows += _basic_conv(f"{head}.conv") + [_flat(f"{head}.fc1", "linear"),
                                              _flat(f"{head}.fc2", "linear")]
  return rows + [_flat("fc", "linear")]


def _densenet_rows(depth: int) -> list[Row]:
  _, blocks, _ = DENSENET_CONFIGS[depth]
  rows = [_flat("features.conv0", "conv"), _flat("features.norm0", "bn")]
  for b, n_layers in enumerate(blocks, start=1):
    for i in range(1, n_layers + 1):
      p = f"features.denseblock{b}.denselayer{i}"
      rows += [_flat(f"{p}.norm1", "bn"), _flat(f"{p}.conv1", "conv"),
               _flat(f"{p}.norm2", "bn"), _flat(f"{p}.conv2", "conv")]
    if b < len(blocks):
      rows += [_flat(f"features.transition{b}.norm", "bn"), _flat(f"features.transition{b}.conv", "conv")]
  return rows + [_flat("features.norm5", "bn"), _flat("classifier", "linear")]


def torch_mapping(arch: str, aux_logits: bool = False) -> list[Row]:
  """The explicit torchvision -> zoo table of ``arch``.

  Args:
    arch: one of :data:`ARCHS`.
    aux_logits: googlenet only: include the auxiliary heads.
  Returns:
    Rows ``(torch module path, flax module path, kind)`` in forward order.
  """
  check_choice("torchvision architecture", arch, ARCHS)
  if arch.startswith("resnet"):
    return _resnet_rows(int(arch[6:]))
  if arch.startswith("vgg"):
    return _vgg_rows(int(arch[3:5]), arch.endswith("_bn"))
  if arch == "alexnet":
    return _alexnet_rows()
  if arch == "googlenet":
    return _googlenet_rows(aux_logits)
  return _densenet_rows(int(arch[8:]))


def head_modules(arch: str) -> tuple[str, ...]:
  """Top-level flax modules of ``arch``'s classifier heads (the layers sized by num_classes)."""
  if arch.startswith("resnet"):
    return ("fc",)
  if arch.startswith("vgg"):
    return ("classifier_6", "classifier")  # imagenet / cifar stem.
  if arch == "alexnet":
    return ("classifier_6",)
  if arch == "googlenet":
    return ("fc", "aux1_fc2", "aux2_fc2")
  if arch.startswith("densenet"):
    return ("classifier",)
  return ()


def _head_torch_paths(arch: str) -> tuple[str, ...]:
  return {"alexnet": ("classifier.6",), "googlenet": ("fc", "aux1.fc2", "aux2.fc2")}.get(
      arch, ("classifier.6",) if arch.startswith("vgg") else
      ("classifier",) if arch.startswith("densenet") else ("fc",))


# --- layout conversions (the one place) -----------------------------------------------------

def _to_flax(kind: str, leaf: str, value: np.ndarray) -> tuple[str, str, np.ndarray]:
  """(collection, flax leaf name, array) of one torch tensor ``leaf`` of a ``kind`` module."""
  if kind == "bn":
    collection, name = _BN_LEAVES[leaf]
    return collection, name, value
  if leaf == "bias":
    return "params", "bias", value
  if kind == "conv":
    return "params", "kernel", np.transpose(value, (2, 3, 1, 0))  # OIHW -> HWIO
  return "params", "kernel", np.transpose(value, (1, 0))  # (out, in) -> (in, out)


def _torch_shape(kind: str, leaf: str, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
  """The torch shape whose conversion has ``flax_shape`` (inverse of :func:`_to_flax`)."""
  if kind == "bn" or leaf == "bias":
    return flax_shape
  if kind == "conv":
    h, w, i, o = flax_shape
    return (o, i, h, w)
  return (flax_shape[1], flax_shape[0])


def expected_keys(arch: str, variables: dict[str, Any],
                  aux_logits: bool = False) -> dict[str, tuple[tuple[str, ...], str, tuple[int, ...]]]:
  """torch key -> (flax variable path, kind, torch shape) for ``variables`` of ``arch``.

  ``num_batches_tracked`` keys map to an empty path (expected in a file, not imported).
  """
  flat = flax.traverse_util.flatten_dict(variables)
  out = {}
  for torch_path, module, kind in torch_mapping(arch, aux_logits):
    leaves = ("weight", "bias", "running_mean", "running_var") if kind == "bn" else ("weight", "bias")
    for leaf in leaves:
      collection, name = _BN_LEAVES[leaf] if kind == "bn" else (
          "params", "bias" if leaf == "bias" else "kernel")
      path = (collection, *module, name)
      if path not in flat:
        if leaf == "bias" and kind != "bn":
          continue  # bias-free conv
        raise ConfigError(f"internal: {arch} table names {path} which the model lacks")
      out[f"{torch_path}.{leaf}"] = (path, kind, _torch_shape(kind, leaf, tuple(flat[path].shape)))
    if kind == "bn":
      out[f"{torch_path}.num_batches_tracked"] = ((), kind, ())
  return out


# --- reading files --------------------------------------------------------------------------

def _unwrap(obj: Any, path: str) -> dict[str, Any]:
  """The flat name -> tensor dict inside a loaded file (``state_dict``/``model`` wrappers
  and DataParallel's ``module.`` prefix removed)."""
  for _ in range(2):
    if isinstance(obj, dict) and len(obj) <= 4:
      inner = [obj[k] for k in ("state_dict", "model", "model_state_dict") if isinstance(obj.get(k), dict)]
      if inner:
        obj = inner[0]
  if not isinstance(obj, dict) or not obj:
    raise ConfigError(f"{path} does not hold a state_dict (a dict of tensors); got {type(obj).__name__}")
  if all(isinstance(k, str) and k.startswith("module.") for k in obj):
    obj = {k[len("module."):]: v for k, v in obj.items()}
  return obj


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads a state_dict file as float32 numpy arrays (integer buffers kept as they are).

  Raises:
    ConfigError: missing file, unknown suffix, torch absent for a torch file, or a file
      that ``torch.load(weights_only=True)`` refuses.
  """
  path = os.path.expanduser(os.fspath(path))
  if not os.path.isfile(path):
    raise ConfigError(f"weight file {path!r} does not exist")
  lower = path.lower()
  if lower.endswith(SAFETENSORS_SUFFIX):
    try:
      from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise ConfigError(f"reading {path} needs the safetensors package (pip install safetensors)") from None
    try:
      raw = load_file(path)
    except Exception as e:  # safetensors raises its own error types for bad headers
      raise ConfigError(f"{path} is not a readable .safetensors file ({type(e).__name__}: {e})") from None
  elif lower.endswith(TORCH_SUFFIXES):
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise ConfigError(f"reading {path} needs torch; install torch, or convert the file to "
                        ".safetensors where torch is installed") from None
    try:
      obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle.UnpicklingError for anything beyond tensors and containers
      first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
      raise ConfigError(f"{path} cannot be read with torch.load(weights_only=True) "
                        f"({type(e).__name__}: {first}); only plain state_dict files are accepted") from None
    raw = {}
    for k, v in _unwrap(obj, path).items():
      if not isinstance(v, torch.Tensor):
        raise ConfigError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor; "
                          "save model.state_dict() itself")
      v = v.detach().cpu()
      raw[k] = v.numpy() if not v.is_floating_point() else v.float().numpy()
  else:
    raise ConfigError(f"weight file {path!r} has an unknown suffix; allowed: "
                      f"{', '.join(TORCH_SUFFIXES + (SAFETENSORS_SUFFIX,))}")
  raw = _unwrap(raw, path)
  return {k: (np.asarray(v, np.float32) if np.issubdtype(np.asarray(v).dtype, np.floating) else np.asarray(v))
          for k, v in raw.items()}


# --- conversion -----------------------------------------------------------------------------

def convert_state_dict(arch: str, state_dict: dict[str, np.ndarray], variables: dict[str, Any],
                       aux_logits: bool = False) -> tuple[dict[str, Any], list[str]]:
  """Fills ``variables`` (an initialised zoo model of ``arch``) from a torchvision state_dict.

  Args:
    arch: one of :data:`ARCHS`.
    state_dict: torch key -> numpy array.
    variables: ``{'params': ..., 'batch_stats': ...}`` of the target model (imagenet stem),
      concrete or abstract (``jax.eval_shape``); its shapes are the reference, and the
      leaves not imported (a head of another size) are returned as they are.
    aux_logits: googlenet only: whether the target model has auxiliary heads.
  Returns:
    (variables with every imported leaf a numpy float32 array, sorted torch keys that
    were not imported).
  Raises:
    ConfigError: keys or shapes that do not match ``arch``, with the first few listed.
  """
  expected = expected_keys(arch, variables, aux_logits)
  heads = _head_torch_paths(arch)
  is_head = lambda key: key.rsplit(".", 1)[0] in heads
  optional_prefixes = ("aux1.", "aux2.") if arch == "googlenet" and not aux_logits else ()

  missing = [k for k in expected if k not in state_dict and not k.endswith("num_batches_tracked")]
  unexpected = [k for k in state_dict if k not in expected and not k.startswith(optional_prefixes)]
  wrong = []
  head_skipped = []
  for key, (path, _, shape) in expected.items():
    if key not in state_dict or not path:
      continue
    got = tuple(np.shape(state_dict[key]))
    if got != shape:
      (head_skipped if is_head(key) else wrong).append(f"{key} {got} (model {shape})")
  if missing or unexpected or wrong:
    parts = []
    for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
      if keys:
        more = f" and {len(keys) - _MAX_LISTED} more" if len(keys) > _MAX_LISTED else ""
        parts.append(f"{len(keys)} {what}: {', '.join(keys[:_MAX_LISTED])}{more}")
    raise ConfigError(f"state_dict does not match torchvision {arch}: " + "; ".join(parts))

  flat = dict(flax.traverse_util.flatten_dict(variables))
  skipped = [k for k in state_dict if k.startswith(optional_prefixes)]
  head_modules_skipped = {h.split(" ")[0].rsplit(".", 1)[0] for h in head_skipped}
  for key, (path, kind, _) in expected.items():
    module = key.rsplit(".", 1)[0]
    if not path or key not in state_dict:
      continue
    if module in head_modules_skipped:
      skipped.append(key)
      continue
    collection, leaf_name, value = _to_flax(kind, key.rsplit(".", 1)[1], state_dict[key])
    assert path == (collection, *path[1:-1], leaf_name), (key, path)
    flat[path] = np.ascontiguousarray(value, np.float32)
  return flax.traverse_util.unflatten_dict(flat), sorted(skipped)


@dataclasses.dataclass
class ImportResult:
  """A zoo model with imported weights."""
  arch: str
  model: Any                    # flax module (imagenet stem)
  variables: dict[str, Any]     # params + batch_stats (numpy float32)
  num_classes: int
  skipped: list[str]            # torch keys not imported (fresh head, absent aux heads)
  file_num_classes: int | None  # the file's head size, when it has one


def file_num_classes(arch: str, state_dict: dict[str, np.ndarray]) -> int | None:
  """The number of classes of the file's main head (None when the key is absent)."""
  w = state_dict.get(f"{_head_torch_paths(arch)[0]}.weight")
  return int(w.shape[0]) if w is not None and np.ndim(w) == 2 else None


def import_torchvision(arch: str, path: str, *, num_classes: int | None = None, seed: int = 0,
                       **model_options: Any) -> ImportResult:
  """Builds zoo model ``arch`` (imagenet stem) and loads a torchvision weight file into it.

  Args:
    arch: one of :data:`ARCHS`.
    path: ``.pth``/``.pt``/``.bin`` (torch needed) or ``.safetensors`` state_dict file.
    num_classes: logits of the new model; None: the file's head size. When it differs
      from the file, the head is freshly initialised (from ``seed``) and reported.
    seed: PRNG seed of the initialisation of anything not imported.
    **model_options: zoo options (e.g. ``aux_logits``, ``transform_input`` for googlenet).
  Returns:
    An :class:`ImportResult`.
  Raises:
    ConfigError: unknown arch, unreadable file, or keys / shapes that do not match.
  """
  check_choice("torchvision architecture", arch, ARCHS)
  state_dict = load_state_dict(path)
  from_file = file_num_classes(arch, state_dict)
  n = int(num_classes or from_file or 1000)
  model = get_model(arch, n, stem="imagenet", **model_options)
  init = lambda k: init_variables(model, k, (1, 64, 64, 3))
  key = jax.random.key(seed)
  variables, skipped = convert_state_dict(arch, state_dict, jax.eval_shape(init, key),
                                          aux_logits=bool(model_options.get("aux_logits", False)))
  flat = flax.traverse_util.flatten_dict(variables)
  fresh = [p for p, v in flat.items() if isinstance(v, jax.ShapeDtypeStruct)]
  if fresh:  # initialise the model only when something (a new head) is not in the file
    real = flax.traverse_util.flatten_dict(jax.device_get(jax.jit(init)(key)))
    variables = flax.traverse_util.unflatten_dict({**flat, **{p: np.asarray(real[p]) for p in fresh}})
  return ImportResult(arch, model, variables, n, skipped, from_file)
