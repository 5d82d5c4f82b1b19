"""The attacks x defenses report: a CSV (long format), a Markdown page and a heatmap.

``write_report(workdir, rows, wall_seconds)`` writes ``workdir/report/``:

  attacks_x_defenses.csv  one row per (attack, defense), plus ``defense=none`` (undefended)
  attacks_x_defenses.md   sample sizes and wall times; the attacks undefended; clean accuracy /
                          ASR / robust accuracy after each removal defense; the detectors' verdicts
  attacks_x_defenses.png  ASR and clean accuracy after each removal defense (heatmaps)

A defense counts as a *removal* when it reports a model after defending (``*_after``),
and as a *detector* when it reports flagged classes or detection rates; some are both.
"""
from __future__ import annotations

import csv
import io as io_std
import os
from typing import Any, Sequence

import numpy as np

from backdoor_jax import io

FILES = ("attacks_x_defenses.csv", "attacks_x_defenses.md", "attacks_x_defenses.png")
METRICS = ("clean_accuracy", "attack_success_rate", "robust_accuracy")
COLUMNS = ("attack", "defense", "status", *(f"{m}_{w}" for w in ("before", "after") for m in METRICS),
           "detection_rate", "false_positive_rate", "flagged_classes", "max_anomaly_index", "most_anomalous_class",
           "names_true_target", "detected", "verdict", "seconds", "num_train", "num_poisoned", "poison_rate",
           "target", "num_test", "num_attack_test", "num_val", "train_seconds", "defenses_seconds", "error")
DETECTION_KEYS = ("detection_rate", "flagged_classes", "detected")


def _f(v: Any, digits: int = 3) -> str:
  if v is None or (isinstance(v, float) and not np.isfinite(v)):
    return "n/a"
  return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _defenses_where(rows: Sequence[dict[str, Any]], keys: Sequence[str]) -> list[str]:
  """Defenses (in the table's order) with a value for any of ``keys`` in some row."""
  order = dict.fromkeys(r["defense"] for r in rows if r["defense"] != "none")
  have = {r["defense"] for r in rows if any(r.get(k) is not None for k in keys)}
  return [d for d in order if d in have]


def removal_defenses(rows: Sequence[dict[str, Any]]) -> list[str]:
  """Defenses that report the defended model's numbers."""
  return _defenses_where(rows, ("clean_accuracy_after",))


def detectors(rows: Sequence[dict[str, Any]]) -> list[str]:
  """Defenses that flag classes or samples."""
  return _defenses_where(rows, DETECTION_KEYS)


def after(r: dict[str, Any] | None, metric: str) -> tuple[Any, bool]:
  """(``metric`` of the model a removal defense leaves, whether it left the model unchanged).

  A removal defense that did not act (e.g. Neural Cleanse flagged no class, so nothing
  was unlearned) leaves the undefended model: its numbers are the ``_before`` ones.
  """
  if r is None or r.get("status") != "ok":
    return None, False
  if r.get("clean_accuracy_after") is None:
    return r.get(f"{metric}_before"), True
  return r.get(f"{metric}_after"), False


MAX_LISTED = 5  # longer lists of flagged classes are summarised as a count


def _detection_cell(r: dict[str, Any], target: Any = None) -> str:
  parts = []
  flagged = r.get("flagged_classes")
  if flagged is not None:
    if not flagged:
      parts.append("flags none")
    elif len(flagged) <= MAX_LISTED:
      parts.append(f"flags {flagged}")
    else:
      where = "" if target is None else (" incl. the target" if target in flagged else " not the target")
      parts.append(f"flags {len(flagged)} classes{where}")
  if r.get("max_anomaly_index") is not None:
    parts.append(f"AI {r['max_anomaly_index']:.2f}")
  if r.get("names_true_target") is not None:
    parts.append("target named" if r["names_true_target"] else "target missed")
  if r.get("detection_rate") is not None or r.get("false_positive_rate") is not None:
    parts.append(f"TPR {_f(r.get('detection_rate'), 2)} / FPR {_f(r.get('false_positive_rate'), 2)}")
  return ", ".join(parts) or _f(r.get("verdict"))


