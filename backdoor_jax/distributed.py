"""Starting JAX's multi-process runtime before anything touches a device.

One training run can span several processes (one per host, or one per GPU): each
process sees its local devices, and ``jax.devices()`` lists all of them. The trainers
need nothing else: their mesh spans ``jax.devices()``, each process feeds its block of
every global batch (``train.feed``), orbax saves checkpoints collectively and only
process 0 writes results, figures and logs.

Call :func:`initialize` first thing in a launcher, before any other JAX call.
"""
from __future__ import annotations

import re
import socket
import time

from absl import logging

from backdoor_jax.errors import ConfigError

_ADDRESS = re.compile(r"^\[?[A-Za-z0-9_.:-]+\]?:\d{1,5}$")


def initialize(*, auto: bool = False, coordinator_address: str = "", num_processes: int = 0,
               process_id: int = -1, cpu_devices: int = 0, timeout_s: int = 300) -> None:
  """Configures devices and, when asked, joins a multi-process JAX run.

  Args:
    auto: call ``jax.distributed.initialize()`` with no arguments, which detects the
      cluster from the environment (Slurm, Open MPI, TPU VM pod slices, Kubernetes
      with JobSet; or ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` /
      ``JAX_PROCESS_ID``).
    coordinator_address: ``host:port`` of process 0's coordinator service; with
      ``num_processes`` and ``process_id`` it sets the cluster explicitly.
    num_processes: number of processes in the run (>= 1).
    process_id: this process's rank, in ``[0, num_processes)``.
    cpu_devices: > 0: expose this many CPU devices per process (simulated devices for
      tests and CPU clusters); with several processes, CPU collectives use gloo.
    timeout_s: seconds to wait for the coordinator and for the other processes.

  Raises:
    ConfigError: inconsistent settings, or (for a process other than 0 in the explicit
      mode) the coordinator could not be reached within ``timeout_s``.
  """
  import jax

  explicit = bool(coordinator_address) or num_processes > 0 or process_id >= 0
  if explicit and auto:
    raise ConfigError("--distributed (auto-detect) and an explicit --coordinator_address/--num_processes/"
                      "--process_id were both given; use one or the other")
  if explicit:
    if not _ADDRESS.match(coordinator_address or ""):
      raise ConfigError(f"--coordinator_address={coordinator_address!r} is invalid; allowed: host:port of "
                        "process 0, e.g. 10.0.0.1:1234 or localhost:1234")
    if num_processes < 1:
      raise ConfigError(f"--num_processes={num_processes} is invalid; allowed: an integer >= 1")
    if not 0 <= process_id < num_processes:
      raise ConfigError(f"--process_id={process_id} is invalid; allowed: 0 .. {num_processes - 1}")
  if cpu_devices < 0:
    raise ConfigError(f"--cpu_devices={cpu_devices} is invalid; allowed: 0 (the platform default) or >= 1")
  if cpu_devices:
    jax.config.update("jax_num_cpu_devices", int(cpu_devices))
  if (explicit and num_processes > 1) or auto:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # used only if the devices are CPUs
  if not (explicit or auto):
    return
  if explicit and process_id > 0:
    _wait_for_coordinator(coordinator_address, timeout_s)
  kwargs = ({"coordinator_address": coordinator_address, "num_processes": num_processes, "process_id": process_id}
            if explicit else {})
  try:
    jax.distributed.initialize(initialization_timeout=timeout_s, **kwargs)
  except (RuntimeError, ValueError) as e:
    where = f"coordinator {coordinator_address}" if explicit else "the cluster environment (auto-detection)"
    raise ConfigError(f"jax.distributed.initialize failed with {where}: {str(e).splitlines()[0][:300]}") from None
  if jax.process_index() != 0:
    logging.set_verbosity(logging.WARNING)  # only process 0 logs progress
  logging.info("process %d of %d: %d local and %d global devices (%s)", jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count(), jax.devices()[0].platform)


def _wait_for_coordinator(address: str, timeout_s: float) -> None:
  """Waits until process 0's coordinator accepts connections, or raises ConfigError.

  JAX aborts the whole process (a C++ fatal error, no Python exception) when it cannot
  reach the coordinator, so a process other than 0 checks the address first.
  """
  host, port = address.rsplit(":", 1)
  host = host.strip("[]")
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      with socket.create_connection((host, int(port)), timeout=2.0):
        return
    except OSError as e:
      if time.monotonic() >= deadline:
        raise ConfigError(f"cannot reach the coordinator {address} within {timeout_s:g} s ({e.strerror or e}); "
                          "start process 0 first, and check --coordinator_address and the firewall") from None
      time.sleep(0.5)
