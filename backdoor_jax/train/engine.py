"""The one training engine: every recipe is a state, a jitted step, a feed and an evaluation.

A recipe (``train/recipes/*.py``) builds a :class:`Task` and calls :func:`fit`. The engine
owns what every run shares:

* resume: the newest checkpoint of ``workdir`` is restored, after checking that the work
  dir belongs to this config (``config.json``); checkpoints without one are refused;
* the epoch loop (``feed.run_epoch``: prefetched batches, device-side metric sums,
  progress bar) and a guard that stops the run, with one line, when the loss or the
  parameters become non-finite, keeping the last good checkpoint;
* one evaluation per epoch, ``metrics.jsonl`` (one record per epoch), a checkpoint per
  epoch, ``results.json`` and the figures hook; only process 0 writes files.

``fit`` with ``RunSpec.workdir=None`` trains in memory (no files), which is how the
defenses fine-tune and retrain models.
"""
from __future__ import annotations

import dataclasses
import json
import os
import resource
from typing import Any, Callable

import jax
import numpy as np
from absl import logging

from backdoor_jax import io
from backdoor_jax.errors import ConfigError
from backdoor_jax.train import checkpoint as ckpt_lib
from backdoor_jax.train import feed as feed_lib
from backdoor_jax.train import optim
from backdoor_jax.train import state as state_lib


class NonFiniteError(ConfigError):
  """The loss or the parameters became NaN/inf; nothing of that epoch was kept."""


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """How a run is driven, independent of the recipe (frozen; built once at the start).

  Attributes:
    workdir: output folder (absolute), or None to train in memory without files.
    epochs: epochs to train in total (a resumed run continues to this number).
    log_every: steps between progress-bar updates and non-finite checks.
    prefetch: batches prepared ahead in a background thread.
    keep: checkpoints kept (at least 1).
    figures: call the task's figures hook at the end.
    progress: show progress bars.
    config_json: the resolved config as JSON text: written to ``config.json`` and
      compared on resume; None for runs that check their checkpoints themselves.
    name: how log lines name the run.
  """
  workdir: str | None
  epochs: int
  log_every: int = 10
  prefetch: int = 2
  keep: int = 2
  figures: bool = True
  progress: bool = True
  config_json: str | None = None
  name: str = "run"

  @classmethod
  def from_config(cls, config: Any, workdir: str | None, **overrides: Any) -> "RunSpec":
    """The run settings of a recipe config (``train.*``, ``checkpoint.keep``, ``figures``)."""
    values = dict(workdir=os.path.abspath(workdir) if workdir else None, epochs=int(config.train.epochs),
                  log_every=int(config.train.get("log_every", 10)), prefetch=config.train.get("prefetch", 2),
                  keep=int(config.checkpoint.keep) if "checkpoint" in config else 2,
                  figures=bool(config.get("figures", True)), config_json=config_json(config))
    values.update(overrides)
    spec = cls(**values)
    if spec.keep < 1:
      raise ConfigError(f"checkpoint.keep={spec.keep} is invalid; allowed: an int >= 1 (the newest checkpoint is "
                        "what a rerun resumes from and what explain.py / defend.py load)")
    if spec.epochs < 1:
      raise ConfigError(f"train.epochs={spec.epochs} is invalid; allowed: an int >= 1")
    if spec.log_every < 1:
      raise ConfigError(f"train.log_every={spec.log_every} is invalid; allowed: an int >= 1")
    return spec


def config_json(config: Any) -> str:
  """The config as canonical JSON text (sorted keys), as written to ``config.json``."""
  return json.dumps(json.loads(config.to_json_best_effort(sort_keys=True)), sort_keys=True)


def default_train_record(sums: dict[str, Any], state: Any) -> dict[str, Any]:
  """Epoch means of the step sums: ``loss_sum`` -> ``train_loss``, ``correct`` -> ``train_accuracy``,
  ``X_sum`` -> ``train_X``; arrays (stacked models) become lists."""
  del state
  n = sums["count"]
  out = {}
  for k, v in sums.items():
    if k == "count":
      continue
    name = "train_loss" if k == "loss_sum" else "train_accuracy" if k == "correct" else f"train_{k[:-4]}" if (
        k.endswith("_sum")) else f"train_{k}"
    m = v / n
    out[name] = m.tolist() if hasattr(m, "tolist") and getattr(m, "ndim", 0) else float(m)
  return out


