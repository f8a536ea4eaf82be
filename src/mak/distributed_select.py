"""Selection at web scale: one answer from many processes, sharded stores, near-duplicate removal.

``torchrun --nproc_per_node G -m mak select ...`` (or ``torchrun --no-python mak select ...``)
runs :func:`select_stores_scaled`; so does a single-process ``mak select`` on a sharded pool
store, with ``--dedup`` or with ``--kcenter two-round``. The selection is the one a single process
computes with the same seed, for every strategy.

:class:`DistributedContext` is the :class:`~mak.selection.Context` behind it. Rank r owns the
contiguous pool rows ``shard_range(N, r, W)`` (its score vectors hold those rows only) and reads
them through mmap; strategies only ever call the context's global operations:

* ``ecle()``: the orderings are the global permutations of :func:`mak.tailness.partition_order`;
  batch b of ordering p is scored by rank ``(p * batches + b) % W``, which reads that batch's view
  vectors from the shared store (mmap). Each rank adds its batches' losses into an N-long float64
  vector (exact for float32 terms, so the order of addition does not matter); chunked
  ``reduce`` calls send each owner the sum of its rows. Result: bit-identical ECLE.
* ``distance()``: k-means of the (small) seed runs once on rank 0; the centroids are broadcast;
  each rank scores its rows, in the same 65536-row chunks as one process (the chunks that straddle
  its range are scored whole), so the distances are bit-identical.
* ``zscore(x)``: global mean and population std, summed by :func:`pairwise_sum_global` in exactly
  numpy's pairwise order, so the z-scores (and the MAK score) are bit-identical too.
* ``top_k(score, k)``: local top-k, then the W*k (value, global index) pairs are gathered and
  merged with the lowest-index tie rule; no rank ever holds all N scores.
* ``kcenter(rows, budget, init)``: the sorted candidates are cut into W contiguous blocks (rank r
  reads its block's feature rows from the shared store); :func:`mak.kcenter_scale.greedy_sharded`
  does one all-reduce of a packed (similarity, index) int64 and one d-float broadcast per step.
  ``--kcenter two-round`` runs :func:`mak.kcenter_scale.two_round_sharded` instead.
* ``random_subset``: the same permutation as on one process.
* the ``robust`` strategy's extra operations (percentile ranks by a broadcast of each rank's
  sorted values in turn, masked z-scores, counts, extents, histograms) are global too.

Returned ``Selection.indices`` (and ``candidates``) are global pool indices, identical on every
rank; the per-image vectors (``ecle``, ``distance``, ``score``) hold the rank's own rows. The
store job writes ``scores.csv`` as per-rank parts (each rank streams its own rows' items) that
rank 0 concatenates, so no rank gathers all N scores; rank 0 writes the other files.

Exactness: ECLE, distances and z-scores are bit-identical to one process (same batch and chunk
shapes, same summation order), and so is every ``scores.csv``. The k-center similarities are
bit-identical across any number of ranks (blocks padded, see :mod:`mak.kcenter_scale`), but the
one-process :func:`mak.kcenter_greedy` lets MKL round the last few rows of its matrix-vector
product differently, so exact greedy could in principle pick differently where two candidates'
similarities tie to within one float32 ulp (e.g. exact duplicate rows at the tail of the
matrix). Padding ``kcenter_greedy``'s matrix the same way would remove that case.
"""
from __future__ import annotations

import csv
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from . import distributed as D
from ._tensor import auto_device, is_auto, l2_normalize, resolve_device, to_tensor, top_k as _top_k, zscore as _zscore
from .errors import MakError
from .kcenter_scale import angle, covering_radius_sharded, exact_sharded, two_round_sharded
from .proximity import CHUNK as DIST_CHUNK, kmeans, nearest_centroid_distance
from .selection import NEEDS, Context, Selection, select, strategy_needs
from .store import FEATURES, SHARDS, VIEWS, FeatureStore, open_store
from .tailness import batch_plan, ecle_sum

try:  # the robust strategy (issue 6) needs five more global operations
    from .robust import RobustOps
except ImportError:  # pragma: no cover - robust not installed
    class RobustOps:  # type: ignore[no-redef]
        """Placeholder when :mod:`mak.robust` is absent."""

EXACT_COMPARE_LIMIT = 2e9  # candidates x budget up to which two-round is also compared with exact greedy
SCALED_OPTIONS = ("dedup", "dedup_clusters", "kcenter", "kcenter_parts")


# --------------------------------------------------------------------------------------------
# Lazy arrays over a (sharded) store
# --------------------------------------------------------------------------------------------

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


