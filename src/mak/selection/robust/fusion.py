"""Turning the tail score into the selection score over the gated pool, and the global operations that needs.

:func:`fuse`: percentile ranks (``rank``) or z-scores (``z``) over the rows the gate keeps, -inf
outside. :class:`RobustOps` lists the operations over the whole pool robust needs beyond
:class:`~mak.selection.strategies.Context`'s; a distributed context overrides them.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from mak._tensor import zscore
from mak.errors import MakError
from mak.selection.strategies import Context

FUSIONS = ("rank", "z")
HIST_BINS = 50


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


def rank_fusion(tail: np.ndarray | Sequence[np.ndarray], distance: np.ndarray, alpha: float = 0.5,
                mask: np.ndarray | None = None) -> np.ndarray:
    """``alpha*pct(tail) - (1-alpha)*pct(distance)`` over the rows where ``mask``; -inf elsewhere.

    ``tail`` may be a list of tail scores: their percentile ranks are averaged.
    """
    return fuse(_LOCAL, _as_list(tail), distance, alpha, mask, "rank")


class RobustOps:
    """Operations over the whole pool that ``robust`` needs beyond :class:`~mak.selection.strategies.Context`'s.

    These are the single-process versions. A context whose vectors hold only its own rows must
    override every method with a global one (same results as on one process).
    """

    def rank_normalize(self, x: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        """Mid-rank percentiles over the masked rows of the whole pool (see :func:`rank_normalize`)."""
        return rank_normalize(x, mask)

    def masked_zscore(self, x: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        """z-scores over the masked rows of the whole pool; NaN outside the mask."""
        return masked_zscore(x, mask)

    def count(self, mask: np.ndarray) -> int:
        """Number of True rows in the whole pool."""
        return int(np.count_nonzero(mask))

    def extent(self, x: np.ndarray) -> tuple[float, float]:
        """(min, max) of ``x`` over the whole pool."""
        x = np.asarray(x)
        return (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)

    def histogram(self, x: np.ndarray, edges: np.ndarray) -> np.ndarray:
        """Counts of ``x`` over the whole pool in the bins ``edges`` (numpy's convention)."""
        return np.histogram(np.asarray(x), bins=edges)[0].astype(np.int64)


class RobustContext(RobustOps, Context):
    """A single-process :class:`Context` with the robust operations (pass as ``context_cls``)."""


_LOCAL = RobustOps()
_GLOBAL_OPS = ("zscore", "top_k", "random_subset", "kcenter")  # overriding any of these = not one process


def ops(ctx: Context) -> RobustOps:
    """The robust operations for ``ctx``: its own when it is a :class:`RobustOps`, else the local ones.

    A context that overrides Context's global operations (a distributed one) but not these is
    refused: single-process ranks over a rank's own rows would be silently wrong.
    """
    if isinstance(ctx, RobustOps):
        return ctx
    cls = type(ctx)
    if any(getattr(cls, name, None) is not getattr(Context, name) for name in _GLOBAL_OPS):
        raise MakError(f"strategy 'robust' needs {cls.__name__} to provide the global operations of "
                       f"mak.selection.robust.RobustOps (rank_normalize, masked_zscore, count, extent, histogram)")
    return _LOCAL


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


__all__ = ["FUSIONS", "RobustContext", "RobustOps", "fuse", "histograms", "masked_zscore", "ops", "rank_fusion", "rank_normalize"]
