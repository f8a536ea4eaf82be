"""The ``robust`` strategy: MAK's selection, kept in-domain and tail-seeking on a junk-heavy pool.

MAK's score ``alpha*z(ECLE) - (1-alpha)*z(distance)`` over the whole pool cancels on a web pool
(out-of-domain images have both a high ECLE and a high distance), so junk gets in about as often as
with random sampling. ``robust`` keeps MAK's pipeline (score -> candidates -> greedy k-center seeded
with the seed set) and changes the parts below, each an option of ``mak select``. The design and
the measurements behind each default: ``docs/robust.md``.

Features: ``robust`` should score features of a *pool-aware* model (SimCLR on the seed plus a
uniform sample of the pool), which ``mak run`` trains for it (``pretrain.pool_mix``). On a store
whose ``meta.json`` names a seed-only model, :func:`mak.select_stores.model_note` resolves
``gate_quantile`` auto to 0.98 before the strategy runs; plain arrays are taken as pool-aware.

1. Gate (``gate``, ``gate_score``, ``gate_quantile``): terms joined by ``+``, a pool image must pass
   every one. Each term is computed held out for every seed image, and those values set its
   threshold (no labels, nothing fitted to the pool). Quantiles: ``np.quantile``, linear.
   * ``centroid`` (:func:`seed_gate`): cosine distance to k-means centroids of the seed
     (``gate_clusters`` auto: :func:`auto_gate_clusters`). Folds: ``np.random.default_rng(seed)
     .permutation(M)`` cut by ``np.array_split`` into ``gate_folds``; fold f is scored against
     ``kmeans(seed minus fold f, seed=seed)``. Rejected when strictly above the ``gate_quantile``
     quantile of the held-out distances.
   * ``share`` (:func:`seed_share`, :func:`share_gate`): the fraction of seed images among the
     ``share_k`` nearest neighbours in seed + pool reference (``share_reference`` auto =
     max(10 M, 10,000) rows, a uniform sample of a larger pool); leave-one-out for seed images.
     Rejected when strictly below the ``1 - gate_quantile`` quantile of the held-out shares.
   * ``ratio`` (:mod:`mak.density_ratio`): the classifier logit of the tail (3.), seed images scored
     by the fold models that never saw them; rejected below the ``1 - gate_quantile`` quantile.
   Default ``centroid+share+ratio`` at ``gate_quantile="auto"`` = min(0.998, 1 - 5/M), M the seed
   size (:func:`auto_gate_quantile`); with the gate on, a seed of 5 images or fewer is an error.
2. Fusion (``fusion``). ``rank`` (default): score = percentile of the tail over the gated pool,
   ``(r - 0.5) / n`` with mid-ranks for ties (:func:`rank_normalize`), no distance term. ``z``:
   ``alpha*z(tail) - (1-alpha)*z(centroid distance)``, z-scores over the gated pool (the whole pool
   with the gate off), as ``mak``. Rows outside the gate get a NaN percentile and a score of -inf.
3. Tail (``tail``). ``ratio`` (default): a *low* logit of a seed-vs-pool MLP (``ratio_hidden``,
   ``ratio_epochs``), cross-fitted over ``ratio_folds`` folds of the pool reference and of the seed
   (no image is scored by a model trained on it) and bagged: the logit, for gate and tail alike, is
   the mean of ``ratio_bags`` (default 5) independent cross-fitted fits
   (:func:`mak.density_ratio.ratio_ensemble`). ``ecle``: a high ECLE (the pool store needs views).
   Each classifier fit and scoring pass runs on one intra-op thread, several at once, so the
   selection is bit-identical for any thread count and under torchrun.
4. Candidates: the top ``ceil(gate_core_ratio * budget)`` gated images by score (default 1.0; with
   the gate off, mak's ``core_ratio``); greedy k-center over them with the seed features as initial
   centers picks the budget. Fewer gated images than the budget: all of them, best first, then the
   rejected ones with the lowest gate score; ``gate_filled`` and ``note`` in the info say so.

``gate="off", tail="ecle", fusion="z"`` reproduces ``mak`` exactly: same scores, candidates, indices.

Info (-> summary.json): ``gate_rejected``, ``gate_kept``, ``gate_filled``, ``gate`` (score,
threshold, quantile, parameters, and ``histogram``: shared ``edges`` with the counts of the
held-out seed scores ``seed_heldout`` and of the pool's ``pool``), ``robust`` (effective settings).

Distributed contexts: the strategy calls only context methods for operations over the whole pool
(``ctx.distance``, ``ctx.ecle``, ``ctx.zscore``, ``ctx.top_k``, ``ctx.kcenter``) and the five of
:class:`RobustOps` (``rank_normalize``, ``masked_zscore``, ``count``, ``extent``, ``histogram``). A
context whose score vectors hold only its own rows must inherit :class:`RobustOps` and override all
five with global versions; one that overrides Context's global operations without being a
:class:`RobustOps` is refused. Everything else is per pool row (of ``ctx.pool_features``, which such
a context sets to its own rows) or per replicated seed; ``scores.csv`` is byte-identical across 1, 2
and 3 processes (tested).
"""
from __future__ import annotations

