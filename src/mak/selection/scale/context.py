"""Selection across processes: one answer from many ranks, the one a single process computes.

``torchrun --nproc_per_node G -m mak select ...`` (or ``torchrun --no-python mak select ...``)
runs :func:`mak.run.select_job.select_stores` on every rank, and a plain ``mak select`` runs the
same job as a world of size 1. The selection is the one a single process computes with the same
seed, for every strategy.

:class:`DistributedContext` is the :class:`~mak.selection.strategies.Context` behind it. Rank r owns the
contiguous pool rows ``shard_range(N, r, W)`` (its score vectors hold those rows only) and reads
them through mmap; strategies only ever call the context's global operations:

* ``ecle()``: the orderings are the global permutations of :func:`mak.selection.tailness.partition_order`;
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
  reads its block's feature rows from the shared store); :func:`mak.selection.scale.kcenter.greedy_sharded`
  does one all-reduce of a packed (similarity, index) int64 and one d-float broadcast per step.
  ``--kcenter two-round`` runs :func:`mak.selection.scale.kcenter.two_round_sharded` instead.
* ``random_subset``: the same permutation as on one process.
* the ``robust`` strategy's extra operations (percentile ranks by a broadcast of each rank's
  sorted values in turn, masked z-scores, counts, extents, histograms) are global too.

Returned ``Selection.indices`` (and ``candidates``) are global pool indices, identical on every
rank; the per-image vectors (``ecle``, ``distance``, ``score``) hold the rank's own rows. The
store job writes ``scores.csv`` as per-rank parts (each rank streams its own rows' items) that
rank 0 concatenates, so no rank gathers all N scores; rank 0 writes the other files.

Exactness: ECLE, distances and z-scores are bit-identical to one process (same batch and chunk
shapes, same summation order), and so is every ``scores.csv``. The k-center similarities are
bit-identical across any number of ranks (blocks padded, see :mod:`mak.selection.scale.kcenter`).
The one-process :func:`mak.kcenter_greedy` uses the same column layout over fixed, unpadded
blocks; where a BLAS rounds a product's last entries by its length, exact greedy could in
principle pick differently where two candidates' similarities tie to within one float32 ulp
(e.g. exact duplicate rows at the end of the matrix).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from mak import distributed as D
from mak._tensor import l2_normalize, resolve_device, to_tensor, top_k as _top_k, zscore as _zscore
from mak.data.pool_array import take_rows
from mak.errors import MakError
from mak.options import ParameterError
from mak.selection.proximity import CHUNK as DIST_CHUNK, kmeans, nearest_centroid_distance
from mak.selection.robust import RobustOps
from mak.selection.scale.kcenter import angle, covering_radius_sharded, exact_sharded, two_round_sharded
from mak.selection.strategies import Context, Selection, select
from mak.selection.tailness import batch_plan, ecle_sum

# candidates x budget up to which two-round is also compared with exact greedy (a few seconds on a
# CPU; beyond it the comparison would cost as much as the exact greedy two-round stands in for)
EXACT_COMPARE_LIMIT = 1e8


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


def _pairwise_mid(lo: int, hi: int) -> int:
    """Where numpy's pairwise summation splits ``[lo, hi)``: at half its length, rounded down to a multiple of 8."""
    n2 = (hi - lo) // 2
    n2 -= n2 % 8
    return lo + n2


def _pairwise_walk(bounds: np.ndarray, lo: int, hi: int, plan: list[tuple[int, int, int]]) -> None:
    """Append to ``plan`` the top nodes ``(lo, hi, owner)`` of the tree over ``[lo, hi)`` lying in one rank's part
    (owner: that rank) or straddling two ranks' parts (owner -1: leaves of <= 128 values), left to right."""
    r = int(np.searchsorted(bounds, lo, side="right") - 1)
    if hi <= bounds[r + 1]:
        plan.append((lo, hi, r))
    elif hi - lo <= _PW_BLOCK:
        plan.append((lo, hi, -1))
    else:
        mid = _pairwise_mid(lo, hi)
        _pairwise_walk(bounds, lo, mid, plan)
        _pairwise_walk(bounds, mid, hi, plan)


