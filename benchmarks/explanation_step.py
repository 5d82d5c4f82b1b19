r"""Workload: the second-order explanation-backdoor train step, JAX against PyTorch.

Flag-free (``python -m benchmarks suite --workloads=explain`` prints the table). The step
(``backdoor_jax.train.explain_steps.make_explain_train_step``) is second order: its loss
contains Grad-CAM maps, which are themselves gradients. Measured in the targeted form
with a keep-clean term:

  loss = CE(f(x), y) + lambda * mean_{triggered} MSE(cam_f(x), mask)
         + mu * mean_{clean} MSE(cam_f(x), cam_ref(x))

with the first half of the batch stamped with a yellow square trigger (labels kept),
Grad-CAM of the true class at ``layer`` (``layer4`` in the suite by default), ``mask`` a
top-left square covering 1/16 of the image, ``cam_ref`` the maps of a frozen reference
model (same initial weights), every term with BatchNorm in inference mode, and Adam. The
PyTorch reference computes the same loss eagerly on the twin from
``backdoor_jax.models.torch_reference``: forward hooks keep A,
``torch.autograd.grad(score, A, create_graph=True)`` gives the Grad-CAM weights as a
differentiable graph, then ``loss.backward()`` and ``Adam.step()``.

Known-answer check (``Job.check``; ``suite --check``): the JAX worker saves its initial
weights; the PyTorch worker starts from them, so the first step's loss and gradient norm
must agree (:func:`check_line`; on a GPU both are computed with TF32 off for that).

Methodology: ``warmup`` untimed steps (compilation included), then 2 x ``steps`` timed
steps, each blocked on. Memory is sampled after timed step N = ``steps`` and after 2N
(and every ``sample_every`` steps for the soak): if the step leaks (e.g. a graph kept
alive between steps), the later figures are larger. On CPU that is the process RSS; on a
GPU JAX's ``bytes_in_use`` / ``peak_bytes_in_use`` and PyTorch's ``memory_allocated`` /
``max_memory_allocated``.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

from benchmarks import common

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

  device, description, cuda = common.torch_setup(job.dtype)
  stem = common.model_stem(job.model)
  flat = dict(np.load(_weights_path(job)))

  def make_net() -> Any:
    return common.torch_twin(job.model, flat).to(device).eval()  # BatchNorm in inference mode in every term, as in the JAX step

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


def check_line(model: str, layer: str, jax_res: dict[str, Any], torch_res: dict[str, Any]) -> str:
  """Header line comparing the first step's loss and gradient norm."""
  if "check" not in jax_res or "check" not in torch_res:
    return f"- explanation-step check {model} {layer}: n/a"
  a, b = jax_res["check"], torch_res["check"]
  rel = {k: abs(a[k] - b[k]) / max(abs(b[k]), 1e-12) for k in ("loss", "grad_norm")}
  return (f"- explanation-step known-answer check {model} {layer} (same initial weights and batch, first step): "
          f"loss JAX {a['loss']:.6f} vs PyTorch {b['loss']:.6f} (rel. diff {rel['loss']:.1e}); "
          f"gradient norm JAX {a['grad_norm']:.6f} vs PyTorch {b['grad_norm']:.6f} "
          f"(rel. diff {rel['grad_norm']:.1e})")
