r"""Runs a backdoor defense on a trained run; reports in WORKDIR/defenses/NAME/.

  python launch/defend.py --workdir=runs/digits --defense=neural_cleanse
  python launch/defend.py --workdir=runs/digits --defense=all --config.strip.num_overlays=10

Defenses: neural_cleanse, activation_clustering, spectral, fine_pruning, strip,
tv_denoise, or all (every one, plus WORKDIR/defenses/summary.{json,md}). Settings:
configs/defenses.py (any key can be overridden with --config.SECTION.KEY=VALUE).
"""
import os

from absl import flags
from ml_collections import config_flags

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "defenses.py")
# No default here: ml_collections would load it (and fail on a bad override) at import time; run_app passes it.
_CONFIG = config_flags.DEFINE_config_file("config", None, "Defense settings file (default: configs/defenses.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Training work dir (config.json + checkpoints/).")
_DEFENSE = flags.DEFINE_string("defense", None, "Defense name, or 'all'.")
flags.mark_flags_as_required(["workdir", "defense"])


def main(argv):
  del argv
  from backdoor_jax import cli
  cli.quiet_library_logs()
  from backdoor_jax import defenses
  rec = cli.run_or_exit(lambda: defenses.defend_run(_WORKDIR.value, _DEFENSE.value, _CONFIG.value))
  out = os.path.join(os.path.abspath(_WORKDIR.value), "defenses")
  if _DEFENSE.value == "all":
    print(defenses.report.summary_markdown(rec["rows"]), end="")
    print(f"-> {os.path.join(out, 'summary.md')}")
  else:
    row = defenses.report.summary_row(rec)
    print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    print(f"-> {os.path.join(out, _DEFENSE.value, 'report.json')}")


if __name__ == "__main__":
  from backdoor_jax import cli, config_checks
  cli.run_app(main, default_config=_DEFAULT_CONFIG, check=config_checks.check_defense_config,
              workdir_flag="workdir", workdir_must_exist=True)
