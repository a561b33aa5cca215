"""What a measurement ran on: the processor, the code's commit, the devices; and XLA:CPU pinned to one thread."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from pathlib import Path

# XLA:CPU's thread pools: Eigen's for convolutions, and the intra-op pool. Both off, a JAX process uses one core,
# so that K single-threaded runs side by side (fidelity's seeds, replica_drift) do not contend.
SINGLE_THREAD_XLA_FLAGS = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


def use_one_thread() -> None:
    """Pins XLA:CPU to one thread; only before JAX's backend starts (XLA reads XLA_FLAGS once)."""
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {SINGLE_THREAD_XLA_FLAGS}".strip()


def cpu_name() -> str:
    """The processor's model name (the CPU changes between sessions and sets the speed)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit(short: bool = False) -> str | None:
    """The commit of the checkout this package was imported from (a frozen worktree reports its own)."""
    try:
        out = subprocess.run(["git", "rev-parse", *(["--short"] if short else []), "HEAD"], capture_output=True,
                             text=True, cwd=Path(__file__).parent, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def machine_info() -> dict:
    """The platform, devices, processor, library versions, commit and date of a measurement."""
    import flax
    import jax

    dev = jax.devices()[0]
    return {"platform": jax.default_backend(), "device": getattr(dev, "device_kind", str(dev)),
            "device_count": jax.device_count(), "cpu": cpu_name(), "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "jax": jax.__version__, "flax": flax.__version__,
            "commit": git_commit(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def device_label(info: dict) -> str:
    """'1 x cpu (AMD EPYC, 2 cores)' from machine_info()'s fields."""
    cpu = f" ({info['cpu']}, {info['cpu_count']} cores)" if info["platform"] == "cpu" else ""
    return f"{info['device_count']} x {info['device']}{cpu}"


def run_context() -> dict:
    """What each epoch record says it was trained on and by: the machine (device_label) and the code's commit. A
    run resumed elsewhere, or by other code, shows it epoch by epoch."""
    info = machine_info()
    return {"machine": device_label(info), "commit": info["commit"]}


def process_age_s() -> float:
    """Seconds since this process started (its interpreter start and imports included: ~3-5 s of a training
    command's start-up before any line of it runs); 0.0 where /proc does not say."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22, counted after the name's closing ")"
        return max(0.0, float(Path("/proc/uptime").read_text().split()[0]) - started)
    except (OSError, ValueError, IndexError):
        return 0.0