def _pairwise_local_parts(local: np.ndarray, plan: list[tuple[int, int, int]], bounds: np.ndarray,
                          me: int) -> tuple[list[float], list[np.ndarray]]:
    """This rank's sums of the plan nodes it owns and its slices of the straddling leaves, in plan order."""
    start = int(bounds[me])
    vals, raws = [], []
    for lo, hi, r in plan:
        if r == me:
            vals.append(float(np.sum(local[lo - start: hi - start])))
        elif r < 0:
            a, b = max(lo, start), min(hi, start + local.size)
            if a < b:
                raws.append(local[a - start: b - start])
    return vals, raws


def _pairwise_leaves(plan: list[tuple[int, int, int]], bounds: np.ndarray, got_vals: list,
                     got_raws: list) -> dict[tuple[int, int], float]:
    """The value of every plan node from the gathered parts: its owner's sum, or the leaf sum of its pieces."""
    world = len(bounds) - 1
    vpos = [0] * world
    rpos = [0] * world
    leaves: dict[tuple[int, int], float] = {}
    for lo, hi, r in plan:
        if r >= 0:
            leaves[(lo, hi)] = float(got_vals[r][vpos[r]])
            vpos[r] += 1
        else:
            pieces = []
            for q in range(world):
                a, b = max(lo, int(bounds[q])), min(hi, int(bounds[q + 1]))
                if a < b:
                    pieces.append(got_raws[q][rpos[q]: rpos[q] + b - a])
                    rpos[q] += b - a
            leaves[(lo, hi)] = _pairwise_leaf(np.concatenate(pieces))
    return leaves


def _pairwise_value(leaves: dict[tuple[int, int], float], lo: int, hi: int) -> float:
    """The pairwise sum of ``[lo, hi)``: the top of numpy's tree rebuilt over the plan nodes' values."""
    if (lo, hi) in leaves:
        return leaves[(lo, hi)]
    mid = _pairwise_mid(lo, hi)
    return float(np.float64(_pairwise_value(leaves, lo, mid)) + np.float64(_pairwise_value(leaves, mid, hi)))


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
    if n == 0:
        return 0.0
    plan: list[tuple[int, int, int]] = []  # (lo, hi, owner rank or -1 for a straddling leaf)
    _pairwise_walk(bounds, 0, n, plan)
    vals, raws = _pairwise_local_parts(local, plan, bounds, me)
    got_vals = D.all_gather_varlen(np.array(vals, dtype=np.float64))
    got_raws = D.all_gather_varlen(np.concatenate(raws) if raws else np.zeros(0, dtype=np.float64))
    leaves = _pairwise_leaves(plan, bounds, got_vals, got_raws)
    return _pairwise_value(leaves, 0, n)


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
    """Which ECLE batches this rank scores (:func:`mak.selection.tailness.ecle_sum`'s ``owner``): batch ``k`` of
    ordering ``p`` goes to rank ``(p * batches + k) % world``; None (all) on one process. The float64
    sums are exact, so adding the ranks' sums gives one process's ECLE bit for bit."""
    w, me = D.world_size(), D.rank()
    if w <= 1:
        return None
    nb = len(batch_plan(n, batch_size)) if batch_size >= 2 else 1
    return lambda p, k: (p * nb + k) % w == me


