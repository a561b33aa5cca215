"""Several processes, one training run: JAX's distributed runtime over gloo, with real processes on this machine.

One chain of starts of the command line as 2 processes x 2 CPU devices (stopped by a signal to one process,
resumed, one process killed, resumed again to the end) against one uninterrupted start as 1 process x 4 devices.
"""

import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from jaxcifar.run import checkpoint, runlog, trees
from conftest import REPO, with_devices

EPOCHS = 2  # 6 steps each


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment(prepared, devices: int, process: int | None = None, port: int | None = None) -> dict:
    env = dict(os.environ, XLA_FLAGS=with_devices(devices), TFDS_DATA_DIR=prepared[0], JAXCIFAR_CACHE_DIR=prepared[1],
               TQDM_DISABLE="1")
    if process is not None:
        env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(process),
                   JAXCIFAR_HEARTBEAT_TIMEOUT_S="10")
    return env


def train_args(workdir, prepared) -> list[str]:
    return ["-m", "jaxcifar.train", "--config", str(REPO / "configs/tiny.py"), "--workdir", str(workdir),
            f"--config.data.md5_file={prepared[3]}", "--config.batch_size=32", "--config.eval_batch_size=30",
            "--config.steps_per_call=1", "--config.log_every_steps=1", f"--config.num_epochs={EPOCHS}"]


def start_pair(prepared, workdir) -> list[subprocess.Popen]:
    """The command line as processes 0 and 1 of one distributed run, 2 CPU devices each."""
    port = free_port()
    return [subprocess.Popen([sys.executable, *train_args(workdir, prepared)], cwd=REPO,
                             env=environment(prepared, 2, i, port), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True) for i in (0, 1)]


def read_until(proc, marker: str, timeout: float = 300) -> str:
    out, deadline = "", time.time() + timeout
    while marker not in out and time.time() < deadline and proc.poll() is None:
        out += proc.stdout.readline()
    return out


def finish(procs, timeout=600) -> list[tuple[int, str]]:
    outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    return [(p.returncode, out) for p, out in zip(procs, outputs)]


