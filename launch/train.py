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
                                 "Multi-process run, cluster auto-detected: jax.distributed.initialize() "
                                 "(Slurm, Open MPI, TPU pod slices, Kubernetes, or JAX_COORDINATOR_ADDRESS etc.).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", "",
                                   "Multi-process run, set explicitly: host:port of process 0 (with "
                                   "--num_processes and --process_id).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "Processes in the run (explicit multi-process).")
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "This process's rank (explicit multi-process).")
_TIMEOUT = flags.DEFINE_integer("coordinator_timeout", 300,
                                "Seconds to wait for the coordinator and the other processes.")
_CPU_DEVICES = flags.DEFINE_integer("cpu_devices", 0,
                                    "Simulated CPU devices per process (0: platform default); for tests.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  from backdoor_jax import cli
  from backdoor_jax import distributed
  cli.quiet_library_logs()
  cli.run_or_exit(lambda: distributed.initialize(
      auto=_DISTRIBUTED.value, coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
      process_id=_PROCESS_ID.value, cpu_devices=_CPU_DEVICES.value, timeout_s=_TIMEOUT.value))
  from backdoor_jax.train import recipes
  config = _CONFIG.value
  recipe = cli.run_or_exit(lambda: recipes.get(config.get("recipe", "badnets")))
  results = cli.run_or_exit(lambda: recipe.train(config, _WORKDIR.value))
  summary = " ".join(f"{k}={results[k]:.4f}" for k in recipe.summary if results.get(k) is not None)
  import jax
  if jax.process_index() != 0:
    return
  print(f"{summary} train_seconds={results['train_seconds']:.1f} -> "
        f"{os.path.join(os.path.abspath(_WORKDIR.value), 'results.json')}")


if __name__ == "__main__":
  from backdoor_jax import cli
  cli.run_app(main, workdir_flag="workdir")
