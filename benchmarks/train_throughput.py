r"""Training throughput of the JAX train step against a PyTorch reference.

Prints one Markdown table (plus a header naming the device, versions, date and
settings) for one training step of a zoo model (default: ResNet-18 with the CIFAR
stem, 10 classes, 32x32x3 inputs, batch 128), measured in the same run on the same
device:

  1. this project's JAX train step (``backdoor_jax.train.steps.make_train_step``,
     data parallel over ``make_mesh()``) in float32;
  2. JAX with bfloat16 compute (``dtype=jnp.bfloat16``; params stay float32);
  3. a PyTorch eager reference of the same network, optimiser, loss and batch;
  4. ``torch.compile`` of that reference, where it works.

Usage::

  python benchmarks/train_throughput.py                       # defaults below
  python benchmarks/train_throughput.py --steps=20 --warmup=3 --repeats=5
  python benchmarks/train_throughput.py --nobf16 --notorch_compile

Methodology: each row runs in its own subprocess (so that the process max RSS,
the CPU memory figure, belongs to that row alone, and JAX's GPU preallocation
never competes with PyTorch). ``--warmup`` steps (compilation included) are
excluded; then ``--repeats`` times, ``--steps`` steps are timed, blocking on the
result after every step (``jax.block_until_ready`` on the new state;
``torch.cuda.synchronize()`` on a GPU). The per-step time of a repeat is its wall
time over ``--steps``; the table reports the median over repeats and
images/s = batch / median.

Data (``--synthetic``, the only mode): random uint8 images and labels, drawn once
from ``--seed`` and reused every step, so no dataset is needed. The JAX step gets
the uint8 batch and converts/normalises it on the device inside the step, as in
training; PyTorch gets float32 NCHW tensors normalised outside the timed region.
Both use SGD (momentum 0.9, lr 0.1, weight decay 5e-4 on all parameters), mean
softmax cross-entropy and BatchNorm in train mode. No augmentation unless
``--augment`` (JAX only: random crop with padding 4 and horizontal flips).

The script runs unchanged on CPU and on an NVIDIA GPU: JAX picks the GPU itself,
PyTorch uses CUDA when ``torch.cuda.is_available()``. Without torch installed the
torch rows say so and the JAX rows are still measured.
"""
from __future__ import annotations

import dataclasses
import datetime
import importlib.util
import os
import platform
import shlex
import statistics
import sys
import time
from typing import Any, Callable

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  pylint: disable=wrong-import-position

_MODEL = flags.DEFINE_string("model", "resnet18",
                             "Zoo model for the JAX rows (backdoor_jax.models.MODEL_NAMES); the "
                             "PyTorch reference exists for the ResNets only.")
_BATCH = flags.DEFINE_integer("batch", 128, "Global batch size (images per step).")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps per repeat.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed warm-up steps (compilation included), >= 1.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repeats of --steps steps; the median is reported.")
_BF16 = flags.DEFINE_bool("bf16", True, "Measure the JAX bfloat16-compute row (--nobf16 skips it).")
_BF16_STEPS = flags.DEFINE_integer("bf16_steps", 0,
                                   "Timed steps per repeat for the bf16 row (0: same as --steps); "
                                   "bf16 convolutions can be very slow on CPU.")
_TORCH = flags.DEFINE_bool("torch", True, "Measure the PyTorch rows.")
_TORCH_COMPILE = flags.DEFINE_bool("torch_compile", True, "Measure the torch.compile row.")
_SYNTHETIC = flags.DEFINE_bool("synthetic", True,
                               "Random uint8 images and labels (the only mode; no dataset needed).")
_AUGMENT = flags.DEFINE_bool("augment", False,
                             "Include random crop (padding 4) and flips in the JAX step.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the synthetic data and of the initialisation.")
_ROW_TIMEOUT = flags.DEFINE_integer("row_timeout", 0, "Seconds before a row is abandoned (0: none).")
_WORKER = flags.DEFINE_string("worker", None, "Internal: JSON job of one measurement subprocess.")

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
  """Runs ``step`` (which must block until its work is done) and times it.

  Args:
    step: one complete, synchronised training step.
    warmup: untimed calls first.
    steps: timed calls per repeat.
    repeats: number of timed repeats.
  Returns:
    ``warmup_s`` (total warm-up seconds) and ``step_s`` (per-step seconds of each repeat).
  """
  t0 = time.perf_counter()
  for _ in range(warmup):
    step()
  warmup_s = time.perf_counter() - t0
  per_step = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(steps):
      step()
    per_step.append((time.perf_counter() - t0) / steps)
  return {"warmup_s": warmup_s, "step_s": per_step}


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


