r"""Workload: one training step, this project's JAX step against a PyTorch reference.

Flag-free: ``Job`` describes one row, ``run_jax`` / ``run_torch`` measure it in their own
process (``python -m benchmarks.worker``); ``python -m benchmarks suite --workloads=train``
prints the table. Rows:

  1. this project's JAX train step (``backdoor_jax.train.steps.make_train_step``,
     data parallel over ``make_mesh()``) in float32, or with bfloat16 compute
     (``dtype=jnp.bfloat16``; params stay float32);
  2. the PyTorch twin of the same network (``backdoor_jax.models.torch_reference``),
     optimiser, loss and batch, eager or under ``torch.compile`` (network and optimiser step).

Methodology: ``warmup`` steps (compilation included) are excluded; then ``repeats`` times,
``steps`` steps are timed, blocking on the result after every step
(``jax.block_until_ready`` on the new state; ``torch.cuda.synchronize()`` on a GPU); a
repeat's per-step time is its wall time over ``steps``. Data: random uint8 images and
labels drawn once from ``seed`` and reused every step. The JAX step gets the uint8 batch
and normalises it on the device, as in training; PyTorch gets float32 NCHW tensors
normalised outside the timed region. Both use SGD (momentum 0.9, lr 0.1, weight decay
5e-4 on all parameters), mean softmax cross-entropy and BatchNorm in train mode.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

from benchmarks import common

NUM_CLASSES = 10
IMAGE_SHAPE = (32, 32, 3)
LR, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 5e-4


@dataclasses.dataclass
class Job:
  """One row of the table, as measured by one subprocess.

  Attributes:
    label: row label.
    framework: ``'jax'`` or ``'torch'``.
    dtype: ``'float32'`` or ``'bfloat16'`` (computation dtype).
    compile: torch only: wrap the model and optimiser step in ``torch.compile``.
    model: zoo model name.
    batch: global batch size.
    steps: timed steps per repeat.
    warmup: untimed steps.
    repeats: timed repeats.
    augment: JAX only: random crop and flip inside the step.
    seed: data and initialisation seed.
    size: input side in pixels (this script: 32).
    stem: ``'cifar'`` or ``'imagenet'`` (this script: CIFAR); also picks the
      normalisation statistics.
    num_classes: logits (this script: 10).
  """
  label: str
  framework: str
  dtype: str
  compile: bool
  model: str
  batch: int
  steps: int
  warmup: int
  repeats: int
  augment: bool
  seed: int
  size: int = IMAGE_SHAPE[0]
  stem: str = "cifar"
  num_classes: int = NUM_CLASSES


def time_steps(step: Callable[[], None], warmup: int, steps: int, repeats: int) -> dict[str, Any]:
  """``common.time_steps`` over groups of ``steps`` steps: per-step seconds of each repeat."""
  def group() -> None:
    for _ in range(steps):
      step()
  out = common.time_steps(step, warmup, 0)
  timed = common.time_steps(group, 0, repeats)
  return {"warmup_s": out["warmup_s"], "step_s": [t / steps for t in timed["step_s"]]}


# ----------------------------------------------------------------------------- JAX


def run_jax(job: Job) -> dict[str, Any]:
  """Measures the project's data-parallel JAX train step."""
  import jax
  import jax.numpy as jnp
  from ml_collections import config_dict

  from backdoor_jax import models
  from backdoor_jax.train import mesh as mesh_lib
  from backdoor_jax.train import optim
  from backdoor_jax.train import state as state_lib
  from backdoor_jax.train import steps as steps_lib

  dtype = jnp.bfloat16 if job.dtype == "bfloat16" else jnp.float32
  model = models.get_model(job.model, job.num_classes, stem=job.stem, dtype=dtype)
  mesh = mesh_lib.make_mesh()
  mesh_lib.check_global_batch(job.batch, mesh)
  train_cfg = config_dict.ConfigDict({
      "optimizer": "sgd", "lr": LR, "momentum": MOMENTUM, "nesterov": False,
      "weight_decay": WEIGHT_DECAY, "schedule": "constant", "epochs": 1, "warmup_epochs": 0,
      "trainable": ".*"})
  root = jax.random.key(job.seed)
  init_key, step_key = jax.random.fold_in(root, 0), jax.random.fold_in(root, 1)
  input_shape = (1, job.size, job.size, 3)
  variables = models.init_variables(model, init_key, input_shape)
  tx, _ = optim.make_optimizer(train_cfg, steps_per_epoch=1, params=variables["params"])
  state = state_lib.create_train_state(model, tx, init_key, input_shape, variables=variables)
  state = mesh_lib.replicate(mesh, state)
  spec = steps_lib.InputSpec(*common.dataset_stats(job.stem), crop_padding=4 if job.augment else 0,
                             flip=job.augment)
  train_step = steps_lib.make_train_step(spec, step_key)
  images, labels = mesh_lib.shard_batch(
      mesh, *common.synthetic_uint8(job.batch, job.size, job.num_classes, job.seed))
  jax.block_until_ready((images, labels))

  def step() -> None:
    nonlocal state
    state, _ = train_step(state, images, labels)  # the old state is donated
    jax.block_until_ready(state)

  result = time_steps(step, job.warmup, job.steps, job.repeats)
  devices = jax.devices()
  peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in devices]
  if all(p is not None for p in peaks):
    result["memory"] = {"bytes": max(peaks), "kind": "device peak_bytes_in_use (max over devices)"}
  else:
    result["memory"] = {"bytes": common.max_rss_bytes(), "kind": "process max RSS"}
  kind = devices[0].device_kind
  result["device"] = f"{len(devices)} x {devices[0].platform} ({kind})"
  # After the timing, so that the warm-up still includes the compilation; the compiled
  # step is cached, so this costs no second compilation.
  result["flops"] = common.xla_flops(train_step, state, images, labels)
  return result