@dataclasses.dataclass
class Task:
  """What a recipe supplies to :func:`fit`.

  Attributes:
    state: the initial train state (placed on the devices); replaced by the checkpoint on resume.
    step: jitted ``step(state, *batch) -> (state, metric sums)``; the sums include
      ``count`` and ``loss_sum``.
    feed: the batches (``feed.ArrayFeed`` or the recipe's own ``feed.Feed``).
    evaluate: ``state -> flat dict`` of metrics, run after every epoch (added to the record).
    finish: ``(state, history) -> results`` at the end (the engine adds timing and devices).
    train_record: ``(sums, state) -> dict`` of the epoch's training metrics.
    meta: JSON facts stored with every checkpoint (what rebuilding the model needs).
    check_meta: called with a checkpoint's metadata before restoring it; raises to refuse.
    postfix: host sums -> progress-bar fields.
    describe: epoch record -> the text of its log line.
    figures: ``(workdir, state, history)``, called on process 0 at the end.
    params: ``state -> parameters`` checked for NaN/inf after every epoch.
  """
  state: Any
  step: Callable[..., tuple[Any, dict[str, jax.Array]]]
  feed: Any
  evaluate: Callable[[Any], dict[str, Any]] = lambda state: {}
  finish: Callable[[Any, list], dict[str, Any]] = lambda state, history: {}
  train_record: Callable[[dict[str, Any], Any], dict[str, Any]] = default_train_record
  meta: dict[str, Any] = dataclasses.field(default_factory=dict)
  check_meta: Callable[[dict[str, Any]], None] | None = None
  postfix: Callable[[dict[str, Any]], dict[str, str]] | None = None
  describe: Callable[[dict[str, Any]], str] | None = None
  figures: Callable[[str, Any, list], None] | None = None
  params: Callable[[Any], Any] = lambda state: state.params
  checkpoint_tree: Callable[[Any], Any] = state_lib.checkpoint_tree
  from_checkpoint_tree: Callable[[Any, Any], Any] = state_lib.from_checkpoint_tree