def build_torch_resnet18(num_classes: int) -> Any:
  """ResNet-18 with the CIFAR stem (3x3/1 conv, no max-pool) as a ``torch.nn.Module``.

  Same layout as ``backdoor_jax.models.ResNet(18, stem='cifar')``: BasicBlocks of
  (conv3x3-BN-ReLU-conv3x3-BN) + shortcut (1x1 conv + BN where the shape changes),
  ReLU after the sum, global average pool and a linear head.
  """
  import torch
  from torch import nn

  def conv_bn(cin: int, cout: int, kernel: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2, bias=False),
            nn.BatchNorm2d(cout)]

  class Block(nn.Module):
    """Basic residual block."""

    def __init__(self, cin: int, cout: int, stride: int):
      super().__init__()
      self.body = nn.Sequential(*conv_bn(cin, cout, 3, stride), nn.ReLU(inplace=True),
                                *conv_bn(cout, cout, 3, 1))
      self.shortcut = (nn.Sequential(*conv_bn(cin, cout, 1, stride))
                       if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
      return torch.relu(self.body(x) + self.shortcut(x))

  layers: list[nn.Module] = [*conv_bn(3, 64, 3, 1), nn.ReLU(inplace=True)]
  cin = 64
  for stage in range(4):
    cout = 64 * 2**stage
    for b in range(2):
      layers.append(Block(cin, cout, 2 if (stage > 0 and b == 0) else 1))
      cin = cout
  layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
  net = nn.Sequential(*layers)
  for m in net.modules():
    if isinstance(m, nn.Conv2d):  # He init on fan-out, as the Flax model's conv_init
      nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
  return net


def run_torch(job: Job) -> dict[str, Any]:
  """Measures the PyTorch reference (eager, or with ``torch.compile``)."""
  import torch
  import torch.nn.functional as F

  depth = job.model[len("resnet"):] if job.model.startswith("resnet") else ""
  if job.dtype != "float32":
    raise NotImplementedError(f"the PyTorch reference runs in float32 only, not {job.dtype}")
  if depth not in ("18", "34", "50", "101", "152"):
    raise NotImplementedError(f"the PyTorch reference exists for resnet18/34/50/101/152 only, not {job.model}")
  torch.manual_seed(job.seed)
  cuda = torch.cuda.is_available()
  device = torch.device("cuda" if cuda else "cpu")
  torch.backends.cudnn.benchmark = True  # let cuDNN pick conv algorithms, as XLA autotunes
  if job.model == "resnet18" and job.stem == "cifar":
    model = build_torch_resnet18(job.num_classes)
  else:  # the Flax-like layout of common.py (PyTorch's default initialisation)
    model = common.build_torch_resnet(int(depth), job.num_classes, job.stem)
  model = model.to(device).train()
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
    result["device"] = f"cuda ({torch.cuda.get_device_name(0)})"
  else:
    result["memory"] = {"bytes": common.max_rss_bytes(), "kind": "process max RSS"}
    result["device"] = f"cpu ({torch.get_num_threads()} threads)"
  return result


# ------------------------------------------------------------------------- driver


def format_table(jobs: list[Job], results: list[dict[str, Any]], baseline: float | None) -> list[str]:
  """The Markdown table rows (header included)."""
  out = ["| implementation | compute dtype | timed steps | step time, median (min-max) | "
         "images/s | ratio vs PyTorch eager | peak memory | warm-up (compile) |",
         "| --- | --- | --- | --- | --- | --- | --- | --- |"]
  for job, res in zip(jobs, results):
    if "error" in res:
      out.append(f"| {job.label} | {job.dtype} | - | - | n/a ({res['error']}) | - | - | - |")
      continue
    times = res["step_s"]
    med = statistics.median(times)
    ips = job.batch / med
    ratio = f"{ips / baseline:.2f}" if baseline else "n/a"
    mem = res["memory"]
    mem_kind = "max RSS" if "RSS" in mem["kind"] else "device peak"
    out.append(
        f"| {job.label} | {job.dtype} | {job.repeats} x {job.steps} | {med * 1e3:.1f} ms "
        f"({min(times) * 1e3:.1f}-{max(times) * 1e3:.1f}) | {ips:.1f} | {ratio} | "
        f"{mem['bytes'] / 2**20:.0f} MiB ({mem_kind}) | {res['warmup_s']:.1f} s / {job.warmup} steps |")
  return out


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _WORKER.value:
    common.worker_main(_WORKER.value, Job, run_jax, run_torch)
    return
  if not _SYNTHETIC.value:
    raise app.UsageError("only --synthetic data is supported")
  for name, value, low in (("batch", _BATCH.value, 1), ("steps", _STEPS.value, 1),
                           ("warmup", _WARMUP.value, 1), ("repeats", _REPEATS.value, 1),
                           ("bf16_steps", _BF16_STEPS.value, 0)):
    if value < low:
      raise app.UsageError(f"--{name}={value} must be >= {low}")

  shared = dict(model=_MODEL.value, batch=_BATCH.value, warmup=_WARMUP.value,
                repeats=_REPEATS.value, augment=_AUGMENT.value, seed=_SEED.value)
  jobs = [Job("JAX (this project, jit)", "jax", "float32", False, steps=_STEPS.value, **shared)]
  if _BF16.value:
    jobs.append(Job("JAX (this project, jit)", "jax", "bfloat16", False,
                    steps=_BF16_STEPS.value or _STEPS.value, **shared))
  torch_jobs = [Job("PyTorch eager", "torch", "float32", False, steps=_STEPS.value, **shared),
                Job("PyTorch torch.compile", "torch", "float32", True, steps=_STEPS.value, **shared)]
  eager_index = len(jobs)
  jobs += torch_jobs
  have_torch = importlib.util.find_spec("torch") is not None

  results = []
  start = time.perf_counter()
  for job in jobs:
    if job.framework == "torch" and not have_torch:
      res = {"error": "torch not installed"}
    elif job.framework == "torch" and not _TORCH.value:
      res = {"error": "skipped by --notorch"}
    elif job.compile and not _TORCH_COMPILE.value:
      res = {"error": "skipped by --notorch_compile"}
    else:
      print(f"measuring {job.label} {job.dtype} ...", file=sys.stderr, flush=True)
      res = common.run_worker(__file__, job, _ROW_TIMEOUT.value)
    results.append(res)
  elapsed = time.perf_counter() - start

  eager = results[eager_index]
  baseline = _BATCH.value / statistics.median(eager["step_s"]) if "step_s" in eager else None
  devices = {j.framework: r["device"] for j, r in zip(jobs, results) if "device" in r}
  now = datetime.datetime.now(datetime.timezone.utc)
  command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0])] + sys.argv[1:])
  lines = [
      f"### Train-step throughput: {_MODEL.value} (CIFAR stem), {NUM_CLASSES} classes, "
      f"{'x'.join(map(str, IMAGE_SHAPE))} input, batch {_BATCH.value}",
      "",
      f"- date: {now:%Y-%m-%d %H:%M} UTC",
      f"- device: JAX: {devices.get('jax', 'n/a')}; PyTorch: {devices.get('torch', 'n/a')}; "
      f"host: {common.cpu_name()}, {os.cpu_count()} logical CPUs",
      f"- versions: python {platform.python_version()}, jax {common.version('jax')}, "
      f"jaxlib {common.version('jaxlib')}, flax {common.version('flax')}, optax {common.version('optax')}, "
      f"torch {common.version('torch')}",
      f"- batch: {_BATCH.value}; warm-up: {_WARMUP.value} steps (excluded); timed: "
      f"repeats x steps per row (column 'timed steps'); data: synthetic uint8"
      f"{'; JAX augments (crop 4, flip)' if _AUGMENT.value else ''}",
      f"- command: `{command}` (total {elapsed:.0f} s)",
      "",
      *format_table(jobs, results, baseline),
      "",
      "Step time: wall time of a repeat / its steps, blocking on every step; median over "
      "repeats; images/s = batch / median. Ratio = images/s of the row / images/s of "
      "PyTorch eager in this run. The JAX step starts from uint8 and normalises on the "
      "device; PyTorch is fed float32 tensors normalised outside the timed region. Each "
      "row runs in its own process, so a max RSS figure (CPU) is that row's alone "
      "(it includes the framework itself and compilation).",
  ]
  print("\n".join(lines))


if __name__ == "__main__":
  app.run(main)