@dataclass(eq=False)
class DistributedContext(RobustOps, Context):
    """A :class:`~mak.selection.strategies.Context` whose rows are split across the ranks of a process group.

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
            x = take_rows(self.global_features, rows[lo:hi])
        return l2_normalize(to_tensor(x, dev))

    def _kcenter_setup(self) -> tuple[str, int]:
        """The k-center mode and part count to run, checked (two-round over one part runs as exact)."""
        mode = self.kcenter_mode or "exact"
        if mode not in ("exact", "two-round"):
            raise MakError(f"unknown k-center mode '{mode}' (choose from: exact, two-round)")
        parts = int(self.kcenter_parts or self.world)
        if parts < 1:
            raise MakError(f"k-center parts must be >= 1, got {parts}")
        if mode == "two-round" and parts == 1:
            mode = "exact"  # one part: round 1 is exact greedy, round 2 would only reorder it
        return mode, parts

    def _kcenter_exact(self, cand: np.ndarray | None, total: int, budget: int, init: Any) -> np.ndarray:
        """Exact greedy over this rank's block of the candidates; records the report, returns candidate positions."""
        show = self.progress and self.me == 0
        w, me = self.world, self.me
        lo, hi = D.shard_range(total, me, w)
        res = exact_sharded(self._block(cand, lo, hi), budget, init=init, seed=self.seed, progress=show)
        self.report["kcenter"] = {"mode": "exact", "parts": w, "radius": res.radius,
                                  "seconds_per_step": res.step_seconds}
        return res.picks

    def _kcenter_two_round(self, cand: np.ndarray | None, total: int, budget: int, parts: int,
                           init: Any) -> tuple[np.ndarray, dict[str, Any]]:
        """Two-round k-center over this rank's parts of the candidates; (candidate positions, report)."""
        show = self.progress and self.me == 0
        w, me = self.world, self.me
        p_lo, p_hi = D.shard_range(parts, me, w)
        blo = D.shard_range(total, p_lo, parts)[0] if p_lo < p_hi else 0
        bhi = D.shard_range(total, p_hi - 1, parts)[1] if p_lo < p_hi else 0
        tr = two_round_sharded(self._block(cand, blo, bhi), blo, total, budget, parts, init=init,
                               seed=self.seed, progress=show)
        rep: dict[str, Any] = {"mode": "two-round", "parts": parts, "union": tr.union,
                               "round1_radius": tr.round1_radius, "round2_radius": tr.round2_radius,
                               "radius_bound": tr.radius_bound, "radius": None, "exact_radius": None}
        return tr.picks, rep

    def _kcenter_compare(self, cand: np.ndarray | None, total: int, budget: int, init: Any, pos: np.ndarray,
                         rep: dict[str, Any]) -> None:
        """Add to ``rep`` the covering radius of the picks ``pos`` and exact greedy's (a note where too large)."""
        if total * budget <= EXACT_COMPARE_LIMIT:
            t2 = time.perf_counter()
            lo, hi = D.shard_range(total, self.me, self.world)
            xb = self._block(cand, lo, hi)
            pick_rows = np.sort(pos) if cand is None else np.sort(cand[pos])
            centers = l2_normalize(to_tensor(take_rows(self.global_features, pick_rows), xb.device))
            r2 = covering_radius_sharded(xb, centers, init=init)
            ex = exact_sharded(xb, budget, init=init, seed=self.seed)
            rep.update(radius=r2, exact_radius=ex.radius,
                       angle_ratio=(angle(r2) / angle(ex.radius)) if ex.radius > 0 else None,
                       compare_seconds=time.perf_counter() - t2)
        else:
            rep["note"] = (f"exact greedy not run for comparison: candidates x budget = {total * budget:.3g} "
                           f"> {EXACT_COMPARE_LIMIT:.0e}")

    def kcenter(self, rows: np.ndarray | None, budget: int, init: Any) -> np.ndarray:
        mode, parts = self._kcenter_setup()
        if mode == "exact" and self.world == 1:
            picks = super().kcenter(rows, budget, init)
            self.report["kcenter"] = {"mode": "exact", "parts": 1}
            if self.kcenter_mode == "two-round":
                self.report["kcenter"]["note"] = ("two-round over one part is exact greedy: give it parts "
                                                  "(kcenter_parts, or torchrun ranks)")
            return picks
        t = time.perf_counter()
        cand = None if rows is None else np.sort(np.asarray(rows, dtype=np.int64))
        total = self.n_total if cand is None else int(cand.size)
        if mode == "exact":
            pos = self._kcenter_exact(cand, total, budget, init)
            self.timings["kcenter"] = time.perf_counter() - t
        else:
            if parts > total:
                raise ParameterError("kcenter_parts", f"kcenter_parts={parts} is more than the {total} candidates")
            pos, rep = self._kcenter_two_round(cand, total, budget, parts, init)
            self.timings["kcenter"] = time.perf_counter() - t
            self._kcenter_compare(cand, total, budget, init, pos, rep)
            self.report["kcenter"] = rep
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


__all__ = ["DistributedContext", "EXACT_COMPARE_LIMIT", "ecle_batch_owner", "gather_scores", "global_top_k",
           "global_zscore", "pairwise_sum_global", "select_distributed"]
