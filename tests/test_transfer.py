"""Transfer learning: init checkpoints from imported weights, recipes, loud random init."""
from __future__ import annotations

import functools
import os

import numpy as np
import pytest
import jax
import flax

from backdoor_jax import models
from backdoor_jax.errors import ConfigError
from backdoor_jax.configs import pets_transfer, sok_transfer
from backdoor_jax.models import torchvision_import as ti
from backdoor_jax.train import checkpoint as ckpt_lib
from backdoor_jax.train import init_weights, optim, steps
from backdoor_jax.train.recipes import badnets
from backdoor_jax.train.restore import model_kwargs
from tests.helpers import REPO, apply_overrides


@functools.lru_cache(maxsize=None)
def _abstract(name: str, num_classes: int, **kw):
  model = models.get_model(name, num_classes, **kw)
  return jax.eval_shape(lambda k: models.init_variables(model, k, (1, 64, 64, 3)), jax.random.key(0))


def _safetensors_file(tmp_path, arch: str = "resnet18") -> tuple[str, dict[str, np.ndarray]]:
  """A random torchvision-layout state_dict of ``arch`` saved as .safetensors (no torch)."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  variables = _abstract(arch, 1000, stem="imagenet")
  rng = np.random.RandomState(1)
  sd = {k: (np.asarray(3, np.int64) if k.endswith("num_batches_tracked") else
            (rng.rand(*shape).astype(np.float32) * 0.1 + 0.95 if k.endswith(("running_var", "bn1.weight"))
             else rng.randn(*shape).astype(np.float32) * 0.05))
        for k, (_, _, shape) in ti.expected_keys(arch, variables).items()}
  path = str(tmp_path / f"{arch}.safetensors")
  save_file(sd, path)
  return path, sd


def _count(config, num_classes: int) -> tuple[int, int]:
  variables = _abstract(config.model.name, num_classes, **model_kwargs(config))
  return (models.count_params(variables["params"]),
          optim.count_trainable(variables["params"], config.train.trainable))


# --- recipes --------------------------------------------------------------------------------

def test_pets_recipe():
  c = pets_transfer.get_config()
  assert (c.model.name, c.model.stem, c.data.name, c.data.image_size) == ("resnet50", "imagenet", "oxford_iiit_pet", 224)
  assert (c.train.optimizer, c.train.lr, c.train.epochs, c.train.batch_size) == ("adam", 1e-3, 10, 32)
  assert tuple(c.data.mean) == tuple(c.data.std) == (0.5, 0.5, 0.5)
  assert (c.poison.rate, c.poison.target, c.trigger.kind, c.trigger.position) == (0.1, 0, "stripe", "top-left")
  dots = pets_transfer.get_config("dots")
  assert (dots.trigger.kind, dots.trigger.position) == ("dots", "bottom-right")
  assert c.model.pretrained_required and c.model.init_checkpoint == ""
  assert _count(c, 37) == (23_583_845, 2048 * 37 + 37)
  with pytest.raises(ValueError, match="stripe, dots, offline"):
    pets_transfer.get_config("zebra")


@pytest.mark.parametrize("arch,trainable", [("alexnet", 54_575_114), ("googlenet", 24_810),
                                            ("vgg19_bn", 51_978), ("resnet152", 171_914)])
def test_sok_freezing_rules(arch, trainable):
  c = sok_transfer.get_config(arch)
  total, n = _count(c, 10)
  assert n == trainable
  mask = flax.traverse_util.flatten_dict(optim.trainable_mask(_abstract(arch, 10, **model_kwargs(c))["params"],
                                                              c.train.trainable))
  trained = {"/".join(p[:-1]) for p, m in mask.items() if m}
  head = {"alexnet": "classifier_6", "googlenet": "fc", "vgg19_bn": "classifier_6", "resnet152": "fc"}[arch]
  assert head in trained
  if arch == "alexnet":
    assert trained == {"classifier_1", "classifier_4", "classifier_6"}
  else:  # the head and exactly the BatchNorm layers (those with a running mean)
    stats = flax.traverse_util.flatten_dict(_abstract(arch, 10, **model_kwargs(c))["batch_stats"])
    assert trained == {head} | {"/".join(p[:-1]) for p in stats}
  assert sok_transfer.get_config(f"{arch},gtsrb").data.name == "gtsrb"


# --- init checkpoints -----------------------------------------------------------------------

@functools.lru_cache(maxsize=None)  # its absl flags may be defined once per process
def _import_weights_module():
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("import_weights", os.path.join(REPO, "launch", "import_weights.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_import_cli_checkpoint_round_trip_and_new_head(tmp_path):
  src, sd = _safetensors_file(tmp_path)
  meta = _import_weights_module().run("resnet18", src, str(tmp_path / "ck"))
  assert meta["num_classes"] == 1000 and meta["skipped_keys"] == [] and meta["num_params"] == 11_689_512
  loaded, meta2 = init_weights.load_init_checkpoint(str(tmp_path / "ck"))
  assert meta2["arch"] == "resnet18"
  np.testing.assert_array_equal(loaded["params"]["layer3_1"]["conv2"]["kernel"],
                                sd["layer3.1.conv2.weight"].transpose(2, 3, 1, 0))
  fresh = jax.tree_util.tree_map(lambda s: np.full(s.shape, 7.0, np.float32),
                                 _abstract("resnet18", 37, stem="imagenet"))
  merged, kept = init_weights.merge_variables(fresh, loaded, ti.head_modules("resnet18"))
  assert kept == ["params/fc/bias", "params/fc/kernel"]
  assert np.all(merged["params"]["fc"]["kernel"] == 7.0)
  np.testing.assert_array_equal(merged["batch_stats"]["bn1"]["var"], sd["bn1.running_var"])
  with pytest.raises(ConfigError, match="already holds"):
    _import_weights_module().run("resnet18", src, str(tmp_path / "ck"))


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
  src, _ = _safetensors_file(tmp_path)
  _import_weights_module().run("resnet18", src, str(tmp_path / "ck"))
  loaded, _ = init_weights.load_init_checkpoint(str(tmp_path / "ck"))
  with pytest.raises(ConfigError, match=r"\d+ mismatches: .*layer1_2") as info:
    init_weights.merge_variables(_abstract("resnet34", 10, stem="imagenet"), loaded, ("fc",))
  assert len(str(info.value).splitlines()) == 1
  c = pets_transfer.get_config("offline")
  c.model.name = "resnet34"
  c.model.init_checkpoint = str(tmp_path / "ck")
  with pytest.raises(ConfigError, match="holds 'resnet18' weights but model.name='resnet34'"):
    init_weights.initial_variables(c, {})
  c.model.init_checkpoint = str(tmp_path)
  with pytest.raises(ConfigError, match="not an init checkpoint"):
    init_weights.initial_variables(c, {})


def test_random_init_is_loud(capsys):
  c = pets_transfer.get_config("offline")
  fresh = {"params": {}}
  assert init_weights.initial_variables(c, fresh) is fresh
  err = capsys.readouterr().err
  assert "WARNING" in err and "RANDOM initialisation" in err and "resnet50" in err
  c.model.pretrained_required = False
  init_weights.initial_variables(c, fresh)
  assert "WARNING" not in capsys.readouterr().err


def test_input_normalisation_override():
  spec = steps.InputSpec(mean=(0.1,) * 3, std=(0.2,) * 3)
  c = pets_transfer.get_config("offline")
  assert init_weights.input_normalisation(c, spec).mean == (0.5, 0.5, 0.5)
  c.data.mean, c.data.std = (), ()
  assert init_weights.input_normalisation(c, spec) is spec
  c.data.mean, c.data.std = (0.5,), (0.5,)
  with pytest.raises(ConfigError, match="3 values each"):
    init_weights.input_normalisation(c, spec)


@pytest.mark.skipif(os.environ.get("BACKDOOR_JAX_SKIP_SLOW") == "1", reason="BACKDOOR_JAX_SKIP_SLOW=1 (CI runs it)")
def test_training_starts_from_init_checkpoint_with_frozen_backbone(tmp_path):
  """resnet18 from imported weights, only fc trains: the backbone ends exactly as imported."""
  src, sd = _safetensors_file(tmp_path)
  _import_weights_module().run("resnet18", src, str(tmp_path / "ck"))
  c = pets_transfer.get_config("offline")
  c = apply_overrides(c, **{"model.name": "resnet18", "model.init_checkpoint": str(tmp_path / "ck"),
                            "data.image_size": 32, "data.max_train": 64, "data.max_test": 32,
                            "train.epochs": 1, "train.batch_size": 32, "train.eval_batch_size": 32,
                            "figures": False})
  results = badnets.train(c, str(tmp_path / "run"))
  assert results["num_trainable_params"] == 512 * 10 + 10
  ck = ckpt_lib.Checkpointer(str(tmp_path / "run"))
  meta = ck.restore_meta(ck.latest())
  ck.close()
  assert meta["mean"] == [0.5, 0.5, 0.5]
  from backdoor_jax.train import restore  # pylint: disable=g-import-not-at-top
  run = restore.load_run(str(tmp_path / "run"))
  np.testing.assert_array_equal(run.variables["params"]["layer2_0"]["conv1"]["kernel"],
                                sd["layer2.0.conv1.weight"].transpose(2, 3, 1, 0))
  assert run.variables["params"]["fc"]["kernel"].shape == (512, 10)
