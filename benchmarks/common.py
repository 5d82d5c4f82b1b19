"""Helpers shared by the benchmark workloads and reports.

Three groups:

* measurement plumbing: timing with a per-step barrier, process memory (RSS), one
  measurement per subprocess (``python -m benchmarks.worker``) with a tagged JSON result
  line, the Markdown header (device, versions, date, command, load average), FLOPs from
  XLA's cost analysis;
* JAX-side set-up shared by the workloads (a ResNet with random BatchNorm statistics,
  synthetic data); the PyTorch twins of the models are ``backdoor_jax.models.torch_reference``;
* a hook-based PyTorch Grad-CAM (:func:`torch_gradcam`) following the same conventions
  as ``backdoor_jax.explain.gradcam`` (per-sample target logit, ReLU of the
  gradient-weighted channel sum, bilinear resize with half-pixel centres, per-image
  min-max normalisation with eps 1e-8).

Only standard-library modules are imported at module level; JAX, numpy and torch are
imported inside the functions that need them, so a worker process pays only for the
framework it measures.
"""
from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Sequence

from backdoor_jax.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAM_LAYERS = ("stem", "layer1", "layer2", "layer3", "layer4")
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CAM_EPS = 1e-8
_RESULT_TAG = "@@benchmark-result@@ "

# ------------------------------------------------------------------ measurement


def time_steps(step: Callable[[], Any], warmup: int, steps: int,
               on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
  """Calls ``step`` ``warmup`` times untimed, then ``steps`` times timed one by one.

  Args:
    step: one complete unit of work that returns only when the device is done
      (the caller blocks inside it).
    warmup: untimed calls first (compilation, autotuning, allocator growth).
    steps: timed calls.
    on_step: called with the 1-based index of each timed step after it ran
      (outside the timed region), e.g. to sample memory.
  Returns:
    ``warmup_s`` (total seconds of the warm-up) and ``step_s`` (seconds of each timed call).
  """
  t0 = time.perf_counter()
  for _ in range(warmup):
    step()
  warmup_s = time.perf_counter() - t0
  times = []
  for i in range(steps):
    t0 = time.perf_counter()
    step()
    times.append(time.perf_counter() - t0)
    if on_step is not None:
      on_step(i + 1)
  return {"warmup_s": warmup_s, "step_s": times}


def max_rss_bytes() -> int:
  """Peak resident set size of this process so far (Linux reports KiB, macOS bytes)."""
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return rss if sys.platform == "darwin" else rss * 1024


def current_rss_bytes() -> int:
  """Current resident set size of this process (Linux ``/proc``; else the peak)."""
  try:
    with open("/proc/self/statm") as f:
      return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
  except (OSError, ValueError, IndexError):
    return max_rss_bytes()


def cost_flops(cost: Any) -> float | None:
  """The ``'flops'`` entry of an XLA cost analysis, whatever shape JAX returned it in.

  ``Compiled.cost_analysis()`` returns a dict in current JAX and a list with one dict
  per executable module in older releases (and may return ``None``). In a list, the
  first dict that has a ``'flops'`` entry is used.

  Args:
    cost: the cost analysis (a dict, a list/tuple of dicts, or ``None``).
  Returns:
    The FLOP count as a float, or ``None`` when there is none, or it is not a positive
    finite number (XLA reports -1 or 0 when it could not count).
  """
  if isinstance(cost, (list, tuple)):
    cost = next((c for c in cost if isinstance(c, dict) and "flops" in c), None)
  if not isinstance(cost, dict):
    return None
  try:
    flops = float(cost.get("flops"))  # type: ignore[arg-type]
  except (TypeError, ValueError):
    return None
  return flops if 0 < flops < float("inf") else None


def xla_flops(jitted: Any, *args: Any) -> float | None:
  """FLOPs of one call of a jitted function, from XLA's cost analysis of its compiled form.

  ``jitted.lower(*args).compile()`` shares JAX's compilation cache with ordinary calls,
  so this costs no second compilation; lowering does not consume donated arguments.

  Args:
    jitted: a ``jax.jit``-wrapped function.
    *args: the arguments of a call (arrays or pytrees of them).
  Returns:
    The FLOP count, or ``None`` when XLA gives none (see :func:`cost_flops`).
  """
  try:
    return cost_flops(jitted.lower(*args).compile().cost_analysis())
  except Exception:  # pylint: disable=broad-except  # a missing estimate is reported as n/a
    return None


def median(values: Sequence[float]) -> float:
  """Median of a non-empty sequence."""
  return statistics.median(values)


def mib(n: float | None) -> str:
  """Bytes as a MiB string ('-' for None)."""
  return "-" if n is None else f"{n / 2**20:.0f} MiB"


def write_csv(path: str, records: Sequence[dict[str, Any]]) -> None:
  """Writes dicts with the same keys as CSV (header from the first; None as empty)."""
  import csv
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    if records:
      writer.writerow(list(records[0]))
    for r in records:
      writer.writerow(["" if v is None else v for v in r.values()])


def emit_result(result: dict[str, Any]) -> None:
  """Prints a worker's result as the one tagged JSON line the driver looks for."""
  print(_RESULT_TAG + json.dumps(result), flush=True)


def first_line(text: str, limit: int = 160) -> str:
  """The first non-empty line of ``text``, shortened to ``limit`` characters."""
  line = next((s.strip() for s in text.splitlines() if s.strip()), "")
  return line if len(line) <= limit else line[:limit - 3] + "..."


def per_model(values: Sequence[str], models: Sequence[str], defaults: dict[str, int], name: str) -> list[int]:
  """One positive int per model from a flag list (empty: per-stem defaults; one value: for all).

  Raises:
    ConfigError: the list has the wrong length or a value that is not an int >= 1.
  """
  if not values:
    return [defaults["resnet50" if model_stem(m) == "imagenet" else "resnet18"] for m in models]
  if len(values) == 1:
    values = list(values) * len(models)
  if len(values) != len(models):
    raise ConfigError(f"--{name}={','.join(values)}: allowed: one value or one per model ({len(models)})")
  try:
    out = [int(v) for v in values]
  except ValueError:
    out = [0]
  if min(out) < 1:
    raise ConfigError(f"--{name}={','.join(values)}: allowed: integers >= 1")
  return out


def num_classes(model: str) -> int:
  """10 classes for CIFAR-stem ResNets, 1000 for ImageNet-stem ones."""
  return 10 if model_stem(model) == "cifar" else 1000


def module_name(path: str) -> str:
  """``benchmarks/train_throughput.py`` (any absolute form) -> ``benchmarks.train_throughput``."""
  rel = os.path.relpath(os.path.abspath(path), REPO)
  return os.path.splitext(rel)[0].replace(os.sep, ".")


def run_worker(script: str, job: Any, timeout: float = 0) -> dict[str, Any]:
  """Runs ``python -m benchmarks.worker <module> <job as JSON>`` and returns its result.

  The worker runs from the repository root, so ``benchmarks`` and ``backdoor_jax`` are
  importable there as they are here.

  Args:
    script: path of the workload module (its ``__file__``), which defines ``Job``,
      ``run_jax`` and ``run_torch``.
    job: a dataclass instance, serialised with ``dataclasses.asdict``.
    timeout: seconds before the worker is abandoned (0: none).
  Returns:
    The worker's result dict, or ``{'error': ...}`` if it failed or printed none.
  """
  cmd = [sys.executable, "-m", "benchmarks.worker", module_name(script), json.dumps(dataclasses.asdict(job))]
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=timeout or None)
  except subprocess.TimeoutExpired:
    return {"error": f"timed out after {timeout:.0f} s"}
  for line in reversed(proc.stdout.splitlines()):
    if line.startswith(_RESULT_TAG):
      return json.loads(line[len(_RESULT_TAG):])
  tail = [s for s in proc.stderr.splitlines() if s.strip()]
  return {"error": f"worker exited with code {proc.returncode}: {tail[-1].strip() if tail else ''}"[:300]}


