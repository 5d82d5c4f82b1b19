"""Tests of the model zoo: torchvision parity (param counts, names, shapes) and conventions."""
from __future__ import annotations

import functools

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from backdoor_jax import models
from backdoor_jax.errors import ConfigError
from backdoor_jax.models import vgg as vgg_lib

RNG = jax.random.PRNGKey(0)


def real_init(model, input_shape):
  """Real (jitted, hence cheap to compile on CPU) ``init_variables``."""
  return jax.jit(functools.partial(models.init_variables, model, input_shape=input_shape))(RNG)

TORCHVISION_PARAMS = {
    "resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032,
    "resnet101": 44_549_160, "resnet152": 60_192_808,
    "vgg11": 132_863_336, "vgg11_bn": 132_868_840, "vgg13": 133_047_848, "vgg13_bn": 133_053_736,
    "vgg16": 138_357_544, "vgg16_bn": 138_365_992, "vgg19": 143_667_240, "vgg19_bn": 143_678_248,
    "alexnet": 61_100_840,
}
CIFAR_ONLY = ("small_cnn", "preact_resnet18")
CASES = ([(n, "cifar", 32) for n in models.MODEL_NAMES]
         + [(n, "imagenet", 64) for n in models.MODEL_NAMES if n not in CIFAR_ONLY])


@functools.lru_cache(maxsize=None)
def abstract_init(name: str, stem: str, hw: int, batch: int = 2, **kwargs):
  """eval_shape of init with every collection mutable: (logits, variables) shapes."""
  model = models.get_model(name, 1000 if stem == "imagenet" else 10, stem=stem, **kwargs)
  init = functools.partial(model.init_with_output, train=False, mutable=True)
  x = jax.ShapeDtypeStruct((batch, hw, hw, 3), jnp.float32)
  return model, jax.eval_shape(init, {"params": RNG, "dropout": RNG}, x)


def test_model_names():
  expected = {"small_cnn", "preact_resnet18", "alexnet", "googlenet", "densenet121", "densenet161"}
  expected |= {f"resnet{d}" for d in (18, 34, 50, 101, 152)}
  expected |= {f"vgg{d}{bn}" for d in (11, 13, 16, 19) for bn in ("", "_bn")}
  assert isinstance(models.MODEL_NAMES, tuple) and set(models.MODEL_NAMES) == expected


@pytest.mark.parametrize("name", sorted(TORCHVISION_PARAMS))
def test_param_count_matches_torchvision(name):
  _, (_, variables) = abstract_init(name, "imagenet", 64)
  assert models.count_params(variables["params"]) == TORCHVISION_PARAMS[name]


@pytest.mark.parametrize("name,kwargs,count", [
    ("resnet18", {}, 11_173_962),  # the usual CIFAR ResNet-18 (kuangliu/BackdoorBench).
    ("preact_resnet18", {"final_norm": False}, 11_171_146),  # BackdoorBench exactly.
    ("preact_resnet18", {}, 11_171_146 + 2 * 512),  # + final BatchNorm.
    ("small_cnn", {}, 186_474),
])
def test_param_count_cifar(name, kwargs, count):
  _, (_, variables) = abstract_init(name, "cifar", 32, **kwargs)
  assert models.count_params(variables["params"]) == count


@pytest.mark.parametrize("name,stem,hw", CASES)
def test_output_shape_and_exposed_layers(name, stem, hw):
  model, (logits, variables) = abstract_init(name, stem, hw)
  num_classes = 1000 if stem == "imagenet" else 10
  assert logits.shape == (2, num_classes) and logits.dtype == jnp.float32
  names = model.layer_names
  assert isinstance(names, tuple) and len(set(names)) == len(names)
  assert names == models.layer_names(name, stem=stem)
  sown = variables["intermediates"]
  assert set(sown) == set(names) == set(variables["perturbations"])
  for i, layer in enumerate(names):
    (act,) = sown[layer]
    assert act.shape[0] == 2
    assert act.shape == variables["perturbations"][layer].shape
    flat = layer == "pool" or layer.startswith("classifier")
    assert act.ndim == (2 if flat else 4), (layer, act.shape)
    assert (act.ndim == 2) == (i == len(names) - 1 or layer.startswith("classifier"))
  if any(k.startswith("bn") or "_bn" in k for k in _all_paths(variables["params"])):
    assert "batch_stats" in variables


