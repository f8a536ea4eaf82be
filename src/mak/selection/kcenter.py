"""Diversity: greedy k-center (farthest-first traversal) under cosine distance.

One running vector holds each point's largest cosine similarity to any center (equivalently
its smallest distance); each step picks the point with the smallest such similarity (ties to
the lowest index), then updates the vector with one matrix-vector product over the features.
Memory O(N + chunk x chunk) beyond the features themselves; the initial centers are compared in
chunks, never as an N x M matrix. Runs on the device of the features (or ``device``).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from mak._tensor import l2_normalize, resolve_device, to_tensor
from mak.errors import MakError

CHUNK = 4096  # chunk x chunk float32 similarity block: 64 MiB


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
        for step in range(start, budget):
            j = int(torch.argmin(sim))  # first occurrence: lowest index among ties
            picks[step] = j
            torch.maximum(sim, x @ x[j], out=sim)
            sim[j] = float("inf")
            bar.update(1)
        bar.close()
    return picks


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
