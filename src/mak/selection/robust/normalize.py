"""Mid-rank percentiles and z-scores of a score over the masked rows, on one process."""
from __future__ import annotations

import numpy as np

from mak._tensor import zscore


def rank_normalize(x: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Mid-rank percentiles of ``x`` over the rows where ``mask`` (all when None); NaN elsewhere.

    ``pct = (r - 0.5) / n``: ``r`` the 1-based rank among the n masked rows, ties given their
    average rank. float64 in (0, 1).
    """
    x = np.asarray(x)
    out = np.full(x.shape[0], np.nan, dtype=np.float64)
    idx = np.arange(x.shape[0]) if mask is None else np.flatnonzero(mask)
    n = idx.size
    if n == 0:
        return out
    vals = x[idx]
    _, inverse, counts = np.unique(vals, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)  # 1-based rank of the last copy of each distinct value
    avg_rank = ends - (counts - 1) / 2.0
    out[idx] = (avg_rank[inverse.reshape(-1)] - 0.5) / n
    return out


def masked_zscore(x: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """z-scores of ``x`` over the rows where ``mask`` (population std); NaN elsewhere."""
    if mask is None:
        return zscore(x)
    out = np.full(np.asarray(x).shape[0], np.nan, dtype=np.float64)
    if mask.any():
        out[mask] = zscore(np.asarray(x)[mask])
    return out


__all__ = ["masked_zscore", "rank_normalize"]