def _take(src: Any, rows: np.ndarray) -> np.ndarray | torch.Tensor:
    """Feature rows ``rows`` (sorted) of an array, memmap, tensor or :class:`PoolArray`."""
    if isinstance(src, torch.Tensor):
        return src[torch.as_tensor(rows, device=src.device)]
    if isinstance(src, PoolArray):
        return src.take(rows)
    return np.asarray(src[rows])


# --------------------------------------------------------------------------------------------
# Global statistics
# --------------------------------------------------------------------------------------------

_PW_BLOCK = 128  # numpy's PW_BLOCKSIZE


def _pairwise_leaf(a: np.ndarray) -> float:
    """numpy's pairwise summation of a block of <= 128 float64 values (8 accumulators, then the rest)."""
    n = a.size
    if n < 8:
        res = 0.0
        for v in a:
            res += float(v)
        return res
    r = a[:8].copy()
    m = n - n % 8
    for i in range(8, m, 8):
        r += a[i: i + 8]
    res = float(((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7])))
    for v in a[m:]:
        res += float(v)
    return res


def pairwise_sum_global(local: np.ndarray, counts: Sequence[int] | None = None) -> float:
    """Sum of the concatenation (in rank order) of every rank's float64 ``local``, rounded exactly as
    ``np.sum`` rounds it on one process.

    numpy sums a contiguous float64 vector by recursive halving (split at n/2 rounded down to a
    multiple of 8) down to blocks of <= 128 values. Every node of that tree lying inside one
    rank's part is summed there (``np.sum`` of the slice, which follows the same tree), blocks
    straddling two ranks are sent as raw values (<= 128 per boundary), and every rank rebuilds
    the top of the tree: O(W log N) numbers exchanged, and the one-process float64 result.
    """
    local = np.ascontiguousarray(local, dtype=np.float64)
    if not D.active():
        return float(np.sum(local))
    counts = D.all_gather_counts(local.size) if counts is None else list(counts)
    bounds = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    me, n = D.rank(), int(bounds[-1])
    start = int(bounds[me])
    plan: list[tuple[int, int, int]] = []  # (lo, hi, owner rank or -1 for a straddling leaf)

    def walk(lo: int, hi: int) -> None:
        r = int(np.searchsorted(bounds, lo, side="right") - 1)
        if hi <= bounds[r + 1]:
            plan.append((lo, hi, r))
        elif hi - lo <= _PW_BLOCK:
            plan.append((lo, hi, -1))
        else:
            n2 = (hi - lo) // 2
            n2 -= n2 % 8
            walk(lo, lo + n2)
            walk(lo + n2, hi)

    if n == 0:
        return 0.0
    walk(0, n)
    vals, raws = [], []
    for lo, hi, r in plan:
        if r == me:
            vals.append(float(np.sum(local[lo - start: hi - start])))
        elif r < 0:
            a, b = max(lo, start), min(hi, start + local.size)
            if a < b:
                raws.append(local[a - start: b - start])
    got_vals = D.all_gather_varlen(np.array(vals, dtype=np.float64))
    got_raws = D.all_gather_varlen(np.concatenate(raws) if raws else np.zeros(0, dtype=np.float64))
    vpos = [0] * len(counts)
    rpos = [0] * len(counts)
    leaves: dict[tuple[int, int], float] = {}
    for lo, hi, r in plan:
        if r >= 0:
            leaves[(lo, hi)] = float(got_vals[r][vpos[r]])
            vpos[r] += 1
        else:
            pieces = []
            for q in range(len(counts)):
                a, b = max(lo, int(bounds[q])), min(hi, int(bounds[q + 1]))
                if a < b:
                    pieces.append(got_raws[q][rpos[q]: rpos[q] + b - a])
                    rpos[q] += b - a
            leaves[(lo, hi)] = _pairwise_leaf(np.concatenate(pieces))

    def value(lo: int, hi: int) -> float:
        if (lo, hi) in leaves:
            return leaves[(lo, hi)]
        n2 = (hi - lo) // 2
        n2 -= n2 % 8
        return float(np.float64(value(lo, lo + n2)) + np.float64(value(lo + n2, hi)))

    return value(0, n)


def global_zscore(x: np.ndarray) -> np.ndarray:
    """z-scores of the rank-local ``x`` over the concatenation of all ranks' ``x``.

    Bit-identical to :func:`mak._tensor.zscore` on the whole vector: the mean and population std
    are numpy's (``x.mean()``, ``x.std()``), with the sums of :func:`pairwise_sum_global`.
    """
    x = np.asarray(x, dtype=np.float64)
    counts = D.all_gather_counts(x.size)
    n = sum(counts)
    if n == 0:
        return np.zeros_like(x)
    mean = np.float64(pairwise_sum_global(x, counts)) / n
    dev = x - mean
    std = np.sqrt(np.float64(pairwise_sum_global(dev * dev, counts)) / n)
    if not np.isfinite(std) or std == 0:
        return np.zeros_like(x)
    return (x - mean) / std


