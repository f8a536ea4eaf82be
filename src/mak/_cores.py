"""Sharing the cores: OpenMP's wait policy, chosen before torch loads its OpenMP runtime.

torch's CPU kernels run in OpenMP parallel regions; between regions, libgomp's threads spin for
a while before they sleep. Alone on a machine that is fastest. Beside other busy processes it is
not: a spinning thread burns the time slice the thread it waits for needs. Measured on 2 cores of
an AMD EPYC (``mak pretrain``, 8 epochs of the benchmark's 2,480 seed images; docs/performance.md):
alone 14.0 s spinning, 16.6 s passive; beside a busy process 26.1 s against 19.1 s; two pre-trainings
at once 28 s each against 17.2 s. So mak sleeps at once (``OMP_WAIT_POLICY=PASSIVE``) when other
processes are running as it starts, and keeps libgomp's default otherwise. A policy the user set
is never changed. This module imports no torch: :func:`choose_wait_policy` must run before it.
"""
from __future__ import annotations

import os
import statistics
import time
from typing import MutableMapping

PASSIVE = "PASSIVE"


def running_others(samples: int = 5, interval: float = 0.004) -> float:
    """Other runnable tasks right now: the median of ``samples`` reads of /proc/loadavg's running
    count, less this process (0 where /proc is missing)."""
    reads = []
    for i in range(samples):
        try:
            with open("/proc/loadavg", encoding="ascii") as fh:
                reads.append(int(fh.read().split()[3].split("/")[0]) - 1)
        except (OSError, ValueError, IndexError):
            return 0.0
        if i + 1 < samples:
            time.sleep(interval)
    return max(0.0, float(statistics.median(reads)))


def is_shared(others: float, cores: int) -> bool:
    """Whether ``others`` runnable tasks beside us make the ``cores`` shared: at least half a core's
    worth on a small machine, a quarter of the cores on a large one."""
    return others >= max(0.5, 0.25 * cores)


def choose_wait_policy(environ: MutableMapping[str, str] | None = None, others: float | None = None,
                       cores: int | None = None) -> str | None:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` in ``environ`` (default ``os.environ``) when the cores are
    shared and the user set no policy; returns the policy set, or None."""
    env = os.environ if environ is None else environ
    if "OMP_WAIT_POLICY" in env:
        return None
    cores = cores if cores is not None else len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
        else (os.cpu_count() or 1)
    if not is_shared(running_others() if others is None else others, cores):
        return None
    env["OMP_WAIT_POLICY"] = PASSIVE
    return PASSIVE


__all__ = ["PASSIVE", "choose_wait_policy", "is_shared", "running_others"]