def _all_paths(tree):
  return ["/".join(str(getattr(k, "key", k)) for k in path)
          for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def test_layer_names_exact():
  assert models.layer_names("resnet50") == ("stem", "layer1", "layer2", "layer3", "layer4", "pool")
  assert models.layer_names("small_cnn") == ("conv1", "conv2", "conv3", "conv4", "conv5", "pool")
  assert models.layer_names("small_cnn", widths=[8, 8]) == ("conv1", "conv2", "pool")
  vgg16 = models.layer_names("vgg16", stem="imagenet")
  assert vgg16[:4] == ("features_1", "features_3", "features_4", "features_6")
  assert vgg16[-4:] == ("features_29", "features_30", "classifier_1", "classifier_4")
  vgg16_bn = models.layer_names("vgg16_bn")
  assert vgg16_bn[:3] == ("features_2", "features_5", "features_6")
  assert vgg16_bn[-3:] == ("features_42", "features_43", "pool")
  assert models.layer_names("alexnet") == (
      "features_1", "features_2", "features_4", "features_5", "features_7", "features_9",
      "features_11", "features_12", "classifier_2", "classifier_5")


@pytest.mark.parametrize("name,layer,shape", [
    ("resnet50", "stem", (1, 56, 56, 64)), ("resnet50", "layer4", (1, 7, 7, 2048)),
    ("resnet18", "layer2", (1, 28, 28, 128)), ("vgg16", "features_29", (1, 14, 14, 512)),
    ("vgg16", "features_30", (1, 7, 7, 512)), ("alexnet", "features_12", (1, 6, 6, 256)),
])
def test_imagenet_224_shapes(name, layer, shape):
  _, (_, variables) = abstract_init(name, "imagenet", 224, batch=1)
  assert variables["intermediates"][layer][0].shape == shape


def test_cifar_shapes():
  _, (_, v) = abstract_init("resnet18", "cifar", 32)
  assert v["intermediates"]["stem"][0].shape == (2, 32, 32, 64)
  assert v["intermediates"]["layer4"][0].shape == (2, 4, 4, 512)
  _, (_, v) = abstract_init("vgg11", "cifar", 32)
  assert v["intermediates"]["features_20"][0].shape == (2, 1, 1, 512)
  assert v["params"]["classifier"]["kernel"].shape == (512, 10)
  _, (_, v) = abstract_init("alexnet", "cifar", 32)
  assert v["params"]["features_0"]["kernel"].shape == (3, 3, 3, 64)
  assert v["params"]["classifier_1"]["kernel"].shape == (2304, 1024)


def test_torchvision_param_names():
  _, (_, v) = abstract_init("resnet50", "imagenet", 64)
  p = v["params"]
  assert p["conv1"]["kernel"].shape == (7, 7, 3, 64) and "bias" not in p["conv1"]
  assert p["layer1_0"]["downsample_conv"]["kernel"].shape == (1, 1, 64, 256)
  assert p["layer4_2"]["bn3"]["scale"].shape == (2048,)
  assert "downsample_conv" not in p["layer1_1"]
  assert p["fc"]["kernel"].shape == (2048, 1000)
  assert v["batch_stats"]["layer3_5"]["bn2"]["mean"].shape == (256,)
  _, (_, v) = abstract_init("vgg16_bn", "imagenet", 64)
  assert v["params"]["features_40"]["kernel"].shape == (3, 3, 512, 512)
  assert v["params"]["features_41"]["scale"].shape == (512,)
  assert v["params"]["classifier_0"]["kernel"].shape == (25088, 4096)
  assert v["params"]["classifier_6"]["kernel"].shape == (4096, 1000)
  _, (_, v) = abstract_init("alexnet", "imagenet", 64)
  assert sorted(v["params"]) == ["classifier_1", "classifier_4", "classifier_6", "features_0",
                                 "features_10", "features_3", "features_6", "features_8"]
  assert v["params"]["features_0"]["kernel"].shape == (11, 11, 3, 64)
  _, (_, v) = abstract_init("preact_resnet18", "cifar", 32)
  assert set(v["params"]["layer2_0"]) == {"bn1", "conv1", "bn2", "conv2", "shortcut_0"}
  assert "final_bn" in v["params"] and "linear" in v["params"]


def test_bottleneck_stride_on_3x3():
  """torchvision v1.5: the first block of layer2 strides in conv2, not conv1."""
  model = models.get_model("resnet50", 10, stem="imagenet")
  x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  variables = jax.eval_shape(lambda: real_init(model, (1, 64, 64, 3)))
  apply = functools.partial(model.apply, train=False, capture_intermediates=True,
                            mutable=["intermediates"])
  _, state = jax.eval_shape(apply, variables, x)
  block = state["intermediates"]["layer2_0"]
  assert block["conv1"]["__call__"][0].shape == (1, 16, 16, 128)
  assert block["conv2"]["__call__"][0].shape == (1, 8, 8, 128)


# --- adaptive average pooling -----------------------------------------------------------------

def _slow_adaptive_pool(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
  b, h, w, c = x.shape
  y = np.zeros((b, out_h, out_w, c), np.float64)
  for i in range(out_h):
    h0, h1 = int(np.floor(i * h / out_h)), int(np.ceil((i + 1) * h / out_h))
    for j in range(out_w):
      w0, w1 = int(np.floor(j * w / out_w)), int(np.ceil((j + 1) * w / out_w))
      y[:, i, j] = x[:, h0:h1, w0:w1].mean(axis=(1, 2))
  return y


def test_adaptive_pool_block_means():
  x = np.random.RandomState(0).randn(2, 4, 4, 3).astype(np.float32)
  expected = x.reshape(2, 2, 2, 2, 2, 3).mean(axis=(2, 4))
  y = models.adaptive_avg_pool(jnp.asarray(x), 2)
  np.testing.assert_allclose(y, expected, rtol=1e-6, atol=1e-6)


def test_adaptive_pool_replicates_small_input():
  x = np.random.RandomState(1).randn(2, 1, 1, 5).astype(np.float32)
  y = models.adaptive_avg_pool(jnp.asarray(x), 7)
  np.testing.assert_allclose(y, np.broadcast_to(x, (2, 7, 7, 5)), rtol=1e-6)


@pytest.mark.parametrize("in_hw,out_hw", [((5, 7), (3, 4)), ((10, 10), (7, 7)), ((3, 2), (7, 6)),
                                          ((13, 13), (6, 6))])
def test_adaptive_pool_matches_slow_loop(in_hw, out_hw):
  x = np.random.RandomState(2).randn(2, *in_hw, 3).astype(np.float32)
  y = models.adaptive_avg_pool(jnp.asarray(x), out_hw)
  np.testing.assert_allclose(y, _slow_adaptive_pool(x, *out_hw), rtol=1e-5, atol=1e-6)


def test_adaptive_pool_identity_and_dtype():
  x = jnp.ones((1, 7, 7, 2), jnp.bfloat16)
  assert models.adaptive_avg_pool(x, 7) is x
  assert models.adaptive_avg_pool(x, (3, 2)).dtype == jnp.bfloat16


def test_flatten_chw_is_torch_order():
  x = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)  # NHWC
  np.testing.assert_array_equal(vgg_lib.flatten_chw(jnp.asarray(x)),
                                x.transpose(0, 3, 1, 2).reshape(2, -1))


# --- registry errors ----------------------------------------------------------------------------

def test_unknown_model_raises_config_error():
  with pytest.raises(ConfigError, match="resnet9000") as info:
    models.get_model("resnet9000", 10)
  assert "resnet18" in str(info.value) and "small_cnn" in str(info.value)
  with pytest.raises(ConfigError, match="resnet9000"):
    models.layer_names("resnet9000")


def test_bad_stem_and_options_raise_config_error():
  with pytest.raises(ConfigError, match="imagenet"):
    models.get_model("resnet18", 10, stem="tiny")
  with pytest.raises(ConfigError, match="cifar"):
    models.get_model("small_cnn", 10, stem="imagenet")
  with pytest.raises(ConfigError, match="depth"):
    models.get_model("resnet18", 10, depth=4)
  with pytest.raises(ConfigError, match="pool_after"):
    models.get_model("small_cnn", 10, widths=[8], pool_after=[2])


# --- real forward passes (small models only) --------------------------------------------------

def _xent(logits, labels):
  return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1))


