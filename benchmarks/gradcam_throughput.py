r"""Workload: Grad-CAM maps per second, this project's jitted JAX Grad-CAM against PyTorch hooks.

Flag-free (``python -m benchmarks suite --workloads=gradcam_layer4,gradcam_all`` prints
the table). Rows, per model:

  1. JAX: ``backdoor_jax.explain.gradcam(apply_fn, variables, x, targets, 'layer4')``
     under ``jax.jit`` (one layer), or at ``[stem, layer1, ..., layer4]``: five maps in one
     forward and one backward pass; float32 or bfloat16 compute;
  2. PyTorch: forward hooks keep the activations and one ``torch.autograd.grad`` of the
     summed per-sample target logits gives dScore/dA (``common.torch_gradcam``), with the
     same map post-processing (ReLU of the gradient-weighted channel sum, bilinear
     resize, per-image min-max), eager or under ``torch.compile``.

Known-answer check (``Job.check``; ``suite --check``): the JAX worker saves its weights
(random, with random BatchNorm statistics) and its float64 maps of the first
``check_batch`` images at all five layers; the PyTorch worker loads the weights into the
twin from ``backdoor_jax.models.torch_reference``, computes the same maps in float64 and
reports the largest absolute difference per layer (:func:`check_line`).

Methodology: ``warmup`` untimed calls (compilation included), then ``steps`` timed
calls, each blocked on; inputs are random uint8 images normalised once outside the timed
region; targets are random class ids. PyTorch runs with frozen parameters, so its
backward stops at the lowest requested activation, as JAX's does.
"""
from __future__ import annotations

import copy
import dataclasses
import os
from typing import Any

from benchmarks import common

@dataclasses.dataclass
class Job:
  """One worker: one framework, one model.

  Attributes:
    framework: ``'jax'`` or ``'torch'``.
    model: zoo ResNet name.
    batch: images per call.
    size: input side in pixels.
    steps: timed calls per row.
    warmup: untimed calls per row.
    check_batch: images of the map check.
    seed: weights and data seed.
    workdir: folder where the JAX worker leaves weights and check maps for PyTorch.
    dtype: JAX computation dtype, ``'float32'`` or ``'bfloat16'`` (parameters stay
      float32); PyTorch runs float32 only.
    compile: PyTorch only: run the network under ``torch.compile``.
    methods: which rows to time, from ``'layer4'`` and ``'all'`` (all five layers).
    check: run the float64 known-answer check (JAX saves its maps, PyTorch compares).
  """
  framework: str
  model: str
  batch: int
  size: int
  steps: int
  warmup: int
  check_batch: int
  seed: int
  workdir: str
  dtype: str = "float32"
  compile: bool = False
  methods: tuple[str, ...] = ("layer4", "all")
  check: bool = True


_METHOD_LAYERS = {"layer4": ("layer4",), "all": common.CAM_LAYERS}


def _inputs(job: Job) -> tuple[Any, Any]:
  """Normalised float32 NHWC images and int32 targets shared by both workers."""
  stem = common.model_stem(job.model)
  images, targets = common.synthetic_uint8(job.batch, job.size, common.num_classes(job.model), job.seed)
  return common.normalize_np(images, *common.dataset_stats(stem)), targets


def run_jax(job: Job) -> dict[str, Any]:
  """Times JAX Grad-CAM at layer4 and at all five layers; saves weights and check maps."""
  import jax
  import numpy as np

  from backdoor_jax.explain.gradcam import gradcam

  model, variables = common.init_flax_resnet(job.model, common.num_classes(job.model),
                                             common.model_stem(job.model), job.size, job.seed)
  if job.dtype == "bfloat16":  # computation in bfloat16, parameters stay float32
    model = model.clone(dtype=jax.numpy.bfloat16)
  elif job.dtype != "float32":
    raise ValueError(f"dtype must be float32 or bfloat16, not {job.dtype!r}")
  x_np, t_np = _inputs(job)

  def maps_fn(layers: tuple[str, ...]):
    def fn(v, x, t):
      return {n: r.maps for n, r in gradcam(model.apply, v, x, t, list(layers)).items()}
    return jax.jit(fn)

  cb = min(job.check_batch, job.batch)
  check = {}
  if job.check:
    with jax.enable_x64(True):  # the check runs in float64 on both sides (see run_torch)
      f64 = lambda a: jax.numpy.asarray(a, jax.numpy.float64)  # noqa: E731
      model64 = model.clone(dtype=jax.numpy.float64)
      check = jax.jit(lambda v, x, t: {n: r.maps for n, r in gradcam(model64.apply, v, x, t,
                                                                     list(common.CAM_LAYERS)).items()})(
          jax.tree.map(f64, variables), f64(x_np[:cb]), t_np[:cb])
      check = {f"maps/{k}": np.asarray(v) for k, v in check.items()}
  np.savez(os.path.join(job.workdir, f"{job.model}.npz"), **common.flatten_variables(variables), **check)

  x, t = jax.device_put(x_np), jax.device_put(t_np)
  rows = {}
  for method in job.methods:
    fn = maps_fn(_METHOD_LAYERS[method])
    rows[method] = common.time_steps(lambda: jax.block_until_ready(fn(variables, x, t)),
                                     job.warmup, job.steps)
    rows[method]["flops"] = common.xla_flops(fn, variables, x, t)  # cached executable: no recompilation
  return {"rows": rows, "device": common.jax_device_info(), "memory": common.jax_memory()}