def global_top_k(score: np.ndarray, k: int, offset: int, n_total: int, largest: bool = True) -> np.ndarray:
    """Global indices of the k best of the rank-local ``score`` (rows ``offset``...), best first.

    Local top-k, then an all-gather of at most W*k (key, index) pairs merged by (key, index):
    the same order as :func:`mak._tensor.top_k` on the whole vector.
    """
    k = min(int(k), int(n_total))
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    score = np.asarray(score)
    loc = _top_k(score, min(k, score.shape[0]), largest) if score.shape[0] else np.zeros(0, dtype=np.int64)
    key = (-score[loc] if largest else score[loc]).astype(np.float64)
    keys = np.concatenate(D.all_gather_varlen(key))
    idx = np.concatenate(D.all_gather_varlen(loc.astype(np.int64) + offset))
    order = np.lexsort((idx, keys))[:k]
    return idx[order].astype(np.int64)


# --------------------------------------------------------------------------------------------
# The context
# --------------------------------------------------------------------------------------------

def ecle_batch_owner(n: int, batch_size: int) -> Callable[[int, int], bool] | None:
    """Which ECLE batches this rank scores (:func:`mak.tailness.ecle_sum`'s ``owner``): batch ``k`` of
    ordering ``p`` goes to rank ``(p * batches + k) % world``; None (all) on one process. The float64
    sums are exact, so adding the ranks' sums gives one process's ECLE bit for bit."""
    w, me = D.world_size(), D.rank()
    if w <= 1:
        return None
    nb = len(batch_plan(n, batch_size)) if batch_size >= 2 else 1
    return lambda p, k: (p * nb + k) % w == me


