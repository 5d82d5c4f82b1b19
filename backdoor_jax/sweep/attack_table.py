"""Attacks x defenses: trains each attack of a table config, runs the defenses on it, writes the table.

Work dir layout::

  table.json              the attacks and defenses of this table (a rerun must match)
  attacks/<name>/         each attack's training run (resumable) with its defenses/ folder
  cache/                  files attacks build once (SSBA encoder, adversarial surrogate)
  report/                 attacks_x_defenses.{md,csv,png} (``sweep.table_report``)

A rerun resumes: a finished attack is only re-evaluated, and its defenses are reused
when ``defenses/table_settings.json`` holds the same settings. An attack that fails is
recorded with its error and the table goes on.
"""
from __future__ import annotations

import copy
import json
import os
import time
from typing import Any

from absl import logging
from ml_collections import config_dict

from backdoor_jax import config_checks, io
from backdoor_jax.errors import ConfigError
from backdoor_jax.sweep import grid

# report.json fields copied into the table (detectors' verdicts), when a defense reports them.
REPORT_FIELDS = ("flagged_classes", "max_anomaly_index", "most_anomalous_class", "names_true_target", "detected",
                 "num_removed", "chosen_fraction", "chosen_weight", "threshold")


def _get(c: config_dict.ConfigDict, dotted: str) -> Any:
  for p in dotted.split("."):
    if p not in c:
      return None
    c = c[p]
  return c


# Cache files an attack config may name with a relative path (kept inside the table's work dir).
CACHE_KEYS = ("trigger.ssba.path", "poison.surrogate_path")


def resolve_attack(config: config_dict.ConfigDict, name: str, workdir: str) -> config_dict.ConfigDict:
  """The training config of attack ``name``: its own config, then ``shared``, cache paths made absolute.

  ``config`` is not modified.
  """
  if name not in config.attacks:
    raise ConfigError(f"table.attacks names {name!r}, which has no config under attacks; allowed: "
                      f"{', '.join(config.attacks.keys())}")
  cfg = copy.deepcopy(config.attacks[name])
  cfg.unlock()
  shared = config_checks.flatten(config.get("shared", config_dict.ConfigDict()))
  for key, value in ((k, v) for k, v in shared if v is not None):
    parent = key.rpartition(".")[0]
    if parent and not isinstance(_get(cfg, parent), config_dict.ConfigDict):
      raise ConfigError(f"shared.{key} has no place in attack {name!r}'s config")
    grid.set_key(cfg, key, value)
  for key in CACHE_KEYS:
    path = _get(cfg, key)
    if isinstance(path, str) and path and not os.path.isabs(path):
      grid.set_key(cfg, key, os.path.join(workdir, path))
  return cfg


def _check(config: config_dict.ConfigDict) -> tuple[tuple[str, ...], tuple[str, ...]]:
  from backdoor_jax.defenses import registry
  config_checks.check_config(config.defenses, config_checks.DEFENSE_RULES)
  attacks = tuple(config.table.attacks)
  defenses = tuple(config.table.defenses)
  if not attacks:
    raise ConfigError("table.attacks is empty; allowed: one or more of " + ", ".join(config.attacks.keys()))
  for d in defenses:
    registry.get(d)  # ConfigError naming the registered ones
  dup = sorted({a for a in attacks if attacks.count(a) > 1} | {d for d in defenses if defenses.count(d) > 1})
  if dup:
    raise ConfigError(f"table lists {', '.join(dup)} twice; each attack and defense may appear once")
  return attacks, defenses


def _check_workdir(workdir: str, fingerprint: dict[str, Any]) -> None:
  path = os.path.join(workdir, "table.json")
  if os.path.exists(path):
    old = io.read_json(path)
    if old.get("dataset") != fingerprint["dataset"]:
      raise ConfigError(f"{workdir} holds a table on dataset {old.get('dataset')!r}, not "
                        f"{fingerprint['dataset']!r}; use a new --workdir")
  io.write_json_atomic(path, fingerprint)


def _ensure_caches(cfg: config_dict.ConfigDict, config: config_dict.ConfigDict, progress: bool) -> None:
  """Builds the files an attack needs once (today: SSBA's encoder) when they are missing."""
  path = _get(cfg, "trigger.ssba.path") if cfg.trigger.kind == "ssba" else None
  if not path or os.path.exists(path):
    return
  from backdoor_jax.data import load_dataset
  from backdoor_jax.experiment import data_seed
  from backdoor_jax.triggers import ssba_train
  ds = load_dataset(cfg.data.name, path=cfg.data.path or None, data_dir=cfg.data.data_dir or None,
                    image_size=cfg.data.image_size, seed=data_seed(cfg), max_train=cfg.data.max_train or None,
                    max_test=cfg.data.max_test or None)
  logging.info("table: training the SSBA encoder -> %s", path)
  ssba_train.train_encoder_file(path, ds.train_images, ds.test_images, seed=int(cfg.seed), progress=progress,
                                **config.table.ssba.to_dict())


