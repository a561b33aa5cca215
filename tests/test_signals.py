"""signals.py: SIGINT and SIGTERM become a stop flag (the run saves, then stops); a second signal exits at once."""

import os
import signal
import subprocess
import sys

import pytest

from jaxcifar import signals
from conftest import REPO


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_either_signal_sets_the_flag_and_the_previous_handler_comes_back(sig):
    before = signal.getsignal(sig)
    with signals.StopFlag() as stop:
        assert not stop()
        os.kill(os.getpid(), sig)  # Python runs the handler in this thread before the next line
        assert stop() and stop.signum == sig
        message = str(signals.TrainingInterrupted(stop.signum, 7))
    assert signal.getsignal(sig) is before
    assert message == (f"stopped by {signal.Signals(sig).name} at step 7 after saving; run the same command again to "
                       "resume")


SECOND_SIGNAL = """
import os, signal, sys, time
from jaxcifar import signals
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
    assert len(lines) == 1 and "second SIGINT: exiting without waiting for the save" in lines[0], r.stderr
