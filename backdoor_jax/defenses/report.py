"""Runs defenses on a trained work dir and writes their reports.

:func:`defend_run` writes ``WORKDIR/defenses/NAME/report.json`` (the defense's record
plus the undefended model's test numbers under ``before``, the settings used and the
run's facts) and the defense's figures next to it. :func:`defend_all` runs every
defense on one loaded context and adds ``WORKDIR/defenses/summary.json`` and
``summary.md`` (one row per defense).
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import jax
from absl import logging
from ml_collections import config_dict

from backdoor_jax import io
from backdoor_jax.configs import defenses as defenses_config
from backdoor_jax.defenses import common, registry
from backdoor_jax.errors import ConfigError, check_choice


def default_config() -> config_dict.ConfigDict:
  """The default settings of every built-in defense (``backdoor_jax/configs/defenses.py``, shipped in the package)."""
  return defenses_config.get_config()


def _facts(ctx: common.DefenseContext) -> dict[str, Any]:
  c = ctx.run.config
  return {"workdir": ctx.run.workdir, "checkpoint": ctx.run.epoch,
          "model": c.model.name, "data": c.data.name, "num_classes": ctx.num_classes,
          "recipe": c.get("recipe", "badnets"), "poison_rate": float(c.poison.rate), "true_target": ctx.target,
          "num_train": int(len(ctx.exp.train_labels)), "num_poisoned": int(ctx.exp.is_poisoned.sum()),
          "num_val": int(len(ctx.val_index)), "num_test": int(len(ctx.test_labels)),
          "num_attack_test": int(len(ctx.attack_labels)), "seed": ctx.seed,
          "explanation_attack": None if ctx.explanation is None else
          {"method": ctx.explanation.method, "layer": ctx.explanation.layer,
           "iou_threshold": ctx.explanation.iou_threshold, "iou_gt": ctx.explanation.iou_gt},
          "platform": jax.devices()[0].platform}


def _run_one(ctx: common.DefenseContext, name: str, before: dict[str, Any]) -> dict[str, Any]:
  out_dir = os.path.join(ctx.run.workdir, "defenses", name)
  os.makedirs(out_dir, exist_ok=True)
  logging.info("defense %s on %s", name, ctx.run.workdir)
  t0 = time.time()
  d = registry.get(name)
  rec = d.run(ctx, out_dir)
  rec = {"defense": name, **rec, "before": before, "total_seconds": time.time() - t0, "run": _facts(ctx),
         "settings": json.loads(ctx.config[d.section].to_json_best_effort()),
         "shared_settings": {k: ctx.config[k] for k in ("val_fraction", "val_size", "max_test", "seed")}}
  io.write_json_atomic(os.path.join(out_dir, "report.json"), rec)
  return rec


def defend_run(workdir: str, name: str, config: config_dict.ConfigDict | None = None,
               ctx: common.DefenseContext | None = None) -> dict[str, Any]:
  """Runs one defense (or ``'all'``) on ``workdir``; returns its report record.

  Raises:
    ConfigError: unknown defense, no run / checkpoint, or an invalid setting.
  """
  check_choice("defense", name, tuple(registry.NAMES) + ("all",))
  config = config or (ctx.config if ctx is not None else default_config())
  if name == "all":
    return defend_all(workdir, config)
  config = registry.with_sections(config, [name])
  if ctx is None:
    ctx = common.load_context(workdir, config)
  elif ctx.config is not config:
    ctx = dataclasses.replace(ctx, config=config)
  return _run_one(ctx, name, common.evaluate(ctx, ctx.variables))


def summary_row(rec: dict[str, Any]) -> dict[str, Any]:
  """One line of the summary table from a defense's report (its own part from ``Defense.summary``)."""
  part = dict(registry.get(rec["defense"]).summary(rec))
  after = part.pop("after", None)
  row = {"defense": rec["defense"], "seconds": rec["total_seconds"], **part}
  for k in ("clean_accuracy", "attack_success_rate", "robust_accuracy", "fsr"):
    if after is not None and after.get(k) is not None:
      row[f"{k}_after"] = after[k]
    if rec["before"].get(k) is not None:
      row[f"{k}_before"] = rec["before"][k]
  return row


def _fmt(v: Any) -> str:
  if v is None:
    return ""
  return f"{v:.3f}" if isinstance(v, float) else str(v)


def summary_markdown(rows: list[dict[str, Any]]) -> str:
  cols = ["defense", "verdict", "detection_rate", "false_positive_rate", "clean_accuracy_before",
          "clean_accuracy_after", "attack_success_rate_before", "attack_success_rate_after",
          "robust_accuracy_before", "robust_accuracy_after", "fsr_before",
          "fsr_after", "seconds"]
  cols = [c for c in cols if any(r.get(c) is not None for r in rows)]
  lines = ["| " + " | ".join(cols) + " |", "| " + " | ".join("---" for _ in cols) + " |"]
  lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
  return "\n".join(lines) + "\n"


def defend_all(workdir: str, config: config_dict.ConfigDict | None = None,
               names: tuple[str, ...] | None = None) -> dict[str, Any]:
  """Every defense (or those in ``names``) on one loaded run; writes each report plus ``defenses/summary.{json,md}``.

  ``names`` defaults to every registered defense, in registration order. A defense
  that fails on bad input (e.g. a model without the layer it needs) is recorded in the
  summary with its error and the others still run.
  """
  names = tuple(registry.NAMES) if names is None else tuple(names)
  for name in names:
    registry.get(name)
  config = registry.with_sections(config or default_config(), names)
  ctx = common.load_context(workdir, config)
  before = common.evaluate(ctx, ctx.variables)
  rows, reports = [], {}
  for name in names:
    try:
      reports[name] = _run_one(ctx, name, before)
      rows.append(summary_row(reports[name]))
    except ConfigError as e:
      logging.warning("defense %s skipped: %s", name, e)
      rows.append({"defense": name, "verdict": f"error: {e}"})
  out = os.path.join(ctx.run.workdir, "defenses")
  summary = {"run": _facts(ctx), "before": before, "rows": rows}
  io.write_json_atomic(os.path.join(out, "summary.json"), summary)
  io.write_bytes_atomic(os.path.join(out, "summary.md"), summary_markdown(rows).encode())
  return summary