# --------------------------------------------------------------------------- PyTorch


def run_torch(job: Job) -> dict[str, Any]:
  """Measures the PyTorch reference (eager, or with ``torch.compile``)."""
  import torch
  import torch.nn.functional as F

  from backdoor_jax.models import torch_reference

  if not job.model.startswith("resnet"):
    raise NotImplementedError(f"the PyTorch reference exists for the ResNets only, not {job.model}")
  device, description, cuda = common.torch_setup(job.dtype)
  torch.manual_seed(job.seed)
  model = torch_reference.build(job.model, job.num_classes, stem=job.stem).to(device).train()
  opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
  images, labels = common.synthetic_uint8(job.batch, job.size, job.num_classes, job.seed)
  mean_values, std_values = common.dataset_stats(job.stem)
  mean = torch.tensor(mean_values).view(1, 3, 1, 1)
  std = torch.tensor(std_values).view(1, 3, 1, 1)
  x = ((torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0 - mean) / std)
  x = x.contiguous().to(device)
  y = torch.from_numpy(labels).long().to(device)

  forward: Callable[[torch.Tensor], torch.Tensor] = model
  opt_step: Callable[[], Any] = opt.step
  if job.compile:
    forward = torch.compile(model)
    opt_step = torch.compile(opt.step)

  def step() -> None:
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(forward(x), y)
    loss.backward()
    opt_step()
    if cuda:
      torch.cuda.synchronize()

  if cuda:
    torch.cuda.reset_peak_memory_stats()
  result = time_steps(step, job.warmup, job.steps, job.repeats)
  if cuda:
    result["memory"] = {"bytes": torch.cuda.max_memory_allocated(),
                        "kind": "torch.cuda.max_memory_allocated"}
  else:
    result["memory"] = {"bytes": common.max_rss_bytes(), "kind": "process max RSS"}
  result["device"] = description
  return result
