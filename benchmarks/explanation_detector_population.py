r"""Catching explanation backdoors over a population of models: BN re-estimation and the map detector.

Trains (or finds, resumable: a model whose work dir holds ``results.json`` is not
retrained) a population of small CNNs:

* explanation-backdoored: two-stage runs with different seeds, trigger positions
  (``trigger.position``) and target regions (``explain.target_corner``);
* clean: the stage-1 model of each two-stage run (``WORKDIR/stage1``);
* classic BadNets models (a few, different seeds / patch corners);

then runs the ``map_probe`` detector and ``bn_reestimate`` on each (reports are kept in
each work dir, so a rerun only does what is missing) and prints the table: per-model
scores and verdicts, detection AUROC and TPR at 5% FPR (explanation-backdoored vs clean),
localisation hits (target region, trigger position), and BN re-estimation's clean
accuracy / FSR (ASR for BadNets) before and after. The run that was measured (digits, the
two-stage digits recipe as shipped; two processes share the training with --shard)::

  python benchmarks/explanation_detector_population.py --root=runs/popd --dataset=digits \
      --n_backdoor=8 --n_badnets=2 --train_only --shard=0 --shards=2 &   # and --shard=1
  python benchmarks/explanation_detector_population.py --root=runs/popd --dataset=digits \
      --n_backdoor=8 --n_badnets=2

The GTSRB population (README, "Defenses against explanation backdoors"; trigger looks
varied, half of them outside Map Probe's probe dictionary)::

  python benchmarks/explanation_detector_population.py --root=runs/pop_gtsrb --dataset=gtsrb \
      --max_train=10000 --max_test=1000 --stage1_epochs=6 --n_backdoor=9 --n_badnets=2 --appearance=varied

On a 3k GTSRB subset the two-stage attack did not take (``iou_gt_05`` 0.0 after 6 stage-2
epochs); on 10k it takes with the shipped 4 stage-2 epochs. A run whose attack did not take
is listed but kept out of the detection statistics.

Everything lands in ``--root``: one work dir per model, ``population.json`` (all
records) and ``population.md`` (the table).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

import numpy as np

CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right")
# (trigger position, target region): every trigger corner with two different target corners.
PLACEMENTS = (("bottom-right", "top-left"), ("top-left", "bottom-right"), ("top-right", "bottom-left"),
              ("bottom-left", "top-right"), ("bottom-right", "top-right"), ("top-left", "bottom-left"),
              ("top-right", "top-left"), ("bottom-left", "bottom-right"))


# --appearance=varied: trigger looks cycled over the explanation-backdoored models. Half are
# outside Map Probe's probe dictionary (its solid colours are the RGB cube's corners): orange,
# purple, grey, and seeded noise patches drawn from each run's own key, not the probes' seed.
APPEARANCES = (("yellow", "square", (255, 255, 0)), ("orange", "square", (255, 128, 0)),
               ("noise", "noise_patch", None), ("cyan", "square", (0, 255, 255)),
               ("purple", "square", (128, 0, 192)), ("grey", "square", (128, 128, 128)),
               ("noise", "noise_patch", None), ("white", "square", (255, 255, 255)))


def population_specs(n_backdoor: int, n_badnets: int, appearance: str = "yellow") -> list[dict[str, Any]]:
  """Names and overrides of every trained run (clean models are the two-stage runs' stage 1)."""
  specs = []
  for i in range(n_backdoor):
    pos, tgt = PLACEMENTS[i % len(PLACEMENTS)]
    look, kind, colour = APPEARANCES[i % len(APPEARANCES)] if appearance == "varied" else APPEARANCES[0]
    specs.append({"name": f"ts{i:02d}", "kind": "two_stage", "seed": 100 + i, "trigger": pos, "target": tgt,
                  "look": look, "trigger_kind": kind, "color": colour})
  for i in range(n_badnets):
    specs.append({"name": f"bn{i:02d}", "kind": "badnets", "seed": 200 + i, "trigger": CORNERS[(i + 1) % 4],
                  "target": None})
  return specs


def make_config(spec: dict[str, Any], args: argparse.Namespace):
  """The config of one population member (small enough for a shared 2-core CPU)."""
  from backdoor_jax.configs import badnets, two_stage
  c = two_stage.get_config(args.dataset) if spec["kind"] == "two_stage" else badnets.get_config(args.dataset)
  c.seed = int(spec["seed"])
  if args.dataset == "gtsrb":
    c.data.path = args.data
    c.data.max_train = args.max_train
    c.data.max_test = args.max_test
  if args.widths:
    widths = tuple(int(w) for w in args.widths.split(","))
    c.model.widths = widths + ((widths[-1],) if spec["kind"] == "two_stage" else ())
  c.trigger.position = spec["trigger"]
  c.figures = False
  if spec.get("trigger_kind", "square") != "square":
    badnets.use_trigger(c, spec["trigger_kind"])
  if spec.get("color"):
    c.trigger.color = tuple(spec["color"])
  if spec["kind"] == "two_stage":
    c.explain.target_corner = spec["target"]
    c.stage1.train.epochs = args.stage1_epochs or c.stage1.train.epochs
    c.train.epochs = args.stage2_epochs or c.train.epochs
    c.train.batch_size = args.stage2_batch_size or c.train.batch_size
  else:
    c.train.epochs = args.stage1_epochs or c.train.epochs
  return c


def train_population(specs: list[dict[str, Any]], args: argparse.Namespace) -> None:
  """Trains every spec whose work dir has no results.json yet, with one progress line per model."""
  from backdoor_jax.train import recipes
  for k, spec in enumerate(specs):
    if k % args.shards != args.shard:
      continue
    wd = os.path.join(args.root, spec["name"])
    if os.path.exists(os.path.join(wd, "results.json")):
      print(f"[{k + 1}/{len(specs)}] {spec['name']}: trained, skipped", flush=True)
      continue
    t0 = time.time()
    res = recipes.run(make_config(spec, args), wd)
    keys = ("clean_accuracy", "iou_gt_05", "fsr", "cr", "attack_success_rate")
    got = {k2: res.get(k2) for k2 in keys if res.get(k2) is not None}
    print(f"[{k + 1}/{len(specs)}] {spec['name']} ({spec['kind']}, trigger {spec['trigger']}, target "
          f"{spec['target']}): {time.time() - t0:.0f} s {got}", flush=True)


def members(specs: list[dict[str, Any]], root: str) -> list[dict[str, Any]]:
  """The evaluated models: each two-stage run (label 1) and its stage-1 model (label 0), and the BadNets runs.

  A two-stage run whose attack did not take (``iou_gt_05`` below 0.5 on its own test
  set) is kept out of the detection statistics (listed with label None).
  """
  out = []
  for spec in specs:
    wd = os.path.join(root, spec["name"])
    if not os.path.exists(os.path.join(wd, "results.json")):
      continue
    if spec["kind"] == "two_stage":
      with open(os.path.join(wd, "results.json")) as f:
        took = (json.load(f).get("iou_gt_05") or 0.0) >= 0.5
      out.append({**spec, "model": spec["name"], "workdir": wd, "label": 1 if took else None, "class": "explanation"})
      out.append({**spec, "model": spec["name"] + "/stage1", "workdir": os.path.join(wd, "stage1"), "label": 0,
                  "class": "clean", "trigger": None, "target": None})
    else:
      out.append({**spec, "model": spec["name"], "workdir": wd, "label": None, "class": "badnets", "target": None})
  return out


def defend(member: dict[str, Any], names: tuple[str, ...], config) -> dict[str, Any]:
  """Runs (or reads, when its report exists) each defense on one model."""
  from backdoor_jax import defenses
  from backdoor_jax.defenses import common
  out, ctx = {}, None
  for name in names:
    path = os.path.join(member["workdir"], "defenses", name, "report.json")
    if os.path.exists(path):
      with open(path) as f:
        out[name] = json.load(f)
      continue
    cfg = defenses.registry.with_sections(config, [name])
    ctx = common.load_context(member["workdir"], cfg) if ctx is None else ctx
    out[name] = defenses.defend_run(member["workdir"], name, cfg, ctx=ctx)
  return out


def tpr_at_fpr(labels: np.ndarray, scores: np.ndarray, fpr: float) -> tuple[float, float]:
  """(TPR, threshold) at the smallest threshold whose false-positive rate is at most ``fpr`` (flag: score > t)."""
  neg = np.sort(scores[labels == 0])
  k = int(np.floor(fpr * len(neg)))  # negatives allowed above the threshold
  thr = neg[len(neg) - 1 - k] if k < len(neg) else -np.inf
  return float(np.mean(scores[labels == 1] > thr)), float(thr)


def report(rows: list[dict[str, Any]]) -> str:
  """The Markdown table and the detection statistics."""
  from sklearn.metrics import roc_auc_score
  lines = ["| model | kind | trigger -> target | map_probe score | verdict | found region / trigger | "
           "clean acc before -> after BN re-est. | FSR (or ASR) before -> after |", "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    mp, bn = r["map_probe"], r["bn_reestimate"]
    fsr_b = bn["before"].get("fsr", bn["before"].get("attack_success_rate"))
    fsr_a = bn["after"].get("fsr", bn["after"].get("attack_success_rate"))
    loc = ""
    if r["class"] == "explanation":
      loc = f"{mp['region']} {'ok' if mp['region'] == r['target'] else 'x'} / {mp['position_name']} " \
            f"{'ok' if mp['position_name'] == r['trigger'] else 'x'}"
    tt = (f"{r.get('look', 'yellow')} {r['trigger']} -> {r['target']}" if r["class"] == "explanation"
          else (r["trigger"] or ""))
    lines.append(f"| {r['model']} | {r['class'] if r['label'] is not None or r['class'] == 'badnets' else 'explanation (attack failed)'} "
                 f"| {tt} | {mp['score']:.3f} | {'flagged' if mp['detected'] else '-'} | {loc} | "
                 f"{bn['before']['clean_accuracy']:.3f} -> {bn['after']['clean_accuracy']:.3f} | "
                 f"{_f(fsr_b)} -> {_f(fsr_a)} |")
  lab = np.asarray([r["label"] for r in rows if r["label"] is not None])
  sc = np.asarray([r["map_probe"]["score"] for r in rows if r["label"] is not None])
  stats = {"n_backdoored": int((lab == 1).sum()), "n_clean": int((lab == 0).sum())}
  if stats["n_backdoored"] and stats["n_clean"]:
    stats["auroc"] = float(roc_auc_score(lab, sc))
    stats["tpr_at_5pct_fpr"], stats["threshold_at_5pct_fpr"] = tpr_at_fpr(lab, sc, 0.05)
    flagged = np.asarray([r["map_probe"]["detected"] for r in rows if r["label"] is not None])
    stats["verdict_tpr"] = float(flagged[lab == 1].mean())
    stats["verdict_fpr"] = float(flagged[lab == 0].mean())
    expl = [r for r in rows if r["label"] == 1]
    stats["finds_target_region"] = float(np.mean([r["map_probe"]["region"] == r["target"] for r in expl]))
    stats["finds_trigger_position"] = float(np.mean([r["map_probe"]["position_name"] == r["trigger"] for r in expl]))
    # ablation: the score without the probes of the population's trigger colours (for every model
    # alike), and with noise probes only
    own = {r.get("look", "yellow") for r in rows if r["class"] == "explanation"}
    stats["trigger_colours_dropped"] = sorted(own & set(rows[0]["map_probe"]["pattern_lift"]))
    for what, keep in (("without_trigger_colours", lambda n: n not in own),
                       ("noise_only", lambda n: n.startswith("noise"))):
      sc2 = np.asarray([max(v for n, v in r["map_probe"]["pattern_lift"].items() if keep(n))
                        for r in rows if r["label"] is not None])
      stats[f"auroc_{what}"] = float(roc_auc_score(lab, sc2))
      stats[f"tpr_at_5pct_fpr_{what}"] = tpr_at_fpr(lab, sc2, 0.05)[0]
  lines.append("")
  lines.append(json.dumps(stats, indent=1))
  return "\n".join(lines)


def plot_scores(rows: list[dict[str, Any]], threshold: float, path: str) -> None:
  """Map Probe score of every model, one column per class (clean, explanation-backdoored, BadNets)."""
  from backdoor_jax import figures  # selects the Agg backend
  plt = figures.plt
  groups = (("clean", lambda r: r["label"] == 0), ("explanation\nbackdoor", lambda r: r["label"] == 1),
            ("attack did\nnot take", lambda r: r["class"] == "explanation" and r["label"] is None),
            ("BadNets", lambda r: r["class"] == "badnets"))
  groups = [(name, [r for r in rows if keep(r)]) for name, keep in groups]
  groups = [(name, g) for name, g in groups if g]
  fig, ax = plt.subplots(figsize=(1.6 * len(groups) + 1.5, 3.2))
  jitter = np.random.default_rng(0)
  for i, (name, g) in enumerate(groups):
    sc = np.asarray([r["map_probe"]["score"] for r in g])
    ax.scatter(i + jitter.uniform(-0.15, 0.15, len(sc)), sc, s=22, alpha=0.8)
  ax.axhline(threshold, color="k", lw=0.8, ls="--", label=f"flag threshold {threshold:g}")
  ax.set_xticks(range(len(groups)), [n for n, _ in groups])
  ax.set_ylabel("Map Probe score (largest lift)")
  ax.set_ylim(-0.05, 1.05)
  ax.legend(loc="upper left", fontsize=8, frameon=False)
  figures.save_figure(fig, path)


def _f(v: Any) -> str:
  return "n/a" if v is None else f"{v:.3f}"


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--root", required=True, help="folder of the population's work dirs")
  ap.add_argument("--dataset", default="gtsrb", choices=("gtsrb", "digits"), help="config variant")
  ap.add_argument("--data", default=os.path.join("..", "shared", "data", "gtsrb32.npz"), help="gtsrb .npz")
  ap.add_argument("--n_backdoor", type=int, default=8)
  ap.add_argument("--n_badnets", type=int, default=2)
  ap.add_argument("--max_train", type=int, default=3000)
  ap.add_argument("--max_test", type=int, default=500)
  ap.add_argument("--widths", default="", help="small_cnn widths (two-stage adds one more conv); '' = config's")
  ap.add_argument("--stage1_epochs", type=int, default=0, help="0 = the config's")
  ap.add_argument("--stage2_epochs", type=int, default=0, help="0 = the config's")
  ap.add_argument("--stage2_batch_size", type=int, default=0, help="0 = the config's")
  ap.add_argument("--appearance", default="yellow", choices=("yellow", "varied"),
                  help="explanation triggers: all yellow squares, or APPEARANCES cycled")
  ap.add_argument("--shard", type=int, default=0, help="train only models k with k %% shards == shard")
  ap.add_argument("--shards", type=int, default=1)
  ap.add_argument("--train_only", action="store_true")
  args = ap.parse_args()
  from backdoor_jax import cli
  cli.quiet_library_logs()
  specs = population_specs(args.n_backdoor, args.n_badnets, args.appearance)
  t0 = time.time()
  train_population(specs, args)
  print(f"training: {time.time() - t0:.0f} s", flush=True)
  if args.train_only:
    return
  from backdoor_jax import defenses
  config = defenses.default_config()
  names = ("map_probe", "bn_reestimate")
  rows = []
  todo = members(specs, args.root)
  for k, m in enumerate(todo):
    t1 = time.time()
    rows.append({**m, **defend(m, names, config)})
    mp = rows[-1]["map_probe"]
    print(f"[{k + 1}/{len(todo)}] {m['model']}: map_probe score {mp['score']:.3f} "
          f"({mp['pattern']} at {mp['position_name']} -> {mp['region']}), {time.time() - t1:.0f} s", flush=True)
  table = report(rows)
  print(table)
  with open(os.path.join(args.root, "population.md"), "w") as f:
    f.write(table + "\n")
  from backdoor_jax.defenses import map_probe
  plot_scores(rows, float(map_probe.defaults().lift_threshold), os.path.join(args.root, "population.png"))
  with open(os.path.join(args.root, "population.json"), "w") as f:
    json.dump([{k: v for k, v in r.items()} for r in rows], f, indent=1, default=str)
  print(f"total: {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
  main()
