"""Near-duplicate removal: drop pool images whose cosine similarity to a kept image is >= a threshold.

Web pools repeat the same image many times; without this, copies of one image fill the
candidate set. ``mak select --dedup 0.95`` runs :func:`find_duplicates` on the pool features
before any scoring and then selects from the kept rows only (indices stay pool indices).

Algorithm (O(N) memory, never an N x N matrix):

1. **Clusters.** k-means (:func:`mak.selection.proximity.kmeans`, cosine) with K clusters (default
   ``round(sqrt(N))``, which balances the N*K assignment cost against the N*N/K comparisons)
   fitted on a random sample of the rows; every row gets its nearest centroid (*home*) and its
   second-nearest (*second*). A cluster more than 8x the mean size (and over 8192 rows) is split
   by k-means on its members, and the rows it touched are re-assigned, up to 3 times.
2. **Pass 1, within clusters.** Each cluster's members are visited in index order, in chunks;
   a row is dropped when its similarity to an earlier *kept* member is >= the threshold, and
   its representative is the lowest-index such kept member ("leader" clustering: the first
   member of a group is kept, every later copy is dropped). Only kept members are compared,
   so a group of 10,000 copies costs 10,000 comparisons, not 10^8.
3. **Pass 2, across a boundary.** Copies can straddle two clusters. Each row kept by pass 1 is
   compared with the kept members of its *second* cluster; the resulting pairs are resolved in
   index order (a row is dropped if a lower-index row that stays kept is a near-duplicate of it).
   Rows that pass 1 dropped in favour of a row dropped here are re-pointed to that row's
   representative.

What is guaranteed:

* every kept row and every dropped row's representative is kept; a dropped row's similarity to
  its representative is >= the threshold, except after a re-pointing in pass 3, where it is the
  similarity actually measured (>= cos(2*arccos(threshold)) by the triangle inequality on
  angles; it is reported in ``dedup.csv``);
* no two kept rows with similarity >= the threshold share a home cluster or have one's home
  equal to the other's second cluster. Pairs whose clusters are neither the same nor
  adjacent in that sense are not compared (at a threshold like 0.95 such pairs are very rare:
  both rows lie within a few degrees of each other, so their nearest centroids are almost
  always the same or each other's runner-up);
* within a cluster the lowest index of each group is kept; across a boundary the lower index
  wins unless it was itself dropped.

The comparison uses float32 similarities with a tolerance of 1e-6 (``sim >= threshold - 1e-6``),
so ``threshold = 1`` catches exact copies. Under ``torchrun`` clusters are shared out among the
ranks (largest first), the chunked assignment is split the same way, and the results are
exchanged, so every rank gets the same answer as one process.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch

from mak import distributed as D
from mak._tensor import l2_normalize, resolve_device, to_tensor
from mak.errors import MakError
from mak.selection.proximity import kmeans

ASSIGN_CHUNK = 65536  # rows per assignment chunk (chunks are shared out among ranks)
CHUNK = 1024  # rows per comparison chunk inside a cluster
KEPT_BLOCK = 16384  # kept rows compared at once
TOL = 1e-6
SPLIT_FACTOR = 8
SPLIT_MIN = 8192


@dataclass
class DedupResult:
    """Outcome of :func:`find_duplicates` (identical on every rank)."""

    keep: np.ndarray  # (N,) bool
    rep: np.ndarray  # (N,) int64: the kept representative (itself when kept)
    similarity: np.ndarray  # (N,) float32: similarity to the representative (NaN when kept)
    threshold: float
    clusters: int
    timings: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    home: np.ndarray | None = None  # (N,) int32 cluster of each row
    second: np.ndarray | None = None  # (N,) int32 second-nearest cluster (-1 with one cluster)

    @property
    def dropped(self) -> int:
        return int(self.keep.size - np.count_nonzero(self.keep))

    @property
    def kept_rows(self) -> np.ndarray:
        return np.flatnonzero(self.keep).astype(np.int64)


def near_duplicates(features: Any, threshold: float, clusters: int | None = None, seed: int = 0,
                    device: str | torch.device | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Near-duplicate groups of ``features`` at cosine ``threshold``: ``(keep_mask, rep_index)``.

    ``keep_mask[i]`` is False for a dropped row; ``rep_index[i]`` is the kept row standing for it
    (``i`` itself when kept). See the module docstring for what is guaranteed.
    """
    r = find_duplicates(features, threshold, clusters=clusters, seed=seed, device=device)
    return r.keep, r.rep