import math
import time
from functools import cached_property
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from . import options as opts
from ._tensor import l2_normalize, resolve_device, to_tensor, zscore
from .density_ratio import fold_parts, ratio_ensemble, ratio_logits, seed_heldout_logits
from .errors import MakError
from .proximity import kmeans, nearest_centroid_distance
from .selection import Context, Selection, mak_score, register_strategy

GATE_TERMS = ("centroid", "share", "ratio")
TAILS = ("ratio", "ecle")
FUSIONS = ("rank", "z")
GATE_QUANTILE_MAX = 0.998  # gate_quantile auto = min(this, 1 - GATE_TAIL_IMAGES / seed size)
GATE_TAIL_IMAGES = 5
HIST_BINS = 50
CHUNK = 4096


def _gate_score(name: str, value: Any) -> str:
    """Gate terms of ``GATE_TERMS`` joined by '+', each at most once, kept in the order given."""
    terms = str(value).split("+")
    if any(t not in GATE_TERMS for t in terms) or len(set(terms)) != len(terms):
        raise opts.ParameterError(name, f"{name}={value!r} must be terms of {', '.join(GATE_TERMS)} joined by '+' "
                                        "(e.g. centroid+share+ratio)")
    return "+".join(terms)


OPTIONS: tuple[opts.Option, ...] = (
    opts.Option("gate", True, "reject pool images beyond the seed-calibrated in-domain gate: on or off (default on)",
                opts.switch, "on|off"),
    opts.Option("gate_quantile", "auto", "gate threshold = this quantile of the held-out seed images' gate scores, "
                "in (0, 1], or auto = min(0.998, 1 - 5 / seed size) (default auto)",
                opts.or_auto(opts.number(0.0, 1.0)), "Q"),
    opts.Option("gate_score", "centroid+share+ratio", "gate terms joined by '+', each calibrated on the held-out "
                "seed, all required: centroid (distance to the seed's centroids), share (seed share of the k-NN in "
                "seed + pool), ratio (seed-vs-pool classifier logit) (default centroid+share+ratio)",
                _gate_score, "TERMS"),
    opts.Option("gate_folds", 5, "seed folds of the held-out centroid distances (default 5)", opts.integer(2), "F"),
    opts.Option("gate_clusters", "auto", "k-means centroids of the centroid gate, or auto = max(--clusters, "
                "sqrt(seed size / 2)) (default auto)", opts.or_auto(opts.integer(1)), "K"),
    opts.Option("gate_core_ratio", 1.0, "candidates = this x budget of the gated pool before k-center (default 1; "
                "--core-ratio applies with --gate off)", opts.number(0.0), "R"),
    opts.Option("share_k", 50, "neighbours (in seed + pool reference) of the seed-share gate (default 50)",
                opts.integer(1), "K"),
    opts.Option("share_reference", "auto", "pool rows the seed share and the classifier compare against (a uniform "
                "sample of a larger pool); auto = max(10 x seed size, 10000)", opts.or_auto(opts.integer(1)), "N"),
    opts.Option("tail", "ratio", "tail score: ratio (a low seed-vs-pool classifier logit) or ecle (MAK's "
                "tailness) (default ratio)", opts.choice(*TAILS), "|".join(TAILS), TAILS),
    opts.Option("fusion", "rank", "rank: score = the tail's percentile over the gated pool; z: the paper's "
                "alpha*z(tail) - (1-alpha)*z(distance) (default rank)", opts.choice(*FUSIONS), "|".join(FUSIONS),
                FUSIONS),
    opts.Option("ratio_bags", 5, "independent cross-fitted fits of the classifier whose logits are averaged "
                "(default 5)", opts.integer(1), "B"),
    opts.Option("ratio_folds", 5, "cross-fitting folds of the seed-vs-pool classifier (default 5)",
                opts.integer(2), "F"),
    opts.Option("ratio_hidden", 256, "hidden units of the classifier (default 256)", opts.integer(1), "H"),
    opts.Option("ratio_epochs", 60, "training epochs of the classifier over seed + pool reference (default 60)",
                opts.integer(1), "E"),
)
DEFAULTS: dict[str, Any] = opts.defaults(OPTIONS)


