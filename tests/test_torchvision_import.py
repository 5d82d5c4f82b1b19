"""torchvision weight import: mapping tables, logits agreement with torch, bad files.

The agreement tests build random torch twins of torchvision's classifiers
(backdoor_jax/models/torch_reference.py, no download), save their state_dict, import it and
compare logits on one random input. "max relative difference" here is
max |jax - torch| / max |torch| over the logits. They need torch (skipped with a reason
without it); .ci/run installs it. The slowest cases can be skipped locally with
``BACKDOOR_JAX_SKIP_SLOW=1``; CI runs all of them.
"""
from __future__ import annotations

import functools
import os
import pickle

import numpy as np
import pytest
import jax
import flax

from backdoor_jax import models
from backdoor_jax.errors import ConfigError
from backdoor_jax.models import torchvision_import as ti

try:
  import torch
except ImportError:  # the agreement tests are skipped
  torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="torch is not installed (pip install torch==2.13.0)")
slow = pytest.mark.skipif(os.environ.get("BACKDOOR_JAX_SKIP_SLOW") == "1",
                          reason="BACKDOOR_JAX_SKIP_SLOW=1 (CI runs it)")
TOLERANCE = 1e-4

# Input side per family: VGG and AlexNet need a final map larger than 1x1, or the
# adaptive pool would replicate one value and hide a wrong flatten order.
INPUT_HW = {"alexnet": 128, "googlenet": 32, "densenet121": 32, "densenet161": 32}
SLOW = {"resnet101", "resnet152", "densenet161", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19"}


def _hw(arch: str) -> int:
  return INPUT_HW.get(arch, 64 if arch.startswith("vgg") else 32)


@functools.lru_cache(maxsize=None)
def _abstract(arch: str, num_classes: int = 1000, **options):
  model = models.get_model(arch, num_classes, stem="imagenet", **options)
  return model, jax.eval_shape(lambda k: models.init_variables(model, k, (1, 64, 64, 3)),
                               jax.random.key(0))


def _torch_model(arch: str, num_classes: int = 1000, **options):
  from backdoor_jax.models import torch_reference as trm  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  model = trm.build(arch, num_classes, **options)
  trm.randomize_batch_norm(model)
  return model.eval()


def max_relative_difference(arch: str, tmp_path, **options) -> float:
  """Imports a random torch twin of ``arch`` and returns the logits' max relative difference."""
  net = _torch_model(arch, **options)
  hw = _hw(arch)
  x = np.random.RandomState(0).randn(1, 3, hw, hw).astype(np.float32)
  with torch.no_grad():
    ref = net(torch.from_numpy(x)).numpy()
  path = os.path.join(tmp_path, f"{arch}.pth")
  torch.save(net.state_dict(), path)
  del net
  result = ti.import_torchvision(arch, path, **options)
  assert result.num_classes == 1000 and result.file_num_classes == 1000
  assert result.skipped == []
  out = jax.jit(functools.partial(result.model.apply, train=False))(
      result.variables, x.transpose(0, 2, 3, 1))
  return float(np.abs(np.asarray(out) - ref).max() / np.abs(ref).max())


# --- no torch needed ------------------------------------------------------------------------

@pytest.mark.parametrize("arch,options,count", [
    ("googlenet", {}, 6_624_904), ("googlenet", {"aux_logits": True}, 13_004_888),
    ("densenet121", {}, 7_978_856), ("densenet161", {}, 28_681_000)])
def test_param_counts_match_torchvision(arch, options, count):
  _, variables = _abstract(arch, **options)
  assert models.count_params(variables["params"]) == count


@pytest.mark.parametrize("arch,options", [(a, {}) for a in ti.ARCHS] + [("googlenet", {"aux_logits": True})])
def test_mapping_covers_every_variable_once(arch, options):
  _, variables = _abstract(arch, **options)
  table = ti.expected_keys(arch, variables, aux_logits=bool(options))
  paths = [p for p, _, _ in table.values() if p]
  assert len(paths) == len(set(paths))
  assert set(paths) == set(flax.traverse_util.flatten_dict(variables))
  n_bn = sum(kind == "bn" for _, _, kind in ti.torch_mapping(arch, bool(options)))
  assert sum(k.endswith("num_batches_tracked") for k in table) == n_bn


def test_mapping_rows_are_torchvision_names():
  rows = {t: (f, k) for t, f, k in ti.torch_mapping("resnet50")}
  assert rows["layer1.0.downsample.0"] == (("layer1_0", "downsample_conv"), "conv")
  assert rows["layer4.2.bn3"] == (("layer4_2", "bn3"), "bn")
  assert "layer1.1.downsample.0" not in rows and "layer2.0.downsample.1" in rows
  assert "layer1.0.downsample.0" not in dict((t, 0) for t, _, _ in ti.torch_mapping("resnet18"))
  vgg = {t: k for t, _, k in ti.torch_mapping("vgg11_bn")}
  assert vgg["features.0"] == "conv" and vgg["features.1"] == "bn" and vgg["features.4"] == "conv"
  assert vgg["classifier.6"] == "linear"
  dense = {t: f for t, f, _ in ti.torch_mapping("densenet121")}
  assert dense["features.denseblock3.denselayer24.conv2"] == ("features_denseblock3_denselayer24_conv2",)
  goog = {t: f for t, f, _ in ti.torch_mapping("googlenet", aux_logits=True)}
  assert goog["inception4e.branch4.1.bn"] == ("inception4e_branch4_1_bn",)
  assert goog["aux2.fc2"] == ("aux2_fc2",)


def test_layout_conversions():
  w = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)  # O, I, H, W
  _, name, k = ti._to_flax("conv", "weight", w)
  assert name == "kernel" and k.shape == (4, 5, 3, 2) and k[1, 2, 0, 1] == w[1, 0, 1, 2]
  _, name, k = ti._to_flax("linear", "weight", w[:, :, 0, 0])
  assert k.shape == (3, 2) and k[2, 1] == w[1, 2, 0, 0]
  assert ti._to_flax("bn", "running_var", w[0, 0, 0])[:2] == ("batch_stats", "var")
  assert ti._to_flax("bn", "weight", w[0, 0, 0])[:2] == ("params", "scale")


