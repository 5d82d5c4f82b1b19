"""Rebuild a trained model from its work dir (config.json + newest checkpoint)."""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
from absl import logging
from ml_collections import config_dict

from backdoor_jax import io, models
from backdoor_jax.errors import ConfigError, check_choice
from backdoor_jax.train import checkpoint as ckpt_lib
from backdoor_jax.train import optim, state as state_lib, steps


@dataclasses.dataclass
class TrainedRun:
  """A trained model ready for inference or explanation."""
  workdir: str
  config: config_dict.ConfigDict
  model: Any
  variables: dict[str, Any]       # params (+ batch_stats)
  num_classes: int
  image_shape: tuple[int, int, int]
  input_spec: steps.InputSpec     # mean/std normalisation (no augmentation)
  class_names: tuple[str, ...]
  epoch: int


def model_kwargs(c: config_dict.ConfigDict) -> dict[str, Any]:
  """The zoo keyword arguments a config's ``model`` section asks for."""
  kw = {"stem": c.model.stem}
  if c.model.name == "small_cnn":
    if c.model.get("widths"):
      kw["widths"] = tuple(c.model.widths)
    if c.model.get("pool_after") is not None:
      kw["pool_after"] = tuple(c.model.pool_after)
  if c.model.name == "googlenet":
    for key in ("aux_logits", "transform_input"):
      if c.model.get(key) is not None:
        kw[key] = bool(c.model[key])
  return kw


COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


def compute_dtype(c: config_dict.ConfigDict) -> Any:
  """The model's computation dtype for training (``train.dtype``); params stay float32.

  bfloat16 has float32's exponent range, so it needs no loss scaling. float16 (for GPUs
  without fast bfloat16, e.g. V100 or T4) does: ``optim.make_optimizer`` then wraps the
  optimiser in dynamic loss scaling, starting at ``train.loss_scale_init``. Losses,
  softmax and Grad-CAM maps are computed in float32 (the models cast their logits,
  ``explain.gradcam`` its maps). Restored runs (explain, defend) evaluate in float32.

  Raises:
    ConfigError: an unknown dtype name.
  """
  import jax.numpy as jnp
  name = c.train.get("dtype", "float32")
  check_choice("train.dtype", name, COMPUTE_DTYPES)
  return jnp.dtype(name)


def read_run_config(workdir: str) -> config_dict.ConfigDict:
  """The resolved config a run wrote (``WORKDIR/config.json``).

  Raises:
    ConfigError: no such folder; checkpoints without ``config.json`` (they cannot be
      matched to a model); a ``config.json`` that is not valid JSON or not a training
      config. Each names the file.
  """
  workdir = os.path.abspath(workdir)
  if not os.path.isdir(workdir):
    what = "is a file, not a folder" if os.path.exists(workdir) else "does not exist"
    raise ConfigError(f"work dir {workdir} {what} (no config.json to load); pass the --workdir of a training run")
  cfg_path = os.path.join(workdir, "config.json")
  if not os.path.exists(cfg_path):
    if os.path.isdir(os.path.join(workdir, "checkpoints")) and os.listdir(os.path.join(workdir, "checkpoints")):
      raise ConfigError(f"work dir {workdir} holds checkpoints but no config.json, so the model they belong to "
                        "is unknown; restore config.json or retrain into a new --workdir")
    raise ConfigError(f"{workdir} is not a training work dir (no config.json); train first with launch/train.py")
  raw = io.read_json_or_error(cfg_path, "run config")
  if not isinstance(raw, dict) or not isinstance(raw.get("model"), dict) or "name" not in raw["model"]:
    raise ConfigError(f"run config {cfg_path} is corrupted (no model.name); restore it or retrain into a new "
                      "--workdir")
  config = config_dict.ConfigDict(raw)
  if "trigger" in config:  # runs written before trigger kinds had their own sections still load
    from backdoor_jax import triggers
    config.trigger = triggers.upgrade_flat_config(config.trigger)
  return config


def not_clean_reasons(config: config_dict.ConfigDict) -> list[str]:
  """Why a run's model is not a clean model (empty when it is): poisoned data or an attack recipe."""
  reasons = []
  recipe = config.get("recipe", "badnets")
  if recipe != "badnets":
    reasons.append(f"it was trained with the {recipe!r} recipe (an explanation attack)")
  poison = config.get("poison") or {}
  if poison.get("phase", "both") != "test_only":
    count = poison.get("count")
    if count:
      reasons.append(f"poison.count={count}")
    elif count is None and (poison.get("rate") or 0) > 0:
      reasons.append(f"poison.rate={poison.get('rate')}")
  return reasons


def warn_if_not_clean(workdir: str, role: str = "reference") -> list[str]:
  """Logs a warning when the run in ``workdir`` is not a clean model; returns the reasons.

  Raises:
    ConfigError: as :func:`read_run_config`.
  """
  reasons = not_clean_reasons(read_run_config(workdir))
  if reasons:
    logging.warning("the %s run %s is not a clean model (%s); its maps are no clean baseline", role,
                    os.path.abspath(workdir), "; ".join(reasons))
  return reasons


def load_run(workdir: str, number: int | None = None) -> TrainedRun:
  """Loads ``workdir``'s config and checkpoint ``number`` (default: the newest).

  Raises:
    ConfigError: no work dir / config / checkpoint, or an unreadable checkpoint.
  """
  workdir = os.path.abspath(workdir)
  config = read_run_config(workdir)
  ck = ckpt_lib.Checkpointer(workdir)
  number = ck.latest() if number is None else number
  if number is None:
    raise ConfigError(f"work dir {workdir} has no checkpoint yet (checkpoints/ is empty); train first")
  meta = ck.restore_meta(number)
  if "num_classes" not in meta:
    raise ConfigError(f"checkpoint {number} in {workdir} predates model metadata; retrain it")
  model = models.get_model(config.model.name, meta["num_classes"], **model_kwargs(config))
  shape = tuple(meta["image_shape"])
  variables = jax.eval_shape(lambda k: models.init_variables(model, k, (1,) + shape), jax.random.key(0))
  tx, _ = optim.make_optimizer(config.train, 1, variables["params"])
  abstract = jax.eval_shape(lambda v: state_lib.checkpoint_tree(
      state_lib.create_train_state(model, tx, None, None, variables=v)), variables)
  tree, _ = ck.restore(number, abstract)
  ck.close()
  variables = {"params": tree["params"]}
  if tree["batch_stats"]:
    variables["batch_stats"] = tree["batch_stats"]
  spec = steps.InputSpec(mean=tuple(meta["mean"]), std=tuple(meta["std"]))
  return TrainedRun(workdir, config, model, variables, int(meta["num_classes"]), shape, spec,
                    tuple(meta.get("class_names", [str(i) for i in range(meta["num_classes"])])), number)