@dataclass(eq=False)
class DistributedContext(RobustOps, Context):
    """A :class:`~mak.selection.Context` whose rows are split across the ranks of a process group.

    Pass as ``select(..., context_cls=DistributedContext)`` on every rank with the same arguments
    (``pool_features``/``pool_views`` may be arrays, memmaps, tensors or :class:`PoolArray` s).
    On one process it behaves exactly like :class:`Context`. Its k-center is ``kcenter_mode``
    (``exact`` | ``two-round``) over ``kcenter_parts`` parts (None: the world size); a subclass
    or the caller sets both after construction.
    """

    kcenter_mode = "exact"
    kcenter_parts: int | None = None

    def __post_init__(self) -> None:
        self.world = D.world_size()
        self.me = D.rank()
        self.n_total = int(self.pool_features.shape[0])
        self.start, self.stop = D.shard_range(self.n_total, self.me, self.world)
        self.global_features = self.pool_features
        self.global_views = self.pool_views
        self.pool_features = self.global_features[self.start: self.stop]
        if self.pool_views is not None:
            self.pool_views = self.global_views[:, self.start: self.stop]
        self.report: dict[str, Any] = {}

    @property
    def pool_size(self) -> int:  # type: ignore[override]
        return self.n_total

    @property
    def local_rows(self) -> tuple[int, int]:
        """The global rows ``[start, stop)`` this rank's score vectors hold."""
        return self.start, self.stop

    # ---- scores --------------------------------------------------------------------------
    def ecle(self) -> np.ndarray:
        if self._ecle is not None and self._ecle.shape[0] == self.n_total != self.stop - self.start:
            self._ecle = np.asarray(self._ecle[self.start: self.stop])  # precomputed for the whole pool
        if self._ecle is None:
            self.need_views()
            t = time.perf_counter()
            views, n = self.global_views, self.n_total
            w, me = self.world, self.me
            owner = ecle_batch_owner(n, self.batch_size)
            show = self.progress and me == 0
            # A lazy PoolArray is read batch by batch, like a memmap (views[:, rows, :]).
            acc, terms = ecle_sum(views, temperature=self.temperature, batch_size=self.batch_size,
                                  partitions=self.partitions, seed=self.seed, device=self.device, owner=owner,
                                  progress=show)
            local = D.reduce_to_owners(acc) if w > 1 else acc
            self._ecle = (local / terms).astype(np.float32)
            self.timings["ecle"] = time.perf_counter() - t
        return self._ecle

    def distance(self) -> np.ndarray:
        if self._distance is None:
            seed_feats = self.need_seed()
            t = time.perf_counter()
            k, d = int(self.clusters), int(seed_feats.shape[1])
            cen = kmeans(seed_feats, clusters=k, seed=self.seed, device=self.device) if self.me == 0 else None
            cen = D.broadcast_array(cen, (k, d), np.float32, src=0)
            lo, hi = self.start, self.stop
            if lo == hi:
                self._distance = np.zeros(0, dtype=np.float32)
            else:
                alo = (lo // DIST_CHUNK) * DIST_CHUNK  # score whole single-process chunks: same shapes
                ahi = min(self.n_total, -(-hi // DIST_CHUNK) * DIST_CHUNK)
                dd = nearest_centroid_distance(self.global_features[alo:ahi], cen, device=self.device)
                self._distance = dd[lo - alo: hi - alo]
            self.timings["proximity"] = time.perf_counter() - t
        return self._distance

    # ---- global operations ---------------------------------------------------------------
    def zscore(self, x: np.ndarray) -> np.ndarray:
        if self.world == 1:
            return _zscore(x)
        return global_zscore(x)

    def top_k(self, score: np.ndarray, k: int, largest: bool = True) -> np.ndarray:
        if self.world == 1:
            return _top_k(score, k, largest)
        return global_top_k(score, k, self.start, self.n_total, largest)

    def _block(self, rows: np.ndarray | None, lo: int, hi: int) -> torch.Tensor:
        """Normalised features of candidates ``lo:hi`` (of ``rows`` sorted, or of the whole pool)."""
        dev = resolve_device(self.device, self.global_features)
        if rows is None:
            x = self.global_features[lo:hi]
        else:
            x = _take(self.global_features, rows[lo:hi])
        return l2_normalize(to_tensor(x, dev))

    def kcenter(self, rows: np.ndarray | None, budget: int, init: Any) -> np.ndarray:
        mode = self.kcenter_mode or "exact"
        if mode not in ("exact", "two-round"):
            raise MakError(f"unknown k-center mode '{mode}' (choose from: exact, two-round)")
        parts = int(self.kcenter_parts or self.world)
        if parts < 1:
            raise MakError(f"k-center parts must be >= 1, got {parts}")
        if mode == "two-round" and parts == 1:
            mode = "exact"  # one part: round 1 is exact greedy, round 2 would only reorder it
        if mode == "exact" and self.world == 1:
            picks = super().kcenter(rows, budget, init)
            self.report["kcenter"] = {"mode": "exact", "parts": 1}
            return picks
        t = time.perf_counter()
        cand = None if rows is None else np.sort(np.asarray(rows, dtype=np.int64))
        total = self.n_total if cand is None else int(cand.size)
        show = self.progress and self.me == 0
        w, me = self.world, self.me
        if mode == "exact":
            lo, hi = D.shard_range(total, me, w)
            res = exact_sharded(self._block(cand, lo, hi), budget, init=init, seed=self.seed, progress=show)
            pos = res.picks
            self.report["kcenter"] = {"mode": "exact", "parts": w, "radius": res.radius,
                                      "seconds_per_step": res.step_seconds}
        else:
            p_lo, p_hi = D.shard_range(parts, me, w)
            blo = D.shard_range(total, p_lo, parts)[0] if p_lo < p_hi else 0
            bhi = D.shard_range(total, p_hi - 1, parts)[1] if p_lo < p_hi else 0
            tr = two_round_sharded(self._block(cand, blo, bhi), blo, total, budget, parts, init=init,
                                   seed=self.seed, progress=show)
            pos = tr.picks
            rep: dict[str, Any] = {"mode": "two-round", "parts": parts, "union": tr.union,
                                   "round1_radius": tr.round1_radius, "round2_radius": tr.round2_radius,
                                   "radius_bound": tr.radius_bound, "radius": None, "exact_radius": None}
            self.timings["kcenter"] = time.perf_counter() - t
            if total * budget <= EXACT_COMPARE_LIMIT:
                t2 = time.perf_counter()
                lo, hi = D.shard_range(total, me, w)
                xb = self._block(cand, lo, hi)
                pick_rows = np.sort(pos) if cand is None else np.sort(cand[pos])
                centers = l2_normalize(to_tensor(_take(self.global_features, pick_rows), xb.device))
                r2 = covering_radius_sharded(xb, centers, init=init)
                ex = exact_sharded(xb, budget, init=init, seed=self.seed)
                rep.update(radius=r2, exact_radius=ex.radius,
                           angle_ratio=(angle(r2) / angle(ex.radius)) if ex.radius > 0 else None,
                           compare_seconds=time.perf_counter() - t2)
            else:
                rep["note"] = (f"exact greedy not run for comparison: candidates x budget = {total * budget:.3g} "
                               f"> {EXACT_COMPARE_LIMIT:.0e}")
            self.report["kcenter"] = rep
            return pos if cand is None else cand[pos]
        self.timings["kcenter"] = time.perf_counter() - t
        return pos if cand is None else cand[pos]

    # ---- robust's operations -------------------------------------------------------------
    def rank_normalize(self, x: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        if self.world == 1:
            return RobustOps.rank_normalize(self, x, mask)  # type: ignore[attr-defined]
        x = np.asarray(x)
        out = np.full(x.shape[0], np.nan, dtype=np.float64)
        idx = np.arange(x.shape[0]) if mask is None else np.flatnonzero(mask)
        vals = x[idx]
        n = int(D.all_reduce_scalar(idx.size, "sum"))
        if n == 0:
            return out
        srt = np.sort(vals)
        counts = D.all_gather_counts(srt.size)
        less = np.zeros(vals.size, dtype=np.int64)
        leq = np.zeros(vals.size, dtype=np.int64)
        for src in range(self.world):  # each rank's sorted values in turn: memory O(N / W)
            blk = D.broadcast_array(srt if src == self.me else None, (counts[src],), srt.dtype, src)
            less += np.searchsorted(blk, vals, side="left")
            leq += np.searchsorted(blk, vals, side="right")
        avg_rank = leq - (leq - less - 1) / 2.0
        out[idx] = (avg_rank - 0.5) / n
        return out

    def masked_zscore(self, x: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        if self.world == 1:
            return RobustOps.masked_zscore(self, x, mask)  # type: ignore[attr-defined]
        if mask is None:
            return self.zscore(x)
        out = np.full(np.asarray(x).shape[0], np.nan, dtype=np.float64)
        z = global_zscore(np.asarray(x)[mask])
        out[mask] = z
        return out

    def count(self, mask: np.ndarray) -> int:
        return int(D.all_reduce_scalar(int(np.count_nonzero(mask)), "sum", dtype=np.int64))

    def extent(self, x: np.ndarray) -> tuple[float, float]:
        x = np.asarray(x)
        lo = float(x.min()) if x.size else float("inf")
        hi = float(x.max()) if x.size else float("-inf")
        lo, hi = D.all_reduce_scalar(lo, "min"), D.all_reduce_scalar(hi, "max")
        return (lo, hi) if lo <= hi else (0.0, 0.0)

    def histogram(self, x: np.ndarray, edges: np.ndarray) -> np.ndarray:
        h = np.histogram(np.asarray(x), bins=edges)[0].astype(np.int64)
        return D.all_reduce_array(h, "sum")


def select_distributed(*args: Any, **kwargs: Any) -> Selection:
    """:func:`mak.select` with :class:`DistributedContext` (call on every rank, same arguments).

    ``indices`` are global and identical everywhere; ``ecle``/``distance``/``score`` hold the
    rank's rows ``shard_range(N)``; :func:`gather_scores` collects them on rank 0.
    """
    kwargs["context_cls"] = DistributedContext
    return select(*args, **kwargs)


def gather_scores(values: np.ndarray | None, n: int) -> np.ndarray | None:
    """Concatenate rank-local per-image ``values`` (rows ``shard_range(n)``) on rank 0 (None elsewhere)."""
    if not D.active():
        return values
    flag = D.all_reduce_scalar(0 if values is None else 1, "min")
    if not flag:
        return None
    box: list | None = [None] * D.world_size() if D.rank() == 0 else None
    torch.distributed.gather_object(np.asarray(values, dtype=np.float64), box, dst=0)
    if D.rank() != 0:
        return None
    out = np.concatenate(box)
    assert out.shape[0] == n
    return out


# --------------------------------------------------------------------------------------------
# The store job (``mak select`` under torchrun, on sharded stores, with --dedup / two-round)
# --------------------------------------------------------------------------------------------

def wants_scaled_path(pool_store: str | Path, options: dict[str, Any]) -> bool:
    """Whether ``mak select`` must take :func:`select_stores_scaled` rather than the plain job."""
    return (D.launched_by_torchrun() or D.active() or options.get("dedup") is not None
            or (options.get("kcenter") or "exact") != "exact" or options.get("kcenter_parts") is not None
            or (Path(pool_store) / SHARDS).is_file())


def _first_nonfinite(store: FeatureStore, lo: int, hi: int, chunk: int = 65536) -> str | None:
    """The file holding a NaN/Inf among pool rows ``[lo, hi)`` (features, then views), else None."""
    for sh, a, b in store._spans(lo, hi):
        for name, arr in ((FEATURES, sh.features), (VIEWS, sh.views)):
            if arr is None:
                continue
            for s in range(a, b, chunk):
                block = arr[..., s: min(b, s + chunk), :]
                if not np.isfinite(block).all():
                    return f"{sh.path / name}: contains NaN or Inf values"
    return None


def load_inputs_scaled(seed_store: str | Path | None, pool_store: str | Path, strategy: str,
                       options: dict[str, Any] | None = None) -> tuple[FeatureStore | None, FeatureStore]:
    """:func:`mak.select_stores.load_inputs`, with the pool's NaN/Inf scan split across ranks."""
    from .select_stores import load_inputs, open_seed_store

    if not D.active():
        return load_inputs(seed_store, pool_store, strategy, options=options)
    pool = open_store(pool_store, require_views=strategy_needs(strategy, options)[1], check_finite=False)
    lo, hi = D.shard_range(pool.num_rows)
    msgs = [m for m in D.all_gather_object(_first_nonfinite(pool, lo, hi)) if m]
    if msgs:
        raise MakError(msgs[0])
    return open_seed_store(seed_store, pool, strategy), pool


def iter_items(store: FeatureStore, lo: int = 0, hi: int | None = None) -> Iterator[str]:
    """Item lines of pool rows ``[lo, hi)``, streamed from the shards' items.txt (as read_items reads them)."""
    hi = store.num_rows if hi is None else hi
    for sh in store.shards:
        n = sh.features.shape[0]
        a, b = max(lo, sh.start), min(hi, sh.start + n)
        if a >= b:
            continue
        with open(sh.items_path, encoding="utf-8") as fh:
            for i, line in enumerate(fh):
                if i < a - sh.start:
                    continue
                if i >= b - sh.start:
                    break
                yield line[:-1] if line.endswith("\n") else line


def _fmt(a: np.ndarray | None, present: np.ndarray) -> list[str]:
    if a is None:
        return [""] * present.size
    vals = np.asarray(a, dtype=np.float64)
    return [repr(float(v)) if ok else "" for v, ok in zip(vals, present)]


def _write_scores_part(path: Path, store: FeatureStore, lo: int, hi: int, cols: Sequence[np.ndarray | None],
                       present: np.ndarray, rank: np.ndarray) -> None:
    """scores.csv rows for pool rows ``[lo, hi)`` (no header); ``cols`` aligned with those rows.

    Formatted 65536 rows at a time, so memory stays O(chunk) beyond the columns themselves.
    """
    chunk = 65536
    items = iter_items(store, lo, hi)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        for c0 in range(0, hi - lo, chunk):
            c1 = min(hi - lo, c0 + chunk)
            ok = present[c0:c1]
            e, d, s = (_fmt(None if c is None else c[c0:c1], ok) for c in cols)
            for j in range(c1 - c0):
                r = int(rank[c0 + j])
                w.writerow([lo + c0 + j, next(items), e[j], d[j], s[j], 1 if r >= 0 else 0, r if r >= 0 else ""])


def select_stores_scaled(seed_store: str | Path | None, pool_store: str | Path, out: str | Path, budget: int,
                         strategy: str = "mak", overwrite: bool = False, progress: bool = True,
                         dedup: float | None = None, dedup_clusters: int | None = None, kcenter: str = "exact",
                         kcenter_parts: int | None = None, **params: Any) -> Selection:
    """``mak select`` across ranks (or on one process): same outputs as :func:`mak.select_stores.select_stores`,
    plus ``dedup.csv`` with ``dedup``. Initialises the process group under torchrun (gloo on CPU,
    NCCL with ``device='cuda'``) and tears it down again when it started it."""
    device = params.get("device")
    if is_auto(device):
        device = params["device"] = str(auto_device(device))
    with D.process_group(device or "cpu") as on:
        if on and device and torch.device(device).type == "cuda":
            params["device"] = str(D.local_device(device))
        return _run_job(seed_store, pool_store, Path(out), budget, strategy, overwrite, progress, dedup,
                        dedup_clusters, kcenter, kcenter_parts, params)


def _run_job(seed_store: Any, pool_store: Any, out: Path, budget: int, strategy: str, overwrite: bool,
             progress: bool, dedup: float | None, dedup_clusters: int | None, kcenter: str,
             kcenter_parts: int | None, params: dict[str, Any]) -> Selection:
    from .atomic import write_json
    from .select_stores import check_out_dir, publish, versions

    w, me = D.world_size(), D.rank()
    check_out_dir(out, overwrite)
    kcenter = kcenter or "exact"
    if kcenter not in ("exact", "two-round"):
        raise MakError(f"unknown --kcenter '{kcenter}' (choose from: exact, two-round)")
    if kcenter_parts is not None and kcenter_parts < 1:
        raise MakError(f"--kcenter-parts must be >= 1, got {kcenter_parts}")
    t0 = time.perf_counter()
    seed, pool = load_inputs_scaled(seed_store, pool_store, strategy, options=params)
    from .select_stores import model_note

    note = model_note(pool, strategy, params, echo=D.rank() == 0)  # every rank resolves the same settings
    n_pool = pool.num_rows
    if budget > n_pool:
        raise MakError(f"budget ({budget}) is larger than the pool ({n_pool} images in {pool_store})")
    t_load = time.perf_counter() - t0
    seed_feats = seed.features() if seed is not None else None
    timings: dict[str, float] = {"load": t_load}

    dd = None
    kept = None
    if dedup is not None:
        from .dedup import find_duplicates

        t = time.perf_counter()
        feats_all, _ = store_arrays(pool, None, views=False)
        dd = find_duplicates(feats_all, dedup, clusters=dedup_clusters, seed=int(params.get("seed", 0)),
                             device=params.get("device"), progress=progress and me == 0)
        kept = dd.kept_rows
        timings["dedup"] = time.perf_counter() - t
        if budget > kept.size:
            raise MakError(f"budget ({budget}) is larger than the pool after --dedup {dedup} "
                           f"({kept.size} of {n_pool} images kept)")
    n_sel = n_pool if kept is None else int(kept.size)
    ecle_file = params.pop("ecle_file", None)
    if ecle_file is not None:  # ECLE computed earlier for the whole pool (e.g. by `mak run`)
        e = np.load(ecle_file, mmap_mode="r", allow_pickle=False)
        if e.ndim != 1 or e.shape[0] != n_pool:
            raise MakError(f"{ecle_file}: precomputed ECLE must hold {n_pool} values, found shape {e.shape}")
        opts_ecle = {"ecle_scores": np.asarray(e if kept is None else e[kept], dtype=np.float32)}
    else:
        opts_ecle = {}
    feats, views = store_arrays(pool, kept, views=strategy_needs(strategy, params)[1] if strategy in NEEDS else False)

    holder: dict[str, DistributedContext] = {}

    @dataclass(eq=False)
    class _Ctx(DistributedContext):
        def __post_init__(self) -> None:
            super().__post_init__()
            self.kcenter_mode = kcenter
            self.kcenter_parts = None if kcenter_parts is None else int(kcenter_parts)
            holder["ctx"] = self

    sel = select(seed_feats, feats, views, budget, strategy=strategy, progress=progress and me == 0,
                 context_cls=_Ctx, **params, **opts_ecle)
    if ecle_file is not None:
        params["ecle_file"] = str(ecle_file)
    ctx = holder.get("ctx")
    picks = sel.indices if kept is None else kept[sel.indices]
    cand = None if sel.candidates is None else (sel.candidates if kept is None else kept[sel.candidates])

    # ---- outputs --------------------------------------------------------------------------
    t1 = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)) if me == 0 else None
    tmp = Path(D.broadcast_object(str(tmp)))
    try:
        # pool rows [bounds[r], bounds[r+1]) are written by rank r (its selection rows + dropped ones)
        starts = [D.shard_range(n_sel, r, w)[0] for r in range(w)]
        to_pool = (lambda i: i) if kept is None else (lambda i: int(kept[i]))
        bounds = [0] + [to_pool(s) if s < n_sel else n_pool for s in starts[1:]] + [n_pool]
        plo, phi = bounds[me], bounds[me + 1]
        slo, shi = D.shard_range(n_sel, me, w)
        rows = np.arange(plo, phi, dtype=np.int64)
        if kept is None:
            present = np.ones(rows.size, dtype=bool)
            where = rows - slo
        else:
            present = dd.keep[plo:phi].copy()
            where = np.searchsorted(kept, rows) - slo
        cols = []
        for a in (sel.ecle, sel.distance, sel.score):
            if a is None:
                cols.append(None)
                continue
            a = np.asarray(a)
            if a.shape[0] != shi - slo:
                raise RuntimeError(f"per-image vector of length {a.shape[0]} on rank {me}, expected {shi - slo}")
            full = np.zeros(rows.size, dtype=np.float64)
            full[present] = a[where[present]]
            cols.append(full)
        rank_of = np.full(rows.size, -1, dtype=np.int64)
        inside = (picks >= plo) & (picks < phi)
        rank_of[picks[inside] - plo] = np.flatnonzero(inside)
        _write_scores_part(tmp / f".scores.part-{me:05d}", pool, plo, phi, cols, present, rank_of)
        D.barrier()
        if me == 0:
            _finish(tmp, out, pool, seed, sel, picks, cand, dd, ctx, strategy, budget, seed_store, pool_store,
                    params, dict(dedup=dedup, dedup_clusters=dedup_clusters, kcenter=kcenter,
                                 kcenter_parts=kcenter_parts), timings, t1, w, write_json, versions, publish,
                    note=note)
    except BaseException:
        if me == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    D.barrier()
    sel.indices = np.asarray(picks, dtype=np.int64)
    sel.candidates = cand
    return sel


def _finish(tmp: Path, out: Path, pool: FeatureStore, seed: FeatureStore | None, sel: Selection, picks: np.ndarray,
            cand: np.ndarray | None, dd: Any, ctx: DistributedContext | None, strategy: str, budget: int,
            seed_store: Any, pool_store: Any, params: dict[str, Any], scaled: dict[str, Any],
            timings: dict[str, float], t1: float, w: int, write_json: Any, versions: Any, publish: Any,
            note: str | None = None) -> None:
    """Rank 0: scores.csv from the parts, selection.txt, dedup.csv, summary.json; then publish."""
    with open(tmp / "scores.csv", "wb") as fh:
        fh.write(b"index,item,ecle,distance,score,selected,pick_rank\r\n")
        for r in range(w):
            part = tmp / f".scores.part-{r:05d}"
            with open(part, "rb") as src:
                shutil.copyfileobj(src, fh, 1 << 20)
            part.unlink()
    # selection.txt and dedup.csv in one pass over the items
    pos_of = {int(p): i for i, p in enumerate(picks)}
    chosen: list[str | None] = [None] * len(picks)
    dropped_rows = np.zeros(0, dtype=np.int64) if dd is None else np.flatnonzero(~dd.keep)
    rep_rows = set() if dd is None else set(int(r) for r in np.unique(dd.rep[dropped_rows]))
    rep_items: dict[int, str] = {}
    dfh = open(tmp / "dedup.csv", "w", newline="", encoding="utf-8") if dd is not None else None
    try:
        dw = csv.writer(dfh) if dfh is not None else None
        if dw is not None:
            dw.writerow(["index", "item", "representative", "representative_item", "similarity"])
        drop_set = dd is not None and dropped_rows.size > 0
        for i, item in enumerate(iter_items(pool)):
            p = pos_of.get(i)
            if p is not None:
                chosen[p] = item
            if dd is not None:
                if i in rep_rows:
                    rep_items[i] = item
                if drop_set and not dd.keep[i]:
                    r = int(dd.rep[i])
                    dw.writerow([i, item, r, rep_items.get(r, ""), repr(float(dd.similarity[i]))])
    finally:
        if dfh is not None:
            dfh.close()
    (tmp / "selection.txt").write_text("".join(f"{it}\n" for it in chosen), encoding="utf-8")
    info = {k: v for k, v in sel.info.items() if not isinstance(v, (int, float, str))}
    counts = {"pool": pool.num_rows, "seed": seed.num_rows if seed is not None else None, "selected": len(picks),
              "candidates": None if cand is None else int(len(cand)),
              **{k: v for k, v in sel.info.items() if isinstance(v, (int, float, str))}}
    parameters = {"budget": int(budget), **params}
    for k, v in scaled.items():
        if v is not None and not (k == "kcenter" and v == "exact"):
            parameters[k] = v
    if dd is not None:
        counts["dedup_dropped"] = dd.dropped
        counts["after_dedup"] = int(dd.keep.sum())
        info["dedup"] = {"threshold": dd.threshold, "clusters": dd.clusters, "dropped": dd.dropped,
                         **dd.info, "timings_s": {k: round(v, 4) for k, v in dd.timings.items()}}
    if ctx is not None and ctx.report.get("kcenter"):
        info["kcenter"] = ctx.report["kcenter"]
    info["distributed"] = {"world_size": w,
                           "backend": torch.distributed.get_backend() if D.active() else None,
                           "scores_csv": "per-rank parts concatenated by rank 0"}
    summary = {
        "strategy": strategy,
        "parameters": parameters,
        "inputs": {"seed_store": str(seed_store) if seed_store is not None else None, "pool_store": str(pool_store)},
        "counts": counts,
        "timings_s": {**{k: round(v, 4) for k, v in timings.items()},
                      **{k: round(v, 4) for k, v in sel.timings.items()},
                      "write": round(time.perf_counter() - t1, 4)},
        "info": info,
        "versions": versions(),
        "command": " ".join(sys.argv),
        **({"note": note} if note else {}),
    }
    write_json(tmp / "summary.json", summary)
    publish(tmp, out)


__all__ = [
    "DistributedContext",
    "PoolArray",
    "gather_scores",
    "global_top_k",
    "global_zscore",
    "iter_items",
    "load_inputs_scaled",
    "select_distributed",
    "select_stores_scaled",
    "store_arrays",
    "wants_scaled_path",
]
