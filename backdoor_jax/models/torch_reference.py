"""PyTorch twins of the zoo's classifiers: one reference module for tests and benchmarks.

Each class has torchvision's module tree, hence identical ``state_dict`` keys and
shapes, and the same forward computation in eval mode (``tests/test_torchvision_import.py``
imports their weights into the Flax zoo). The ResNet also has the zoo's CIFAR stem
(3x3/1 conv, no max-pool), and :func:`load_flax_variables` copies Flax variables into a
twin (the inverse of ``torchvision_import``'s table), so the benchmarks compare the two
frameworks on the same weights. Written from the published architectures; nothing is
downloaded. Needs torch, which the library itself never imports: only callers that
compare with PyTorch import this module.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from backdoor_jax.errors import ConfigError

VGG_CFGS = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    13: [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
         512, 512, 512, 512, "M"],
}
RESNET_CFGS = {18: (False, [2, 2, 2, 2]), 34: (False, [3, 4, 6, 3]), 50: (True, [3, 4, 6, 3]),
               101: (True, [3, 4, 23, 3]), 152: (True, [3, 8, 36, 3])}


# --- ResNet ---------------------------------------------------------------------------------

class Block(nn.Module):
  """BasicBlock (``bottleneck=False``) or v1.5 Bottleneck (stride on the 3x3)."""

  def __init__(self, cin: int, planes: int, stride: int, bottleneck: bool):
    super().__init__()
    self.bottleneck = bottleneck
    cout = planes * (4 if bottleneck else 1)
    if bottleneck:
      self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(planes)
      self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(planes)
      self.conv3 = nn.Conv2d(planes, cout, 1, bias=False)
      self.bn3 = nn.BatchNorm2d(cout)
    else:
      self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(planes)
      self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(planes)
    self.downsample = None
    if stride != 1 or cin != cout:
      self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    if self.bottleneck:
      y = F.relu(self.bn2(self.conv2(y)))
      y = self.bn3(self.conv3(y))
    else:
      y = self.bn2(self.conv2(y))
    return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
  """torchvision's ResNet (v1.5); ``stem='cifar'``: a 3x3/1 first conv and no max-pool.

  ``maxpool`` (an identity for the CIFAR stem) outputs what the zoo exposes as ``stem``.
  """

  def __init__(self, depth: int, num_classes: int = 1000, stem: str = "imagenet"):
    super().__init__()
    bottleneck, stages = RESNET_CFGS[depth]
    cifar = stem == "cifar"
    self.conv1 = nn.Conv2d(3, 64, 3 if cifar else 7, 1 if cifar else 2, 1 if cifar else 3, bias=False)
    self.bn1 = nn.BatchNorm2d(64)
    self.maxpool = nn.Identity() if cifar else nn.MaxPool2d(3, 2, 1)
    cin = 64
    for s, n in enumerate(stages):
      blocks = []
      for b in range(n):
        blocks.append(Block(cin, 64 * 2**s, 2 if (s and not b) else 1, bottleneck))
        cin = 64 * 2**s * (4 if bottleneck else 1)
      setattr(self, f"layer{s + 1}", nn.Sequential(*blocks))
    self.fc = nn.Linear(cin, num_classes)

  def forward(self, x):
    x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
    for s in range(1, 5):
      x = getattr(self, f"layer{s}")(x)
    return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# --- VGG / AlexNet --------------------------------------------------------------------------

class VGG(nn.Module):
  def __init__(self, depth: int, batch_norm: bool, num_classes: int = 1000):
    super().__init__()
    layers, cin = [], 3
    for v in VGG_CFGS[depth]:
      if v == "M":
        layers.append(nn.MaxPool2d(2, 2))
        continue
      layers.append(nn.Conv2d(cin, v, 3, padding=1))
      if batch_norm:
        layers.append(nn.BatchNorm2d(v))
      layers.append(nn.ReLU())
      cin = v
    self.features = nn.Sequential(*layers)
    self.avgpool = nn.AdaptiveAvgPool2d(7)
    self.classifier = nn.Sequential(nn.Linear(512 * 49, 4096), nn.ReLU(), nn.Dropout(),
                                    nn.Linear(4096, 4096), nn.ReLU(), nn.Dropout(),
                                    nn.Linear(4096, num_classes))

  def forward(self, x):
    return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class AlexNet(nn.Module):
  def __init__(self, num_classes: int = 1000):
    super().__init__()
    self.features = nn.Sequential(
        nn.Conv2d(3, 64, 11, 4, 2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(),
        nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(),
        nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2))
    self.avgpool = nn.AdaptiveAvgPool2d(6)
    self.classifier = nn.Sequential(nn.Dropout(), nn.Linear(256 * 36, 4096), nn.ReLU(),
                                    nn.Dropout(), nn.Linear(4096, 4096), nn.ReLU(),
                                    nn.Linear(4096, num_classes))

  def forward(self, x):
    return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


# --- GoogLeNet ------------------------------------------------------------------------------

class BasicConv2d(nn.Module):
  def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, padding: int = 0):
    super().__init__()
    self.conv = nn.Conv2d(cin, cout, kernel, stride, padding, bias=False)
    self.bn = nn.BatchNorm2d(cout, eps=0.001)

  def forward(self, x):
    return F.relu(self.bn(self.conv(x)))


class Inception(nn.Module):
  def __init__(self, cin, c1, c3r, c3, c5r, c5, pool_proj):
    super().__init__()
    self.branch1 = BasicConv2d(cin, c1, 1)
    self.branch2 = nn.Sequential(BasicConv2d(cin, c3r, 1), BasicConv2d(c3r, c3, 3, padding=1))
    self.branch3 = nn.Sequential(BasicConv2d(cin, c5r, 1), BasicConv2d(c5r, c5, 3, padding=1))
    self.branch4 = nn.Sequential(nn.MaxPool2d(3, 1, 1, ceil_mode=True), BasicConv2d(cin, pool_proj, 1))

  def forward(self, x):
    return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)


class InceptionAux(nn.Module):
  def __init__(self, cin: int, num_classes: int):
    super().__init__()
    self.conv = BasicConv2d(cin, 128, 1)
    self.fc1 = nn.Linear(2048, 1024)
    self.fc2 = nn.Linear(1024, num_classes)

  def forward(self, x):
    x = torch.flatten(self.conv(F.adaptive_avg_pool2d(x, 4)), 1)
    return self.fc2(F.dropout(F.relu(self.fc1(x)), 0.7, self.training))


class GoogLeNet(nn.Module):
  def __init__(self, num_classes: int = 1000, aux_logits: bool = False):
    super().__init__()
    self.conv1 = BasicConv2d(3, 64, 7, 2, 3)
    self.maxpool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
    self.conv2 = BasicConv2d(64, 64, 1)
    self.conv3 = BasicConv2d(64, 192, 3, padding=1)
    self.maxpool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
    self.inception3a = Inception(192, 64, 96, 128, 16, 32, 32)
    self.inception3b = Inception(256, 128, 128, 192, 32, 96, 64)
    self.maxpool3 = nn.MaxPool2d(3, 2, ceil_mode=True)
    self.inception4a = Inception(480, 192, 96, 208, 16, 48, 64)
    self.inception4b = Inception(512, 160, 112, 224, 24, 64, 64)
    self.inception4c = Inception(512, 128, 128, 256, 24, 64, 64)
    self.inception4d = Inception(512, 112, 144, 288, 32, 64, 64)
    self.inception4e = Inception(528, 256, 160, 320, 32, 128, 128)
    self.maxpool4 = nn.MaxPool2d(2, 2, ceil_mode=True)
    self.inception5a = Inception(832, 256, 160, 320, 32, 128, 128)
    self.inception5b = Inception(832, 384, 192, 384, 48, 128, 128)
    if aux_logits:
      self.aux1 = InceptionAux(512, num_classes)
      self.aux2 = InceptionAux(528, num_classes)
    self.dropout = nn.Dropout(0.2)
    self.fc = nn.Linear(1024, num_classes)

  def forward(self, x):
    x = self.maxpool1(self.conv1(x))
    x = self.maxpool2(self.conv3(self.conv2(x)))
    x = self.maxpool3(self.inception3b(self.inception3a(x)))
    for name in ("4a", "4b", "4c", "4d", "4e"):
      x = getattr(self, f"inception{name}")(x)
    x = self.maxpool4(x)
    x = self.inception5b(self.inception5a(x))
    return self.fc(self.dropout(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)))


# --- DenseNet -------------------------------------------------------------------------------

DENSENET_CFGS = {121: (32, (6, 12, 24, 16), 64), 161: (48, (6, 12, 36, 24), 96)}


class DenseLayer(nn.Module):
  def __init__(self, cin: int, growth: int):
    super().__init__()
    self.norm1 = nn.BatchNorm2d(cin)
    self.relu1 = nn.ReLU()
    self.conv1 = nn.Conv2d(cin, 4 * growth, 1, bias=False)
    self.norm2 = nn.BatchNorm2d(4 * growth)
    self.relu2 = nn.ReLU()
    self.conv2 = nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False)

  def forward(self, x):
    return self.conv2(self.relu2(self.norm2(self.conv1(self.relu1(self.norm1(x))))))


class DenseBlock(nn.ModuleDict):
  def __init__(self, n: int, cin: int, growth: int):
    super().__init__()
    for i in range(n):
      self.add_module(f"denselayer{i + 1}", DenseLayer(cin + i * growth, growth))

  def forward(self, x):
    for layer in self.values():
      x = torch.cat([x, layer(x)], 1)
    return x


class Transition(nn.Sequential):
  def __init__(self, cin: int, cout: int):
    super().__init__()
    self.norm = nn.BatchNorm2d(cin)
    self.relu = nn.ReLU()
    self.conv = nn.Conv2d(cin, cout, 1, bias=False)
    self.pool = nn.AvgPool2d(2, 2)


class DenseNet(nn.Module):
  def __init__(self, depth: int, num_classes: int = 1000):
    super().__init__()
    growth, blocks, width = DENSENET_CFGS[depth]
    self.features = nn.Sequential()
    self.features.add_module("conv0", nn.Conv2d(3, width, 7, 2, 3, bias=False))
    self.features.add_module("norm0", nn.BatchNorm2d(width))
    self.features.add_module("relu0", nn.ReLU())
    self.features.add_module("pool0", nn.MaxPool2d(3, 2, 1))
    c = width
    for b, n in enumerate(blocks, start=1):
      self.features.add_module(f"denseblock{b}", DenseBlock(n, c, growth))
      c += n * growth
      if b < len(blocks):
        self.features.add_module(f"transition{b}", Transition(c, c // 2))
        c //= 2
    self.features.add_module("norm5", nn.BatchNorm2d(c))
    self.classifier = nn.Linear(c, num_classes)

  def forward(self, x):
    x = F.relu(self.features(x))
    return self.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# --- registry -------------------------------------------------------------------------------

def build(arch: str, num_classes: int = 1000, stem: str = "imagenet", **kwargs) -> nn.Module:
  """The torch twin of zoo model ``arch`` (``stem='cifar'``: ResNets only)."""
  if arch.startswith("resnet"):
    return ResNet(int(arch[6:]), num_classes, stem)
  if stem != "imagenet":
    raise ConfigError(f"stem={stem!r} for {arch}: the torch twins have the cifar stem for ResNets only; "
                      "allowed: imagenet")
  if arch.startswith("vgg"):
    return VGG(int(arch[3:5]), arch.endswith("_bn"), num_classes)
  if arch == "alexnet":
    return AlexNet(num_classes)
  if arch == "googlenet":
    return GoogLeNet(num_classes, **kwargs)
  if arch.startswith("densenet"):
    return DenseNet(int(arch[8:]), num_classes)
  raise ConfigError(f"no torch reference for {arch!r}; allowed: resnet*, vgg*, alexnet, googlenet, densenet*")


def randomize_batch_norm(model: nn.Module, seed: int = 0) -> None:
  """Gives every BatchNorm non-trivial affine parameters and running statistics, so the
  import test sees a wrong mapping of any of the four."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, nn.BatchNorm2d):
        n = m.num_features
        m.weight.copy_(1.0 + 0.2 * torch.randn(n, generator=g))
        m.bias.copy_(0.2 * torch.randn(n, generator=g))
        m.running_mean.copy_(0.2 * torch.randn(n, generator=g))
        m.running_var.copy_(0.5 + torch.rand(n, generator=g))


