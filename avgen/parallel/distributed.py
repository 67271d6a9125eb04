"""Multi-host start-up: `jax.distributed.initialize()` when the environment asks for it."""

from __future__ import annotations

import logging
import os

import jax

_log = logging.getLogger(__name__)


def initialize_from_environment() -> None:
  """Initialises jax.distributed for multi-process runs; single-process runs are left alone.

  Triggers: an explicit coordinator (AVGEN_COORDINATOR_ADDRESS, AVGEN_NUM_PROCESSES,
  AVGEN_PROCESS_ID), or a SLURM job with more than one task (jax reads SLURM_* itself).
  """
  address = os.environ.get("AVGEN_COORDINATOR_ADDRESS")
  if address:
    jax.distributed.initialize(
        coordinator_address=address,
        num_processes=int(os.environ["AVGEN_NUM_PROCESSES"]),
        process_id=int(os.environ["AVGEN_PROCESS_ID"]))
  elif int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    jax.distributed.initialize()
  else:
    return
  _log.info("process %d of %d, %d local devices", jax.process_index(), jax.process_count(),
            jax.local_device_count())
