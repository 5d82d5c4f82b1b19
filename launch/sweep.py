r"""Trains every cell of a sweep config and writes results.csv and report/.

A config with a ``table`` section (``configs/attacks_x_defenses.py``) is an attacks x
defenses table instead: every attack is trained, every defense run on it, and
report/attacks_x_defenses.{md,csv,png} written.

  python launch/sweep.py --config=configs/sok_badnets.py:digits --workdir=runs/sok_digits
  python launch/sweep.py --config=configs/sok_badnets.py:gtsrb_reduced \
      --config.data.path=../shared/data/gtsrb32.npz --workdir=runs/sok_gtsrb
  python launch/sweep.py --workdir=runs/sok_gtsrb --report_only
  python launch/sweep.py --config=configs/attacks_x_defenses.py:gtsrb \
      --config.shared.data.path=../shared/data/gtsrb32.npz --workdir=runs/axd_gtsrb

Rerunning the same command on the same --workdir skips the finished cells (and resumes
the group that was training from its last epoch checkpoint).
"""
from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Sweep config file (path[:variant]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Sweep folder (results.csv, report/, groups/).")
_REPORT_ONLY = flags.DEFINE_bool("report_only", False, "Only rebuild report/ from results.csv.")
flags.mark_flags_as_required(["workdir"])


def _require_config():
  from backdoor_jax.errors import ConfigError
  if _CONFIG.value is None:
    raise ConfigError("--config is required (a sweep config such as configs/sok_badnets.py) unless --report_only")
  return _CONFIG.value


def main(argv):
  del argv
  from backdoor_jax import cli
  cli.quiet_library_logs()
  from backdoor_jax import sweep
  import os
  if _REPORT_ONLY.value:
    if os.path.exists(os.path.join(_WORKDIR.value, "table.json")):
      cli.exit_with_error(f"{_WORKDIR.value} is an attacks x defenses table: its report is rewritten after every "
                          "attack; rerun its --config command to rebuild it (finished attacks are only re-evaluated)")
    cli.run_or_exit(lambda: sweep.write_report(_WORKDIR.value))
  elif _CONFIG.value is not None and "table" in _CONFIG.value:
    rows = cli.run_or_exit(lambda: sweep.run_table(_CONFIG.value, _WORKDIR.value))
    failed = [r["attack"] for r in rows if r.get("status") != "ok" and r["defense"] == "none"]
    print(f"{len({r['attack'] for r in rows}) - len(failed)} attacks ok" + (f", failed: {', '.join(failed)}"
                                                                             if failed else ""))
    print(f"-> {os.path.join(os.path.abspath(_WORKDIR.value), 'report', 'attacks_x_defenses.md')}")
    return
  else:
    rows = cli.run_or_exit(lambda: sweep.run_sweep(_require_config(), _WORKDIR.value))
    ok = sum(r.get("status") == "ok" for r in rows)
    print(f"{ok} of {len(rows)} cells ok")
  print(f"-> {os.path.join(os.path.abspath(_WORKDIR.value), 'report', 'summary.md')}")


if __name__ == "__main__":
  from backdoor_jax import cli
  cli.run_app(main, workdir_flag="workdir")