# --------------------------------------------------------------------------------------------
# Reading rows
# --------------------------------------------------------------------------------------------

def _read(features: Any, rows: np.ndarray, dev: torch.device) -> torch.Tensor:
    """Normalised float32 rows ``rows`` (sorted) of an array, memmap, tensor or lazy store array."""
    if isinstance(features, torch.Tensor):
        x = features[torch.as_tensor(rows, device=features.device)]
    else:
        x = features[rows]
    return l2_normalize(to_tensor(x, dev))


def _read_range(features: Any, lo: int, hi: int, dev: torch.device) -> torch.Tensor:
    return l2_normalize(to_tensor(features[lo:hi], dev))


@contextlib.contextmanager
def _single_thread() -> Iterator[None]:
    """Run small-matrix work on one intra-op thread (restored afterwards).

    The per-cluster products are small (about 1024 x 1500 x d): a second thread gains little and
    its synchronisation dominates; on a shared machine OpenMP spin-waiting makes it far worse
    (measured on 30,000 x 128 rows with other jobs on the 2 cores: 0.6 s on one thread, 14.5 s
    on two). Parallelism comes from ranks under ``torchrun`` instead.
    """
    before = torch.get_num_threads()
    if before > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if before > 1:
            torch.set_num_threads(before)


def _mine(num: int) -> range:
    """Indices 0..num-1 handled by this rank (round robin)."""
    if not D.active():
        return range(num)
    return range(D.rank(), num, D.world_size())


# --------------------------------------------------------------------------------------------
# Clustering
# --------------------------------------------------------------------------------------------

