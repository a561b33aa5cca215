"""The project's error types: problems a user can fix, each message naming the problem and the fix.

The command-line tools turn exactly these into a one-line `error: ...` and exit code 2; anything
else (a bug here, or in jax/flax/orbax) keeps its traceback.
"""

import errno
import re


def os_error_cause(e: BaseException) -> str | None:
    """What stopped a file operation, in words, from `e` or the OSError it wraps (orbax and TensorStore wrap them);
    None when no OSError with an errno is in the chain."""
    seen = e
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno is not None:
            return "no space left on device" if seen.errno == errno.ENOSPC else (seen.strerror or str(seen)).lower()
        seen = seen.__cause__ or seen.__context__
    return None


OUT_OF_MEMORY = ("out of memory: the process could not get the memory it asked for; free memory, raise the limit "
                 "(ulimit -v), or ask for less (--config.batch_size, --config.width, fewer --config.seeds)")


def disk_failure_cause(e: BaseException) -> str | None:
    """`os_error_cause`, or the cause where a library reported it only in words: a full disk (TensorStore: a
    RESOURCE_EXHAUSTED ValueError; array_record: a RuntimeError), a file it may not read."""
    cause = os_error_cause(e)
    if cause is not None:
        return cause
    seen = e
    while seen is not None:  # orbax wraps TensorStore's error in a bare Exception that names neither
        text = str(seen)
        # numpy reports a write the disk cut short as "614400 requested and 16352 written", without an errno.
        if "No space left" in text or "RESOURCE_EXHAUSTED" in text or re.search(r"\d+ requested and \d+ written", text):
            return "no space left on device"
        if "PERMISSION_DENIED" in text or "Permission denied" in text:
            return "permission denied"
        seen = seen.__cause__ or seen.__context__
    return None


def failure_line(e: BaseException) -> str:
    """What failed, as one line: the cause in words where the chain holds one, else the exception's first line."""
    text = f"{type(e).__name__}: {e}".strip().splitlines()
    return disk_failure_cause(e) or (text[0][:300] if text else type(e).__name__)


def os_error_fix(e: BaseException) -> str:
    """What to do about the OSError in `e`'s chain, by its errno: the advice a write failure ends with."""
    seen = e
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno is not None:
            if seen.errno in (errno.EMFILE, errno.ENFILE):
                return "raise the limit on open files (ulimit -n) or close other programs"
            if seen.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                return "make the folder writable"
            if seen.errno in (errno.ENOSPC, errno.EDQUOT):
                return "free space"
            break
        seen = seen.__cause__ or seen.__context__
    return "free space or make the folder writable"


def first_line(e: BaseException) -> str:
    """An exception's message as one line (tarfile, array_record and orbax write several)."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def short_path(path, keep: int = 120) -> str:
    """A path as a one-line message can show it: a 4,000-character one by its two ends and its length."""
    text = str(path)
    return text if len(text) <= keep else f"{text[:keep // 2]}...{text[-keep // 2:]} ({len(text):,} characters)"


class JaxcifarError(Exception):
    """A problem with the user's input, files or environment; the message says how to fix it."""


class ConfigError(JaxcifarError, ValueError):
    """A config value or command-line argument that cannot work."""


class DataError(JaxcifarError):
    """A problem with the dataset (archive, MD5 list, prepared files)."""


class OtherDataError(DataError):
    """A saved run asked to be scored on another dataset than the one it trained on."""


class CheckpointError(JaxcifarError):
    """A checkpoint that cannot be used for what was asked (absent, of another run, of another version)."""


class CheckpointDamaged(CheckpointError):
    """A checkpoint whose files are unreadable or whose arrays fail their recorded checksums.

    The only kind of checkpoint a resuming run sets aside and falls back from. `step`: the save's, where known.
    """

    def __init__(self, message: str, step: int | None = None):
        super().__init__(message)
        self.step = step


class WorkdirError(JaxcifarError):
    """A workdir that cannot be created or written, or that another training run holds."""


class CheckpointSaveFailed(WorkdirError):
    """A save could not be written (a full disk, a folder made unwritable); earlier saves are intact."""


class TrainingDiverged(JaxcifarError):
    """The loss became NaN or infinite."""
