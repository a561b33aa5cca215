"""signals.py: SIGINT and SIGTERM become a stop flag (the run saves, then stops), acknowledged at once; a second
signal exits at once."""

import os
import signal
import subprocess
import sys
import time

import pytest

from jaxcifar.run import runlog, signals
from conftest import REPO


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_either_signal_sets_the_flag_and_the_previous_handler_comes_back(sig, capsys):
    before = signal.getsignal(sig)
    wakeup_before = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(wakeup_before)
    with signals.StopFlag() as stop:
        stop.describe = lambda: "stopping by step 12"
        assert not stop() and not stop(boundary=False)
        os.kill(os.getpid(), sig)
        deadline = time.monotonic() + 5
        while not stop.requested and time.monotonic() < deadline:  # the watcher thread sets it
            time.sleep(0.01)
        assert stop(boundary=False) and stop() and stop.signum == sig  # one process: asked at any call
        message = str(signals.TrainingInterrupted(stop.signum, 7))
    assert signal.getsignal(sig) is before
    assert signal.set_wakeup_fd(wakeup_before) == wakeup_before  # the previous wakeup fd is back too
    ack = capsys.readouterr().err.strip()
    assert ack == (f"jaxcifar: {signal.Signals(sig).name} received: stopping by step 12; press Ctrl-C again to exit "
                   "at once without saving")
    assert message == (f"stopped by {signal.Signals(sig).name} at step 7 after saving; run the same command again to "
                       "resume")


SECOND_SIGNAL = """
import os, signal, sys, time
from jaxcifar.run import signals
with signals.StopFlag() as stop:
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.5)
    print("first signal: flag", stop.signum == signal.SIGINT, flush=True)
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(5)
print("not reached")
"""


def test_a_second_signal_exits_at_once_with_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-c", SECOND_SIGNAL], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 128 + 2, r.stderr
    assert r.stdout.strip() == "first signal: flag True"
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 3 and lines[1] == "", r.stderr  # the first signal's acknowledgement, then the second's line
    assert "SIGINT received" in lines[0] and "second SIGINT: exiting without waiting for the save" in lines[2]


BLOCKED_MAIN_THREAD = """
import hashlib, os, signal, threading, time
from jaxcifar.run import signals
t0 = time.monotonic()
hashlib.pbkdf2_hmac("sha256", b"x", b"y", 20000)
rounds = int(20000 * 3.0 / max(time.monotonic() - t0, 1e-4))  # about 3 s in one call
with signals.StopFlag() as stop:
    threading.Timer(0.5, lambda: (print("sent", time.monotonic(), flush=True), os.kill(os.getpid(), signal.SIGTERM))).start()
    # One long call in C (releasing the GIL, as a compiled call or a device sync does): Python's own handler cannot
    # run in the main thread until it returns.
    hashlib.pbkdf2_hmac("sha256", b"x", b"y", rounds)
    print("flag", stop.signum == signal.SIGTERM, flush=True)
"""


def test_the_signal_is_acknowledged_while_the_main_thread_is_busy(tmp_path):
    proc = subprocess.Popen([sys.executable, "-u", "-c", BLOCKED_MAIN_THREAD], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    sent = float(proc.stdout.readline().split()[1])
    ack = ""
    while not ack.strip():  # the acknowledgement starts on a fresh line
        ack = proc.stderr.readline()
    acked = time.monotonic()
    out, err = proc.communicate(timeout=60)
    assert "SIGTERM received" in ack, ack + err
    assert acked - sent < 1.0, acked - sent  # within a second, not after the 4 s computation
    assert out.strip() == "flag True" and proc.returncode == 0


def _lines_with_times(stream, into: list) -> None:
    for line in iter(stream.readline, ""):
        for part in line.replace("\r", "\n").split("\n"):
            if part.strip():
                into.append((time.monotonic(), part))


def test_training_acknowledges_a_stop_at_once_and_stops_within_one_compiled_call(tmp_path, prepared):
    import json
    import threading

    data_dir, cache_dir, _, md5_file = prepared
    # 25 steps an epoch, one per compiled call, and no log boundary inside an epoch: stopping at boundaries alone
    # would run on to the epoch's end.
    cmd = [sys.executable, "-m", "jaxcifar.train", "--config", str(REPO / "configs/tiny.py"),
           "--workdir", str(tmp_path / "run"), "--config.num_epochs=40", "--config.batch_size=8",
           "--config.log_every_steps=1000", f"--config.data.data_dir={data_dir}",
           f"--config.data.cache_dir={cache_dir}", f"--config.data.md5_file={md5_file}"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = [], []
    readers = [threading.Thread(target=_lines_with_times, args=(s, into)) for s, into in ((proc.stdout, out),
                                                                                         (proc.stderr, err))]
    for reader in readers:
        reader.start()
    deadline = time.monotonic() + 300
    while not any(line.startswith("==> epoch 3/") for _, line in out) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # into epoch 3
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=300)
    for reader in readers:
        reader.join()
    acks = [(t, line) for t, line in err if "SIGINT received" in line]
    assert len(acks) == 1, "\n".join(line for _, line in err[-20:])
    acked, ack = acks[0]
    assert acked - sent < 1.0, acked - sent
    assert ack.endswith("press Ctrl-C again to exit at once without saving"), ack
    by = int(ack.split("step ")[1].split(")")[0])
    last = out[-1][1]
    assert proc.returncode == 130 and last.startswith("jaxcifar: stopped by SIGINT at step "), last
    stopped = int(last.split("at step ")[1].split(",")[0])
    assert 50 < stopped <= by, (stopped, ack)  # in epoch 3, no later than announced: one compiled call
    assert (tmp_path / "run" / "checkpoints" / str(stopped)).is_dir()
    epochs = [json.loads(line)["epoch"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert f": {len(epochs)} of 40 epochs, last test accuracy " in last and "; checkpoints " in last
    assert f"; saved: {runlog.saved_in(tmp_path / 'run')};" in last and f"step {stopped}" in last  # what it holds