def per_step_cache(fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
  """``fn(state)`` computed once per training step: the last epoch's evaluation, the final
  results and the figures of the same state share one evaluation pass."""
  last: dict[str, Any] = {}

  def cached(state: Any) -> Any:
    step = int(np.max(jax.device_get(state.step)))
    if last.get("step") != step:
      last.clear()
      last.update(step=step, value=fn(state))
    return last["value"]
  return cached


def rss_bytes() -> int:
  """Current resident set size (Linux /proc), else the peak from getrusage."""
  try:
    with open("/proc/self/statm") as f:
      return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
  except OSError:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def device_memory_bytes() -> int | None:
  """Bytes in use on this process's first device, where the backend reports it (GPUs, TPUs)."""
  stats = getattr(jax.local_devices()[0], "memory_stats", lambda: None)()
  return int(stats["bytes_in_use"]) if stats and "bytes_in_use" in stats else None


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
  return out


# Settings a resumed run may change: the learning rate and its step decay (e.g. lower them
# after a divergence), the number of epochs (train longer), clipping, and how the run logs,
# prefetches and keeps checkpoints. Everything else (data, poisoning, model, optimiser)
# must match the checkpoint.
RESUMABLE_KEYS = frozenset({"train.lr", "train.step_factor", "train.step_epochs", "train.epochs", "train.grad_clip",
                            "train.log_every", "train.prefetch", "checkpoint.keep", "figures"})


def check_resumable(workdir: str, config_text: str | None, has_checkpoint: bool) -> None:
  """Refuses a work dir whose checkpoints belong to another config, or to no recorded config.

  Only :data:`RESUMABLE_KEYS` may differ (each difference is logged).

  Raises:
    ConfigError: checkpoints without ``config.json``, or a ``config.json`` that differs.
  """
  if not has_checkpoint or config_text is None:
    return
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise ConfigError(f"work dir {workdir} holds checkpoints but no config.json, so they cannot be matched to "
                      f"this config; use a new --workdir, or delete {os.path.join(workdir, 'checkpoints')}")
  old, new = _flat(io.read_json_or_error(path, "run config")), _flat(json.loads(config_text))
  diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
  fixed = [k for k in diff if k not in RESUMABLE_KEYS]
  if fixed:
    raise ConfigError(f"work dir {workdir} holds a checkpoint of a different config (differs in: "
                      f"{', '.join(fixed[:8])}); use a new --workdir, or delete {workdir} to start fresh")
  for k in diff:
    logging.warning("resuming %s with %s=%r (the checkpoint was trained with %r)", workdir, k, new.get(k), old.get(k))


def latest_meta(workdir: str | None) -> dict[str, Any] | None:
  """The metadata of ``workdir``'s newest checkpoint (what a resume will start from), or None."""
  if not workdir or not os.path.isdir(os.path.join(workdir, "checkpoints")):
    return None
  ckpt = ckpt_lib.Checkpointer(workdir)
  try:
    latest = ckpt.latest()
    return None if latest is None else ckpt.restore_meta(latest)
  finally:
    ckpt.close()


def _diverged(run: RunSpec, epoch: int, step_in_epoch: int | None, steps_per_epoch: int, what: str,
              last_good: int | None) -> NonFiniteError:
  where = f"epoch {epoch + 1}" + (f", step {step_in_epoch} of {steps_per_epoch}" if step_in_epoch else "")
  if run.workdir is None:
    kept = "nothing was saved (in-memory run)"
  elif last_good is None:
    kept = "no checkpoint had been written yet"
  else:
    kept = (f"the last good checkpoint {os.path.join(run.workdir, 'checkpoints', str(last_good))} (epoch "
            f"{last_good}) is kept; a rerun resumes from it")
  return NonFiniteError(f"training stopped: the {what} became non-finite (NaN/inf) at {where}; nothing of that "
                        f"epoch was saved and {kept}; lower train.lr or train.grad_clip, or check the data")


def fit(task: Task, run: RunSpec) -> tuple[Any, dict[str, Any]]:
  """Trains ``task`` for ``run.epochs`` epochs (resuming when possible) and writes its reports.

  Returns:
    The final state and the results record (as written to ``results.json``).
  Raises:
    ConfigError: a work dir of another config; NonFiniteError when training diverges.
  """
  is_main = jax.process_index() == 0
  state, history, train_seconds, start_epoch, latest = task.state, [], 0.0, 0, None
  ckpt = None
  if run.workdir:
    io.check_workdir_writable(run.workdir)
    ckpt = ckpt_lib.Checkpointer(run.workdir, keep=run.keep)
    latest = ckpt.latest()
    check_resumable(run.workdir, run.config_json, latest is not None)
    if latest is not None:
      if task.check_meta is not None:
        task.check_meta(ckpt.restore_meta(latest))
      tree, meta = ckpt.restore(latest, task.checkpoint_tree(state))
      state = task.from_checkpoint_tree(state, tree)
      start_epoch, history, train_seconds = meta["epoch"], meta["history"], meta["train_seconds"]
      logging.info("resumed from %s (epoch %d of %d): %s", ckpt.directory, start_epoch, run.epochs, run.name)
    if is_main and run.config_json is not None:
      io.write_json_atomic(os.path.join(run.workdir, "config.json"), json.loads(run.config_json))
  try:
    for epoch in range(start_epoch, run.epochs):
      state, ep = feed_lib.run_epoch(task.step, state, task.feed, epoch, desc=f"epoch {epoch + 1}/{run.epochs}",
                                     log_every=run.log_every, postfix=task.postfix, prefetch=run.prefetch,
                                     progress=run.progress)
      spe = task.feed.steps_per_epoch
      if ep.first_nonfinite_step is not None:
        raise _diverged(run, epoch, ep.first_nonfinite_step, spe, "training loss", latest)
      if not bool(optim.all_finite(task.params(state))):  # every loss was finite: the last update overflowed
        raise _diverged(run, epoch, ep.steps, spe, "model parameters", latest)
      train_seconds += ep.seconds
      record = {"epoch": epoch + 1, "step": int(np.max(jax.device_get(getattr(state, "step", 0)))),
                **task.train_record(ep.sums, state),
                "images_per_second": float(np.sum(ep.sums["count"])) / ep.seconds,
                "epoch_seconds": ep.seconds, "data_wait_fraction": ep.data_wait_fraction,
                "rss_bytes": rss_bytes(), "device_bytes_in_use": device_memory_bytes(),
                **task.evaluate(state)}
      history.append(record)
      eta = (run.epochs - epoch - 1) * ep.seconds
      text = task.describe(record) if task.describe else f"loss {record.get('train_loss', float('nan')):.4f}"
      logging.info("epoch %d/%d  %s  %.0f img/s  waiting for data %.1f%%  ETA %.0fs", epoch + 1, run.epochs, text,
                   record["images_per_second"], 100 * ep.data_wait_fraction, eta)
      if ckpt is not None:
        ckpt.save(epoch + 1, task.checkpoint_tree(state),
                  {"epoch": epoch + 1, "history": history, "train_seconds": train_seconds, **task.meta})
        latest = epoch + 1
        if is_main:
          io.write_jsonl_atomic(os.path.join(run.workdir, "metrics.jsonl"), history)
    results = dict(task.finish(state, history))
    results.update({"train_seconds": train_seconds, "epochs": run.epochs,
                    "devices": jax.device_count(), "platform": jax.devices()[0].platform})
    if run.workdir and is_main:
      io.write_jsonl_atomic(os.path.join(run.workdir, "metrics.jsonl"), history)
      io.write_json_atomic(os.path.join(run.workdir, "results.json"), results)
      if run.figures and task.figures is not None:
        task.figures(run.workdir, state, history)
  finally:
    if ckpt is not None:
      ckpt.close()
  return state, results
