"""Runs a sweep: cells in groups of K models trained together, one results.csv row each.

Work dir layout::

  sweep.json      the grid, seeds and a hash of the base config (a rerun must match)
  results.csv     one row per finished cell (rewritten atomically after each group)
  groups/<id>/    stacked checkpoints of the group in progress (resume after a kill)
  report/         tables and plots (``sweep.report``)

A rerun skips the cells already in results.csv, so a killed sweep loses at most the
epochs since the last checkpoint of the group it was training. A cell whose config is
invalid, or whose group crashes, gets a ``failed`` row with its error and the sweep goes
on (``sweep.retry_failed=True`` retries such cells on the next run).
"""
from __future__ import annotations

import csv
import hashlib
import io as io_std
import os
import time
from typing import Any, Sequence

from absl import logging
from ml_collections import config_dict

from backdoor_jax import io
from backdoor_jax.errors import ConfigError
from backdoor_jax.sweep import grid as grid_lib

METRIC_COLUMNS = ("status", "clean_accuracy", "attack_success_rate", "attack_success_rate_visible",
                  "clean_accuracy_drop", "weak_trigger_fraction", "num_poisoned", "final_train_loss",
                  "wall_seconds", "group_wall_seconds", "ensemble_size", "error")


def columns(config: config_dict.ConfigDict) -> list[str]:
  """results.csv header for this sweep's grid."""
  return ["cell_id", "role"] + [k for k, _ in grid_lib.grid_axes(config)] + ["seed"] + list(METRIC_COLUMNS)


def read_results(path: str) -> tuple[list[str], list[dict[str, str]]]:
  """(header, rows) of a results.csv; ([], []) when it does not exist."""
  if not os.path.exists(path):
    return [], []
  with open(path, newline="", encoding="utf-8") as f:
    reader = csv.DictReader(f)
    return list(reader.fieldnames or []), list(reader)


def write_results(path: str, header: Sequence[str], rows: Sequence[dict[str, Any]]) -> None:
  buf = io_std.StringIO()
  writer = csv.DictWriter(buf, fieldnames=list(header), extrasaction="ignore", lineterminator="\n")
  writer.writeheader()
  for row in rows:
    writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in header})
  io.write_bytes_atomic(path, buf.getvalue().encode())


def _check_workdir(workdir: str, config: config_dict.ConfigDict, header: list[str]) -> None:
  """Refuses a work dir that holds results of a different sweep."""
  path = os.path.join(workdir, "sweep.json")
  fp = grid_lib.grid_fingerprint(config)
  old_header, _ = read_results(os.path.join(workdir, "results.csv"))
  if os.path.exists(path):
    old = io.read_json(path)
    diff = sorted(k for k in set(old) | set(fp) if old.get(k) != fp.get(k))
    if diff:
      raise ConfigError(f"{workdir} holds results of a different sweep (differs in: {', '.join(diff)}); "
                        "use a new --workdir or delete the old one")
  elif old_header:
    raise ConfigError(f"{workdir}/results.csv exists but sweep.json does not; it is not this sweep's "
                      "work dir; use a new --workdir")
  if old_header and old_header != header:
    raise ConfigError(f"{workdir}/results.csv has columns {old_header[:6]}... which do not match this "
                      f"sweep's {header[:6]}...; use a new --workdir")
  io.write_json_atomic(path, fp)


def _group_key(cfg: config_dict.ConfigDict) -> str:
  from backdoor_jax import experiment  # heavy imports only when training
  from backdoor_jax.train.recipes import ensemble
  sig = ensemble.shared_signature(cfg)
  # Without a fixed data.split_seed, the dataset subset depends on the seed.
  split = cfg.data.get("split_seed", -1)
  return sig + ("" if split is not None and split >= 0 else f"|data_seed={experiment.data_seed(cfg)}")


def plan_groups(cells: Sequence[grid_lib.Cell], cfgs: Sequence[config_dict.ConfigDict],
                models_per_step: int) -> list[list[int]]:
  """Indices of cells to train together: same shared config, at most ``models_per_step``."""
  by_key: dict[str, list[int]] = {}
  for i, cfg in enumerate(cfgs):
    by_key.setdefault(_group_key(cfg), []).append(i)
  groups = []
  for members in by_key.values():
    for start in range(0, len(members), models_per_step):
      groups.append(members[start:start + models_per_step])
  return groups


