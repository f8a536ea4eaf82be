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
from typing import Any, Callable, Iterable, TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")

TASK_THREADS = 1  # intra-op threads of one task


def pinned_map(fn: Callable[[T], R], items: Iterable[T], device: torch.device | None = None,
               progress: Any = None, size: Callable[[T], int] | None = None, unit: str = "it") -> list[R]:
    """``[fn(x) for x in items]``, each call on one intra-op thread (CPU), up to the caller's thread count at once.

    ``progress``: a label for a progress bar of its own (none when None), or a bar
    (:func:`mak.progress.bar`) to advance, which the caller closes. Each finished call adds
    ``size(x)`` to it (default 1: the bar counts the calls; ``unit`` names what it counts).
    """
    jobs = list(items)
    weight = size if size is not None else (lambda _x: 1)
    own = isinstance(progress, str)
    bar = _bar(progress, sum(weight(x) for x in jobs), unit) if own else progress

    def run(x: T) -> R:
        result = fn(x)
        if bar is not None:
            bar.update(weight(x))  # tqdm's update is thread-safe
        return result

    try:
        if (device is not None and device.type != "cpu") or not jobs:
            return [run(x) for x in jobs]
        before = torch.get_num_threads()

        def pinned(x: T) -> R:
            torch.set_num_threads(TASK_THREADS)  # OpenMP's count is per thread: this worker's only
            return run(x)

        try:
            with ThreadPoolExecutor(max_workers=max(1, min(before, len(jobs)))) as pool:
                return list(pool.map(pinned, jobs))
        finally:
            torch.set_num_threads(before)  # BLAS keeps one process-wide count: give the caller its own back
    finally:
        if own and bar is not None:
            bar.close()


def _bar(label: str, total: int, unit: str):
    if total == 0:
        return None
    from mak.progress import bar

    return bar(total, label, unit=unit)


__all__ = ["TASK_THREADS", "pinned_map"]
