"""Turning the tail score into the selection score over the gated pool.

:func:`fuse`: percentile ranks (``rank``) or z-scores (``z``) over the rows the gate keeps, -inf
outside, computed with the pool-wide operations of :class:`mak.selection.robust.context.RobustOps`.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from mak.errors import MakError
from mak.selection.robust.context import LOCAL, RobustOps

FUSIONS = ("rank", "z")
HIST_BINS = 50


def rank_fusion(tail: np.ndarray | Sequence[np.ndarray], distance: np.ndarray, alpha: float = 0.5,
                mask: np.ndarray | None = None) -> np.ndarray:
    """``alpha*pct(tail) - (1-alpha)*pct(distance)`` over the rows where ``mask``; -inf elsewhere.

    ``tail`` may be a list of tail scores: their percentile ranks are averaged.
    """
    return fuse(LOCAL, _as_list(tail), distance, alpha, mask, "rank")


def _as_list(tail: np.ndarray | Sequence[np.ndarray]) -> list[np.ndarray]:
    if isinstance(tail, np.ndarray) and tail.ndim == 1:
        return [tail]
    return [np.asarray(t) for t in tail]


def fuse(o: RobustOps, tails: list[np.ndarray], distance: np.ndarray | None, alpha: float,
         mask: np.ndarray | None, fusion: str) -> np.ndarray:
    """Fused score with normalisation ``fusion`` (rank or z) over the gated rows; -inf outside the gate.

    ``distance`` None: no distance term, the score is the normalised tail alone (``alpha`` unused).
    """
    if fusion not in FUSIONS:
        raise MakError(f"unknown fusion '{fusion}' (choose from: {', '.join(FUSIONS)})")
    norm = o.rank_normalize if fusion == "rank" else o.masked_zscore
    t = sum(norm(x, mask) for x in tails) / len(tails)
    score = t if distance is None else alpha * t - (1.0 - alpha) * norm(distance, mask)
    if mask is not None:
        score = np.where(mask, score, -np.inf)
    return score


def histograms(o: RobustOps, heldout: np.ndarray, pool_distance: np.ndarray, threshold: float,
                bins: int = HIST_BINS) -> dict[str, Any]:
    """Shared-edge histograms of the held-out seed distances and the pool distances, for the report."""
    plo, phi = o.extent(pool_distance)
    lo = min(plo, float(heldout.min()), threshold)
    hi = max(phi, float(heldout.max()), threshold)
    if hi <= lo:
        hi = lo + 1e-6
    edges = np.linspace(lo, hi, bins + 1)
    return {"edges": [float(e) for e in edges],
            "seed_heldout": [int(c) for c in np.histogram(heldout, bins=edges)[0]],
            "pool": [int(c) for c in o.histogram(pool_distance, edges)]}


__all__ = ["FUSIONS", "fuse", "histograms", "rank_fusion"]
