"""Timing a zero-argument call the way every figure of the benchmark is timed: the first call (compilation) apart,
then the median of `runs` calls after warm-up."""

from __future__ import annotations

import statistics
import time

PHASES = ("forward", "backward", "forward+backward", "train step")


def timed(fn, runs: int, warmup: int = 1):
    """(compile+first-call seconds, median seconds of `runs` calls)."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times)


def time_passes(forward, forward_train, forward_backward, runs: int) -> tuple[dict, dict]:
    """Median seconds of an eval-mode forward pass, a training forward and backward pass, and the backward alone
    (less a training-mode forward); and the first call's extra seconds of the first two."""
    seconds = {}
    first_forward, seconds["forward"] = timed(forward, runs)
    _, forward_train_s = timed(forward_train, runs)
    first_both, seconds["forward+backward"] = timed(forward_backward, runs)
    seconds["backward"] = max(seconds["forward+backward"] - forward_train_s, 0.0)
    return seconds, {"forward": first_forward - seconds["forward"],
                     "forward+backward": first_both - seconds["forward+backward"]}
