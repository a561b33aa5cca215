"""workdir.py: one training run per workdir (the lock), and the workdir's creation."""

import os
import subprocess
import sys

import pytest

from jaxcifar import errors
from jaxcifar.workdir import WorkdirLock
from conftest import REPO


def test_a_held_lock_refuses_a_second_holder_naming_the_first(tmp_path):
    with WorkdirLock(tmp_path) as first:
        assert first.stale is None
        with pytest.raises(errors.WorkdirError, match=rf"in use by another training run \(pid {os.getpid()} on host"):
            WorkdirLock(tmp_path).acquire()
    second = WorkdirLock(tmp_path).acquire()  # released cleanly: free, and nothing stale about it
    assert second.stale is None
    second.release()


HOLD_LOCK = ("import sys, time\nfrom jaxcifar.workdir import WorkdirLock\nWorkdirLock(sys.argv[1]).acquire()\n"
             "print('held', flush=True)\ntime.sleep(600)\n")


def test_the_lock_of_a_killed_run_is_taken_over_and_named(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(errors.WorkdirError, match=f"pid {holder.pid} "):
            WorkdirLock(tmp_path).acquire()
    finally:
        holder.kill()  # SIGKILL: no chance to release
        holder.wait()
    lock = WorkdirLock(tmp_path).acquire()
    try:
        assert lock.stale is not None and f"pid {holder.pid} " in lock.stale
    finally:
        lock.release()