def robust_options(options: dict[str, Any]) -> dict[str, Any]:
    """The effective robust settings: :data:`DEFAULTS` updated with ``options``, validated.

    An option robust does not declare raises :class:`~mak.options.ParameterError` naming it.
    """
    return opts.resolve(OPTIONS, options, "strategy 'robust'")


# --------------------------------------------------------------------------------------------
# The parts, usable alone
# --------------------------------------------------------------------------------------------

def _check_quantile(q: float) -> None:
    opts.number(0.0, 1.0)("quantile", q)


def heldout_distances(seed_features: Any, clusters: int = 10, folds: int = 5, seed: int = 0,
                      device: str | torch.device | None = None) -> np.ndarray:
    """Each seed image's cosine distance to k-means centroids fitted on the other folds. (M,) float32."""
    m = int(seed_features.shape[0])
    if folds < 2:
        raise MakError(f"gate folds must be >= 2, got {folds}")
    if folds > m:
        raise MakError(f"gate folds ({folds}) is larger than the seed set ({m} images)")
    parts = fold_parts(m, folds, seed)
    smallest_train = m - max(len(p) for p in parts)
    if clusters > smallest_train:
        raise MakError(f"clusters ({clusters}) is larger than a gate training fold ({smallest_train} seed images); "
                       f"use fewer clusters or fewer --gate-folds")
    out = np.empty(m, dtype=np.float32)
    for held in parts:
        train = np.setdiff1d(np.arange(m, dtype=np.int64), held, assume_unique=True)
        centroids = kmeans(seed_features[train], clusters=clusters, seed=seed, device=device)
        out[held] = nearest_centroid_distance(seed_features[held], centroids, device=device)
    return out


def seed_gate(seed_features: Any, clusters: int = 10, quantile: float = 0.99, folds: int = 5, seed: int = 0,
              device: str | torch.device | None = None) -> tuple[float, np.ndarray]:
    """The in-domain gate's threshold: (``quantile`` of the held-out seed distances, those distances).

    A pool image whose distance to the full seed's centroids (:func:`mak.proximity`) is greater
    than the threshold is out of domain. ``np.quantile`` default (linear) interpolation.
    """
    _check_quantile(quantile)
    held = heldout_distances(seed_features, clusters=clusters, folds=folds, seed=seed, device=device)
    return float(np.quantile(held.astype(np.float64), quantile)), held