def _numpy_state_dict(arch: str, seed: int = 0, **options) -> dict[str, np.ndarray]:
  """A random state_dict with torchvision's keys and shapes, built without torch."""
  _, variables = _abstract(arch, **options)
  rng = np.random.RandomState(seed)
  out = {}
  for key, (_, _, shape) in ti.expected_keys(arch, variables, bool(options)).items():
    out[key] = (np.asarray(7, np.int64) if key.endswith("num_batches_tracked")
                else rng.rand(*shape).astype(np.float32) + 0.5)
  return out


def test_safetensors_import_without_torch(tmp_path, monkeypatch):
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  sd = _numpy_state_dict("resnet18")
  path = str(tmp_path / "r18.safetensors")
  save_file(sd, path)
  monkeypatch.setitem(__import__("sys").modules, "torch", None)  # `import torch` now fails
  result = ti.import_torchvision("resnet18", path)
  p, s = result.variables["params"], result.variables["batch_stats"]
  np.testing.assert_array_equal(p["conv1"]["kernel"], sd["conv1.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(p["fc"]["kernel"], sd["fc.weight"].T)
  np.testing.assert_array_equal(s["layer2_0"]["downsample_bn"]["var"], sd["layer2.0.downsample.1.running_var"])
  (tmp_path / "x.pth").write_bytes(b"")
  with pytest.raises(ConfigError, match="needs torch"):
    ti.load_state_dict(str(tmp_path / "x.pth"))


def test_new_head_keeps_fresh_init_and_reports_skipped(tmp_path):
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  sd = _numpy_state_dict("resnet18")
  path = str(tmp_path / "r18.safetensors")
  save_file(sd, path)
  result = ti.import_torchvision("resnet18", path, num_classes=37)
  assert result.skipped == ["fc.bias", "fc.weight"] and result.file_num_classes == 1000
  fc = result.variables["params"]["fc"]
  assert fc["kernel"].shape == (512, 37) and np.all(fc["bias"] == 0) and np.std(fc["kernel"]) > 0
  np.testing.assert_array_equal(result.variables["params"]["layer4_1"]["conv2"]["kernel"],
                                sd["layer4.1.conv2.weight"].transpose(2, 3, 1, 0))


def test_googlenet_aux_keys_skipped_when_model_has_none(tmp_path):
  sd = _numpy_state_dict("googlenet", aux_logits=True)
  _, variables = _abstract("googlenet")
  out, skipped = ti.convert_state_dict("googlenet", sd, variables, aux_logits=False)
  assert skipped and all(k.startswith(("aux1.", "aux2.")) for k in skipped)
  assert "aux1_fc1" not in out["params"]
  _, variables = _abstract("googlenet", aux_logits=True)
  out, skipped = ti.convert_state_dict("googlenet", sd, variables, aux_logits=True)
  assert skipped == [] and out["params"]["aux2_fc1"]["kernel"].shape == (2048, 1024)


def test_mismatching_state_dict_lists_first_keys():
  sd = _numpy_state_dict("resnet18")
  _, variables = _abstract("resnet34")
  with pytest.raises(ConfigError, match=r"resnet34: .*missing: layer1\.2\.conv1\.weight") as info:
    ti.convert_state_dict("resnet34", sd, variables)
  assert len(str(info.value).splitlines()) == 1 and "more" in str(info.value)
  bad = dict(sd)
  bad["layer3.0.conv2.weight"] = bad["layer3.0.conv2.weight"][:, :5]
  bad["extra.weight"] = np.zeros(3, np.float32)
  _, variables = _abstract("resnet18")
  with pytest.raises(ConfigError, match=r"1 unexpected: extra\.weight; 1 wrong shape: "
                                        r"layer3\.0\.conv2\.weight \(256, 5, 3, 3\) \(model \(256, 256, 3, 3\)\)"):
    ti.convert_state_dict("resnet18", bad, variables)


def test_bad_files_are_config_errors(tmp_path):
  with pytest.raises(ConfigError, match="does not exist"):
    ti.load_state_dict(str(tmp_path / "none.pth"))
  (tmp_path / "w.npz").write_bytes(b"x")
  with pytest.raises(ConfigError, match="unknown suffix"):
    ti.load_state_dict(str(tmp_path / "w.npz"))
  (tmp_path / "w.safetensors").write_bytes(b"not a safetensors file")
  with pytest.raises(ConfigError, match="not a readable .safetensors"):
    ti.load_state_dict(str(tmp_path / "w.safetensors"))
  with pytest.raises(ConfigError, match="unknown torchvision architecture 'resnet9'"):
    ti.import_torchvision("resnet9", str(tmp_path / "w.safetensors"))


# --- with torch -----------------------------------------------------------------------------

class _Payload:
  """Unpickling this would create ``marker`` (it must never happen)."""

  def __init__(self, marker: str):
    self.marker = marker

  def __reduce__(self):
    return (open, (self.marker, "w"))


@needs_torch
def test_pickle_payload_is_never_unpickled(tmp_path):
  marker = str(tmp_path / "pwned")
  path = str(tmp_path / "evil.pth")
  with open(path, "wb") as f:  # a zip-less legacy pickle holding an object
    pickle.dump({"fc.weight": _Payload(marker)}, f)
  with pytest.raises(ConfigError, match="weights_only=True"):
    ti.load_state_dict(path)
  torch.save({"fc.weight": _Payload(marker)}, path)
  with pytest.raises(ConfigError, match="weights_only=True"):
    ti.load_state_dict(path)
  assert not os.path.exists(marker)


@needs_torch
def test_torch_file_wrappers_and_dtypes(tmp_path):
  path = str(tmp_path / "w.pt")
  torch.save({"state_dict": {"module.fc.weight": torch.ones(2, 3, dtype=torch.bfloat16),
                             "module.bn.num_batches_tracked": torch.tensor(5)}}, path)
  sd = ti.load_state_dict(path)
  assert set(sd) == {"fc.weight", "bn.num_batches_tracked"}
  assert sd["fc.weight"].dtype == np.float32 and sd["bn.num_batches_tracked"].dtype == np.int64
  torch.save({"fc.weight": [1, 2]}, path)
  with pytest.raises(ConfigError, match="not a tensor"):
    ti.load_state_dict(path)


@needs_torch
@pytest.mark.parametrize("arch", [pytest.param(a, marks=slow) if a in SLOW else a for a in ti.ARCHS])
def test_logits_match_torch(arch, tmp_path):
  diff = max_relative_difference(arch, str(tmp_path))
  print(f"\n{arch}: max relative difference {diff:.2e}")
  assert diff < TOLERANCE


@needs_torch
@slow
def test_googlenet_with_aux_heads_matches_torch(tmp_path):
  assert max_relative_difference("googlenet", str(tmp_path), aux_logits=True) < TOLERANCE


@needs_torch
def test_head_size_read_from_file(tmp_path):
  net = _torch_model("resnet18", num_classes=10)
  path = str(tmp_path / "r18_10.pth")
  torch.save(net.state_dict(), path)
  result = ti.import_torchvision("resnet18", path)  # the head size comes from the file
  assert result.num_classes == 10 and result.skipped == []
  assert result.variables["params"]["fc"]["kernel"].shape == (512, 10)
  np.testing.assert_array_equal(result.variables["batch_stats"]["bn1"]["mean"],
                                net.bn1.running_mean.numpy())