def _top2(x: torch.Tensor, c: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    s = x @ c.T
    home = torch.argmax(s, dim=1)
    if c.shape[0] == 1:
        return home.cpu().numpy().astype(np.int32), np.full(x.shape[0], -1, dtype=np.int32)
    s[torch.arange(s.shape[0], device=s.device), home] = -float("inf")
    second = torch.argmax(s, dim=1)
    return home.cpu().numpy().astype(np.int32), second.cpu().numpy().astype(np.int32)


def _assign(features: Any, rows: np.ndarray | None, c: torch.Tensor, n: int, dev: torch.device
            ) -> tuple[np.ndarray, np.ndarray]:
    """(home, second) for ``rows`` (all N when None); chunks shared out among ranks."""
    m = n if rows is None else int(rows.size)
    nchunks = -(-m // ASSIGN_CHUNK)
    mine_h, mine_s = [], []
    with torch.inference_mode():
        for k in _mine(nchunks):
            lo, hi = k * ASSIGN_CHUNK, min(m, (k + 1) * ASSIGN_CHUNK)
            x = _read_range(features, lo, hi, dev) if rows is None else _read(features, rows[lo:hi], dev)
            h, s = _top2(x, c)
            mine_h.append(h)
            mine_s.append(s)
    if not D.active():
        h = np.concatenate(mine_h) if mine_h else np.zeros(0, np.int32)
        s = np.concatenate(mine_s) if mine_s else np.zeros(0, np.int32)
        return h, s
    home = np.empty(m, dtype=np.int32)
    second = np.empty(m, dtype=np.int32)
    hs = np.concatenate(mine_h) if mine_h else np.zeros(0, np.int32)
    ss = np.concatenate(mine_s) if mine_s else np.zeros(0, np.int32)
    w = D.world_size()
    for r, (gh, gs) in enumerate(zip(D.all_gather_varlen(hs), D.all_gather_varlen(ss))):
        pos = 0
        for k in range(r, nchunks, w):
            lo, hi = k * ASSIGN_CHUNK, min(m, (k + 1) * ASSIGN_CHUNK)
            home[lo:hi] = gh[pos: pos + hi - lo]
            second[lo:hi] = gs[pos: pos + hi - lo]
            pos += hi - lo
    return home, second


def _fit(features: Any, rows: np.ndarray, k: int, seed: int, dev: torch.device) -> torch.Tensor:
    """Normalised k-means centroids of ``rows`` (a random sample of them), computed on rank 0."""
    k = max(1, min(k, int(rows.size)))
    d = int(features.shape[1])
    if not D.active() or D.rank() == 0:
        rng = np.random.default_rng(seed)
        m = min(int(rows.size), max(8 * k, 4096))
        sample = np.sort(rng.choice(rows, m, replace=False)) if m < rows.size else rows
        x = _read(features, sample, dev)
        with _single_thread():  # k-means++ seeding is k small steps
            c = kmeans(x, clusters=k, seed=seed, iters=10, normalize=False, device=dev, n_init=1)  # buckets, not a fit
    else:
        c = None
    c = D.broadcast_array(c, (k, d), np.float32, src=0)
    return l2_normalize(torch.from_numpy(np.ascontiguousarray(c)).to(dev))


# --------------------------------------------------------------------------------------------
# Pass 1: leader clustering inside a cluster
# --------------------------------------------------------------------------------------------

class _Kept:
    """Growing buffer of kept rows' normalised features (and their pool indices)."""

    def __init__(self, d: int, dev: torch.device):
        self.x = torch.empty((0, d), dtype=torch.float32, device=dev)
        self.rows = np.zeros(0, dtype=np.int64)
        self.n = 0

    def add(self, x: torch.Tensor, rows: np.ndarray) -> None:
        if not rows.size:
            return
        need = self.n + rows.size
        if need > self.x.shape[0]:
            grown = torch.empty((max(need, 2 * self.x.shape[0], 256), self.x.shape[1]), dtype=torch.float32,
                                device=self.x.device)
            grown[: self.n] = self.x[: self.n]
            self.x = grown
        self.x[self.n: need] = x
        self.rows = np.concatenate([self.rows, rows])
        self.n = need

    def first_match(self, q: torch.Tensor, thr: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For each row of ``q``: whether some kept row has sim >= thr, the lowest such, and the sim."""
        b = q.shape[0]
        hit = np.zeros(b, dtype=bool)
        rep = np.full(b, -1, dtype=np.int64)
        sim = np.zeros(b, dtype=np.float32)
        for lo in range(0, self.n, KEPT_BLOCK):
            hi = min(self.n, lo + KEPT_BLOCK)
            s = q @ self.x[lo:hi].T
            h = s >= thr
            anyh = h.any(dim=1).cpu().numpy() & ~hit
            if anyh.any():
                j = torch.argmax(h.to(torch.uint8), dim=1)  # first True: lowest kept index
                jj = j.cpu().numpy()
                sv = s.gather(1, j[:, None])[:, 0].cpu().numpy()
                rep[anyh] = self.rows[lo + jj[anyh]]
                sim[anyh] = sv[anyh]
                hit |= anyh
            if hit.all():
                break
        return hit, rep, sim


def _leader(features: Any, rows: np.ndarray, thr: float, dev: torch.device
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray, _Kept]:
    """Pass 1 on one cluster (``rows`` sorted): the dropped rows, their representatives and sims,
    and the kept members (rows and normalised features)."""
    d = int(features.shape[1])
    kept = _Kept(d, dev)
    out_r, out_rep, out_s = [], [], []
    for lo in range(0, rows.size, CHUNK):
        r = rows[lo: lo + CHUNK]
        q = _read(features, r, dev)
        b = r.size
        if kept.n:
            dropped, rep, sim = kept.first_match(q, thr)
        else:
            dropped, rep, sim = np.zeros(b, bool), np.full(b, -1, np.int64), np.zeros(b, np.float32)
        g = (q @ q.T).cpu().numpy()
        a = np.tril(g >= thr, k=-1)  # a[i, j]: j < i in this chunk is a near-duplicate
        keep = ~dropped
        for i in np.flatnonzero(a.any(axis=1) & keep):
            nb = np.flatnonzero(a[i, :i] & keep[:i])
            if nb.size:
                j = int(nb[0])
                keep[i] = False
                dropped[i] = True
                rep[i] = r[j]
                sim[i] = g[i, j]
        if dropped.any():
            out_r.append(r[dropped])
            out_rep.append(rep[dropped])
            out_s.append(sim[dropped])
        kidx = np.flatnonzero(keep)
        kept.add(q[torch.as_tensor(kidx, device=q.device)], r[kidx])
    return (*_cat3(out_r, out_rep, out_s), kept)


def _cross(features: Any, visitors: np.ndarray, kept: _Kept, dev: torch.device, thr: float
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs (visitor, kept member, sim) with sim >= thr; ``visitors`` sorted pool rows."""
    out_a, out_b, out_s = [], [], []
    if not visitors.size or not kept.n:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    for mlo in range(0, kept.n, KEPT_BLOCK):
        m = kept.rows[mlo: mlo + KEPT_BLOCK]
        xm = kept.x[mlo: mlo + KEPT_BLOCK][: m.size]
        for vlo in range(0, visitors.size, CHUNK):
            v = visitors[vlo: vlo + CHUNK]
            s = _read(features, v, dev) @ xm.T
            ii, jj = torch.nonzero(s >= thr, as_tuple=True)
            if ii.numel():
                out_a.append(v[ii.cpu().numpy()])
                out_b.append(m[jj.cpu().numpy()])
                out_s.append(s[ii, jj].cpu().numpy())
    if not out_a:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    return np.concatenate(out_a), np.concatenate(out_b), np.concatenate(out_s)


def _gather3(a: np.ndarray, b: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if not D.active():
        return a, b, s
    return (np.concatenate(D.all_gather_varlen(a)), np.concatenate(D.all_gather_varlen(b)),
            np.concatenate(D.all_gather_varlen(s)))


def _groups(labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows sorted by label (stable: ascending row within a label) and the label boundaries."""
    order = np.argsort(labels, kind="stable").astype(np.int64)
    bounds = np.searchsorted(labels[order], np.arange(k + 1), side="left")
    return order, bounds


def _schedule(sizes: np.ndarray) -> list[int]:
    """Clusters this rank handles: largest first, dealt round robin."""
    order = np.lexsort((np.arange(sizes.size), -sizes))
    if not D.active():
        return [int(c) for c in order]
    w, me = D.world_size(), D.rank()
    return [int(c) for i, c in enumerate(order) if i % w == me]


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------

def _check_args(features: Any, threshold: float, clusters: int | None) -> tuple[int, int]:
    """Validate the threshold, row count and cluster count; return (rows N, clusters K)."""
    if not (isinstance(threshold, (int, float, np.floating)) and 0.0 < float(threshold) <= 1.0):
        raise MakError(f"dedup threshold must be a cosine similarity in (0, 1], got {threshold}")
    n = int(features.shape[0])
    if n == 0:
        raise MakError("dedup needs at least one row (got 0)")
    k = int(clusters) if clusters is not None else max(1, min(n, int(round(math.sqrt(n)))))
    if k < 1 or k > n:
        raise MakError(f"dedup clusters must be in [1, {n}], got {k}")
    return n, k


def _cluster(features: Any, n: int, k: int, seed: int, dev: torch.device
             ) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Fit K k-means centroids and give every row its nearest (home) and second-nearest cluster."""
    allrows = np.arange(n, dtype=np.int64)
    c = _fit(features, allrows, k, seed, dev) if k > 1 else None
    if c is None:
        home = np.zeros(n, dtype=np.int32)
        second = np.full(n, -1, dtype=np.int32)
        c = torch.zeros((1, int(features.shape[1])), device=dev)
    else:
        home, second = _assign(features, None, c, n, dev)
    return c, home, second


def _split_oversized(features: Any, c: torch.Tensor, home: np.ndarray, second: np.ndarray, n: int,
                     seed: int, dev: torch.device) -> tuple[torch.Tensor, int]:
    """Split oversized clusters (up to 3 rounds), re-assigning home and second in place; (centroids, splits)."""
    splits = 0
    for rnd in range(3):
        kc = int(c.shape[0])
        sizes = np.bincount(home, minlength=kc)
        mean = max(1, -(-n // kc))
        big = np.flatnonzero(sizes > max(SPLIT_MIN, SPLIT_FACTOR * mean))
        if not big.size:
            break
        c_new, extra, done = c.clone(), [], []
        for p in big:
            members = np.flatnonzero(home == p).astype(np.int64)
            sub = _fit(features, members, int(-(-sizes[p] // mean)), seed + 7919 * (rnd + 1) + int(p), dev)
            g = sub @ sub.T
            if sub.shape[0] < 2 or float(g.min()) > 1.0 - 1e-6:
                continue  # copies of one vector: k-means cannot split them (and they are cheap)
            c_new[p] = sub[0]
            extra.append(sub[1:])
            done.append(int(p))
        if not done:
            break
        c = torch.cat([c_new] + extra)
        affected = np.flatnonzero(np.isin(home, done) | np.isin(second, done)).astype(np.int64)
        h, s2 = _assign(features, affected, c, n, dev)
        home[affected], second[affected] = h, s2
        splits += len(done)
    return c, splits


def _pass_within(features: Any, home: np.ndarray, second: np.ndarray, k_final: int, thr: float,
                 dev: torch.device, progress: bool
                 ) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], tuple[list, list, list]]:
    """Pass 1 on this rank's clusters: gathered (dropped, rep, sim) and this rank's boundary pair lists."""
    # one read of each cluster: leaders among its members, then rows whose second cluster is
    # this one against its kept members
    order, bounds = _groups(home, k_final)
    vorder, vbounds = _groups(np.where(second < 0, k_final, second), k_final + 1)
    sizes = np.diff(bounds)
    mine = _schedule(sizes)
    from mak.progress import bar as progress_bar

    bar = progress_bar(len(mine), "dedup", unit="cluster", enabled=progress)
    pr, prep, ps = [], [], []
    ea, eb, es = [], [], []
    with torch.inference_mode(), _single_thread():
        for cl in mine:
            rows = order[bounds[cl]: bounds[cl + 1]]
            if not rows.size:
                bar.update(1)
                continue
            a, b, s, kept = _leader(features, rows, thr, dev)
            pr.append(a)
            prep.append(b)
            ps.append(s)
            if k_final > 1:
                x, y, z = _cross(features, vorder[vbounds[cl]: vbounds[cl + 1]], kept, dev, thr)
                ea.append(x)
                eb.append(y)
                es.append(z)
            bar.update(1)
    bar.close()
    return _gather3(*_cat3(pr, prep, ps)), (ea, eb, es)


def _resolve_pairs(x: np.ndarray, y: np.ndarray, z: np.ndarray, keep: np.ndarray, rep: np.ndarray,
                   sim: np.ndarray) -> int:
    """Drop the higher row of each pair whose lower row stays kept, in index order; the count dropped."""
    moved = 0
    lo, hi = np.minimum(x, y), np.maximum(x, y)
    o = np.lexsort((lo, hi))
    lo, hi, z = lo[o], hi[o], z[o]
    starts = np.flatnonzero(np.r_[True, hi[1:] != hi[:-1]])
    ends = np.r_[starts[1:], hi.size]
    for s0, e0 in zip(starts, ends):
        h = int(hi[s0])
        if not keep[h]:
            continue
        ok = np.flatnonzero(keep[lo[s0:e0]])
        if ok.size:
            j = s0 + int(ok[0])  # lo sorted ascending within the group: lowest kept index
            keep[h] = False
            rep[h] = lo[j]
            sim[h] = z[j]
            moved += 1
    return moved


def _repoint(features: Any, keep: np.ndarray, rep: np.ndarray, sim: np.ndarray, dev: torch.device) -> int:
    """Point dropped rows whose representative is dropped at that one's representative; the count."""
    stale = np.flatnonzero(~keep & ~keep[rep])
    if stale.size:
        rep[stale] = rep[rep[stale]]
        with torch.inference_mode():
            xa = _read_rows_any(features, stale, dev)
            xb = _read_rows_any(features, rep[stale], dev)
            sim[stale] = (xa * xb).sum(dim=1).cpu().numpy()
    return int(stale.size)


def _pass_across(features: Any, pairs: tuple[list, list, list], keep: np.ndarray, rep: np.ndarray,
                 sim: np.ndarray, info: dict[str, Any], dev: torch.device) -> None:
    """Pass 2: resolve boundary pairs between rows still kept, updating keep/rep/sim/info in place."""
    x, y, z = _gather3(*_cat3(*pairs))
    moved = 0
    both = keep[x] & keep[y] if x.size else np.zeros(0, dtype=bool)
    x, y, z = x[both], y[both], z[both]
    info["boundary_pairs"] = int(x.size)
    if x.size:
        moved = _resolve_pairs(x, y, z, keep, rep, sim)
        info["repointed"] = _repoint(features, keep, rep, sim, dev)
    info["dropped_across_clusters"] = moved


def find_duplicates(features: Any, threshold: float, clusters: int | None = None, seed: int = 0,
                    device: str | torch.device | None = None, progress: bool = False) -> DedupResult:
    """Find near-duplicates of the (N x D) ``features`` at cosine similarity ``threshold``.

    ``features``: numpy array, memmap, tensor or lazy store array (streamed, never loaded whole).
    ``clusters``: k-means clusters (default ``round(sqrt(N))``). Under ``torchrun`` every rank
    must call it with the same arguments; all get the same result.
    """
    n, k = _check_args(features, threshold, clusters)
    dev = resolve_device(device, features)
    thr = float(threshold) - TOL
    timings: dict[str, float] = {}
    info: dict[str, Any] = {}

    t = time.perf_counter()
    c, home, second = _cluster(features, n, k, seed, dev)
    timings["cluster"] = time.perf_counter() - t

    t = time.perf_counter()
    c, info["splits"] = _split_oversized(features, c, home, second, n, seed, dev)
    k_final = int(c.shape[0])
    timings["split"] = time.perf_counter() - t

    t = time.perf_counter()
    keep = np.ones(n, dtype=bool)
    rep = np.arange(n, dtype=np.int64)
    sim = np.full(n, np.nan, dtype=np.float32)
    (a, b, s), pairs = _pass_within(features, home, second, k_final, thr, dev, progress)
    keep[a] = False
    rep[a] = b
    sim[a] = s
    info["dropped_within_clusters"] = int(a.size)
    timings["within"] = time.perf_counter() - t

    t = time.perf_counter()
    _pass_across(features, pairs, keep, rep, sim, info, dev)
    timings["across"] = time.perf_counter() - t
    return DedupResult(keep, rep, sim, float(threshold), k_final, timings, info, home, second)


def _cat3(a: list, b: list, s: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if not a:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    return (np.concatenate(a).astype(np.int64), np.concatenate(b).astype(np.int64),
            np.concatenate(s).astype(np.float32))


def _read_rows_any(features: Any, rows: np.ndarray, dev: torch.device) -> torch.Tensor:
    """Normalised rows in any order (read sorted, then put back in the asked order)."""
    order = np.argsort(rows, kind="stable")
    x = _read(features, rows[order], dev)
    out = torch.empty_like(x)
    out[torch.as_tensor(order, device=x.device)] = x
    return out


__all__ = ["DedupResult", "find_duplicates", "near_duplicates"]
