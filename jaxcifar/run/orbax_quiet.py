"""Orbax's and TensorStore's logging brought down to what a user needs: each failure reported once, by the
Checkpointer, instead of a traceback from every thread it touched. Imported by checkpoint.py, whose saves and
restores these are; every other report still prints.
"""

from __future__ import annotations

import logging
import os
import sys

# Orbax warns on every read-only manager that it is read-only, which is what a reading tool asked for.
logging.getLogger("absl").addFilter(lambda record: "Given directory is read only" not in record.getMessage())
# Orbax logs a failed background save with a traceback from each thread it touched (measured: 4 for one
# unwritable folder, 7 on a full disk); Checkpointer.check raises it once, as CheckpointSaveFailed, instead.
logging.getLogger("absl").addFilter(
    lambda record: not (record.levelno >= logging.ERROR and f"{os.sep}orbax{os.sep}" in record.pathname))
# A failed save also leaves orbax's asyncio futures holding the same error, which asyncio logs with a traceback when
# they are collected ("Future exception was never retrieved": reported in 1 full-disk run of 6, after the one-line
# error). Checkpointer reports that failure itself; only orbax runs asyncio here.
logging.getLogger("asyncio").addFilter(lambda record: "exception was never retrieved" not in record.getMessage())


_watched_dirs: list[str] = []


def silence_echoes(directory: str) -> None:
    """Drops the echoes of a failed restore or save in `directory`, which is reported once already.

    When one array fails to read or write, orbax closes its event loop while TensorStore's other
    operations are still running; each then reports to the closed loop from its own thread
    (sys.unraisablehook: measured 61 read errors and 45 "Event loop is closed" tracebacks, ~570 lines,
    for one damaged VGG save; ~1,300 lines for one save on a full disk) or to asyncio's logger.
    Installed when a Checkpointer opens its workdir, before any failure, because the echoes can come
    before the error they echo is raised. Only those are dropped; every other report still prints.
    """
    if not _watched_dirs:
        previous = sys.unraisablehook

        def hook(unraisable):
            if not _is_echo(unraisable.exc_value):
                previous(unraisable)

        sys.unraisablehook = hook
        logging.getLogger("asyncio").addFilter(
            lambda record: not (record.exc_info and _is_echo(record.exc_info[1])
                                or "exception was never retrieved" in record.getMessage()
                                and any(d in record.getMessage() for d in _watched_dirs)))
    if directory not in _watched_dirs:
        _watched_dirs.append(directory)


def _is_echo(exc) -> bool:
    text = str(exc)
    return ((isinstance(exc, RuntimeError) and text == "Event loop is closed")
            or "Encountered error while reading array" in text or any(d in text for d in _watched_dirs))
