"""Signals acted on at once, by a thread: Python runs its own handlers only between bytecodes of the main thread,
which sits inside one compiled call or device sync for seconds at a time (a 4-step call of the full-width VGG on a
2-core CPU: ~6-10 s; the fidelity run's JAX side, width 1/2 on one thread: ~25 s from Ctrl-C to its exit before
this). Used by training's StopFlag and by every other command's Ctrl-C (cli.interrupt_exits_quietly); light to
import (no jax), as a command installs it before its heavy imports."""

from __future__ import annotations

import os
import signal
import threading


class WakeupWatcher:
    """Calls `on_signal(signum)` from a daemon thread for each of `signums` that reaches the process while installed.

    Through `signal.set_wakeup_fd`, which is written for signals that have a Python-level handler: the caller installs
    one. Main thread only (ValueError elsewhere). `close` puts the previous wakeup fd back, so watchers nest.
    """

    def __init__(self, signums, on_signal, name: str):
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        try:
            self._previous = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        except ValueError:
            os.close(read_fd)
            os.close(write_fd)
            raise
        self._fds = (read_fd, write_fd)
        threading.Thread(target=self._watch, args=(read_fd, frozenset(signums), on_signal), name=name,
                         daemon=True).start()

    @staticmethod
    def _watch(read_fd: int, signums: frozenset, on_signal) -> None:
        while True:
            try:
                received = os.read(read_fd, 64)
            except OSError:
                return
            if not received:  # close() closed the pipe
                return
            for signum in received:
                if signum in signums:
                    on_signal(signum)

    def close(self) -> None:
        """Once, by whoever installed it."""
        signal.set_wakeup_fd(self._previous)
        for fd in self._fds:
            os.close(fd)  # the watcher's read returns: it ends
