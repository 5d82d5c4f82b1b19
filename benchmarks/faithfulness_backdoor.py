r"""Are the manipulated maps of an explanation-backdoored model less faithful than the reference's?

Trains nothing: give it a two-stage explanation-backdoor run (its clean stage-1 model is
the reference), e.g.::

  python launch/train.py --config=configs/two_stage.py --workdir=/tmp/f_ts
  python benchmarks/faithfulness_backdoor.py --workdir=/tmp/f_ts          # reference: /tmp/f_ts/stage1

Computes ``faithfulness_report.faithfulness_run`` (Grad-CAM of the predicted class
at the attacked layer; deletion / insertion AUC, ROAD MoRF / LeRF, region-perturbation
AOPC, cascading randomisation and random-logit similarities) on the same seeded subset
of clean and of triggered test images for both models, writes ``faithfulness.json`` and
``faithfulness_curves.png`` to ``--out_dir`` (default WORKDIR/explain) and prints the table.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np

COLUMNS = (("deletion_auc", "deletion AUC (lower = faithful)"), ("insertion_auc", "insertion AUC (higher)"),
           ("road_morf", "ROAD MoRF (lower)"), ("road_lerf", "ROAD LeRF (higher)"),
           ("road_combined", "ROAD (LeRF-MoRF)/2 (higher)"), ("aopc", "region AOPC (higher)"),
           ("rand_spearman_last", "Spearman, top layer randomised (lower)"),
           ("rand_spearman_all", "Spearman, all randomised (lower)"),
           ("random_logit_spearman", "random-logit Spearman (lower)"))


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--workdir", required=True, help="two-stage explanation-backdoor work dir")
  ap.add_argument("--reference", default=None, help="clean reference run (default WORKDIR/stage1)")
  ap.add_argument("--max_test", type=int, default=200, help="images per set (seeded subset; 0 = all)")
  ap.add_argument("--batch_size", type=int, default=100)
  ap.add_argument("--out_dir", default=None)
  args = ap.parse_args()
  from backdoor_jax import cli
  cli.quiet_library_logs()
  from backdoor_jax import faithfulness_report as fr

  t0 = time.time()
  reference = args.reference or os.path.join(args.workdir, "stage1")
  rec = cli.run_or_exit(lambda: fr.faithfulness_run(
      args.workdir, reference=reference, max_test=args.max_test, out_dir=args.out_dir,
      settings=fr.FaithfulnessSettings(batch_size=args.batch_size)))
  rows = fr.summary_rows(rec)
  sems = {}
  for role, sets in rec["models"].items():
    for name, r in sets.items():
      n = r["count"]
      sems[(role, name)] = {"deletion_auc": r["deletion"]["auc"]["std"], "insertion_auc": r["insertion"]["auc"]["std"],
                            "road_combined": r["road_combined"]["std"], "aopc": r["region_perturbation"]["aopc"]["std"]}
      sems[(role, name)] = {k: v / np.sqrt(n) for k, v in sems[(role, name)].items()}
  print(f"Grad-CAM of the predicted class at {rec['layers']}; {rows[0]['n']} images per set; "
        f"mean (+- standard error where given)\n")
  print("| model | images | accuracy | " + " | ".join(c[1] for c in COLUMNS) + " |")
  print("| --- " * (3 + len(COLUMNS)) + "|")
  for row in rows:
    sem = sems[(row["model"], row["images"])]
    cells = [f"{row[k]:.3f}" + (f" +- {sem[k]:.3f}" if k in sem else "") for k, _ in COLUMNS]
    print(f"| {'attacked' if row['model'] == 'run' else 'reference'} | {row['images']} | {row['accuracy']:.3f} | "
          + " | ".join(cells) + " |")
  print(f"\n-> {rec['out_dir']} ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
  main()
