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


def pinned_map(fn: Callable[[T], R], items: Iterable[T], device: torch.device | None = None,
               progress: str | None = None) -> list[R]:
    """``[fn(x) for x in items]``, each call on one intra-op thread (CPU), up to the caller's thread count at once.

    ``progress``: a label for a progress bar over the calls (none when None).
    """
    jobs = list(items)
    bar = _bar(progress, len(jobs))
    if (device is not None and device.type != "cpu") or not jobs:
        return [_done(bar, fn(x)) for x in jobs]
    before = torch.get_num_threads()

    def pinned(x: T) -> R:
        torch.set_num_threads(TASK_THREADS)  # OpenMP's count is per thread: this worker's only
        return _done(bar, fn(x))

    try:
        with ThreadPoolExecutor(max_workers=max(1, min(before, len(jobs)))) as pool:
            return list(pool.map(pinned, jobs))
    finally:
        torch.set_num_threads(before)  # BLAS keeps one process-wide count: give the caller its own back
        if bar is not None:
            bar.close()


def _bar(label: str | None, total: int):
    if label is None or total == 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=label, leave=False)


def _done(bar, result: R) -> R:
    if bar is not None:
        bar.update(1)  # tqdm's update is thread-safe
    return result


__all__ = ["TASK_THREADS", "pinned_map"]