def knn_chunks(queries: Any, seed_features: Any, k: int, exclude_self: bool = False,
               device: str | torch.device | None = None, chunk: int = CHUNK, self_index: np.ndarray | None = None
               ) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
    """The ``k`` nearest seed images of each query row, one query chunk at a time.

    Yields ``(lo, hi, sim, idx)``: cosine similarities (hi-lo, k), largest first, and the seed
    indices they belong to. A running top-k per query row is merged with each seed chunk by
    ``torch.topk``, so memory is O(chunk x (chunk + k)) beyond what the caller keeps.
    ``exclude_self``: the queries are the seed itself and row i never matches seed image i
    (leave-one-out; an exact duplicate elsewhere in the seed still counts). ``self_index``
    generalises it: query row i never matches seed row ``self_index[i]`` (-1: nothing excluded).
    """
    m = int(seed_features.shape[0])
    n = int(queries.shape[0])
    if exclude_self:
        self_index = np.arange(n, dtype=np.int64)
    excl = None if self_index is None else np.asarray(self_index, dtype=np.int64)
    exclude_self = excl is not None and bool((excl >= 0).any())
    if k < 1:
        raise MakError(f"knn k must be >= 1, got {k}")
    if k > m - int(exclude_self):
        less = ", less the image itself" if exclude_self else ""
        raise MakError(f"knn k ({k}) is larger than the seed set ({m} images{less})")
    if seed_features.shape[1] != queries.shape[1]:
        raise MakError(f"seed feature dimension {seed_features.shape[1]} differs from pool's {queries.shape[1]}")
    dev = resolve_device(device, queries)
    excl_t = torch.from_numpy(excl).to(dev) if exclude_self else None
    resident = m <= 8 * chunk  # a small seed stays on the device; a big one is re-streamed per query chunk
    seed_chunks = [l2_normalize(to_tensor(seed_features[lo : lo + chunk], dev)) for lo in range(0, m, chunk)] \
        if resident else None
    with torch.inference_mode():
        for qlo in range(0, n, chunk):
            q = l2_normalize(to_tensor(queries[qlo : qlo + chunk], dev))
            best = torch.empty((q.shape[0], 0), device=dev)
            best_idx = torch.empty((q.shape[0], 0), dtype=torch.long, device=dev)
            for i, slo in enumerate(range(0, m, chunk)):
                s = seed_chunks[i] if resident else l2_normalize(to_tensor(seed_features[slo : slo + chunk], dev))
                sim = q @ s.T
                if exclude_self:
                    cols = excl_t[qlo: qlo + q.shape[0]] - slo
                    hit = (cols >= 0) & (cols < s.shape[0])
                    sim[hit.nonzero().flatten(), cols[hit]] = -float("inf")
                cand = torch.cat([best, sim], dim=1)
                cols_idx = torch.arange(slo, slo + s.shape[0], device=dev).expand(q.shape[0], -1)
                cand_idx = torch.cat([best_idx, cols_idx], dim=1)
                best, pos = torch.topk(cand, min(k, cand.shape[1]), dim=1, largest=True, sorted=True)
                best_idx = torch.gather(cand_idx, 1, pos)
            yield qlo, qlo + q.shape[0], best, best_idx



def share_reference_size(option: Any, seed_size: int) -> int:
    """Pool rows in the seed-share reference: ``auto`` = max(10 x seed size, 10,000), else the integer."""
    if option == "auto":
        return max(10 * int(seed_size), 10_000)
    return int(option)


def share_bank(seed_features: Any, reference: Any) -> np.ndarray:
    """Seed rows then reference rows, float32: what :func:`seed_share` searches (build it once per pool)."""
    return np.concatenate([np.asarray(seed_features, dtype=np.float32), np.asarray(reference, dtype=np.float32)])


def seed_share(queries: Any, seed_features: Any, reference: Any, k: int = 50,
               self_index: np.ndarray | None = None, device: str | torch.device | None = None,
               chunk: int = CHUNK, *, bank: np.ndarray | None = None) -> np.ndarray:
    """Fraction of seed images among each query's ``k`` nearest neighbours in seed + reference. (n,) float32.

    ``reference`` is the pool (or a uniform sample of it). A label-free density ratio: about
    ``k * p_seed / (p_seed + c * p_pool)``, high where the seed is dense, low in the seed's sparse
    tail, and ~0 where the seed has no support at all (out-of-domain images). ``self_index[i]``
    is the row of seed + reference that query ``i`` itself occupies (-1: none), never counted
    as its own neighbour. Memory O(n + chunk x (chunk + k)) beyond the bank (seed + reference);
    pass ``bank`` (:func:`share_bank`) to reuse one across calls.
    """
    m = int(seed_features.shape[0])
    if bank is None:
        bank = share_bank(seed_features, reference)
    if k > bank.shape[0] - 1:
        raise MakError(f"share k ({k}) is larger than the seed plus the pool reference ({bank.shape[0]} images, "
                       "less the image itself)")
    out = np.empty(int(queries.shape[0]), dtype=np.float32)
    for lo, hi, _, idx in knn_chunks(queries, bank, k, device=device, chunk=chunk, self_index=self_index):
        out[lo:hi] = (idx < m).sum(dim=1).cpu().numpy().astype(np.float32) / np.float32(k)
    return out