def version(dist: str) -> str:
  """Installed version of a distribution, or 'not installed'."""
  try:
    return importlib.metadata.version(dist)
  except importlib.metadata.PackageNotFoundError:
    return "not installed"


def cpu_name() -> str:
  """The CPU model name from ``/proc/cpuinfo`` (or what ``platform`` knows)."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def load_average() -> str:
  """The 1/5/15-minute load averages as a string (``uptime``'s numbers)."""
  try:
    return ", ".join(f"{v:.2f}" for v in os.getloadavg())
  except OSError:
    return "n/a"


def header_lines(title: str, devices: dict[str, str], settings: str, load_start: str,
                 elapsed_s: float) -> list[str]:
  """The Markdown header of a result section.

  Args:
    title: section title (without the leading ``###``).
    devices: framework -> device string reported by its workers.
    settings: one line describing the measured settings.
    load_start: load averages when the run started.
    elapsed_s: wall time of the whole run.
  Returns:
    Markdown lines.
  """
  now = datetime.datetime.now(datetime.timezone.utc)
  command = "python -m benchmarks " + " ".join(shlex.quote(a) for a in sys.argv[1:])
  return [
      f"### {title}",
      "",
      f"- date: {now:%Y-%m-%d %H:%M} UTC",
      f"- device: JAX: {devices.get('jax', 'n/a')}; PyTorch: {devices.get('torch', 'n/a')}; "
      f"host: {cpu_name()}, {os.cpu_count()} logical CPUs",
      f"- load average (1/5/15 min): {load_start} at start, {load_average()} at end",
      f"- versions: python {platform.python_version()}, jax {version('jax')}, jaxlib {version('jaxlib')}, "
      f"flax {version('flax')}, optax {version('optax')}, torch {version('torch')}",
      f"- settings: {settings}",
      f"- command: `{command}` (total {elapsed_s:.0f} s)",
  ]


def torch_device_info() -> tuple[Any, str]:
  """(torch.device, description): CUDA when available, else CPU."""
  import torch
  if torch.cuda.is_available():
    return torch.device("cuda"), f"cuda ({torch.cuda.get_device_name(0)})"
  return torch.device("cpu"), f"cpu ({torch.get_num_threads()} threads)"


def torch_setup(dtype: str) -> tuple[Any, str, bool]:
  """(device, description, on CUDA) for a PyTorch worker; cuDNN picks its algorithms, as XLA autotunes.

  Raises:
    NotImplementedError: ``dtype`` is not float32 (the PyTorch reference runs in float32 only).
  """
  import torch
  if dtype != "float32":
    raise NotImplementedError(f"the PyTorch reference runs in float32 only, not {dtype}")
  torch.backends.cudnn.benchmark = True
  device, description = torch_device_info()
  return device, description, device.type == "cuda"


def jax_device_info() -> str:
  """Description of JAX's default device."""
  import jax
  d = jax.devices()[0]
  return f"{len(jax.devices())} x {d.platform} ({d.device_kind})"


def jax_memory() -> dict[str, Any]:
  """Memory of the JAX process: device bytes on an accelerator, RSS on CPU.

  Returns:
    ``current`` and ``peak`` in bytes and ``kind`` naming what they are.
  """
  import jax
  stats = jax.devices()[0].memory_stats() or {}
  if "bytes_in_use" in stats and jax.devices()[0].platform != "cpu":
    return {"current": stats["bytes_in_use"], "peak": stats.get("peak_bytes_in_use"),
            "kind": "device bytes_in_use / peak_bytes_in_use"}
  return {"current": current_rss_bytes(), "peak": max_rss_bytes(), "kind": "process RSS / max RSS"}


def torch_memory() -> dict[str, Any]:
  """Memory of the PyTorch process: CUDA allocator bytes on a GPU, RSS on CPU."""
  import torch
  if torch.cuda.is_available():
    return {"current": torch.cuda.memory_allocated(), "peak": torch.cuda.max_memory_allocated(),
            "kind": "torch.cuda.memory_allocated / max_memory_allocated"}
  return {"current": current_rss_bytes(), "peak": max_rss_bytes(), "kind": "process RSS / max RSS"}


# ----------------------------------------------------------------- JAX helpers


def dataset_stats(stem: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Normalisation mean/std used for a stem (CIFAR-10 or ImageNet)."""
  return (CIFAR10_MEAN, CIFAR10_STD) if stem == "cifar" else (IMAGENET_MEAN, IMAGENET_STD)


def model_stem(name: str) -> str:
  """The stem a benchmark uses for a ResNet: CIFAR for ResNet-18/34, ImageNet above."""
  return "cifar" if name in ("resnet18", "resnet34") else "imagenet"


def init_flax_resnet(name: str, num_classes: int, stem: str, size: int, seed: int) -> tuple[Any, Any]:
  """A zoo ResNet and variables whose BatchNorm is not the identity.

  Fresh BatchNorm layers (scale 1, bias 0, mean 0, var 1) would make a weight-transfer
  check blind to a mix-up of those four arrays, so they are drawn at random here
  (scale, var ~ U(0.5, 1.5); bias, mean ~ N(0, 0.1)).

  Returns:
    (model, variables) with ``params`` and ``batch_stats``.
  """
  import jax
  import numpy as np

  from backdoor_jax import models

  model = models.get_model(name, num_classes, stem=stem)
  variables = models.init_variables(model, jax.random.key(seed), (1, size, size, 3))
  rng = np.random.default_rng(seed + 1)

  def draw(path: tuple[Any, ...], leaf: Any) -> Any:
    key = str(getattr(path[-1], "key", path[-1]))
    shape = np.shape(leaf)
    if key in ("scale", "var"):
      return rng.uniform(0.5, 1.5, shape).astype(np.float32)
    if key == "mean" or (key == "bias" and "bn" in str(getattr(path[-2], "key", ""))):
      return rng.normal(0.0, 0.1, shape).astype(np.float32)
    return np.asarray(leaf)

  variables = jax.tree_util.tree_map_with_path(draw, variables)
  return model, jax.tree.map(jax.numpy.asarray, variables)


def flatten_variables(variables: Any) -> dict[str, Any]:
  """Flax variables as ``{'params/conv1/kernel': np.ndarray, ...}`` (for ``np.savez``)."""
  import jax
  import numpy as np
  flat = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
    flat["/".join(str(getattr(k, "key", k)) for k in path)] = np.asarray(leaf)
  return flat


def synthetic_uint8(batch: int, size: int, num_classes: int, seed: int) -> tuple[Any, Any]:
  """Random uint8 NHWC images and int32 labels (the same for every worker)."""
  import numpy as np
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
  labels = rng.integers(0, num_classes, (batch,), dtype=np.int32)
  return images, labels


def torch_twin(model: str, flat: dict[str, Any]) -> Any:
  """The PyTorch twin of a benchmark ResNet, holding the weights a JAX worker saved.

  Args:
    model: zoo ResNet name (stem and classes as :func:`model_stem` / :func:`num_classes`).
    flat: :func:`flatten_variables` output, e.g. read back with ``np.load``.
  Returns:
    ``backdoor_jax.models.torch_reference`` ResNet (training mode, on the CPU).
  """
  import flax

  from backdoor_jax.models import torch_reference

  net = torch_reference.build(model, num_classes(model), stem=model_stem(model))
  variables = flax.traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})
  torch_reference.load_flax_variables(net, model, variables)
  return net


def normalize_np(images: Any, mean: Sequence[float], std: Sequence[float]) -> Any:
  """uint8 NHWC -> float32 ``(x / 255 - mean) / std``, as ``data.pipeline.normalize``."""
  import numpy as np
  return ((images.astype(np.float32) / 255.0 - np.asarray(mean, np.float32))
          / np.asarray(std, np.float32)).astype(np.float32)


# ----------------------------------------------------------------- PyTorch Grad-CAM


def minmax_normalize_torch(maps: Any, eps: float = CAM_EPS) -> Any:
  """Per-image (m - min) / (max - min + eps) of (B, H, W) maps.

  ``amin``/``amax`` split the gradient evenly between ties, as JAX's min/max do.
  """
  lo = maps.amin(dim=(1, 2), keepdim=True)
  hi = maps.amax(dim=(1, 2), keepdim=True)
  return (maps - lo) / (hi - lo + eps)


def cam_maps_torch(activation: Any, gradient: Any, size: tuple[int, int]) -> Any:
  """Input-size normalised Grad-CAM maps (B, H, W) from NCHW activation and gradient."""
  import torch.nn.functional as F
  weights = gradient.mean(dim=(2, 3), keepdim=True)
  raw = F.relu((weights * activation).sum(dim=1))
  if tuple(raw.shape[1:]) != tuple(size):
    raw = F.interpolate(raw[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
  return minmax_normalize_torch(raw)


def torch_gradcam(net: Any, x: Any, targets: Any, layers: Sequence[str],
                  create_graph: bool = False) -> tuple[Any, dict[str, Any]]:
  """Grad-CAM of a PyTorch model at several layers with one forward and one backward.

  Forward hooks on the named submodules keep their outputs A_l; ``torch.autograd.grad``
  of the summed per-sample target logits gives dScore/dA_l for all of them at once.
  Where no parameter requires a gradient (a frozen model), the hook marks the output
  as requiring one, so autograd records the graph from the lowest requested layer on
  and nothing below it.

  Args:
    net: a ``torch_reference`` ResNet (BatchNorm mode is the caller's).
    x: (B, C, H, W) normalised input.
    targets: (B,) int64 class ids.
    layers: zoo layer names, e.g. ``('layer4',)`` or ``CAM_LAYERS``.
    create_graph: keep the graph of the gradients (to differentiate the maps again).
  Returns:
    (logits, {layer: (B, H, W) maps in [0, 1]}).
  """
  import torch

  acts: dict[str, Any] = {}

  def keep(name: str) -> Callable[..., None]:
    def hook(_module: Any, _inputs: Any, output: Any) -> None:
      if not output.requires_grad:
        output.requires_grad_(True)
      acts[name] = output
    return hook

  from backdoor_jax.models.torch_reference import RESNET_LAYER_MODULES
  handles = [net.get_submodule(RESNET_LAYER_MODULES[name]).register_forward_hook(keep(name))
             for name in layers]
  try:
    logits = net(x)
  finally:
    for h in handles:
      h.remove()
  score = logits.gather(1, targets[:, None]).sum()
  grads = torch.autograd.grad(score, [acts[n] for n in layers], create_graph=create_graph)
  size = tuple(x.shape[2:])
  return logits, {n: cam_maps_torch(acts[n], g, size) for n, g in zip(layers, grads)}
