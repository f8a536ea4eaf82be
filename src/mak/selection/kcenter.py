"""Diversity: greedy k-center (farthest-first traversal) under cosine distance.

One running vector holds each point's largest cosine similarity to any center (equivalently
its smallest distance); each step picks the point with the smallest such similarity (ties to
the lowest index), then updates the vector with one matrix-vector product over the features.
Memory O(N + chunk x chunk) beyond the features themselves; the initial centers are compared in
chunks, never as an N x M matrix. Runs on the device of the features (or ``device``).

On a CPU the per-pick product runs over fixed blocks of ``PICK_BLOCK`` rows, the blocks spread
over the intra-op threads (one BLAS thread each): a matrix-vector product is one BLAS call that
some libraries run on a single core, and the fixed blocks make every block's arithmetic the same
for any thread count.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from mak._tensor import l2_normalize, resolve_device, to_tensor
from mak.errors import MakError

CHUNK = 4096  # chunk x chunk float32 similarity block: 64 MiB
PICK_BLOCK = 16384  # rows per block of the per-pick product on a CPU (a multiple of every BLAS row block)


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
    from tqdm.auto import tqdm

    with torch.inference_mode():
        x = l2_normalize(to_tensor(features, dev))
        picks = np.empty(budget, dtype=np.int64)
        start = 0
        if init is not None and int(init.shape[0]) > 0:
            sim = max_similarity(x, init)
        else:
            first = int(np.random.default_rng(seed).integers(n))
            picks[0] = first
            sim = x @ x[first]
            sim[first] = float("inf")
            start = 1
        bar = tqdm(total=budget, initial=start, desc="k-center", unit="pick", disable=not progress, leave=False)
        with _Updater(x, sim) as update:
            for step in range(start, budget):
                j = int(torch.argmin(sim))  # first occurrence: lowest index among ties
                picks[step] = j
                update(j)
                sim[j] = float("inf")
                bar.update(1)
        bar.close()
    return picks


class _Updater:
    """``sim = max(sim, x @ x[j])``: one product on a GPU; fixed row blocks over the threads on a CPU."""

    def __init__(self, x: torch.Tensor, sim: torch.Tensor):
        self.x, self.sim = x, sim
        n = int(x.shape[0])
        self.blocks = [(lo, min(lo + PICK_BLOCK, n)) for lo in range(0, n, PICK_BLOCK)]
        self.threads_before = torch.get_num_threads()
        self.threads = min(self.threads_before, len(self.blocks)) if x.device.type == "cpu" else 1
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

    def block(self, lo: int, hi: int, v: torch.Tensor) -> None:
        with torch.inference_mode():  # thread-local: a worker enters it itself
            torch.maximum(self.sim[lo:hi], self.x[lo:hi] @ v, out=self.sim[lo:hi])

    def update(self, j: int) -> None:
        v = self.x[j]
        if self.x.device.type != "cpu":
            torch.maximum(self.sim, self.x @ v, out=self.sim)
        elif self.pool is None:
            for lo, hi in self.blocks:
                self.block(lo, hi, v)
        else:
            list(self.pool.map(lambda b: self.block(b[0], b[1], v), self.blocks))


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
