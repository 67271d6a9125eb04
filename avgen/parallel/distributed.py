"""Multi-host start-up: `jax.distributed.initialize()` when the environment asks for it."""

from __future__ import annotations

import logging
import os

import jax

_log = logging.getLogger(__name__)


def initialize_from_environment() -> None:
  """Initialises jax.distributed for multi-process runs; single-process runs are left alone.

  Triggers: an explicit coordinator (AVGEN_COORDINATOR_ADDRESS, AVGEN_NUM_PROCESSES,
  AVGEN_PROCESS_ID), AVGEN_DISTRIBUTED=auto (jax detects the cluster: Cloud TPU VM pods, GKE
  TPU slices, SLURM, Open MPI), or a SLURM job with more than one task (jax reads SLURM_* itself).
  """
  address = os.environ.get("AVGEN_COORDINATOR_ADDRESS")
  auto = os.environ.get("AVGEN_DISTRIBUTED", "")
  if auto not in ("", "auto"):
    raise ValueError(f"AVGEN_DISTRIBUTED={auto!r}: the only value is 'auto' (or leave it unset)")
  if address:
    missing = [k for k in ("AVGEN_NUM_PROCESSES", "AVGEN_PROCESS_ID") if k not in os.environ]
    if missing:
      raise ValueError(f"AVGEN_COORDINATOR_ADDRESS is set but {missing} are not; set all three")
    jax.distributed.initialize(
        coordinator_address=address,
        num_processes=int(os.environ["AVGEN_NUM_PROCESSES"]),
        process_id=int(os.environ["AVGEN_PROCESS_ID"]))
  elif auto or int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    jax.distributed.initialize()
  else:
    return
  _log.info("process %d of %d, %d local devices", jax.process_index(), jax.process_count(),
            jax.local_device_count())
