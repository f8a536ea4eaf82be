"""Cosine top-k in chunks: the ``k`` most similar rows of a bank for each query, a query chunk at a time.

:func:`cosine_topk` is the one search behind the seed share of the robust selection
(:func:`mak.selection.robust.neighbours.knn_chunks`) and the kNN classifier of the evaluation
(:func:`mak.bench.evaluate.knn_predict`). Callers check their own inputs (``1 <= k <= bank
rows``, equal feature dimensions) and word their own errors.

Merging a bank chunk into the running top k: on a CPU, once a query row holds k candidates, only
the chunk's similarities at least its k-th best can enter, and after the first chunks they are
few. Those are gathered with one comparison pass (``sim >= kth``) and merged with the running k,
instead of a top-k selection over every row of the chunk (the costliest step after the matmul).
The chunk's own top k is taken when many pass (more than ``chunk / FILTER_SHARE`` on a row) and on
a GPU. Both give the exact top-k values; among equal similarities the one kept may differ.
"""
from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import torch

from mak._tensor import l2_normalize, resolve_device, to_tensor

CHUNK = 4096
FILTER_SHARE = 4  # the filtered merge while at most chunk / FILTER_SHARE candidates pass on a row


def cosine_topk(queries: Any, bank: Any, k: int, *, device: str | torch.device | None = None, chunk: int = CHUNK,
                bank_chunk: int | None = None, self_index: np.ndarray | None = None
                ) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
    """The ``k`` most cosine-similar bank rows of each query row, ``chunk`` query rows at a time.

    Yields ``(lo, hi, sim, idx)``: cosine similarities (hi-lo, k), largest first (``torch.topk``,
    sorted), and the bank rows they belong to. The bank is searched ``bank_chunk`` rows at a time
    (default ``chunk``); a running top-k per query row is merged with each bank chunk, so memory
    is O(chunk x (bank_chunk + k)) beyond what the caller keeps. A bank of at most 8 chunks is
    normalised once and stays on the device; a bigger one is re-read for every query chunk.
    ``self_index[i]`` (int64, one per query row): a bank row query ``i`` never matches (-1: none).
    ``device``: ``None`` is the queries' device (CPU for arrays). Row normalisation is
    :func:`mak._tensor.l2_normalize` in float32.
    """
    m = int(bank.shape[0])
    n = int(queries.shape[0])
    bank_chunk = chunk if bank_chunk is None else int(bank_chunk)
    dev = resolve_device(device, queries)
    excl = None if self_index is None else torch.from_numpy(np.asarray(self_index, dtype=np.int64)).to(dev)
    resident = m <= 8 * bank_chunk
    bank_chunks = [l2_normalize(to_tensor(bank[lo : lo + bank_chunk], dev)) for lo in range(0, m, bank_chunk)] \
        if resident else None
    with torch.inference_mode():
        for qlo in range(0, n, chunk):
            q = l2_normalize(to_tensor(queries[qlo : qlo + chunk], dev))
            best = best_idx = None
            for i, slo in enumerate(range(0, m, bank_chunk)):
                s = bank_chunks[i] if resident else l2_normalize(to_tensor(bank[slo : slo + bank_chunk], dev))
                sim = q @ s.T
                if excl is not None:
                    cols = excl[qlo : qlo + q.shape[0]] - slo
                    hit = (cols >= 0) & (cols < s.shape[0])
                    sim[hit.nonzero().flatten(), cols[hit]] = -float("inf")
                best, best_idx = _merge(best, best_idx, sim, slo, k)
            yield qlo, qlo + q.shape[0], best, best_idx


def _merge(best: torch.Tensor | None, best_idx: torch.Tensor | None, sim: torch.Tensor, slo: int, k: int
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """The running top k (largest first) of each row after bank chunk ``sim`` (columns from ``slo``)."""
    cand = None
    if best is not None and best.shape[1] == k and sim.device.type == "cpu":
        cand = _passing(sim, best[:, -1:], slo, max(1, sim.shape[1] // FILTER_SHARE))
    if cand is None:  # the chunk's own top k
        top, pos = torch.topk(sim, min(k, sim.shape[1]), dim=1, largest=True, sorted=True)
        cand = (top, pos + slo)
    if best is None:
        return cand
    merged = torch.cat([best, cand[0]], dim=1)  # k + a few columns, not chunk + k
    top, sel = torch.topk(merged, min(k, merged.shape[1]), dim=1, largest=True, sorted=True)
    return top, torch.gather(torch.cat([best_idx, cand[1]], dim=1), 1, sel)


def _passing(sim: torch.Tensor, kth: torch.Tensor, slo: int, limit: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Each row's similarities >= its ``kth`` value, packed left into a (rows, c) -inf-padded matrix
    with their bank rows; None when some row has more than ``limit``."""
    rows, cols = (sim >= kth).nonzero(as_tuple=True)  # row-major: each row's columns in order
    counts = torch.bincount(rows, minlength=sim.shape[0])
    c = int(counts.max()) if rows.numel() else 0
    if c > limit:
        return None
    slot = torch.arange(rows.numel(), device=sim.device) - (torch.cumsum(counts, 0) - counts)[rows]
    vals = torch.full((sim.shape[0], c), -float("inf"), dtype=sim.dtype, device=sim.device)
    idx = torch.zeros((sim.shape[0], c), dtype=torch.int64, device=sim.device)
    vals[rows, slot] = sim[rows, cols]
    idx[rows, slot] = cols + slo
    return vals, idx


__all__ = ["CHUNK", "FILTER_SHARE", "cosine_topk"]
