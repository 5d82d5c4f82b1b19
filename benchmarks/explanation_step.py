r"""Time and memory of the explanation-backdoor train step, JAX against PyTorch.

The step (``backdoor_jax.train.explain_steps.make_explain_train_step``) is second
order: its loss contains Grad-CAM maps, which are themselves gradients. Measured here
in the targeted form with a keep-clean term:

  loss = CE(f(x), y) + lambda * mean_{triggered} MSE(cam_f(x), mask)
         + mu * mean_{clean} MSE(cam_f(x), cam_ref(x))

with the first half of the batch stamped with a yellow square trigger (labels kept),
Grad-CAM of the true class at ``layer4`` (and, by default, also a run at ``layer3``),
``mask`` a top-left square covering 1/16 of the image, ``cam_ref`` the maps of a
frozen reference model (same initial weights), every term with BatchNorm in inference
mode, and Adam. The PyTorch reference computes the same loss eagerly: forward hooks
keep A, ``torch.autograd.grad(score, A, create_graph=True)`` gives the Grad-CAM
weights as a differentiable graph, then ``loss.backward()`` and ``Adam.step()``.

Defaults (GPU-sized): ResNet-18 (CIFAR stem) 32x32 batch 128 and ResNet-50 (ImageNet
stem) 224x224 batch 32. On CPU shrink them, e.g.::

  python benchmarks/explanation_step.py --batch=32,4 --size=32,64 --steps=3 --warmup=1

Known-answer check: the JAX worker saves its initial weights; the PyTorch worker
starts from them, so the first step's loss and gradient norm must agree (reported in
the header; on a GPU both are computed with TF32 off for that comparison).

Methodology: one subprocess per framework, model and layer (so a CPU RSS figure
belongs to that framework alone). ``--warmup`` untimed steps (compilation included),
then 2 x ``--steps`` timed steps, each blocked on (``jax.block_until_ready`` on the new
state and metrics; ``torch.cuda.synchronize()``); the median is reported. Memory is
sampled after timed step N = ``--steps`` and after step 2N: if the step leaks (e.g. a
graph kept alive between steps), the second figure is larger. On CPU that is the
process RSS (peak = max RSS); on a GPU JAX's ``bytes_in_use`` / ``peak_bytes_in_use``
and PyTorch's ``memory_allocated`` / ``max_memory_allocated``.
"""
from __future__ import annotations

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

_DEFAULT_BATCH = {"resnet18": 128, "resnet50": 32}
_DEFAULT_SIZE = {"resnet18": 32, "resnet50": 224}

_MODELS = flags.DEFINE_list("models", ["resnet18", "resnet50"],
                            "ResNets (resnet18/34: CIFAR stem, 10 classes; resnet50/101/152: "
                            "ImageNet stem, 1000 classes).")
_BATCH = flags.DEFINE_list("batch", [], "Batch per model (one value or one per model); empty: "
                           "128 for resnet18, 32 for resnet50.")
_SIZE = flags.DEFINE_list("size", [], "Input side per model (one value or one per model); "
                          "empty: 32 (CIFAR stem) / 224 (ImageNet stem).")
_LAYERS = flags.DEFINE_list("layers", ["layer4", "layer3"], "Grad-CAM layers, one run each.")
_STEPS = flags.DEFINE_integer("steps", 10, "N: 2N steps are timed; memory is sampled at N and 2N.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps first (compilation included), >= 1.")
_LAM = flags.DEFINE_float("lam", 1.0, "lambda: weight of the map attack term (triggered half).")
_MU = flags.DEFINE_float("mu", 1.0, "mu: weight of the keep-clean term (clean half).")
_LR = flags.DEFINE_float("lr", 1e-3, "Adam learning rate.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the weights and the synthetic data.")
_TORCH = flags.DEFINE_bool("torch", True, "Measure the PyTorch reference.")
_ROW_TIMEOUT = flags.DEFINE_integer("row_timeout", 0, "Seconds before a worker is abandoned (0: none).")
_WORKER = flags.DEFINE_string("worker", None, "Internal: JSON job of one measurement subprocess.")


