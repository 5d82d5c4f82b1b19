"""Start training from imported weights (``model.init_checkpoint``), loudly when not.

An *init checkpoint* is a folder written by ``launch/import_weights.py``:
``variables/`` (orbax, the model's ``params`` and ``batch_stats``) and ``import.json``
(architecture, source file, head size, skipped keys). :func:`initial_variables` merges
it into a freshly initialised model: every variable is taken from the checkpoint,
except a classifier head whose shape differs (another number of classes), which keeps
its fresh initialisation and is reported. Anything else that differs is a ConfigError.

Transfer recipes set ``model.pretrained_required = True``; with an empty
``model.init_checkpoint`` they still run (CPU smoke tests, offline demos) but print a
WARNING line saying the network starts from random initialisation.
"""
from __future__ import annotations

import os
import sys
from typing import Any

import flax
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from backdoor_jax import io
from backdoor_jax.errors import ConfigError
from backdoor_jax.models import torchvision_import
from backdoor_jax.train import optim

VARIABLES_DIR = "variables"
META_FILE = "import.json"
_MAX_LISTED = 5


def save_init_checkpoint(directory: str, variables: dict[str, Any], meta: dict[str, Any]) -> str:
  """Writes ``variables`` (params + batch_stats) and ``meta`` as an init checkpoint.

  Returns:
    The absolute checkpoint folder.
  Raises:
    ConfigError: ``directory`` already holds an init checkpoint.
  """
  directory = os.path.abspath(os.path.expanduser(directory))
  target = os.path.join(directory, VARIABLES_DIR)
  if os.path.exists(target):
    raise ConfigError(f"{directory} already holds an init checkpoint; choose a new --dst or delete it")
  os.makedirs(directory, exist_ok=True)
  tree = {k: v for k, v in variables.items() if k in ("params", "batch_stats") and v}
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(target, jax.tree_util.tree_map(np.asarray, tree))
  io.write_json_atomic(os.path.join(directory, META_FILE), meta)
  return directory