# Zoo layer name -> the twin's submodule whose output it is (ResNets).
RESNET_LAYER_MODULES = {"stem": "maxpool", "layer1": "layer1", "layer2": "layer2", "layer3": "layer3",
                        "layer4": "layer4"}


def load_flax_variables(net: nn.Module, arch: str, variables: Any) -> None:
  """Copies Flax zoo variables of ``arch`` into its twin ``net``, in place.

  The inverse of ``torchvision_import``'s table: conv kernels HWIO -> OIHW, dense
  kernels (in, out) -> (out, in), BatchNorm scale/bias/mean/var -> weight/bias/
  running_mean/running_var. Every tensor of ``net`` (``num_batches_tracked`` aside)
  must be written, with the shape the table expects.

  Args:
    net: the module from :func:`build` (either stem).
    arch: zoo name, one of ``torchvision_import.ARCHS``.
    variables: ``{'params': ..., 'batch_stats': ...}`` (nested dicts of arrays).
  Raises:
    ConfigError: ``net`` and the variables do not match.
  """
  import flax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from backdoor_jax.models import torchvision_import  # pylint: disable=g-import-not-at-top

  flat = flax.traverse_util.flatten_dict(variables)
  state = net.state_dict()
  written = set()
  for key, (path, kind, shape) in torchvision_import.expected_keys(arch, variables).items():
    if not path:
      continue
    value = np.asarray(flat[path], np.float32)
    if path[-1] == "kernel":
      value = value.transpose(3, 2, 0, 1) if kind == "conv" else value.T
    if key not in state or tuple(state[key].shape) != shape or value.shape != shape:
      raise ConfigError(f"{key}: the torch twin has {tuple(state[key].shape) if key in state else 'no such tensor'}, "
                        f"the Flax variables give {value.shape}; allowed: the same architecture and stem")
    with torch.no_grad():
      state[key].copy_(torch.from_numpy(np.ascontiguousarray(value)))
    written.add(key)
  missing = [k for k in state if k not in written and not k.endswith("num_batches_tracked")]
  if missing:
    raise ConfigError(f"torch tensors not written by the Flax variables: {missing[:5]}; allowed: the same "
                      "architecture")
