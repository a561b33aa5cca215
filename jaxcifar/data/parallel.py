"""Host-side data work split over the machine's cores, in threads, results in input order.

Threads, not processes: PNG coding (Pillow) and numpy's array maths release the GIL, and threads share the arrays
without copies. Measured (2026-12-05, 2-core Intel Xeon, real CIFAR-10): 60,000 PNG encodes 1.34 s per 6,000 serial,
0.58 s in 2 threads; provider.lua's preprocessing likewise. Each piece of work is independent of how the input is
split, so the output is bit-identical to the serial one whatever the thread count (tests/test_preprocess.py).
"""

from __future__ import annotations

import concurrent.futures
import os
from typing import Callable, Iterable, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def cores() -> int:
    """The cores this process may run on ($JAXCIFAR_THREADS overrides; 1 is the serial code path)."""
    override = os.environ.get("JAXCIFAR_THREADS", "").strip()
    if override.isdigit() and int(override) > 0:
        return int(override)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def spans(n: int, size: int) -> list[slice]:
    """[0, n) in consecutive slices of at most `size`."""
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def map_ordered(fn: Callable[[T], R], items: Iterable[T], workers: int | None = None) -> list[R]:
    """[fn(x) for x in items], run on `workers` threads (default: cores())."""
    items = list(items)
    workers = min(workers or cores(), len(items))
    if workers <= 1:
        return [fn(x) for x in items]
    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="jaxcifar-data") as pool:
        return list(pool.map(fn, items))
