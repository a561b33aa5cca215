"""Several processes, one run: starting JAX's distributed runtime, and what the processes agree on."""

from __future__ import annotations

import os
import sys
import threading

import jax
import numpy as np

from jaxcifar.errors import ConfigError

# Seconds without a heartbeat after which JAX's coordination service declares a process dead and stops every
# other one (JAX's default is 100 s; a lost process should end the run sooner than that).
HEARTBEAT_TIMEOUT_S = 20
# Seconds to wait for every process to join before giving up (JAX's default is 300 s, in silence).
CONNECT_TIMEOUT_S = 120


def initialize_distributed(environ=os.environ, log=print) -> bool:
    """JAX's distributed runtime, when this is one of several processes; returns whether it was started.

    Explicit: JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES=N, JAX_PROCESS_ID=i (the same address and
    N in every process). Otherwise, under SLURM or Open MPI with more than one task, what
    `jax.distributed.initialize()` detects. CPU devices talk over gloo. Says at once what it waits for, and gives
    up after JAXCIFAR_CONNECT_TIMEOUT_S (default CONNECT_TIMEOUT_S) with one line.
    """
    def number(name, default=None):
        value = environ.get(name)
        if value is None or value == "":
            return default
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{name}={value!r} must be an integer") from None

    address = environ.get("JAX_COORDINATOR_ADDRESS")
    tasks = max(number("SLURM_NTASKS", 1), number("OMPI_COMM_WORLD_SIZE", 1))
    if not address and tasks <= 1:
        return False
    timeout = number("JAXCIFAR_CONNECT_TIMEOUT_S", CONNECT_TIMEOUT_S)
    count = number("JAX_NUM_PROCESSES") or tasks
    where = f"the coordinator at {address}" if address else "the coordinator the cluster's variables name"
    log(f"jaxcifar: joining a run of {count} processes through {where} (process {environ.get('JAX_PROCESS_ID', '?')}"
        f"); waiting up to {timeout} s for the others (JAXCIFAR_CONNECT_TIMEOUT_S)")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    joined = threading.Event()

    def give_up():
        # JAX's own timeout aborts the process from C++ with a stack dump; this says it in one line first.
        if not joined.wait(timeout):
            print(f"error: gave up after {timeout} s: not all {count} processes joined through {where}; start "
                  "every process (or run under srun), or raise JAXCIFAR_CONNECT_TIMEOUT_S", file=sys.stderr, flush=True)
            os._exit(2)

    threading.Thread(target=give_up, name="connect-timeout", daemon=True).start()
    jax.distributed.initialize(address or None, num_processes=number("JAX_NUM_PROCESSES"),
                               process_id=number("JAX_PROCESS_ID"), initialization_timeout=timeout + 60,
                               heartbeat_timeout_seconds=number("JAXCIFAR_HEARTBEAT_TIMEOUT_S", HEARTBEAT_TIMEOUT_S))
    joined.set()
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