@dataclasses.dataclass
class Job:
  """One worker: one framework, model and Grad-CAM layer.

  Attributes:
    framework: ``'jax'`` or ``'torch'``.
    model: zoo ResNet name.
    layer: Grad-CAM layer of the loss.
    batch: images per step (the first half triggered).
    size: input side in pixels.
    steps: N (2N timed steps).
    warmup: untimed steps.
    lam: attack-term weight.
    mu: keep-term weight.
    lr: Adam learning rate.
    seed: weights and data seed.
    workdir: folder where the JAX worker leaves its initial weights for PyTorch.
    dtype: JAX computation dtype, ``'float32'`` or ``'bfloat16'`` (parameters stay
      float32); PyTorch runs float32 only.
    compile: PyTorch only: run both networks under ``torch.compile``.
    check: compute the first-step loss and gradient norm for the known-answer check
      (on a GPU an extra full-precision step in JAX and an extra TF32-off pass in PyTorch).
    sample_every: also record the current memory every this many timed steps
      (``memory['samples']``, a list of [step, bytes]); 0: only at N and 2N.
  """
  framework: str
  model: str
  layer: str
  batch: int
  size: int
  steps: int
  warmup: int
  lam: float
  mu: float
  lr: float
  seed: int
  workdir: str
  dtype: str = "float32"
  compile: bool = False
  check: bool = True
  sample_every: int = 0


