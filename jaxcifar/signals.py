"""Stopping a run cleanly: SIGINT/SIGTERM become a flag the loop asks at log boundaries; exits that cannot hang."""

from __future__ import annotations

import os
import signal
import sys
import threading

from jaxcifar import distributed


class TrainingInterrupted(RuntimeError):
    """SIGINT/SIGTERM arrived; the state was saved and the run can be resumed."""

    def __init__(self, signum: int, step: int):
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step} after saving; "
                         "run the same command again to resume")
        self.signum = signum


class StopFlag:
    """Turns SIGINT/SIGTERM into a flag the loop asks at log boundaries and epoch ends: the run saves, then stops.

    A second signal exits at once with one line, without waiting for that save: orbax writes a save
    under a temporary name, so the interrupted one is simply absent and the previous one is intact.
    """

    def __init__(self):
        self.signum = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:
            print(f"\njaxcifar: second {signal.Signals(signum).name}: exiting without waiting for the save in "
                  "progress; the last complete checkpoint is kept, and the same command resumes from it",
                  file=sys.stderr, flush=True)
            hard_exit(128 + signum)
        self.signum = signum

    def __call__(self) -> bool:
        """Whether to stop; with several processes, whether any of them was signalled (all stop together)."""
        agreed = distributed.any_process(self.signum is not None)
        if agreed and self.signum is None:
            self.signum = signal.SIGTERM  # another process's signal: stop and exit as if this one had it
        return agreed

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def exit_now(code: int) -> None:
    """sys.exit, unless a failed save left orbax threads waiting for signals that never come: a normal exit joins
    them and hangs (measured: alive after 60 s), so the process ends without joining them."""
    stuck = [t for t in threading.enumerate() if t.is_alive() and not t.daemon and t is not threading.main_thread()]
    if stuck:
        hard_exit(code)
    sys.exit(code)


def hard_exit(code: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
