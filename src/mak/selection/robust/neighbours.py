"""Cosine k-nearest neighbours in chunks, and the seed share: a label-free density ratio from them.

:func:`knn_chunks` streams the k nearest rows of a bank for each query, O(chunk x (chunk + k))
memory. :func:`seed_share` is the fraction of seed images among a query's k nearest in seed +
pool reference: high where the seed is dense, low in its sparse tail, ~0 where the seed has no
support. :func:`share_gate` calibrates its threshold on leave-one-out seed shares.
"""
from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import torch

from mak._neighbours import CHUNK, cosine_topk
from mak.errors import MakError
from mak.selection.robust.gate import check_quantile


def knn_chunks(queries: Any, seed_features: Any, k: int, exclude_self: bool = False,
               device: str | torch.device | None = None, chunk: int = CHUNK, self_index: np.ndarray | None = None
               ) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
    """The ``k`` nearest seed images of each query row, one query chunk at a time.

    Yields ``(lo, hi, sim, idx)``: cosine similarities (hi-lo, k), largest first, and the seed
    indices they belong to: :func:`mak._neighbours.cosine_topk` after checking ``k`` and the
    dimensions against the seed. Memory is O(chunk x (chunk + k)) beyond what the caller keeps.
    ``exclude_self``: the queries are the seed itself and row i never matches seed image i
    (leave-one-out; an exact duplicate elsewhere in the seed still counts). ``self_index``
    generalises it: query row i never matches seed row ``self_index[i]`` (-1: nothing excluded).
    """
    m = int(seed_features.shape[0])
    n = int(queries.shape[0])
    if exclude_self:
        self_index = np.arange(n, dtype=np.int64)
    excl = None if self_index is None else np.asarray(self_index, dtype=np.int64)
    exclude_self = excl is not None and bool((excl >= 0).any())
    if k < 1:
        raise MakError(f"knn k must be >= 1, got {k}")
    if k > m - int(exclude_self):
        less = ", less the image itself" if exclude_self else ""
        raise MakError(f"knn k ({k}) is larger than the seed set ({m} images{less})")
    if seed_features.shape[1] != queries.shape[1]:
        raise MakError(f"seed feature dimension {seed_features.shape[1]} differs from pool's {queries.shape[1]}")
    yield from cosine_topk(queries, seed_features, k, device=device, chunk=chunk,
                           self_index=excl if exclude_self else None)


def share_reference_size(option: Any, seed_size: int) -> int:
    """Pool rows in the seed-share reference: ``auto`` = max(10 x seed size, 10,000), else the integer."""
    if option == "auto":
        return max(10 * int(seed_size), 10_000)
    return int(option)


def share_bank(seed_features: Any, reference: Any) -> np.ndarray:
    """Seed rows then reference rows, float32: what :func:`seed_share` searches (build it once per pool)."""
    return np.concatenate([np.asarray(seed_features, dtype=np.float32), np.asarray(reference, dtype=np.float32)])


def seed_share(queries: Any, seed_features: Any, reference: Any, k: int = 50,
               self_index: np.ndarray | None = None, device: str | torch.device | None = None,
               chunk: int = CHUNK, *, bank: np.ndarray | None = None, progress: str | None = None) -> np.ndarray:
    """Fraction of seed images among each query's ``k`` nearest neighbours in seed + reference. (n,) float32.

    ``reference`` is the pool (or a uniform sample of it). A label-free density ratio: about
    ``k * p_seed / (p_seed + c * p_pool)``, high where the seed is dense, low in the seed's sparse
    tail, and ~0 where the seed has no support at all (out-of-domain images). ``self_index[i]``
    is the row of seed + reference that query ``i`` itself occupies (-1: none), never counted
    as its own neighbour. Memory O(n + chunk x (chunk + k)) beyond the bank (seed + reference);
    pass ``bank`` (:func:`share_bank`) to reuse one across calls.
    """
    m = int(seed_features.shape[0])
    if bank is None:
        bank = share_bank(seed_features, reference)
    if k > bank.shape[0] - 1:
        raise MakError(f"share k ({k}) is larger than the seed plus the pool reference ({bank.shape[0]} images, "
                       "less the image itself)")
    n = int(queries.shape[0])
    out = np.empty(n, dtype=np.float32)
    from mak.progress import bar

    with bar(n, progress, unit="img", enabled=progress is not None and n > 0) as shown:
        for lo, hi, _, idx in knn_chunks(queries, bank, k, device=device, chunk=chunk, self_index=self_index):
            out[lo:hi] = (idx < m).sum(dim=1).cpu().numpy().astype(np.float32) / np.float32(k)
            shown.update(hi - lo)
    return out


def share_gate(seed_features: Any, reference: Any, k: int = 50, quantile: float = 0.98,
               device: str | torch.device | None = None, *, bank: np.ndarray | None = None
               ) -> tuple[float, np.ndarray]:
    """The seed-share gate: (threshold, held-out seed shares (M,)).

    Each seed image's share is computed leave-one-out against seed + reference; the threshold is
    their ``1 - quantile`` quantile (``np.quantile``, linear). Pool images with a share strictly
    below it are rejected: the seed itself says how little seed support an in-domain image can have.
    """
    check_quantile(quantile)
    m = int(seed_features.shape[0])
    held = seed_share(seed_features, seed_features, reference, k=k, self_index=np.arange(m, dtype=np.int64),
                      device=device, bank=bank)
    return float(np.quantile(held.astype(np.float64), 1.0 - quantile)), held


__all__ = ["CHUNK", "knn_chunks", "seed_share", "share_bank", "share_gate", "share_reference_size"]
