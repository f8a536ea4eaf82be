"""Lazy row access over a (sharded) feature store: :class:`PoolArray` and :func:`store_arrays`.

A strategy indexes pool features and views like arrays; over a sharded store these views read the
rows asked for from each shard's memmap, so no process loads a pool it does not need.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from mak.data.store import FeatureStore

class PoolArray:
    """Read-only, lazy (N x D) features or (R x N x d) views of a :class:`FeatureStore`.

    Optionally through ``index`` (sorted pool rows, e.g. the rows kept by ``--dedup``): logical
    row i is pool row ``index[i]``. Slicing rows returns another lazy array; integer-array
    indexing and ``np.asarray`` read the rows (float32) through each shard's mmap.
    """

    def __init__(self, store: FeatureStore, kind: str = "features", index: np.ndarray | None = None,
                 start: int = 0, stop: int | None = None):
        if kind not in ("features", "views"):
            raise ValueError(kind)
        self.store, self.kind, self.index = store, kind, index
        total = store.num_rows if index is None else int(index.size)
        self.start = int(start)
        self.stop = total if stop is None else int(stop)

    @property
    def n(self) -> int:
        return self.stop - self.start

    @property
    def shape(self) -> tuple[int, ...]:
        if self.kind == "features":
            return (self.n, self.store.feature_dim)
        return (self.store.num_views, self.n, self.store.view_dim)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    dtype = np.dtype(np.float32)

    def __len__(self) -> int:
        return self.shape[0]

    def _pool_rows(self, pos: np.ndarray) -> np.ndarray:
        p = self.start + np.asarray(pos, dtype=np.int64)
        return p if self.index is None else self.index[p]

    def _sub(self, lo: int, hi: int) -> "PoolArray":
        return PoolArray(self.store, self.kind, self.index, self.start + lo, self.start + hi)

    def take(self, pos: np.ndarray) -> np.ndarray:
        """Rows at logical positions ``pos`` (any order): (k, D) or (R, k, d) float32."""
        rows = self._pool_rows(pos)
        if self.kind == "features":
            return self.store.rows(rows, dtype=np.float32)
        return self.store.view_rows(rows)

    def __getitem__(self, key: Any) -> Any:
        if self.kind == "views":
            if not (isinstance(key, tuple) and len(key) in (2, 3) and key[0] == slice(None)
                    and (len(key) == 2 or key[2] == slice(None))):
                raise TypeError("views support [:, rows] and [:, rows, :] indexing only")
            key = key[1]
        if isinstance(key, slice):
            lo, hi, step = key.indices(self.n)
            if step == 1:
                return self._sub(lo, max(lo, hi))
            return self.take(np.arange(lo, hi, step))
        if isinstance(key, (int, np.integer)):
            k = int(key) + (self.n if key < 0 else 0)
            out = self.take(np.array([k]))
            return out[0] if self.kind == "features" else out[:, 0]
        idx = np.asarray(key)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        return self.take(idx.astype(np.int64))

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        if self.index is None:
            out = (self.store.features(self.start, self.stop) if self.kind == "features"
                   else self.store.views(self.start, self.stop))
        else:
            out = self.take(np.arange(self.n))
        return out if dtype is None else out.astype(dtype, copy=False)


def store_arrays(store: FeatureStore, index: np.ndarray | None = None, views: bool = True) -> tuple[Any, Any]:
    """(features, views) of a store for :func:`mak.select`: the raw memmaps for a plain store
    (exactly what the single-process job passes), lazy :class:`PoolArray` s otherwise."""
    if index is None and len(store.shards) == 1:
        sh = store.shards[0]
        return sh.features, (sh.views if views and store.has_views else None)
    f = PoolArray(store, "features", index)
    v = PoolArray(store, "views", index) if views and store.has_views else None
    return f, v


def take_rows(src: Any, rows: np.ndarray) -> np.ndarray | torch.Tensor:
    """Feature rows ``rows`` (sorted) of an array, memmap, tensor or :class:`PoolArray`."""
    if isinstance(src, torch.Tensor):
        return src[torch.as_tensor(rows, device=src.device)]
    if isinstance(src, PoolArray):
        return src.take(rows)
    return np.asarray(src[rows])


__all__ = ["PoolArray", "store_arrays", "take_rows"]
