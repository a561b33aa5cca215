"""Stopping a run cleanly: SIGINT/SIGTERM become a flag the loop asks between compiled calls; exits that cannot hang."""

from __future__ import annotations

import os
import signal
import sys
import threading

from jaxcifar import distributed
from jaxcifar.run.signal_watch import WakeupWatcher

# SIGHUP: a closed terminal or a dropped SSH session; it killed a run at once, with no line and no save.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class TrainingInterrupted(RuntimeError):
    """SIGINT/SIGTERM/SIGHUP arrived; the state was saved (`saved`: False when nothing had been trained since the
    start or the last save, so there was nothing to save) and the run can be resumed."""

    def __init__(self, signum: int, step: int, saved: bool = True):
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}"
                         + (" after saving" if saved else ", before training anything") + "; run the same command "
                         "again to " + ("resume" if saved or step else "start"))
        self.signum = signum
        self.step = step
        self.saved = saved


class StopFlag:
    """Turns SIGINT/SIGTERM into a flag the loop asks after every compiled call (with several processes, at log
    boundaries, where they agree): the run saves, then stops.

    The signal is acknowledged at once, by a thread (signal_watch.WakeupWatcher), though the main thread sits
    inside a compiled call or a device sync for seconds at a time. A second signal exits at once with one line,
    without waiting for the save: orbax writes a save under a temporary name, so the interrupted one is simply
    absent and the previous one is intact.
    """

    def __init__(self):
        self.signum = None
        # What the first signal's acknowledgement says happens next; the training loop sets a precise one.
        self.describe = lambda: "stopping before the first step (nothing trained yet, so nothing to save)"
        self._previous = {}
        self._watcher = None
        self._lock = threading.Lock()

    def __enter__(self):
        if threading.current_thread() is not threading.main_thread():
            return self  # signals reach the main thread only; nothing to install
        self._watcher = WakeupWatcher(STOP_SIGNALS, self._received, "stop-signals")
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, _ignore_in_main_thread)
        return self

    def _received(self, signum: int) -> None:
        name = signal.Signals(signum).name
        with self._lock:
            first = self.signum is None
            if first:
                self.signum = signum
        if not first:
            print(f"\njaxcifar: second {name}: exiting without waiting for the save in progress; the last complete "
                  "checkpoint is kept, and the same command resumes from it", file=sys.stderr, flush=True)
            hard_exit(128 + signum)
        print(f"\njaxcifar: {name} received: {self.describe()}; press Ctrl-C again to exit at once without saving",
              file=sys.stderr, flush=True)

    @property
    def requested(self) -> bool:
        """Whether this process has been signalled (no communication)."""
        return self.signum is not None

    def __call__(self, boundary: bool = True) -> bool:
        """Whether to stop now. With one process: whether it was signalled, at any call. With several: asked at
        log boundaries only (`boundary`), where they all ask, whether any of them was (all stop together)."""
        if distributed.single_process():
            return self.requested
        if not boundary:
            return False
        agreed = distributed.any_process(self.requested)
        if agreed and self.signum is None:
            self.signum = signal.SIGTERM  # another process's signal: stop and exit as if this one had it
        return agreed

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if self._watcher is not None:
            self._watcher.close()
            self._watcher = None


def _ignore_in_main_thread(signum, frame):
    """Python-level handler of the stop signals: the watcher thread acts on them (through the wakeup fd); this
    handler only keeps SIGINT from raising KeyboardInterrupt and SIGTERM from ending the process."""


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