def _trigger_and_mask(size: int) -> tuple[Any, Any]:
  """The trigger (yellow bottom-right square, side size/8) and the (H, W) target mask."""
  import numpy as np

  from backdoor_jax.triggers import make_patch_trigger

  trigger = make_patch_trigger((size, size), kind="square", size=max(2, size // 8), color=(255, 255, 0))
  mask = np.zeros((size, size), np.float32)
  mask[:size // 4, :size // 4] = 1.0
  return trigger, mask


def _weights_path(job: Job) -> str:
  return os.path.join(job.workdir, f"{job.model}_{job.layer}.npz")


def _memory_sampler(sample: Any, steps: int, store: dict[str, Any], every: int = 0) -> Any:
  """``on_step`` for ``common.time_steps``: current memory after steps N and 2N (and every ``every``)."""
  def on_step(i: int) -> None:
    at_n = i in (steps, 2 * steps)
    periodic = every > 0 and i % every == 0
    if not (at_n or periodic):
      return
    current = sample()["current"]
    if at_n:
      store[f"at_{i}"] = current
    if periodic:
      store.setdefault("samples", []).append([i, current])
  return on_step


def run_jax(job: Job) -> dict[str, Any]:
  """Times this project's jitted explanation-backdoor step."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from ml_collections import config_dict

  from backdoor_jax.train import explain_steps, optim, state as state_lib, steps as steps_lib

  stem = common.model_stem(job.model)
  model, variables = common.init_flax_resnet(job.model, common.num_classes(job.model), stem, job.size, job.seed)
  np.savez(_weights_path(job), **common.flatten_variables(variables))
  if job.dtype == "bfloat16":  # computation in bfloat16, parameters stay float32
    model = model.clone(dtype=jnp.bfloat16)
  elif job.dtype != "float32":
    raise ValueError(f"dtype must be float32 or bfloat16, not {job.dtype!r}")
  cfg = config_dict.ConfigDict({"optimizer": "adam", "lr": job.lr, "schedule": "constant", "epochs": 1,
                                "warmup_epochs": 0, "weight_decay": 0.0, "trainable": ".*"})
  tx, _ = optim.make_optimizer(cfg, steps_per_epoch=1, params=variables["params"])
  state = state_lib.create_train_state(model, tx, jax.random.key(job.seed), (1, job.size, job.size, 3),
                                       variables=jax.tree.map(jnp.copy, variables))  # donated: own buffers
  spec = explain_steps.ExplainSpec(
      methods=(("gradcam", 1.0),), layer=job.layer, attack="targeted", keep="reference",
      num_triggered=job.batch // 2, inverted=False, ce_weight=1.0, attack_weight=job.lam,
      keep_weight=job.mu, loss_resolution=0, top_k=1,
      bn_mode="frozen")  # BatchNorm in inference mode, never updated (PyTorch runs eval())
  step_fn = explain_steps.make_explain_train_step(steps_lib.InputSpec(*common.dataset_stats(stem)), spec,
                                                  jax.random.key(job.seed + 1))
  images, labels = common.synthetic_uint8(job.batch, job.size, common.num_classes(job.model), job.seed)
  trigger, mask = _trigger_and_mask(job.size)
  images, labels, mask = jax.device_put(images), jax.device_put(labels), jax.device_put(mask)
  on_cpu = jax.devices()[0].platform == "cpu"

  def first_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    n = float(metrics["count"])
    return {"loss": float(metrics["loss_sum"]) / n, "grad_norm": float(metrics["grad_norm_sum"]) / n}

  check = None
  if job.check and not on_cpu:  # a separate full-precision step for the comparison (TF32 is the GPU default)
    with jax.default_matmul_precision("highest"):
      _, m = step_fn(jax.tree.map(jnp.copy, state), variables, images, labels, trigger, mask)
      check = first_metrics(m)

  def step() -> None:
    nonlocal state, check
    state, metrics = step_fn(state, variables, images, labels, trigger, mask)
    jax.block_until_ready((state, metrics))
    if check is None and job.check:  # CPU: the very first step is the check (same precision)
      check = first_metrics(metrics)

  memory: dict[str, Any] = {}
  timing = common.time_steps(step, job.warmup, 2 * job.steps,
                             _memory_sampler(common.jax_memory, job.steps, memory, job.sample_every))
  final = common.jax_memory()
  memory.update(peak=final["peak"], kind=final["kind"])
  result = {**timing, "memory": memory, "device": common.jax_device_info(),
            # cached executable: no recompilation; lowering does not consume the donated state
            "flops": common.xla_flops(step_fn, state, variables, images, labels, trigger, mask)}
  if check is not None:
    result["check"] = check
  return result


def run_torch(job: Job) -> dict[str, Any]:
  """Times the eager PyTorch reference of the same loss, starting from the JAX weights."""
  import numpy as np
  import torch
  import torch.nn.functional as F

  if job.dtype != "float32":
    raise NotImplementedError(f"the PyTorch reference runs in float32 only, not {job.dtype}")
  device, description = common.torch_device_info()
  cuda = device.type == "cuda"
  torch.backends.cudnn.benchmark = True
  stem = common.model_stem(job.model)
  flat = dict(np.load(_weights_path(job)))

  def make_net() -> Any:
    net = common.build_torch_resnet(int(job.model[len("resnet"):]), common.num_classes(job.model), stem)
    common.load_flax_weights(net, flat)
    return net.to(device).eval()  # BatchNorm in inference mode in every term, as in the JAX step

  net, ref = make_net(), make_net().requires_grad_(False)
  opt = torch.optim.Adam(net.parameters(), lr=job.lr)
  if job.compile:  # the hooks land on the original submodules, as in eager mode
    net, ref = torch.compile(net), torch.compile(ref)
  images, labels = common.synthetic_uint8(job.batch, job.size, common.num_classes(job.model), job.seed)
  trigger, mask = _trigger_and_mask(job.size)
  images = torch.from_numpy(images).to(device)
  y = torch.from_numpy(labels).long().to(device)
  pattern = torch.from_numpy(np.asarray(trigger.pattern)).to(device)
  tmask = torch.from_numpy(np.asarray(trigger.mask)).to(device)
  target = torch.from_numpy(mask).to(device)
  mean, std = (torch.tensor(v, device=device).view(1, 3, 1, 1) for v in common.dataset_stats(stem))
  k = job.batch // 2

  def loss_and_grads() -> torch.Tensor:
    pixels = images.float()
    stamped = torch.clamp(torch.round(pixels[:k] * (1 - tmask) + pattern * tmask), 0, 255)
    x = (torch.cat([stamped, pixels[k:]]).permute(0, 3, 1, 2) / 255.0 - mean) / std
    logits, maps = common.torch_gradcam(net, x, y, (job.layer,), create_graph=True)
    _, ref_maps = common.torch_gradcam(ref, x.detach(), y, (job.layer,))  # frozen: no graph kept
    cam, ref_cam = (common.minmax_normalize_torch(m[job.layer]) for m in (maps, ref_maps))  # loss renormalises
    attack = ((cam[:k] - target) ** 2).mean(dim=(1, 2)).mean()
    keep = ((cam[k:] - ref_cam[k:].detach()) ** 2).mean(dim=(1, 2)).mean()
    loss = F.cross_entropy(logits, y) + job.lam * attack + job.mu * keep
    opt.zero_grad(set_to_none=True)
    loss.backward()
    return loss.detach()

  check = None
  if job.check:
    tf32 = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    loss = loss_and_grads()  # the check: first-step loss and gradient norm, no update
    grad_norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in net.parameters()))
    check = {"loss": float(loss), "grad_norm": float(grad_norm)}
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32

  def step() -> None:
    loss_and_grads()
    opt.step()
    if cuda:
      torch.cuda.synchronize()

  if cuda:
    torch.cuda.reset_peak_memory_stats()
  memory: dict[str, Any] = {}
  timing = common.time_steps(step, job.warmup, 2 * job.steps,
                             _memory_sampler(common.torch_memory, job.steps, memory, job.sample_every))
  final = common.torch_memory()
  memory.update(peak=final["peak"], kind=final["kind"])
  result = {**timing, "memory": memory, "device": description}
  if check is not None:
    result["check"] = check
  return result


def format_rows(job: Job, jax_res: dict[str, Any], torch_res: dict[str, Any]) -> list[str]:
  """Two table rows (JAX, PyTorch) for one model and layer."""
  label = f"{job.model} ({job.size}x{job.size}, batch {job.batch})"
  med = {f: common.median(r["step_s"]) for f, r in (("jax", jax_res), ("torch", torch_res)) if "step_s" in r}
  peak = {f: r["memory"]["peak"] for f, r in (("jax", jax_res), ("torch", torch_res)) if "memory" in r}
  out = []
  for framework, name, res in (("jax", "JAX jit (this project)", jax_res),
                               ("torch", "PyTorch eager, create_graph", torch_res)):
    if "error" in res:
      out.append(f"| {label} | {job.layer} | {name} | n/a ({res['error']}) | - | - | - | - | - |")
      continue
    m = res["memory"]
    at_n, at_2n = m.get(f"at_{job.steps}"), m.get(f"at_{2 * job.steps}")
    drift = f"{common.mib(at_n)} -> {common.mib(at_2n)} ({(at_2n - at_n) / 2**20:+.1f} MiB)"
    if framework == "jax" and len(med) == 2:
      t_ratio = f"{med['jax'] / med['torch']:.2f}"
      m_ratio = f"{peak['jax'] / peak['torch']:.2f}" if peak.get("torch") else "n/a"
    else:
      t_ratio = m_ratio = "1.00" if framework == "torch" else "n/a"
    out.append(f"| {label} | {job.layer} | {name} | {med[framework]:.3f} | {job.batch / med[framework]:.1f} | "
               f"{common.mib(m['peak'])} | {drift} | {t_ratio} | {m_ratio} |")
  return out


def check_line(job: Job, jax_res: dict[str, Any], torch_res: dict[str, Any]) -> str:
  """Header line comparing the first step's loss and gradient norm."""
  if "check" not in jax_res or "check" not in torch_res:
    return f"- check {job.model} {job.layer}: n/a"
  a, b = jax_res["check"], torch_res["check"]
  rel = {k: abs(a[k] - b[k]) / max(abs(b[k]), 1e-12) for k in ("loss", "grad_norm")}
  return (f"- known-answer check {job.model} {job.layer} (same initial weights and batch, first step): "
          f"loss JAX {a['loss']:.6f} vs PyTorch {b['loss']:.6f} (rel. diff {rel['loss']:.1e}); "
          f"gradient norm JAX {a['grad_norm']:.6f} vs PyTorch {b['grad_norm']:.6f} "
          f"(rel. diff {rel['grad_norm']:.1e})")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _WORKER.value:
    common.worker_main(_WORKER.value, Job, run_jax, run_torch)
    return
  if _STEPS.value < 1 or _WARMUP.value < 1:
    raise app.UsageError("--steps and --warmup must be >= 1")
  models = list(_MODELS.value)
  for m in models:
    if not m.startswith("resnet") or m[len("resnet"):] not in ("18", "34", "50", "101", "152"):
      raise app.UsageError(f"--models: {m!r} is not one of resnet18/34/50/101/152")
  bad = [l for l in _LAYERS.value if l not in common.CAM_LAYERS]
  if bad or not _LAYERS.value:
    raise app.UsageError(f"--layers: {bad or 'empty'}; choose from {', '.join(common.CAM_LAYERS)}")
  batches = common.per_model(_BATCH.value, models, _DEFAULT_BATCH, "batch")
  if min(batches) < 2:
    raise app.UsageError("--batch must be >= 2 (half triggered, half clean)")
  sizes = common.per_model(_SIZE.value, models, _DEFAULT_SIZE, "size")

  load_start = common.load_average()
  start = time.perf_counter()
  workdir = tempfile.mkdtemp(prefix="explain_bench_")
  table = ["| model (input, batch) | Grad-CAM layer | implementation | s / step (median) | images/s | "
           "peak memory | memory at step N -> 2N | time ratio JAX/torch | peak-memory ratio JAX/torch |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
  checks, devices, kinds = [], {}, {}
  try:
    for model, batch, size in zip(models, batches, sizes):
      for layer in _LAYERS.value:
        job = Job("jax", model, layer, batch, size, _STEPS.value, _WARMUP.value, _LAM.value, _MU.value,
                  _LR.value, _SEED.value, workdir)
        print(f"measuring JAX {model} {layer} ...", file=sys.stderr, flush=True)
        jax_res = common.run_worker(__file__, job, _ROW_TIMEOUT.value)
        if not _TORCH.value:
          torch_res = {"error": "skipped by --notorch"}
        elif "error" in jax_res:
          torch_res = {"error": "needs the JAX worker's weights"}
        else:
          print(f"measuring PyTorch {model} {layer} ...", file=sys.stderr, flush=True)
          torch_res = common.run_worker(__file__, dataclasses.replace(job, framework="torch"),
                                        _ROW_TIMEOUT.value)
        for framework, res in (("jax", jax_res), ("torch", torch_res)):
          if "device" in res:
            devices[framework] = res["device"]
            kinds[framework] = res["memory"]["kind"]
        table += format_rows(job, jax_res, torch_res)
        checks.append(check_line(job, jax_res, torch_res))
  finally:
    shutil.rmtree(workdir, ignore_errors=True)

  settings = (", ".join(f"{m} {s}x{s} batch {b}" for m, s, b in zip(models, sizes, batches))
              + f"; layers {', '.join(_LAYERS.value)}; lambda {_LAM.value:g}, mu {_MU.value:g}, Adam lr "
              f"{_LR.value:g}; warm-up {_WARMUP.value} steps (excluded), 2 x {_STEPS.value} timed steps, "
              "median; synthetic data, random weights")
  lines = common.header_lines("Explanation-backdoor step: JAX jit vs PyTorch create_graph", devices, settings,
                              load_start, time.perf_counter() - start)
  lines += checks + [
      f"- memory: JAX: {kinds.get('jax', 'n/a')}; PyTorch: {kinds.get('torch', 'n/a')}", "", *table, "",
      "s / step: median over the 2N timed steps, each blocked on; images/s = batch / median. "
      "Peak memory and the N -> 2N samples are per framework (own process). Ratios JAX/torch: "
      "below 1 means JAX takes less time / less memory."]
  print("\n".join(lines))


if __name__ == "__main__":
  app.run(main)
