"""Tables and plots of a finished (or partial) sweep, from its results.csv.

``write_report(workdir)`` writes ``workdir/report/``:

  summary.csv     one row per grid setting: mean and std over seeds of clean accuracy,
                  ASR and clean-accuracy drop, and the number of seeds
  summary.md      the same as a Markdown table, the clean-accuracy-drop table per
                  architecture and poisoning rate, and the size-vs-rate comparison
  effects.json    per grid key: mean ASR at each of its values (averaged over the rest)
                  and the spread (max - min) of those means
  asr_vs_size.png ASR vs trigger size, one line per position, one panel per colour
  asr_vs_rate.png ASR vs poisoning rate, one line per trigger size
  cad_vs_rate.png clean-accuracy drop vs poisoning rate, one line per architecture

Plots whose keys are not in the grid are skipped. Error bars are one standard deviation
over every run that the point averages (seeds and the keys not shown).
"""
from __future__ import annotations

import math
import os
from typing import Any, Sequence

import numpy as np

from backdoor_jax import io
from backdoor_jax.errors import ConfigError

METRICS = ("clean_accuracy", "attack_success_rate", "clean_accuracy_drop")


def _num(text: Any) -> float:
  try:
    return float(text)
  except (TypeError, ValueError):
    return float("nan")


def _sort_values(values: Sequence[str]) -> list[str]:
  """Numbers in numeric order, anything else in first-seen order."""
  uniq = list(dict.fromkeys(values))
  if all(not math.isnan(_num(v)) for v in uniq):
    return sorted(uniq, key=_num)
  return uniq


def load(workdir: str) -> tuple[list[str], list[dict[str, str]]]:
  """(grid keys, the latest ok row per cell) of a sweep work dir."""
  from backdoor_jax.sweep.runner import read_results
  path = os.path.join(workdir, "results.csv")
  if not os.path.exists(path):
    raise ConfigError(f"{workdir} has no results.csv; run launch/sweep.py first")
  fp = io.read_json(os.path.join(workdir, "sweep.json"))
  keys = [k for k, _ in fp["grid"]]
  _, rows = read_results(path)
  latest = {}
  for r in rows:
    latest[r["cell_id"]] = r
  return keys, [r for r in latest.values() if r.get("status") == "ok"]


def marginal(rows: Sequence[dict[str, str]], metric: str, x: str, hue: str | None = None,
             facet: str | None = None) -> dict[tuple[str | None, str | None], list[tuple[str, float, float, int]]]:
  """Mean/std of ``metric`` at each value of ``x``, split by ``hue`` and ``facet``.

  Returns:
    ``{(facet value, hue value): [(x value, mean, std, n), ...]}`` with x in sorted order.
  """
  out: dict[tuple[str | None, str | None], dict[str, list[float]]] = {}
  for r in rows:
    v = _num(r.get(metric))
    if math.isnan(v):
      continue
    key = (r.get(facet) if facet else None, r.get(hue) if hue else None)
    out.setdefault(key, {}).setdefault(r[x], []).append(v)
  xs = _sort_values([r[x] for r in rows])
  return {key: [(xv, float(np.mean(d[xv])), float(np.std(d[xv])), len(d[xv])) for xv in xs if xv in d]
          for key, d in out.items()}


def effects(rows: Sequence[dict[str, str]], keys: Sequence[str], metric: str = "attack_success_rate"
            ) -> dict[str, dict[str, Any]]:
  """For each grid key: mean ``metric`` per value (others averaged) and the spread."""
  out = {}
  for k in keys:
    series = marginal(rows, metric, k).get((None, None), [])
    if len(series) < 2:
      continue
    means = {xv: m for xv, m, _, _ in series}
    out[k] = {"means": means, "spread": max(means.values()) - min(means.values())}
  return out


def _settings_table(rows: Sequence[dict[str, str]], keys: Sequence[str]) -> list[dict[str, Any]]:
  groups: dict[tuple[str, ...], list[dict[str, str]]] = {}
  for r in rows:
    if r["role"] == "attack":
      groups.setdefault(tuple(r[k] for k in keys), []).append(r)
  table = []
  for setting, rs in groups.items():
    rec: dict[str, Any] = dict(zip(keys, setting))
    for m in METRICS:
      vals = [v for v in (_num(r.get(m)) for r in rs) if not math.isnan(v)]
      rec[f"{m}_mean"] = float(np.mean(vals)) if vals else None
      rec[f"{m}_std"] = float(np.std(vals)) if vals else None
    rec["seeds"] = len(rs)
    table.append(rec)
  order = [_sort_values([r[k] for r in rows]) for k in keys]
  table.sort(key=lambda rec: tuple(o.index(rec[k]) if rec[k] in o else 0 for o, k in zip(order, keys)))
  return table


def _fmt(mean: Any, std: Any) -> str:
  if mean is None:
    return "-"
  return f"{mean:.3f} ± {std:.3f}"


