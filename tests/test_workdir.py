"""workdir.py: one training run per workdir (the lock), and the workdir's creation."""

import os
import subprocess
import sys

import pytest

from jaxcifar import errors
from jaxcifar.run.workdir import WorkdirLock
from conftest import REPO


def test_a_held_lock_refuses_a_second_holder_naming_the_first(tmp_path):
    with WorkdirLock(tmp_path) as first:
        assert first.stale is None
        with pytest.raises(errors.WorkdirError, match=rf"in use by another training run \(pid {os.getpid()} on host"):
            WorkdirLock(tmp_path).acquire()
    second = WorkdirLock(tmp_path).acquire()  # released cleanly: free, and nothing stale about it
    assert second.stale is None
    second.release()


HOLD_LOCK = ("import sys, time\nfrom jaxcifar.run.workdir import WorkdirLock\nWorkdirLock(sys.argv[1]).acquire()\n"
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


@pytest.mark.parametrize("entry,make,kind,wanted", [
    ("metrics.jsonl", "folder", "a folder", "a file"), ("log.txt", "folder", "a folder", "a file"),
    ("tensorboard", "file", "a file", "a folder"), ("train.lock", "fifo", "a named pipe", "a file")])
def test_a_workdir_entry_of_the_wrong_kind_stops_the_run_before_it_starts(tmp_path, entry, make, kind, wanted):
    from jaxcifar.run import workdir as workdir_lib

    target = tmp_path / entry
    {"folder": target.mkdir, "file": target.touch, "fifo": lambda: os.mkfifo(target)}[make]()
    with pytest.raises(errors.WorkdirError, match=f"{entry} is {kind}, where the run keeps {wanted}; move it away"):
        workdir_lib.make_workdir(tmp_path)
    (tmp_path / "elsewhere").mkdir()
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "checkpoints").symlink_to(tmp_path / "elsewhere")  # a link to a folder on another disk is fine
    assert workdir_lib.make_workdir(linked) == linked


@pytest.mark.parametrize("code,advice", [("EMFILE", "raise the limit on open files (ulimit -n)"),
                                         ("ENOSPC", "free space"), ("EROFS", "make the folder writable")])
def test_a_write_failure_is_advised_by_its_cause(tmp_path, code, advice):
    import errno

    from jaxcifar.run import files
    error = files.write_failed(OSError(getattr(errno, code), os.strerror(getattr(errno, code))),
                                        tmp_path / "metrics.jsonl")
    assert f"while writing {tmp_path / 'metrics.jsonl'}; {advice}" in str(error)
    assert code != "EMFILE" or "free space" not in str(error)


def test_a_full_disk_when_the_lock_is_taken_is_one_line_and_leaves_it_free(tmp_path, monkeypatch):
    # 0 bytes free: the lock's few bytes fail to write (os.pwrite: ENOSPC); that was "unexpected OSError", exit 1.
    import errno

    real_pwrite = os.pwrite

    def disk_full(fd, data, offset):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", disk_full)
    with pytest.raises(errors.WorkdirError, match="no space left on device while writing .*train.lock; free space"):
        WorkdirLock(tmp_path).acquire()
    monkeypatch.setattr(os, "pwrite", real_pwrite)
    with WorkdirLock(tmp_path):  # the refused start kept no lock
        pass
