"""backdoor_jax.models.torch_reference.load_flax_variables: Flax zoo weights in the PyTorch twin."""
from __future__ import annotations

import jax
import numpy as np
import pytest

from backdoor_jax import models
from backdoor_jax.errors import ConfigError

torch = pytest.importorskip("torch")
from backdoor_jax.models import torch_reference  # noqa: E402  (needs torch)


@pytest.mark.parametrize("stem,size", [("cifar", 16), ("imagenet", 32)])
def test_flax_variables_give_the_same_logits_in_torch(stem, size):
  model = models.get_model("resnet18", 7, stem=stem)
  variables = models.init_variables(model, jax.random.key(0), (1, size, size, 3))
  rng = np.random.default_rng(0)  # BatchNorm statistics away from the identity, so a mix-up shows
  variables = jax.tree_util.tree_map_with_path(
      lambda p, v: rng.uniform(0.5, 1.5, v.shape).astype(np.float32) if str(p[-1]) in ("['var']", "['scale']")
      else (rng.normal(0, 0.1, v.shape).astype(np.float32) if str(p[-1]) == "['mean']" else np.asarray(v)),
      variables)
  net = torch_reference.build("resnet18", 7, stem=stem)
  torch_reference.load_flax_variables(net, "resnet18", variables)
  x = rng.normal(size=(2, size, size, 3)).astype(np.float32)
  ours = np.asarray(model.apply(variables, x, train=False))
  with torch.no_grad():
    ref = net.eval()(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
  assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()


def test_mismatched_variables_are_a_config_error():
  model = models.get_model("resnet18", 7, stem="cifar")
  variables = models.init_variables(model, jax.random.key(0), (1, 16, 16, 3))
  with pytest.raises(ConfigError, match="conv1.weight"):
    torch_reference.load_flax_variables(torch_reference.build("resnet18", 7, stem="imagenet"), "resnet18", variables)
  with pytest.raises(ConfigError, match="allowed: imagenet"):
    torch_reference.build("vgg11", 7, stem="cifar")
