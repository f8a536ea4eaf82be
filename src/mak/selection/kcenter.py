"""Diversity: greedy k-center (farthest-first traversal) under cosine distance.

One running vector holds each point's largest cosine similarity to any center (equivalently
its smallest distance); each step picks the point with the smallest such similarity (ties to
the lowest index), then updates the vector with one matrix-vector product over the features.
Memory O(N + chunk x chunk) beyond the features themselves; the initial centers are compared in
chunks, never as an N x M matrix. Runs on the device of the features (or ``device``).

The normalised features are held as the columns of a d x N matrix: the per-pick product
``v @ X`` then streams the matrix once at memory speed (the row-major product ``X @ v`` is a
BLAS matrix-vector kernel that runs at well under half of it on AVX2 CPUs). On a CPU the product
runs over fixed blocks of ``PICK_BLOCK`` columns spread over the intra-op threads (one BLAS thread
each), and each block returns its own smallest similarity with the update, so the next pick needs
no second pass over the vector; the fixed blocks make every block's arithmetic the same for any
thread count.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from mak._tensor import l2_normalize, resolve_device, to_tensor
from mak.errors import MakError

CHUNK = 4096  # chunk x chunk float32 similarity block: 64 MiB
PICK_BLOCK = 16384  # columns per block of the per-pick product on a CPU


def max_similarity(x: torch.Tensor, centers: Any, chunk: int = CHUNK) -> torch.Tensor:
    """Largest cosine similarity of each (normalised) row of ``x`` to any row of ``centers``.

    ``centers`` may be a numpy array/memmap or a tensor; it is normalised and streamed in chunks.
    """
    best = torch.full((x.shape[0],), -float("inf"), dtype=torch.float32, device=x.device)
    m = int(centers.shape[0])
    for clo in range(0, m, chunk):
        c = l2_normalize(to_tensor(centers[clo : clo + chunk], x.device))
        for xlo in range(0, x.shape[0], chunk):
            sim = (x[xlo : xlo + chunk] @ c.T).max(dim=1).values
            torch.maximum(best[xlo : xlo + chunk], sim, out=best[xlo : xlo + chunk])
    return best


def kcenter_greedy(features: Any, budget: int, init: Any = None, seed: int = 0,
                   device: str | torch.device | None = None, progress: bool = False) -> np.ndarray:
    """Greedy k-center picks: int64 indices into ``features``, in pick order.

    Cosine distance on L2-normalised features. Each step picks the point farthest from its
    nearest center (``init`` rows and the points already picked); ties go to the lowest index.
    Without ``init`` the first pick is drawn at random from ``seed`` and counts toward the budget.
    """
    dev = resolve_device(device, features)
    n = int(features.shape[0])
    if budget <= 0:
        raise MakError(f"budget must be > 0, got {budget}")
    if budget > n:
        raise MakError(f"budget ({budget}) is larger than the number of candidates ({n})")
    if init is not None and int(init.shape[0]) > 0 and init.shape[1] != features.shape[1]:
        raise MakError(f"init dimension {init.shape[1]} differs from feature dimension {features.shape[1]}")
    from mak.progress import bar as progress_bar

    with torch.inference_mode():
        xt = columns(features, dev)
        picks = np.empty(budget, dtype=np.int64)
        start = 0
        if init is not None and int(init.shape[0]) > 0:
            sim = max_similarity(xt.T, init)
        else:
            first = int(np.random.default_rng(seed).integers(n))
            picks[0] = first
            sim = xt[:, first] @ xt
            sim[first] = float("inf")
            start = 1
        bar = progress_bar(budget, "k-center", unit="pick", enabled=progress, initial=start)
        with _Updater(xt, sim) as update:
            j = int(torch.argmin(sim))  # first occurrence: lowest index among ties
            for step in range(start, budget):
                picks[step] = j
                j = update(j)
                bar.update(1)
        bar.close()
    return picks


def columns(features: Any, device: torch.device, chunk: int = CHUNK) -> torch.Tensor:
    """The L2-normalised rows of ``features`` as the columns of a d x N float32 tensor, ``chunk`` rows at a time."""
    n, d = int(features.shape[0]), int(features.shape[1])
    xt = torch.empty((d, n), dtype=torch.float32, device=device)
    for lo in range(0, n, chunk):
        xt[:, lo : lo + chunk] = l2_normalize(to_tensor(features[lo : lo + chunk], device)).T
    return xt


class _Updater:
    """``sim = max(sim, v @ X)`` with the pick pinned to +inf; returns the next pick (argmin, lowest index).

    One product on a GPU; fixed column blocks over the threads on a CPU, each block reporting its
    own minimum.
    """

    def __init__(self, xt: torch.Tensor, sim: torch.Tensor):
        self.xt, self.sim = xt, sim
        n = int(xt.shape[1])
        self.blocks = [(lo, min(lo + PICK_BLOCK, n)) for lo in range(0, n, PICK_BLOCK)]
        self.threads_before = torch.get_num_threads()
        self.threads = min(self.threads_before, len(self.blocks)) if xt.device.type == "cpu" else 1
        self.pool = None

    def __enter__(self):
        if self.threads > 1:
            from concurrent.futures import ThreadPoolExecutor

            self.pool = ThreadPoolExecutor(self.threads, initializer=torch.set_num_threads, initargs=(1,))
        return self.update

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.shutdown()
            torch.set_num_threads(self.threads_before)  # BLAS keeps one process-wide count: the caller's back

    def block(self, lo: int, hi: int, v: torch.Tensor, j: int) -> tuple[float, int]:
        """Update columns lo:hi; their smallest similarity and its (lowest) index."""
        with torch.inference_mode():  # thread-local: a worker enters it itself
            s = self.sim[lo:hi]
            torch.maximum(s, v @ self.xt[:, lo:hi], out=s)
            if lo <= j < hi:
                s[j - lo] = float("inf")
            k = int(torch.argmin(s))
            return float(s[k]), lo + k

    def update(self, j: int) -> int:
        v = self.xt[:, j].clone()
        if self.xt.device.type != "cpu":
            torch.maximum(self.sim, v @ self.xt, out=self.sim)
            self.sim[j] = float("inf")
            return int(torch.argmin(self.sim))
        if self.pool is None:
            mins = [self.block(lo, hi, v, j) for lo, hi in self.blocks]
        else:
            mins = list(self.pool.map(lambda b: self.block(b[0], b[1], v, j), self.blocks))
        return min(mins)[1]  # smallest similarity; among equal ones the lowest index


def covering_radius(features: Any, centers_idx: np.ndarray, init: Any = None,
                    device: str | torch.device | None = None) -> float:
    """Largest cosine distance from any row of ``features`` to its nearest chosen center (or init row)."""
    dev = resolve_device(device, features)
    with torch.inference_mode():
        x = l2_normalize(to_tensor(features, dev))
        sim = max_similarity(x, x[torch.as_tensor(np.asarray(centers_idx), device=dev)])
        if init is not None and int(init.shape[0]) > 0:
            torch.maximum(sim, max_similarity(x, init), out=sim)
        return float((1.0 - sim).max().clamp_min(0))
