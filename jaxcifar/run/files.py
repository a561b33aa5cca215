"""Files written whole or not at all, the one-line error of a write that fails, and JSON read with a message that
names the file: the file I/O that the run's logs, the report, the results and the fidelity tools share."""

from __future__ import annotations

import json
import os
from pathlib import Path

from jaxcifar.errors import JaxcifarError, WorkdirError, os_error_cause, os_error_fix

RESUME_FROM_CHECKPOINT = "run the same command to resume from the last checkpoint"


def write_failed(e: OSError, path, then: str = RESUME_FROM_CHECKPOINT) -> WorkdirError:
    """The error of a failed write: its cause, what to do about it, then `then` (which depends on what the file is:
    a training workdir's resumes from its checkpoint; a results page is rebuilt by the same command)."""
    return WorkdirError(f"{os_error_cause(e) or e} while writing {path}; {os_error_fix(e)}, then {then}")


def atomic_write(path: Path, payload: bytes, then: str = RESUME_FROM_CHECKPOINT) -> None:
    """`payload` in `path`, whole or not at all: a kill mid-write leaves the old file, a failed write no temporary
    file and the error of write_failed(..., then)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(payload)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise write_failed(e, path, then) from None


def read_json(path, give: str):
    """The JSON in `path`; a file that is missing, unreadable or not JSON raises a JaxcifarError naming it, followed
    by `give` (what the user should pass instead)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        why = (e.strerror or str(e)) if isinstance(e, OSError) else str(e)
        raise JaxcifarError(f"{path} cannot be read as JSON ({why}); {give}") from None
