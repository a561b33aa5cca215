"""A workdir: one training run per workdir (a lock held for the run's lifetime), and the check that its
checkpoint folders can take a save before the first epoch.

`<workdir>/train.lock` carries the holder (pid, host, start time) and an OS lock (flock) on the open
file. The OS drops the flock when its process dies however it dies (kill -9 included), so a lock
left by a killed run never blocks the next start: the file still names the dead holder, which is
how the next run can tell it took over a stale lock. A clean exit empties the file before unlocking.
flock spans hosts only on file systems that support it; multi-host runs take the lock on process 0.
Reading tools (evaluate, predict) neither take it nor write into the workdir.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

from jaxcifar.errors import WorkdirError, failure_line, short_path
from jaxcifar.run import files

LOCK_NAME = "train.lock"


def _not_empty(path: str | os.PathLike) -> Path:
    if not str(path).strip():  # Path("") is ".": an unset $VAR would train into the current folder
        raise WorkdirError("--workdir is empty (an unset variable?); give the run's folder, e.g. --workdir runs/vgg")
    try:
        str(path).encode("utf-8")  # logs, metrics and the report name the workdir in UTF-8
    except UnicodeEncodeError:
        raise WorkdirError(f"--workdir {ascii(str(path))} holds bytes that are not UTF-8; rename the folder or give "
                           "another") from None
    return Path(path)


def make_workdir(path: str | os.PathLike) -> Path:
    """Creates the workdir if needed and checks it is a writable folder."""
    path = _not_empty(path)
    try:
        if path.exists() and not path.is_dir():
            raise WorkdirError(f"--workdir {path} is a file, not a folder; give a folder path")
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # also a name too long for the file system, which exists() does not swallow
        raise WorkdirError(f"cannot create --workdir {short_path(path)}: {e.strerror or e}; give a folder you can write "
                           "to") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise WorkdirError(f"--workdir {path} is not writable; give a folder you can write to")
    check_entries(path)
    return path


def complete_steps(directory: Path) -> list[int]:
    """The steps of the saves orbax finished (renamed from their temporary names) in `directory`; read from the folder
    names alone, nothing opened."""
    try:
        return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and p.is_dir())
    except OSError:
        return []


def holds_nothing(path: str | os.PathLike) -> bool:
    """Whether `path` is missing or an empty folder (a start there that fails leaves it so: clear_if_untrained)."""
    try:
        path = Path(path)
        return not path.exists() or (path.is_dir() and not any(path.iterdir()))
    except (OSError, ValueError):
        return False


def clear_if_untrained(path: Path, remove: bool = False) -> None:
    """Empties a workdir that held nothing before a start that trained nothing (no complete save, no epoch logged):
    what that start made (the lock, log.txt, empty checkpoint folders) goes, and the folder too if that start made
    it (`remove`); a workdir with anything trained in it is left as it is."""
    saved = complete_steps(path / "checkpoints") or complete_steps(path / "best")
    logged = (path / "metrics.jsonl").is_file() and (path / "metrics.jsonl").read_text().strip()
    if saved or logged:
        return
    for entry in path.iterdir():
        shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
    if remove:
        try:
            path.rmdir()
        except OSError:  # something appeared meanwhile: kept
            pass


# What a run keeps in its workdir, and of what kind: something else of that name stops it before it starts.
RUN_FILES = ("log.txt", "metrics.jsonl", "metrics.csv", "metrics.discarded.jsonl", "report.html", "accuracy.png",
             "train.lock")
RUN_FOLDERS = ("checkpoints", "best", "tensorboard", "damaged-checkpoints")


def check_entries(path: Path) -> None:
    """Raises WorkdirError naming the first entry of the workdir that is not of the kind the run keeps there."""
    import stat

    for name in RUN_FILES + RUN_FOLDERS:
        try:
            mode = (path / name).stat().st_mode  # through a link: a checkpoints/ link to another disk is fine
        except FileNotFoundError:
            continue
        except OSError as e:
            raise WorkdirError(f"cannot read {path / name}: {e.strerror or e}; fix its permissions") from None
        want_folder = name in RUN_FOLDERS
        if (stat.S_ISDIR(mode) if want_folder else stat.S_ISREG(mode)):
            continue
        kind = ("a folder" if stat.S_ISDIR(mode) else "a named pipe" if stat.S_ISFIFO(mode) else
                "a socket" if stat.S_ISSOCK(mode) else
                "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a file")
        raise WorkdirError(f"{path / name} is {kind}, where the run keeps {'a folder' if want_folder else 'a file'}; "
                           "move it away, or train in another --workdir")


def existing_workdir(path: str | os.PathLike) -> Path:
    """The workdir of a run to read (evaluate, predict): it must be an existing folder."""
    path = _not_empty(path)
    if not path.exists():
        raise WorkdirError(f"workdir {path} does not exist; give the --workdir a training run wrote")
    if not path.is_dir():
        raise WorkdirError(f"--workdir {path} is a file, not a training run's folder; give the --workdir a training "
                           "run wrote")
    for folder in ("checkpoints", "best"):
        if (path / folder).is_dir() and not os.access(path / folder, os.R_OK | os.X_OK):
            raise WorkdirError(f"{path / folder} cannot be read (permission denied); fix its permissions, or run as "
                               "the user who trained")
    return path


def _describe(holder: dict) -> str:
    started = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, started {when}"


def _read_holder(fd: int) -> dict | None:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 1 << 16).decode(errors="replace").strip()
    if not text:
        return None
    try:
        holder = json.loads(text)
        return holder if isinstance(holder, dict) else {}
    except ValueError:
        return {}


class WorkdirLock:
    """Held while a training run writes into `workdir`; a second run is refused with the holder's name.

    After `acquire`, `stale` describes the holder of a lock that was taken over (None if there was none).
    """

    def __init__(self, workdir: str | os.PathLike):
        self.path = Path(workdir) / LOCK_NAME
        self.stale: str | None = None
        self._fd: int | None = None

    def acquire(self) -> "WorkdirLock":
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise WorkdirError(f"cannot create the lock file {self.path}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd) or {}
            os.close(fd)
            raise WorkdirError(
                f"{self.path.parent} is in use by another training run ({_describe(holder)}); wait for it to "
                f"finish or stop it, or train in another --workdir (evaluate and predict may run meanwhile)") from None
        except OSError as e:
            os.close(fd)
            raise WorkdirError(f"cannot lock {self.path}: {e.strerror or e}; this file system may not support "
                               "locks: use a --workdir on a local disk") from None
        stale = _read_holder(fd)
        self.stale = None if stale is None else _describe(stale)
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
            os.fsync(fd)
        except OSError as e:  # a full disk: with 0 bytes free even these few bytes fail
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            raise files.write_failed(e, self.path, "run the same command again (nothing was trained or changed)") \
                from None
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)  # empty: released cleanly
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


# The deepest path a save creates below checkpoints/ or best/, each part at its longest: orbax's temporary step
# folder (<step>.orbax-checkpoint-tmp-<timestamp>), an item, its OCDBT data folder and a data file (measured: a
# finished save's deepest file is <step>/state/ocdbt.process_0/d/<32 hex digits>). The writability probe creates
# it, so that a workdir path too long for the file system stops the run before its first step, not at its first save.
SAVE_PATH_SHAPE = ("99999999.orbax-checkpoint-tmp-99999999999999999999", "state.orbax-checkpoint-tmp-9999999999",
                   "ocdbt.process_9999", "d", "f" * 32)


def check_writable_folder(folder: Path) -> None:
    """Raises WorkdirError unless `folder` is (or can be made) a folder this process can create saves in."""
    if folder.exists() and not folder.is_dir():
        raise WorkdirError(f"{folder} is a file, not a folder, so no checkpoint can be saved there; move it away, "
                           "or train in another --workdir")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = Path(tempfile.mkdtemp(prefix=".write-test-", dir=folder))
        try:
            deepest = probe.joinpath(*SAVE_PATH_SHAPE)
            deepest.parent.mkdir(parents=True)
            deepest.touch()
        finally:
            shutil.rmtree(probe, ignore_errors=True)
    except OSError as e:
        raise WorkdirError(f"cannot save checkpoints in {short_path(folder)}: {failure_line(e)}; make it "
                           "writable or give a shorter --workdir path, or train in another --workdir") from None