@pytest.mark.parametrize("name", ["small_cnn", "resnet18"])
def test_forward_and_grad_finite(name):
  model = models.get_model(name, 10)
  variables = real_init(model, (2, 32, 32, 3))
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))
  labels = jnp.array([1, 7])

  def loss_fn(params):
    logits, state = model.apply({**variables, "params": params}, x, train=True,
                                mutable=["batch_stats"])
    return _xent(logits, labels), state

  (loss, state), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(variables["params"])
  assert np.isfinite(float(loss))
  leaves = jax.tree_util.tree_leaves(grads)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
  assert sum(float(jnp.abs(g).sum()) for g in leaves) > 0
  assert jax.tree_util.tree_structure(state["batch_stats"]) == jax.tree_util.tree_structure(
      variables["batch_stats"])


def test_train_updates_batch_stats_and_eval_is_deterministic():
  model = models.get_model("small_cnn", 10, widths=(8, 8, 8))
  variables = real_init(model, (2, 16, 16, 3))
  x = jax.random.normal(jax.random.PRNGKey(3), (4, 16, 16, 3)) + 2.0
  _, state = model.apply(variables, x, train=True, mutable=["batch_stats"])
  old, new = variables["batch_stats"]["block1"]["bn"], state["batch_stats"]["block1"]["bn"]
  assert not np.allclose(old["mean"], new["mean"])
  # torch momentum 0.1 == flax momentum 0.9: new = 0.9 * 0 + 0.1 * batch mean of the conv output.
  _, captured = model.apply(variables, x, train=True, capture_intermediates=True,
                            mutable=["intermediates", "batch_stats"])
  conv_out = np.asarray(captured["intermediates"]["block1"]["conv"]["__call__"][0])
  np.testing.assert_allclose(new["mean"], 0.1 * conv_out.mean((0, 1, 2)), rtol=1e-5, atol=1e-6)
  y1 = model.apply(variables, x, train=False)
  y2 = model.apply(variables, x, train=False)
  np.testing.assert_array_equal(y1, y2)