def share_gate(seed_features: Any, reference: Any, k: int = 50, quantile: float = 0.98,
               device: str | torch.device | None = None, *, bank: np.ndarray | None = None
               ) -> tuple[float, np.ndarray]:
    """The seed-share gate: (threshold, held-out seed shares (M,)).

    Each seed image's share is computed leave-one-out against seed + reference; the threshold is
    their ``1 - quantile`` quantile (``np.quantile``, linear). Pool images with a share strictly
    below it are rejected: the seed itself says how little seed support an in-domain image can have.
    """
    _check_quantile(quantile)
    m = int(seed_features.shape[0])
    held = seed_share(seed_features, seed_features, reference, k=k, self_index=np.arange(m, dtype=np.int64),
                      device=device, bank=bank)
    return float(np.quantile(held.astype(np.float64), 1.0 - quantile)), held


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


# --------------------------------------------------------------------------------------------
# Global operations (overridden by a distributed context)
# --------------------------------------------------------------------------------------------

class RobustOps:
    """Operations over the whole pool that ``robust`` needs beyond :class:`~mak.selection.Context`'s.

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
                       f"mak.robust.RobustOps (rank_normalize, masked_zscore, count, extent, histogram)")
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


def auto_gate_quantile(seed_size: int) -> float:
    """``gate_quantile='auto'``: min(0.998, 1 - 5 / M), so each gate term's threshold lies beyond at least
    5 held-out seed images (an extreme quantile of fewer is mostly noise: with M = 620, q0.998 is the
    second-lowest value)."""
    return min(GATE_QUANTILE_MAX, 1.0 - GATE_TAIL_IMAGES / max(int(seed_size), 1))


def auto_gate_clusters(clusters: int, seed_size: int, folds: int = 5) -> int:
    """``gate_clusters='auto'``: max(clusters, round(sqrt(M / 2))), capped by the smallest training fold."""
    smallest_train = seed_size - math.ceil(seed_size / folds)
    return max(1, min(max(int(clusters), round(math.sqrt(seed_size / 2.0))), smallest_train))


def _histograms(o: RobustOps, heldout: np.ndarray, pool_distance: np.ndarray, threshold: float,
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


# --------------------------------------------------------------------------------------------
# The strategy
# --------------------------------------------------------------------------------------------

class RobustRun:
    """One ``robust`` selection on a context: each score is computed once, on first use, and timed."""

    def __init__(self, ctx: Context) -> None:
        self.ctx, self.o = ctx, ops(ctx)
        self.opt = robust_options(ctx.options)
        self.seed_feats = ctx.need_seed()
        if self.opt["gate_quantile"] == "auto":
            m = int(self.seed_feats.shape[0])
            if self.opt["gate"] and m <= GATE_TAIL_IMAGES:
                raise MakError(f"the robust gate's --gate-quantile auto needs more than {GATE_TAIL_IMAGES} seed "
                               f"images (got {m}); pass --gate-quantile Q or --gate off")
            self.opt["gate_quantile"] = auto_gate_quantile(m)
        self.distance = ctx.distance()
        self.info: dict[str, Any] = {"robust": dict(self.opt)}

    @cached_property
    def reference(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(reference pool rows, their features, each of this process's pool rows' reference position or -1)."""
        ctx = self.ctx
        n_ref = share_reference_size(self.opt["share_reference"], int(self.seed_feats.shape[0]))
        rows = np.arange(ctx.pool_size, dtype=np.int64) if n_ref >= ctx.pool_size \
            else np.sort(ctx.random_subset(n_ref))
        everything = getattr(ctx, "global_features", ctx.pool_features)  # a distributed context's whole pool
        features = np.asarray(everything[rows], dtype=np.float32)
        lo, hi = getattr(ctx, "local_rows", (0, ctx.pool_size))
        own = np.arange(lo, hi, dtype=np.int64)
        pos = np.minimum(np.searchsorted(rows, own), len(rows) - 1)
        return rows, features, np.where(rows[pos] == own, pos, -1)

    @cached_property
    def ratio(self) -> tuple[np.ndarray, np.ndarray]:
        """(each pool row's cross-fitted seed-vs-pool logit, the held-out seed logits)."""
        t, opt = time.perf_counter(), self.opt
        _, reference, position = self.reference
        models = ratio_ensemble(self.seed_feats, reference, bags=opt["ratio_bags"], folds=opt["ratio_folds"],
                                hidden=opt["ratio_hidden"], epochs=opt["ratio_epochs"], seed=self.ctx.seed,
                                device=self.ctx.device)
        pool = ratio_logits(self.ctx.pool_features, self.seed_feats, reference, self_index=position, models=models)
        held = seed_heldout_logits(self.seed_feats, models)
        self.info["ratio"] = {"reference": len(reference), "folds": opt["ratio_folds"], "hidden": opt["ratio_hidden"],
                              "epochs": opt["ratio_epochs"], "bags": opt["ratio_bags"]}
        self.ctx.timings["ratio"] = time.perf_counter() - t
        return pool, held

    @cached_property
    def share(self) -> tuple[np.ndarray, float, np.ndarray]:
        """(each pool row's seed share, the gate's threshold, the held-out seed shares)."""
        t = time.perf_counter()
        _, reference, position = self.reference
        self_index = np.where(position >= 0, int(self.seed_feats.shape[0]) + position, -1)
        bank = share_bank(self.seed_feats, reference)
        k = self.opt["share_k"]
        thr, held = share_gate(self.seed_feats, reference, k=k, quantile=self.opt["gate_quantile"],
                               device=self.ctx.device, bank=bank)
        pool = seed_share(self.ctx.pool_features, self.seed_feats, reference, k=k, self_index=self_index,
                          device=self.ctx.device, bank=bank)
        self.ctx.timings["share"] = time.perf_counter() - t
        return pool, thr, held

    def gate_term(self, term: str) -> tuple[np.ndarray, float, np.ndarray, dict[str, Any]]:
        """(pool value, threshold, held-out seed values, parameters), oriented so that value > threshold = out."""
        return {"share": self._share_term, "ratio": self._ratio_term, "centroid": self._centroid_term}[term]()

    def _share_term(self) -> tuple[np.ndarray, float, np.ndarray, dict[str, Any]]:
        share, thr, held = self.share
        q, k, n_ref = self.opt["gate_quantile"], self.opt["share_k"], len(self.reference[0])
        self.info["seed_share"] = {"threshold": thr, "quantile": 1.0 - q, "k": k, "reference": n_ref,
                                   "rejected": self.ctx.pool_size - self.o.count(share >= thr),
                                   "histogram": _histograms(self.o, held, share, thr)}
        if thr <= 0.0:
            self.info["seed_share"]["note"] = (f"the seed-share gate rejects nothing: over {100 * (1 - q):g}% of seed "
                                               f"images have no seed neighbour among their {k}; raise --share-k "
                                               "or lower --gate-quantile")
        return -share, -thr, -held, {"k": k, "reference": n_ref}

    def _ratio_term(self) -> tuple[np.ndarray, float, np.ndarray, dict[str, Any]]:
        logit, held = self.ratio
        q = self.opt["gate_quantile"]
        thr = float(np.quantile(held.astype(np.float64), 1.0 - q))
        self.info["seed_ratio"] = {"threshold": thr, "quantile": 1.0 - q,
                                   "rejected": self.ctx.pool_size - self.o.count(logit >= thr),
                                   "histogram": _histograms(self.o, held, logit, thr)}
        return -logit, -thr, -held, {"folds": self.opt["ratio_folds"]}

    def _centroid_term(self) -> tuple[np.ndarray, float, np.ndarray, dict[str, Any]]:
        ctx, opt = self.ctx, self.opt
        gk = opt["gate_clusters"]
        gk = auto_gate_clusters(ctx.clusters, int(self.seed_feats.shape[0]), opt["gate_folds"]) if gk == "auto" \
            else int(gk)
        thr, held = seed_gate(self.seed_feats, clusters=gk, quantile=opt["gate_quantile"], folds=opt["gate_folds"],
                              seed=ctx.seed, device=ctx.device)
        if gk == ctx.clusters:
            value = self.distance
        else:  # per pool row: no global operation (the seed and its centroids are the same on every rank)
            centroids = kmeans(self.seed_feats, clusters=gk, seed=ctx.seed, device=ctx.device)
            value = nearest_centroid_distance(ctx.pool_features, centroids, device=ctx.device)
        self.info["robust"]["gate_clusters"] = gk
        return np.asarray(value), thr, held, {"clusters": gk, "folds": opt["gate_folds"]}

    def gate(self) -> tuple[np.ndarray | None, int, np.ndarray | None]:
        """(mask of the pool rows every gate term keeps or None with the gate off, kept count, primary term value).

        The primary term (the report's histogram, the fill order) is the centroid term when the gate
        has one, else the first; every term rejects what lies beyond its own threshold.
        """
        if not self.opt["gate"]:
            return None, self.ctx.pool_size, None
        t = time.perf_counter()
        terms = self.opt["gate_score"].split("+")
        primary = "centroid" if "centroid" in terms else terms[0]
        mask = None
        for term in terms:
            value, thr, held_t, params_t = self.gate_term(term)
            mask = value <= thr if mask is None else mask & (value <= thr)
            if term == primary:
                gate_value, threshold, held, params = value, thr, held_t, params_t
        n_gated = self.o.count(mask)
        self.ctx.timings["gate"] = time.perf_counter() - t
        rejected = self.ctx.pool_size - n_gated
        self.info.update(gate_rejected=rejected, gate_kept=n_gated)
        self.info["gate"] = {"score": self.opt["gate_score"], "threshold": threshold,
                             "quantile": self.opt["gate_quantile"], **params, "rejected": rejected, "kept": n_gated,
                             "histogram": _histograms(self.o, held, gate_value, threshold)}
        return mask, n_gated, gate_value

    def tail(self) -> np.ndarray:
        """The tail score, high = tail: ECLE, or the negated classifier logit (the pool has more of it)."""
        if self.opt["tail"] == "ecle":
            return self.ctx.ecle()
        return -self.ratio[0].astype(np.float64)

    def score(self, mask: np.ndarray | None) -> np.ndarray:
        """rank fusion: the tail's percentile over the gated pool; z: MAK's score (with the centroid distance)."""
        tail, ctx = self.tail(), self.ctx
        if self.opt["fusion"] == "z" and mask is None:
            return mak_score(ctx, tail, self.distance, ctx.alpha)  # exactly the paper's score
        distance = self.distance if self.opt["fusion"] == "z" else None
        return fuse(self.o, [tail], distance, ctx.alpha, mask, self.opt["fusion"])

    def select(self) -> Selection:
        ctx = self.ctx
        mask, n_gated, gate_value = self.gate()
        score = self.score(mask)
        budget = ctx.budget
        if n_gated < budget:  # too few in-domain images: take them all, then the least-distant rejected ones
            need = budget - n_gated
            fill_key = np.where(mask, np.inf, np.asarray(gate_value, dtype=np.float64))
            picks = cand = np.concatenate([ctx.top_k(score, n_gated), ctx.top_k(fill_key, need, largest=False)])
            self.info["gate_filled"] = int(need)
            self.info["note"] = (f"only {n_gated} pool images pass the gate for a budget of {budget}: "
                                 f"filled with the {need} least-distant rejected ones")
        else:
            ratio = self.opt["gate_core_ratio"] if mask is not None else ctx.core_ratio
            n_cand = min(n_gated, math.ceil(ratio * budget))
            if n_cand <= budget:
                picks = cand = ctx.top_k(score, budget)
            else:
                cand = ctx.top_k(score, n_cand)
                picks = ctx.kcenter(cand, budget, init=self.seed_feats)
            if mask is not None:
                self.info["gate_filled"] = 0
        ecle = ctx.ecle() if self.opt["tail"] == "ecle" else None
        return Selection(np.asarray(picks, dtype=np.int64), "robust", ecle=ecle, distance=self.distance, score=score,
                         candidates=np.asarray(cand, dtype=np.int64), info=self.info)


def robust_select(ctx: Context) -> Selection:
    """The ``robust`` strategy on a context (see the module docstring)."""
    return RobustRun(ctx).select()


register_strategy("robust", needs_seed=True, needs_views=lambda options: robust_options(options)["tail"] == "ecle",
                  options=OPTIONS)(robust_select)

__all__ = [
    "DEFAULTS",
    "OPTIONS",
    "RobustContext",
    "RobustOps",
    "RobustRun",
    "auto_gate_clusters",
    "auto_gate_quantile",
    "fuse",
    "heldout_distances",
    "knn_chunks",
    "masked_zscore",
    "ops",
    "rank_fusion",
    "rank_normalize",
    "robust_options",
    "robust_select",
    "seed_gate",
    "seed_share",
    "share_bank",
    "share_gate",
    "share_reference_size",
]
