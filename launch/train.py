r"""Trains a backdoored classifier from a config file.

  python launch/train.py --config=configs/badnets.py --workdir=runs/digits
  python launch/train.py --config=configs/badnets.py:gtsrb \
      --config.data.path=../shared/data/gtsrb32.npz --config.train.epochs=3 --workdir=runs/gtsrb

Rerunning the same command on the same --workdir resumes from its newest checkpoint.
"""
import os

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (path[:variant]).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder (checkpoints, metrics, figures).")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False,
                                 "Call jax.distributed.initialize() first (multi-host; auto-detects "
                                 "Slurm / TPU / Kubernetes, or use JAX_COORDINATOR_ADDRESS etc.).")
flags.mark_flags_as_required(["config", "workdir"])



def main(argv):
  del argv
  from backdoor_jax import cli
  cli.quiet_library_logs()
  if _DISTRIBUTED.value:
    import jax
    jax.distributed.initialize()
  from backdoor_jax.train import loop
  config = _CONFIG.value
  if config.get("recipe", "badnets") == "badnets":
    results = cli.run_or_exit(lambda: loop.train_and_evaluate(config, _WORKDIR.value))
    keys = ("clean_accuracy", "attack_success_rate")
  else:
    from backdoor_jax.train import explain_loop
    results = cli.run_or_exit(lambda: explain_loop.train_explanation_backdoor(config, _WORKDIR.value))
    keys = ("clean_accuracy", "reference_accuracy", "iou_gt_05", "fsr", "cr")
  summary = " ".join(f"{k}={results[k]:.4f}" for k in keys if results.get(k) is not None)
  print(f"{summary} train_seconds={results['train_seconds']:.1f} -> "
        f"{os.path.join(os.path.abspath(_WORKDIR.value), 'results.json')}")


if __name__ == "__main__":
  app.run(main)