def test_dropout_only_in_training():
  model = models.get_model("alexnet", 10)
  variables = real_init(model, (1, 32, 32, 3))
  x = jax.random.normal(jax.random.PRNGKey(4), (2, 32, 32, 3))
  ev = [model.apply(variables, x, train=False, rngs={"dropout": jax.random.PRNGKey(i)})
        for i in (0, 1)]
  np.testing.assert_array_equal(ev[0], ev[1])
  tr = [model.apply(variables, x, train=True, rngs={"dropout": jax.random.PRNGKey(i)})
        for i in (0, 1)]
  assert not np.allclose(tr[0], tr[1])


def test_perturbation_gradient_is_activation_gradient():
  model = models.get_model("small_cnn", 10, widths=(8, 16))
  variables = real_init(model, (2, 16, 16, 3))
  x = jax.random.normal(jax.random.PRNGKey(5), (2, 16, 16, 3))
  _, state = model.apply(variables, x, train=False, mutable=["perturbations"])
  zeros = state["perturbations"]

  def total(perts):
    return model.apply({**variables, "perturbations": perts}, x, train=False).sum()

  grads = jax.grad(total)(zeros)
  kernel = variables["params"]["fc"]["kernel"]
  np.testing.assert_allclose(grads["pool"], np.broadcast_to(kernel.sum(axis=1), (2, 16)), rtol=1e-5)
  assert float(jnp.abs(grads["conv1"]).sum()) > 0


def test_bfloat16_compute_keeps_float32_params():
  model = models.get_model("small_cnn", 10, dtype=jnp.bfloat16, widths=(8, 8))
  variables = real_init(model, (2, 16, 16, 3))
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(variables["params"]))
  x = jax.random.normal(jax.random.PRNGKey(6), (2, 16, 16, 3))
  logits, state = model.apply(variables, x, train=False, mutable=["intermediates"])
  assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))
  assert state["intermediates"]["conv2"][0].dtype == jnp.bfloat16
  assert tuple(state["intermediates"]) == model.layer_names  # sown in forward order.
  for name in ("resnet18", "vgg11_bn", "alexnet", "preact_resnet18"):
    m, (out, v) = abstract_init(name, "cifar", 32, dtype=jnp.bfloat16)
    assert out.dtype == jnp.float32
    assert {p.dtype for p in jax.tree_util.tree_leaves(v["params"])} == {jnp.dtype(jnp.float32)}
    assert v["intermediates"][m.layer_names[1]][0].dtype == jnp.bfloat16