def load_init_checkpoint(directory: str) -> tuple[dict[str, Any], dict[str, Any]]:
  """Reads an init checkpoint: (variables as numpy arrays, meta).

  Raises:
    ConfigError: not an init checkpoint folder, or unreadable.
  """
  directory = os.path.abspath(os.path.expanduser(directory))
  meta_path = os.path.join(directory, META_FILE)
  if not os.path.isfile(meta_path) or not os.path.isdir(os.path.join(directory, VARIABLES_DIR)):
    raise ConfigError(f"model.init_checkpoint={directory!r} is not an init checkpoint (no {META_FILE} "
                      f"and {VARIABLES_DIR}/); write one with launch/import_weights.py")
  try:
    with ocp.StandardCheckpointer() as ckptr:
      tree = ckptr.restore(os.path.join(directory, VARIABLES_DIR))
  except Exception as e:  # orbax raises many types for truncated / foreign folders
    raise ConfigError(f"init checkpoint {directory} cannot be read ({type(e).__name__}: "
                      f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
  return jax.tree_util.tree_map(np.asarray, dict(tree)), io.read_json(meta_path)


def merge_variables(fresh: dict[str, Any], loaded: dict[str, Any],
                    heads: tuple[str, ...]) -> tuple[dict[str, Any], list[str]]:
  """Takes every variable of ``fresh`` from ``loaded``, except differing heads.

  Args:
    fresh: the initialised model's variables (the reference structure and shapes).
    loaded: variables from an init checkpoint.
    heads: top-level module names allowed to differ (kept from ``fresh``).
  Returns:
    (merged variables, sorted 'collection/module/leaf' paths kept from ``fresh``).
  Raises:
    ConfigError: a non-head variable missing, extra or of another shape (first few listed).
  """
  f_flat = flax.traverse_util.flatten_dict(fresh)
  l_flat = flax.traverse_util.flatten_dict(loaded)
  name = lambda p: "/".join(p)
  is_head = lambda p: len(p) > 1 and p[1] in heads
  kept, problems, out = [], [], {}
  for path, value in f_flat.items():
    other = l_flat.get(path)
    if other is not None and tuple(other.shape) == tuple(value.shape):
      out[path] = other
    elif is_head(path):
      out[path] = value
      kept.append(name(path))
    else:
      problems.append(f"{name(path)} " + ("missing" if other is None else
                                         f"{tuple(other.shape)} (model {tuple(value.shape)})"))
  problems += [f"{name(p)} not in the model" for p in l_flat if p not in f_flat and not is_head(p)]
  if problems:
    more = f" and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
    raise ConfigError(f"init checkpoint does not fit the model ({len(problems)} mismatches: "
                      f"{', '.join(problems[:_MAX_LISTED])}{more}); import weights for this architecture")
  return flax.traverse_util.unflatten_dict(out), sorted(kept)


def warn(message: str) -> None:
  """A WARNING line on the log and on stderr (seen even with logging quieted)."""
  logging.warning("%s", message)
  print(f"WARNING: {message}", file=sys.stderr, flush=True)


def initial_variables(config: Any, fresh: dict[str, Any]) -> dict[str, Any]:
  """The variables a run starts from: ``model.init_checkpoint`` merged into ``fresh``.

  Args:
    config: run config (reads ``model.name``, ``model.init_checkpoint``,
      ``model.pretrained_required``).
    fresh: the initialised model's variables.
  Returns:
    ``fresh`` itself when no init checkpoint is configured, else the merged variables.
  Raises:
    ConfigError: unreadable checkpoint, another architecture, or variables that do not fit.
  """
  path = config.model.get("init_checkpoint", "") or ""
  name = config.model.name
  if not path:
    if config.model.get("pretrained_required", False):
      warn(f"model.init_checkpoint is empty: {name} trains from RANDOM initialisation, not from "
           "pretrained weights (import them with launch/import_weights.py and pass "
           "--config.model.init_checkpoint=DIR)")
    return fresh
  loaded, meta = load_init_checkpoint(path)
  if meta.get("arch") != name:
    raise ConfigError(f"init checkpoint {path} holds {meta.get('arch')!r} weights but model.name={name!r}")
  merged, kept = merge_variables(fresh, loaded, torchvision_import.head_modules(name))
  n = sum(np.size(x) for x in jax.tree_util.tree_leaves(merged))
  logging.info("initialised %s from %s (imported from %s); %s values", name, path,
               meta.get("source", "?"), f"{n:,}")
  if kept:
    logging.info("kept freshly initialised (shape differs from the checkpoint: new head): %s", ", ".join(kept))
  return merged


def log_trainable(params: Any, pattern: str) -> int:
  """Logs which top-level modules ``train.trainable`` leaves trainable; returns the count."""
  n = optim.count_trainable(params, pattern)
  total = sum(np.size(x) for x in jax.tree_util.tree_leaves(params))
  if pattern in (".*", ""):
    return n
  mask = flax.traverse_util.flatten_dict(optim.trainable_mask(params, pattern))
  modules = sorted({p[0] for p, m in mask.items() if m})
  shown = ", ".join(modules[:8]) + (f" and {len(modules) - 8} more" if len(modules) > 8 else "")
  logging.info("train.trainable=%r: %s of %s parameters train (%.2f%%), in %d modules: %s",
               pattern, f"{n:,}", f"{total:,}", 100.0 * n / max(total, 1), len(modules), shown)
  return n


def input_normalisation(config: Any, spec: Any) -> Any:
  """``spec`` with ``data.mean``/``data.std`` from the config when set (pretrained nets
  expect the statistics they were trained with, not the dataset's)."""
  mean, std = tuple(config.data.get("mean", ()) or ()), tuple(config.data.get("std", ()) or ())
  if not mean and not std:
    return spec
  if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
    raise ConfigError(f"data.mean={mean!r} and data.std={std!r} need 3 values each (std > 0), "
                      "or leave both empty for the dataset's statistics")
  return spec._replace(mean=tuple(float(m) for m in mean), std=tuple(float(s) for s in std))