def _markdown(keys: Sequence[str], table: Sequence[dict[str, Any]], rows: Sequence[dict[str, str]],
              eff: dict[str, dict[str, Any]]) -> str:
  lines = ["# Sweep report", "", f"{sum(r['role'] == 'attack' for r in rows)} attack models, "
           f"{sum(r['role'] == 'clean' for r in rows)} clean baselines (mean ± std over seeds).", ""]
  head = list(keys) + ["clean acc", "ASR", "clean-acc drop", "seeds"]
  lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for rec in table:
    cells = [rec[k] for k in keys] + [_fmt(rec["clean_accuracy_mean"], rec["clean_accuracy_std"]),
                                      _fmt(rec["attack_success_rate_mean"], rec["attack_success_rate_std"]),
                                      _fmt(rec["clean_accuracy_drop_mean"], rec["clean_accuracy_drop_std"]),
                                      str(rec["seeds"])]
    lines.append("| " + " | ".join(cells) + " |")
  if "poison.rate" in keys:
    attack = [r for r in rows if r["role"] == "attack"]
    by = "model.name" if "model.name" in keys else None
    cad = marginal(attack, "clean_accuracy_drop", "poison.rate", hue=by)
    rates = _sort_values([r["poison.rate"] for r in attack])
    lines += ["", "## Clean-accuracy drop by poisoning rate", "",
              "| " + (by or "all models") + " | " + " | ".join(rates) + " |", "|---|" + "---|" * len(rates)]
    for (_, hue), series in sorted(cad.items(), key=lambda kv: str(kv[0][1])):
      d = {xv: (m, s) for xv, m, s, _ in series}
      lines.append(f"| {hue or 'all'} | " + " | ".join(_fmt(*d[r]) if r in d else "-" for r in rates) + " |")
  if eff:
    lines += ["", "## Which grid key moves ASR most", "",
              "Mean ASR at each value of a key, averaged over every other key and seed; "
              "spread = max - min of those means.", "", "| key | spread | mean ASR per value |", "|---|---|---|"]
    for k, e in sorted(eff.items(), key=lambda kv: -kv[1]["spread"]):
      per = ", ".join(f"{v}: {m:.3f}" for v, m in e["means"].items())
      lines.append(f"| {k} | {e['spread']:.3f} | {per} |")
    if "trigger.size" in eff and "poison.rate" in eff:
      s, r = eff["trigger.size"]["spread"], eff["poison.rate"]["spread"]
      verdict = "more" if s > r else "less"
      lines += ["", f"ASR changes {verdict} with trigger size (spread {s:.3f}) than with poisoning rate "
                f"(spread {r:.3f}) over the ranges swept."]
  return "\n".join(lines) + "\n"


def _plot(path: str, rows: Sequence[dict[str, str]], metric: str, x: str, hue: str | None,
          facet: str | None, ylabel: str) -> None:
  from backdoor_jax.figures import save_figure
  import matplotlib.pyplot as plt
  data = marginal(rows, metric, x, hue, facet)
  facets = _sort_values([k[0] for k in data]) if facet else [None]
  fig, axes = plt.subplots(1, len(facets), figsize=(4.2 * len(facets), 3.4), squeeze=False, sharey=True,
                           constrained_layout=True)
  for ax, fv in zip(axes[0], facets):
    hues = _sort_values([k[1] for k in data if k[0] == fv]) if hue else [None]
    for hv in hues:
      series = data.get((fv, hv), [])
      if not series:
        continue
      xs = [_num(s[0]) if not math.isnan(_num(s[0])) else i for i, s in enumerate(series)]
      ax.errorbar(xs, [s[1] for s in series], yerr=[s[2] for s in series], marker="o", capsize=3,
                  label=f"{hue}={hv}" if hue else None)
    ax.set_xlabel(x)
    ax.set_title(f"{facet}={fv}" if facet else "")
    ax.grid(alpha=0.3)
    if hue:
      ax.legend(fontsize=7)
  axes[0][0].set_ylabel(ylabel)
  save_figure(fig, path)


def write_report(workdir: str) -> dict[str, Any]:
  """Writes ``workdir/report/`` (see the module docstring); returns the effects record."""
  keys, rows = load(workdir)
  out = os.path.join(workdir, "report")
  attack = [r for r in rows if r["role"] == "attack"]
  table = _settings_table(rows, keys)
  eff = effects(attack, keys)
  from backdoor_jax.sweep.runner import write_results
  if table:
    write_results(os.path.join(out, "summary.csv"), list(table[0]), table)
  io.write_bytes_atomic(os.path.join(out, "summary.md"), _markdown(keys, table, rows, eff).encode())
  io.write_json_atomic(os.path.join(out, "effects.json"), eff)
  if not attack:
    return eff
  if "trigger.size" in keys:
    _plot(os.path.join(out, "asr_vs_size.png"), attack, "attack_success_rate", "trigger.size",
          "trigger.position" if "trigger.position" in keys else None,
          "trigger.color" if "trigger.color" in keys else None, "ASR")
  if "poison.rate" in keys:
    _plot(os.path.join(out, "asr_vs_rate.png"), attack, "attack_success_rate", "poison.rate",
          "trigger.size" if "trigger.size" in keys else None, None, "ASR")
    _plot(os.path.join(out, "cad_vs_rate.png"), attack, "clean_accuracy_drop", "poison.rate",
          "model.name" if "model.name" in keys else None, None, "clean-accuracy drop")
  return eff
