r"""Grad-CAM throughput: this project's jitted JAX Grad-CAM against PyTorch hooks.

For each model (default: ResNet-18 with the CIFAR stem at 32x32, batch 256, and
ResNet-50 with the ImageNet stem at 224x224, batch 32) it measures, in the same run
and on the same device, images explained per second by

  1. JAX: ``backdoor_jax.explain.gradcam(apply_fn, variables, x, targets, 'layer4')``
     under ``jax.jit`` (one layer);
  2. JAX: the same call with ``layers=[stem, layer1, layer2, layer3, layer4]``: five
     maps in one forward and one backward pass;
  3. PyTorch: forward hooks keep the activations and one ``torch.autograd.grad`` of the
     summed per-sample target logits gives dScore/dA (``common.torch_gradcam``), at
     layer4 and at all five layers, with the same map post-processing (ReLU of the
     gradient-weighted channel sum, bilinear resize, per-image min-max).

Before timing, a known-answer check: the JAX worker saves its weights (random, with
random BatchNorm statistics) and its maps of the first ``--check_batch`` images at all
five layers, computed in float64; the PyTorch worker loads the weights
into its own ResNet (conv HWIO -> OIHW, dense (in, out) -> (out, in), BatchNorm
scale/bias/mean/var, eval mode), computes the same maps in float64 and reports the
largest absolute difference per layer in the header.

Usage::

  python benchmarks/gradcam_throughput.py                      # GPU-sized defaults
  python benchmarks/gradcam_throughput.py --batch=64,8 --size=32,112 --steps=5 --warmup=2

Methodology: one subprocess per framework and model (so the frameworks' thread pools
and allocators never share a process); ``--warmup`` untimed calls (compilation
included), then ``--steps`` timed calls, each blocked on (``jax.block_until_ready``;
``torch.cuda.synchronize()`` on a GPU); the median call time is reported and
images/s = batch / median. Inputs are random uint8 images normalised once outside the
timed region; targets are random class ids, one per image. PyTorch runs with frozen
parameters (``requires_grad=False``), so its backward stops at the lowest requested
activation, as JAX's does. On a GPU both frameworks run float32 convolutions with their
defaults (TF32 allowed in both); only the check runs in float64.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import shutil
import sys
import tempfile
import time
from typing import Any

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  pylint: disable=wrong-import-position

_DEFAULT_BATCH = {"resnet18": 256, "resnet50": 32}
_DEFAULT_SIZE = {"resnet18": 32, "resnet50": 224}

_MODELS = flags.DEFINE_list("models", ["resnet18", "resnet50"],
                            "ResNets to measure (resnet18/34 use the CIFAR stem and 10 classes, "
                            "resnet50/101/152 the ImageNet stem and 1000 classes).")
_BATCH = flags.DEFINE_list("batch", [], "Batch size per model (one value for all, or one per "
                           "--models entry); empty: 256 for resnet18, 32 for resnet50.")
_SIZE = flags.DEFINE_list("size", [], "Input side per model (one value or one per model); empty: "
                          "32 for CIFAR-stem models, 224 for ImageNet-stem ones.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed calls per row.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed calls first (compilation included), >= 1.")
_CHECK_BATCH = flags.DEFINE_integer("check_batch", 4, "Images in the JAX-vs-PyTorch map check.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the weights and the synthetic data.")
_TORCH = flags.DEFINE_bool("torch", True, "Measure the PyTorch rows (and run the check).")
_ROW_TIMEOUT = flags.DEFINE_integer("row_timeout", 0, "Seconds before a worker is abandoned (0: none).")
_WORKER = flags.DEFINE_string("worker", None, "Internal: JSON job of one measurement subprocess.")


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

  if job.dtype != "float32":
    raise NotImplementedError(f"the PyTorch reference runs in float32 only, not {job.dtype}")
  device, description = common.torch_device_info()
  cuda = device.type == "cuda"
  torch.backends.cudnn.benchmark = True
  saved = dict(np.load(os.path.join(job.workdir, f"{job.model}.npz")))
  net = common.build_torch_resnet(int(job.model[len("resnet"):]), common.num_classes(job.model),
                                  common.model_stem(job.model))
  common.load_flax_weights(net, {k: v for k, v in saved.items() if not k.startswith("maps/")})
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


_METHOD_LABELS = {"layer4": "Grad-CAM layer4", "all": "Grad-CAM all 5 layers, one pass"}


def format_rows(job: Job, jax_res: dict[str, Any], torch_res: dict[str, Any]) -> list[str]:
  """Table rows of one model: JAX and PyTorch, layer4 and all layers."""
  out = []
  label = f"{job.model} ({job.size}x{job.size}, batch {job.batch})"
  torch_ips = {m: job.batch / common.median(torch_res["rows"][m]["step_s"])
               for m in _METHOD_LABELS if "rows" in torch_res}
  for framework, res in (("JAX jit", jax_res), ("PyTorch hooks", torch_res)):
    for method, text in _METHOD_LABELS.items():
      if "error" in res:
        out.append(f"| {label} | {framework}: {text} | - | n/a ({res['error']}) | - | - |")
        continue
      med = common.median(res["rows"][method]["step_s"])
      ips = job.batch / med
      n_maps = len(common.CAM_LAYERS) if method == "all" else 1
      ratio = f"{ips / torch_ips[method]:.2f}" if method in torch_ips else "n/a"
      out.append(f"| {label} | {framework}: {text} | {med * 1e3:.1f} | {ips:.1f} | {ips * n_maps:.1f} | {ratio} |")
  return out


def check_line(job: Job, torch_res: dict[str, Any]) -> str:
  """One header line with the per-layer max |JAX - PyTorch| of the normalised maps."""
  if "check" not in torch_res:
    return f"- check {job.model}: n/a ({torch_res.get('error', 'no PyTorch result')})"
  c = torch_res["check"]
  worst = max(v["max_abs_diff"] for v in c.values())
  verdict = "agree" if worst <= 1e-9 else "DIFFER (above 1e-9)"
  per_layer = ", ".join(f"{k} {v['max_abs_diff']:.1e}" for k, v in c.items())
  compared = ", ".join(f"{k} {v['compared']}/{v['count']}" for k, v in c.items())
  return (f"- known-answer check {job.model} ({min(job.check_batch, job.batch)} images, JAX weights "
          f"copied into PyTorch, both in float64): max abs "
          f"diff of the [0, 1] maps = {worst:.1e} (maps {verdict}); per layer: {per_layer}; images "
          f"compared (both maps not all-zero): {compared}")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _WORKER.value:
    common.worker_main(_WORKER.value, Job, run_jax, run_torch)
    return
  if _STEPS.value < 1 or _WARMUP.value < 1 or _CHECK_BATCH.value < 1:
    raise app.UsageError("--steps, --warmup and --check_batch must be >= 1")
  models = list(_MODELS.value)
  for m in models:
    if not m.startswith("resnet") or m[len("resnet"):] not in ("18", "34", "50", "101", "152"):
      raise app.UsageError(f"--models: {m!r} is not one of resnet18/34/50/101/152")
  batches = common.per_model(_BATCH.value, models, _DEFAULT_BATCH, "batch")
  sizes = common.per_model(_SIZE.value, models, _DEFAULT_SIZE, "size")

  load_start = common.load_average()
  start = time.perf_counter()
  workdir = tempfile.mkdtemp(prefix="gradcam_bench_")
  table = ["| model (input, batch) | method | ms / batch (median) | images/s | maps/s | "
           "ratio vs PyTorch hooks |", "| --- | --- | --- | --- | --- | --- |"]
  checks, devices = [], {}
  try:
    for model, batch, size in zip(models, batches, sizes):
      job = Job("jax", model, batch, size, _STEPS.value, _WARMUP.value, _CHECK_BATCH.value,
                _SEED.value, workdir)
      print(f"measuring JAX {model} ...", file=sys.stderr, flush=True)
      jax_res = common.run_worker(__file__, job, _ROW_TIMEOUT.value)
      if not _TORCH.value:
        torch_res = {"error": "skipped by --notorch"}
      elif "error" in jax_res:
        torch_res = {"error": "needs the JAX worker's weights"}
      else:
        print(f"measuring PyTorch {model} ...", file=sys.stderr, flush=True)
        torch_res = common.run_worker(__file__, dataclasses.replace(job, framework="torch"),
                                      _ROW_TIMEOUT.value)
      for framework, res in (("jax", jax_res), ("torch", torch_res)):
        if "device" in res:
          devices[framework] = res["device"]
      table += format_rows(job, jax_res, torch_res)
      checks.append(check_line(job, torch_res))
  finally:
    shutil.rmtree(workdir, ignore_errors=True)

  settings = (", ".join(f"{m} {s}x{s} batch {b}" for m, s, b in zip(models, sizes, batches))
              + f"; warm-up {_WARMUP.value} calls (excluded), {_STEPS.value} timed calls per row, "
              "median; synthetic data, random weights")
  lines = common.header_lines("Grad-CAM throughput: JAX jit vs PyTorch hooks", devices, settings,
                              load_start, time.perf_counter() - start)
  lines += checks + ["", *table, "",
                     "images/s = batch / median call time (each call blocked on); maps/s counts one map "
                     "per layer per image; ratio = the row's images/s / PyTorch hooks' images/s for the "
                     "same model and layers in this run (above 1: JAX faster)."]
  print("\n".join(lines))


if __name__ == "__main__":
  app.run(main)