def run_torch(job: Job) -> dict[str, Any]:
  """Checks PyTorch maps against the JAX worker's (``job.check``), then times hook-based Grad-CAM."""
  import numpy as np
  import torch

  device, description, cuda = common.torch_setup(job.dtype)
  saved = dict(np.load(os.path.join(job.workdir, f"{job.model}.npz")))
  net = common.torch_twin(job.model, {k: v for k, v in saved.items() if not k.startswith("maps/")})
  net = net.to(device).eval().requires_grad_(False)
  x_np, t_np = _inputs(job)
  x = torch.from_numpy(x_np).permute(0, 3, 1, 2).contiguous().to(device)
  t = torch.from_numpy(t_np).long().to(device)
  check = _torch_check(job, net, x, t, saved) if job.check else None
  if job.compile:
    # The hooks of torch_gradcam land on the original submodules (the compiled wrapper
    # forwards attribute access to them); dynamo traces them, breaking the graph there.
    net = torch.compile(net)

  def call(layers: tuple[str, ...]) -> None:
    common.torch_gradcam(net, x, t, layers)
    if cuda:
      torch.cuda.synchronize()

  rows = {}
  for method in job.methods:
    rows[method] = common.time_steps(lambda: call(_METHOD_LAYERS[method]), job.warmup, job.steps)
  result = {"rows": rows, "device": description, "memory": common.torch_memory()}
  if check is not None:
    result["check"] = check
  return result


def _torch_check(job: Job, net: Any, x: Any, t: Any, saved: dict[str, Any]) -> dict[str, Any]:
  """Per-layer max |PyTorch - JAX| of the float64 maps of the first ``check_batch`` images."""
  import numpy as np

  cb = min(job.check_batch, job.batch)
  # Both sides compute the check in float64: in float32, a map built from small,
  # cancelling terms (ResNet-50's stem map of one image: raw max 0.485 vs 0.488 in
  # float64) differs by ~1e-2 after min-max normalisation in either framework.
  net64 = copy.deepcopy(net).double()
  _, maps = common.torch_gradcam(net64, x[:cb].double(), t[:cb], common.CAM_LAYERS)
  del net64
  check = {}
  for name in common.CAM_LAYERS:
    ours = maps[name].detach().cpu().numpy()
    ref = saved[f"maps/{name}"]
    # A map whose raw values are 0 everywhere (ReLU of a negative sum) stays 0 after
    # normalisation; count only images where both maps reach their [0, 1] range.
    ref_live, ours_live = ref.max(axis=(1, 2)) > 0.5, ours.max(axis=(1, 2)) > 0.5
    live = ref_live & ours_live
    diff = np.abs(ours - ref)[live]
    worst = float(diff.max()) if diff.size else 0.0
    if np.any(ref_live != ours_live):  # all-zero in one framework only: a real disagreement
      worst = max(worst, 1.0)
    check[name] = {"max_abs_diff": worst,
                   "compared": int(live.sum()), "count": int(ref.shape[0])}
  return check


def check_line(model: str, check_batch: int, torch_res: dict[str, Any]) -> str:
  """One header line with the per-layer max |JAX - PyTorch| of the normalised maps."""
  if "check" not in torch_res:
    return f"- Grad-CAM check {model}: n/a ({torch_res.get('error', 'no PyTorch result')})"
  c = torch_res["check"]
  worst = max(v["max_abs_diff"] for v in c.values())
  verdict = "agree" if worst <= 1e-9 else "DIFFER (above 1e-9)"
  per_layer = ", ".join(f"{k} {v['max_abs_diff']:.1e}" for k, v in c.items())
  compared = ", ".join(f"{k} {v['compared']}/{v['count']}" for k, v in c.items())
  return (f"- Grad-CAM known-answer check {model} ({check_batch} images, JAX weights "
          f"copied into PyTorch, both in float64): max abs "
          f"diff of the [0, 1] maps = {worst:.1e} (maps {verdict}); per layer: {per_layer}; images "
          f"compared (both maps not all-zero): {compared}")
