"""Several processes, one run: starting JAX's distributed runtime, and what the processes agree on."""

from __future__ import annotations

import os

import jax
import numpy as np

from jaxcifar.errors import ConfigError

# Seconds without a heartbeat after which JAX's coordination service declares a process dead and stops every
# other one (JAX's default is 100 s; a lost process should end the run sooner than that).
HEARTBEAT_TIMEOUT_S = 20


def initialize_distributed(environ=os.environ) -> bool:
    """JAX's distributed runtime, when this is one of several processes; returns whether it was started.

    Explicit: JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES=N, JAX_PROCESS_ID=i (the same address and
    N in every process). Otherwise, under SLURM or Open MPI with more than one task, what
    `jax.distributed.initialize()` detects. CPU devices talk over gloo.
    """
    address = environ.get("JAX_COORDINATOR_ADDRESS")
    tasks = max(int(environ.get("SLURM_NTASKS", "1") or 1), int(environ.get("OMPI_COMM_WORLD_SIZE", "1") or 1))
    if not address and tasks <= 1:
        return False

    def number(name):
        value = environ.get(name)
        if value is None:
            return None
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{name}={value!r} must be an integer") from None

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(address or None, num_processes=number("JAX_NUM_PROCESSES"),
                               process_id=number("JAX_PROCESS_ID"),
                               heartbeat_timeout_seconds=number("JAXCIFAR_HEARTBEAT_TIMEOUT_S") or HEARTBEAT_TIMEOUT_S)
    return True


def single_process() -> bool:
    return jax.process_count() == 1


def is_writer() -> bool:
    """Whether this process writes the run's files: the only one, or process 0 of several."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Waits until every process gets here (nothing to wait for with one)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"jaxcifar: {name}")


def any_process(flag: bool) -> bool:
    """Whether `flag` is set in any process (every process must ask, in the same order)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))