def _defend(adir: str, config: config_dict.ConfigDict, defenses: tuple[str, ...]) -> dict[str, Any]:
  """The defenses' summary of one trained attack (reused when the settings are unchanged)."""
  from backdoor_jax.defenses import report
  settings = {"defenses": list(defenses), "config": json.loads(config.defenses.to_json_best_effort())}
  stamp = os.path.join(adir, "defenses", "table_settings.json")
  summary_path = os.path.join(adir, "defenses", "summary.json")
  if os.path.exists(stamp) and os.path.exists(summary_path) and io.read_json(stamp) == settings:
    return io.read_json(summary_path)
  summary = report.defend_all(adir, config.defenses, names=defenses)
  io.write_json_atomic(stamp, settings)
  return summary


def _rows(name: str, results: dict[str, Any], summary: dict[str, Any], adir: str) -> list[dict[str, Any]]:
  """Long-format table rows of one attack: one 'none' row, then one per defense."""
  facts, before = summary["run"], summary["before"]
  base = {"attack": name, "num_train": facts["num_train"], "num_poisoned": facts["num_poisoned"],
          "num_test": facts["num_test"], "num_attack_test": facts["num_attack_test"], "num_val": facts["num_val"],
          "poison_rate": facts["poison_rate"], "target": facts["true_target"],
          "train_seconds": results.get("train_seconds"),
          "defenses_seconds": sum(float(r.get("seconds") or 0.0) for r in summary["rows"])}
  rows = [{**base, "defense": "none", "status": "ok",
           **{f"{k}_after": before.get(k) for k in ("clean_accuracy", "attack_success_rate", "robust_accuracy")}}]
  for r in summary["rows"]:
    row = {**base, "defense": r["defense"], "status": "failed" if str(r.get("verdict", "")).startswith("error:")
           else "ok", **{k: v for k, v in r.items() if k != "defense"}}
    rep = os.path.join(adir, "defenses", r["defense"], "report.json")
    if os.path.exists(rep):
      rec = io.read_json(rep)
      row.update({k: rec[k] for k in REPORT_FIELDS if k in rec})
    rows.append(row)
  for row in rows:
    for k in ("clean_accuracy", "attack_success_rate", "robust_accuracy"):
      row[f"{k}_before"] = before.get(k)
  return rows


def run_table(config: config_dict.ConfigDict, workdir: str, progress: bool = True) -> list[dict[str, Any]]:
  """Trains every attack of ``config.table.attacks``, runs ``config.table.defenses`` on each, writes report/.

  Returns:
    The table's rows (one per attack and defense, plus a ``defense='none'`` row per attack).
  Raises:
    ConfigError: an unknown attack or defense, a work dir of another table.
  """
  from backdoor_jax.sweep import table_report
  from backdoor_jax.train import recipes

  attacks, defenses = _check(config)
  workdir = os.path.abspath(workdir)
  io.check_workdir_writable(workdir)
  cfgs = {a: resolve_attack(config, a, workdir) for a in attacks}
  datasets = sorted({c.data.name for c in cfgs.values()})
  _check_workdir(workdir, {"dataset": ",".join(datasets), "attacks": list(attacks), "defenses": list(defenses)})
  rows: list[dict[str, Any]] = []
  t_start = time.time()
  for i, name in enumerate(attacks):
    adir = os.path.join(workdir, "attacks", name)
    t0 = time.time()
    if progress:
      print(f"[table] attack {i + 1}/{len(attacks)}: {name}", flush=True)
    try:
      _ensure_caches(cfgs[name], config, progress)
      results = recipes.run(cfgs[name], adir)
      summary = _defend(adir, config, defenses)
      rows += _rows(name, results, summary, adir)
    except Exception as e:  # one broken attack (bad setting, missing file, divergence) must not stop the table
      logging.exception("attack %s failed", name)
      rows.append({"attack": name, "defense": "none", "status": "failed",
                   "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]})
    table_report.write_report(workdir, rows, time.time() - t_start)
    if progress:
      print(f"[table] {name} done in {time.time() - t0:.0f}s", flush=True)
  return rows
