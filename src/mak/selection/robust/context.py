"""The pool-wide operations robust needs beyond those of a :class:`Context`, and a context that has them."""
from __future__ import annotations

import numpy as np

from mak.errors import MakError
from mak.selection.robust.normalize import masked_zscore, rank_normalize
from mak.selection.strategies import Context


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


LOCAL = RobustOps()
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
    return LOCAL


__all__ = ["LOCAL", "RobustContext", "RobustOps", "ops"]