def markdown(rows: Sequence[dict[str, Any]], wall_seconds: float) -> str:
  """The report page (see the module docstring)."""
  ok = [r for r in rows if r.get("status") == "ok" or r["defense"] != "none"]
  none = {r["attack"]: r for r in rows if r["defense"] == "none"}
  by = {(r["attack"], r["defense"]): r for r in ok}
  attacks = list(none)
  first = next((r for r in none.values() if r.get("num_train") is not None), {})
  lines = ["# Attacks x defenses", ""]
  if first:
    train_s = sum(float(r.get("train_seconds") or 0) for r in none.values())
    def_s = sum(float(r.get("defenses_seconds") or 0) for r in none.values())
    lines += [f"{first['num_train']} training images per model, {first['num_test']} clean test images, "
              f"{first['num_val']} clean validation images for the defenses (carved from the training set). "
              f"Compute: {train_s / 60:.1f} min of training and {def_s / 60:.1f} min of defenses in all; this "
              f"pass took {wall_seconds / 60:.1f} min (finished attacks are only re-evaluated).", ""]
  lines += ["Each removal cell is the model the defense leaves; \"unchanged\" when it did not act (e.g. "
            "nothing flagged).", ""] if any(r["defense"] != "none" for r in rows) else []
  lines += ["## Attacks, undefended", "",
            "| attack | clean acc | ASR | robust acc | poisoned | triggered test images | train s | "
            "defenses s |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
  for a in attacks:
    r = none[a]
    if r.get("status") != "ok":
      lines.append(f"| {a} | failed: {r.get('error', '')} | | | | | | |")
      continue
    lines.append(f"| {a} | {_f(r['clean_accuracy_after'])} | {_f(r['attack_success_rate_after'])} | "
                 f"{_f(r['robust_accuracy_after'])} | {r['num_poisoned']} ({r['poison_rate']:g}) | "
                 f"{r['num_attack_test']} | {_f(r.get('train_seconds'), 0)} | {_f(r.get('defenses_seconds'), 0)} |")
  rem = removal_defenses(ok)
  if rem:
    lines += ["", "## After each removal defense: clean acc / ASR / robust acc", "",
              "| attack | none | " + " | ".join(rem) + " |", "| --- " * (len(rem) + 2) + "|"]
    for a in attacks:
      cells = []
      for d in ["none"] + rem:
        r = by.get((a, d))
        if r is None or r.get("status") != "ok":
          cells.append("" if r is None else _f(r.get("verdict")))
          continue
        vals = [after(r, m) for m in METRICS]
        cells.append(" / ".join(_f(v) for v, _ in vals) + (" (unchanged)" if vals[0][1] else ""))
      lines.append(f"| {a} | " + " | ".join(cells) + " |")
  det = detectors(ok)
  if det:
    lines += ["", "## Detection", "",
              "Flagged classes and anomaly index (AI) for class-level detectors; TPR / FPR over poisoned vs clean "
              "training samples (Activation Clustering, Spectral Signatures) or triggered vs clean test inputs "
              "(STRIP). Targets: " + ", ".join(f"{a} -> {none[a].get('target')}" for a in attacks
                                               if none[a].get("num_poisoned")) + ".", "",
              "| attack | " + " | ".join(det) + " |", "| --- " * (len(det) + 1) + "|"]
    for a in attacks:
      target = none[a].get("target") if none[a].get("num_poisoned") else None
      lines.append(f"| {a} | " + " | ".join(_detection_cell(by[(a, d)], target) if (a, d) in by else ""
                                              for d in det) + " |")
  seconds = [(r["attack"], r["defense"], r.get("seconds")) for r in ok if r["defense"] != "none"]
  if seconds:
    per_def: dict[str, list[float]] = {}
    for _, d, s in seconds:
      if s is not None:
        per_def.setdefault(d, []).append(float(s))
    lines += ["", "Defense wall time, mean over attacks: " +
              ", ".join(f"{d} {np.mean(v):.0f} s" for d, v in per_def.items()) + "."]
  return "\n".join(lines) + "\n"


def heatmap(path: str, rows: Sequence[dict[str, Any]]) -> bool:
  """ASR and clean accuracy after each removal defense, one heatmap each; False when there is nothing to draw."""
  from backdoor_jax.figures import plt, save_figure
  none = [r for r in rows if r["defense"] == "none" and r.get("status") == "ok"]
  rem = ["none"] + removal_defenses(rows)
  if not none:
    return False
  attacks = [r["attack"] for r in none]
  by = {(r["attack"], r["defense"]): r for r in rows}
  fig, axes = plt.subplots(1, 2, figsize=(2.0 + 1.3 * len(rem) * 2, 1.0 + 0.45 * len(attacks)), squeeze=False)
  for ax, metric, title in zip(axes[0], ("attack_success_rate", "clean_accuracy"),
                               ("ASR after defense", "clean accuracy after defense")):
    m = np.array([[_num(after(by.get((a, d)), metric)[0]) for d in rem] for a in attacks])
    ax.imshow(m, vmin=0, vmax=1, cmap="viridis" if metric.startswith("clean") else "magma_r", aspect="auto")
    for (i, j), v in np.ndenumerate(m):
      ax.text(j, i, "n/a" if np.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize=8,
              color="white" if (not np.isnan(v) and (v < 0.5) == metric.startswith("clean")) else "black")
    ax.set_xticks(range(len(rem)), rem, rotation=30, ha="right")
    ax.set_yticks(range(len(attacks)), attacks)
    ax.set_title(title)
  save_figure(fig, path)
  return True


def _num(v: Any) -> float:
  try:
    return float(v)
  except (TypeError, ValueError):
    return float("nan")


def write_csv(path: str, rows: Sequence[dict[str, Any]]) -> None:
  buf = io_std.StringIO()
  w = csv.DictWriter(buf, fieldnames=list(COLUMNS), extrasaction="ignore", lineterminator="\n")
  w.writeheader()
  for r in rows:
    w.writerow({k: "" if r.get(k) is None else r[k] for k in COLUMNS})
  io.write_bytes_atomic(path, buf.getvalue().encode())


def write_report(workdir: str, rows: Sequence[dict[str, Any]], wall_seconds: float) -> dict[str, str]:
  """Writes the three report files under ``workdir/report``; returns their paths (the figure when drawn)."""
  out = os.path.join(workdir, "report")
  os.makedirs(out, exist_ok=True)
  paths = {k: os.path.join(out, f) for k, f in zip(("csv", "md", "png"), FILES)}
  write_csv(paths["csv"], rows)
  io.write_bytes_atomic(paths["md"], markdown(rows, wall_seconds).encode())
  if not heatmap(paths["png"], rows):
    paths.pop("png")
  return paths
