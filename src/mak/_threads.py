"""Thread-count-independent CPU work: run tasks on one intra-op thread each, several at once.

BLAS and oneDNN split a reduction (for example a gradient product over a 1,024-row batch) across
the intra-op threads, so a float32 result depends on ``torch.set_num_threads`` /
``OMP_NUM_THREADS``. :func:`pinned_map` runs every task on a worker thread whose own intra-op
thread count is one, so each task's arithmetic happens in one fixed order whatever the caller's
thread count, and uses the cores by running up to ``torch.get_num_threads()`` tasks at once.
Results come back in input order. On a GPU, tasks run in order on the calling thread.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")

TASK_THREADS = 1  # intra-op threads of one task


def pinned_map(fn: Callable[[T], R], items: Iterable[T], device: torch.device | None = None) -> list[R]:
    """``[fn(x) for x in items]``, each call on one intra-op thread (CPU), up to the caller's thread count at once."""
    jobs = list(items)
    if (device is not None and device.type != "cpu") or not jobs:
        return [fn(x) for x in jobs]
    before = torch.get_num_threads()

    def pinned(x: T) -> R:
        torch.set_num_threads(TASK_THREADS)  # OpenMP's count is per thread: this worker's only
        return fn(x)

    try:
        with ThreadPoolExecutor(max_workers=max(1, min(before, len(jobs)))) as pool:
            return list(pool.map(pinned, jobs))
    finally:
        torch.set_num_threads(before)  # BLAS keeps one process-wide count: give the caller its own back


__all__ = ["TASK_THREADS", "pinned_map"]
