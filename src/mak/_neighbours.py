"""Cosine top-k in chunks: the ``k`` most similar rows of a bank for each query, a query chunk at a time.

:func:`cosine_topk` is the one search behind the seed share of the robust selection
(:func:`mak.selection.robust.neighbours.knn_chunks`) and the kNN classifier of the evaluation
(:func:`mak.bench.evaluate.knn_predict`). Callers check their own inputs (``1 <= k <= bank
rows``, equal feature dimensions) and word their own errors.
"""
from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import torch

from mak._tensor import l2_normalize, resolve_device, to_tensor

CHUNK = 4096


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
                top, pos = torch.topk(sim, min(k, sim.shape[1]), dim=1, largest=True, sorted=True)
                if best is None:
                    best, best_idx = top, pos + slo
                else:  # merge the chunk's own top k with the running one: 2k columns, not chunk + k
                    merged = torch.cat([best, top], dim=1)
                    top, sel = torch.topk(merged, min(k, merged.shape[1]), dim=1, largest=True, sorted=True)
                    best_idx = torch.gather(torch.cat([best_idx, pos + slo], dim=1), 1, sel)
                    best = top
            yield qlo, qlo + q.shape[0], best, best_idx


__all__ = ["CHUNK", "cosine_topk"]