@pytest.fixture(scope="module")
def one_process_run(prepared, tmp_path_factory):
    """The same command, uninterrupted, as 1 process x 4 devices."""
    workdir = tmp_path_factory.mktemp("one-process") / "w"
    r = subprocess.run([sys.executable, *train_args(workdir, prepared)], cwd=REPO, env=environment(prepared, 4),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return workdir


@pytest.fixture(scope="module")
def two_process_chain(prepared, tmp_path_factory):
    """Three starts of the pair in one workdir: (1) SIGTERM to process 1 alone in epoch 1; (2) resumed, then process
    1 SIGKILLed in epoch 2; (3) resumed to the end. Returns the workdir and each start's [(rc, output)] per process."""
    workdir = tmp_path_factory.mktemp("two-process") / "w"
    first, second = start_pair(prepared, workdir)
    head = read_until(first, "==> epoch 1/")
    second.send_signal(signal.SIGTERM)
    stopped = [(rc, head + out if i == 0 else out) for i, (rc, out) in enumerate(finish([first, second]))]

    first, second = start_pair(prepared, workdir)
    head = read_until(first, f"==> epoch {EPOCHS}/")
    second.send_signal(signal.SIGKILL)
    killed = time.time()
    rest, _ = first.communicate(timeout=120)
    second.communicate()
    lost = [(first.returncode, head + rest, time.time() - killed)]

    resumed = finish(start_pair(prepared, workdir))
    return workdir, stopped, lost, resumed


def test_a_signal_to_one_process_stops_both_at_one_step_after_a_common_save(two_process_chain):
    workdir, stopped, lost, _ = two_process_chain
    assert [rc for rc, _ in stopped] == [128 + signal.SIGTERM] * 2, stopped[0][1][-3000:] + stopped[1][1][-3000:]
    at = [int(out.split("stopped by SIGTERM at step ")[1].split(",")[0]) for _, out in stopped]
    assert at[0] == at[1] and 0 < at[0] <= 6  # in epoch 1
    assert f"resumed from checkpoint at step {at[0]}" in lost[0][1] and "on 4 cpu device(s)" in lost[0][1]


def test_a_lost_process_stops_the_other_and_a_restart_resumes_to_the_end(two_process_chain):
    workdir, _, lost, resumed = two_process_chain
    rc, out, seconds = lost[0]
    assert rc != 0 and seconds < 60  # JAXCIFAR_HEARTBEAT_TIMEOUT_S=10, not JAX's 100 s
    assert "tasks are unhealthy (stopped sending heartbeats):\n1\n" in out, out[-3000:]
    assert all(rc == 0 for rc, _ in resumed), resumed[0][1][-3000:] + resumed[1][1][-3000:]
    assert "resumed from checkpoint at step" in resumed[0][1]
    assert [r["epoch"] for r in runlog.untimed_records(workdir)] == list(range(1, EPOCHS + 1))


def test_process_0_alone_writes_the_logs(two_process_chain):
    workdir, _, _, resumed = two_process_chain
    assert "Test accuracy" in resumed[0][1] and "Test accuracy" not in resumed[1][1]  # process 1 prints nothing...
    log = (workdir / "log.txt").read_text()  # ...and writes none of the logs
    assert log.count("jaxcifar: vgg_bn_drop") == 3  # one line per start
    assert len((workdir / "metrics.csv").read_text().splitlines()) == 1 + EPOCHS
    assert len(list((workdir / "tensorboard").iterdir())) == 1  # process 0's, rewritten at each of the 3 starts


def test_two_processes_compute_what_one_process_computes(one_process_run, two_process_chain):
    workdir = two_process_chain[0]
    # Same devices in number, the global batch split the same way, BatchNorm over the global batch: the same
    # function; only the all-reduces run elsewhere (in one process, or over gloo), summing in another order, and
    # the two-process run was stopped and resumed twice. A skipped, repeated or misplaced step moves the loss and
    # the parameters by O(1) of their change.
    one_log, two_log = runlog.untimed_records(one_process_run), runlog.untimed_records(workdir)
    np.testing.assert_allclose([r["train_loss"] for r in two_log], [r["train_loss"] for r in one_log], rtol=1e-5)
    steps = checkpoint.Checkpointer(one_process_run, read_only=True).steps()
    one, two, one_epoch_before = (trees.flat_vector(checkpoint.read_saved(w, step=s)[0]["train_state"]["params"])
                                  for w, s in ((one_process_run, None), (workdir, None), (one_process_run, steps[-2])))
    # Measured (Sapphire Rapids, native): 5.1e-6 of the last epoch's travel apart after 2 epochs (4.6e-4
    # after 3: rounding grows), the largest share in the conv biases ahead of BatchNorm, which only rounding
    # moves. One step on a wrong batch moves them by about a sixth of an epoch's travel.
    assert np.linalg.norm(two - one) <= 1e-2 * np.linalg.norm(one - one_epoch_before)
    one_conf, two_conf = (np.asarray(records[-1]["test_confusion"]) for records in (one_log, two_log))
    assert np.abs(one_conf - two_conf).sum() <= 2 and two_conf.sum() == 50


def test_a_process_whose_peers_never_come_says_so_at_once_and_gives_up_in_one_line(prepared, tmp_path):
    env = dict(environment(prepared, 1), JAX_COORDINATOR_ADDRESS=f"localhost:{29700 + os.getpid() % 200}",
               JAX_NUM_PROCESSES="2", JAX_PROCESS_ID="0", JAXCIFAR_CONNECT_TIMEOUT_S="3")
    started = time.time()
    r = subprocess.run([sys.executable, *train_args(tmp_path / "w", prepared)], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and time.time() - started < 60
    assert r.stdout.startswith("jaxcifar: joining a run of 2 processes through the coordinator at localhost:")
    assert r.stderr.strip().splitlines() == [
        f"error: gave up after 3 s: not all 2 processes joined through the coordinator at "
        f"{env['JAX_COORDINATOR_ADDRESS']}; start every process (or run under srun), or raise JAXCIFAR_CONNECT_TIMEOUT_S"]


def test_a_cluster_variable_that_is_not_a_number_is_one_line(prepared, tmp_path):
    r = subprocess.run([sys.executable, *train_args(tmp_path / "w", prepared)], cwd=REPO, capture_output=True, text=True,
                       env=dict(environment(prepared, 1), SLURM_NTASKS="abc"), timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == "error: SLURM_NTASKS='abc' must be an integer", r.stderr