def _baseline_accuracy(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
  out = {}
  for r in rows:
    if r.get("role") == "clean" and r.get("status") == "ok" and r.get("clean_accuracy") not in (None, ""):
      out[r["cell_id"]] = float(r["clean_accuracy"])
  return out


def run_sweep(config: config_dict.ConfigDict, workdir: str, progress: bool = True) -> list[dict[str, Any]]:
  """Trains every pending cell of the sweep and writes results.csv and the report.

  Args:
    config: a training config with a ``sweep`` section (see ``sweep.grid``).
    workdir: the sweep's folder (created; a rerun resumes).
    progress: progress bars for each group.
  Returns:
    All rows of results.csv (dicts of strings / numbers).
  Raises:
    ConfigError: invalid grid, a work dir of another sweep.
  """
  from backdoor_jax.sweep import report as report_lib
  from backdoor_jax.train.recipes import ensemble

  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  cells = grid_lib.enumerate_cells(config)
  header = columns(config)
  _check_workdir(workdir, config, header)
  csv_path = os.path.join(workdir, "results.csv")
  _, rows = read_results(csv_path)
  retry = bool(config.sweep.get("retry_failed", False))
  done = {r["cell_id"] for r in rows if r.get("status") == "ok" or (r.get("status") == "failed" and not retry)}
  rows = [r for r in rows if r["cell_id"] in done]
  pending = [c for c in cells if c.cell_id not in done]
  k_max = int(config.sweep.get("models_per_step", 8))
  if k_max < 1:
    raise ConfigError(f"sweep.models_per_step={k_max} must be >= 1")
  cfgs = [grid_lib.cell_config(config, c) for c in pending]
  groups = plan_groups(pending, cfgs, k_max)
  logging.info("sweep: %d cells (%d done, %d to train in %d groups of <= %d models) -> %s",
               len(cells), len(cells) - len(pending), len(pending), len(groups), k_max, workdir)
  t_start = time.time()
  for g, members in enumerate(groups):
    gid = hashlib.sha1("\n".join(pending[i].cell_id for i in members).encode()).hexdigest()[:12]
    t0 = time.time()
    try:
      results = ensemble.train_ensemble([cfgs[i] for i in members], workdir=os.path.join(workdir, "groups", gid),
                                        progress=progress, member_errors="record")
    except Exception as e:  # a crashed group must not stop the sweep
      logging.exception("group %s failed", gid)
      results = [{"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]}] * len(members)
    wall = time.time() - t0
    baselines = _baseline_accuracy(rows)
    new_rows = []
    for i, res in zip(members, results):
      cell = pending[i]
      row = {"cell_id": cell.cell_id, "role": cell.role, "seed": cell.seed,
             **{k: grid_lib.encode(v) for k, v in cell.values},
             "group_wall_seconds": round(wall, 2), "ensemble_size": len(members),
             "wall_seconds": round(wall / len(members), 2)}
      if "error" in res:
        row.update(status="failed", error=res["error"])
      else:
        row.update(status="ok", **{k: res.get(k) for k in METRIC_COLUMNS if k in res and k != "status"})
      new_rows.append(row)
    baselines.update(_baseline_accuracy(new_rows))
    for row, i in zip(new_rows, members):
      b = baselines.get(pending[i].baseline_id())
      if row["role"] == "attack" and row["status"] == "ok" and b is not None and row.get("clean_accuracy") is not None:
        row["clean_accuracy_drop"] = b - float(row["clean_accuracy"])
    rows.extend(new_rows)
    write_results(csv_path, header, rows)
    elapsed = time.time() - t_start
    eta = elapsed / (g + 1) * (len(groups) - g - 1)
    n_failed = sum(r["status"] == "failed" for r in new_rows)
    logging.info("sweep group %d/%d: %d models in %.0fs (%d failed); ETA %.0fs", g + 1, len(groups),
                 len(members), wall, n_failed, eta)
    if progress:
      print(f"[sweep] group {g + 1}/{len(groups)}: {len(members)} models in {wall:.0f}s "
            f"({n_failed} failed), ETA {eta:.0f}s", flush=True)
  # Rows written before their baseline finished get the drop now.
  baselines = _baseline_accuracy(rows)
  for row in rows:
    if row.get("role") == "attack" and row.get("status") == "ok" and row.get("clean_accuracy_drop") in (None, ""):
      cell_values = tuple((k, row[k]) for k, _ in grid_lib.grid_axes(config))
      bid = grid_lib.Cell(tuple((k, v) for k, v in grid_lib.baseline_values(cell_values)),
                          int(row["seed"]), "clean")
      # values in rows are already encoded text; encode() is the identity on str
      b = baselines.get(bid.cell_id)
      if b is not None and row.get("clean_accuracy") not in (None, ""):
        row["clean_accuracy_drop"] = b - float(row["clean_accuracy"])
  write_results(csv_path, header, rows)
  report_lib.write_report(workdir)
  return rows
