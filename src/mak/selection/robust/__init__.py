"""The ``robust`` strategy: MAK's selection, kept in-domain and tail-seeking on a junk-heavy pool.

MAK's score ``alpha*z(ECLE) - (1-alpha)*z(distance)`` over the whole pool cancels on a web pool
(out-of-domain images have both a high ECLE and a high distance), so junk gets in about as often as
with random sampling. ``robust`` keeps MAK's pipeline (score -> candidates -> greedy k-center seeded
with the seed set) and changes the parts below, each an option of ``mak select``. The design and
the measurements behind each default: ``docs/robust.md``.

Features: ``robust`` should score features of a *pool-aware* model (SimCLR on the seed plus a
uniform sample of the pool), which ``mak run`` trains for it (``pretrain.pool_mix``). On features
of any other model, :func:`seed_model_note` resolves ``gate_quantile`` auto before the strategy
runs: 0.98 for a seed-only model, 0.99 for an external one (arrays, ``mak store import``, a store
without ``meta.json``).

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
   * ``ratio`` (:mod:`mak.selection.robust.density_ratio`): the classifier logit of the tail (3.), seed images scored
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
   (:func:`mak.selection.robust.density_ratio.ratio_ensemble`). ``ecle``: a high ECLE (the pool store needs views).
   Each classifier fit and scoring pass runs on one intra-op thread, several at once, so the
   selection is bit-identical for any thread count and under torchrun.
4. Candidates: the top ``ceil(gate_core_ratio * budget)`` gated images by score (default 1.0; with
   the gate off, mak's ``core_ratio``); greedy k-center over them with the seed features as initial
   centers picks the budget. Fewer gated images than the budget (``gate_fill``): ``none`` (default)
   picks all of them, best first, and no more, so the pick is smaller than the budget; ``distance``
   adds the rejected ones with the lowest primary gate term (least distant) up to the budget. On the
   open-world benchmark the images beyond the gate are 91-98% junk on the standard pool and 15-42%
   where the pool holds only classes the seed lacks (docs/robust.md). ``gate_filled``,
   ``gate_short`` and ``note`` in the info say what happened; no gated image at all is an error
   with ``none``.

Columns (-> scores.csv): ``gate_TERM`` (the term's value: centroid distance, seed share or
classifier logit) and ``gate_TERM_pass`` (1 when it passes that term) for each gate term.

``gate="off", tail="ecle", fusion="z"`` reproduces ``mak`` exactly: same scores, candidates, indices.

Info (-> summary.json): ``gate_rejected``, ``gate_kept``, ``gate_filled``, ``gate`` (score,
threshold, quantile, parameters, ``term`` (the primary term), ``thresholds`` (each term's, in its own
units: distance, share, logit), and ``histogram``: shared ``edges`` with the counts of the
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
from typing import Any

import numpy as np

from mak import options as opts
from mak.data.store import model_kind
from mak.selection.proximity import kmeans, nearest_centroid_distance
from mak.selection.robust.density_ratio import (DEFAULT_EPOCHS, DEFAULT_HIDDEN, ratio_ensemble, ratio_logits,
                                                seed_heldout_logits)
from mak.selection.robust.context import RobustContext, RobustOps, ops
from mak.selection.robust.fusion import FUSIONS, histograms, fuse, rank_fusion
from mak.selection.robust.normalize import masked_zscore, rank_normalize
from mak.selection.robust.gate import GATE_TAIL_IMAGES, auto_gate_clusters, auto_gate_quantile, seed_gate
from mak.selection.robust.neighbours import seed_share, share_bank, share_gate, share_reference_size
from mak.selection.strategies import Context, Selection, mak_score, register_strategy

GATE_TERMS = ("centroid", "share", "ratio")
TAILS = ("ratio", "ecle")
FILLS = ("none", "distance")


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
    opts.Option("gate_fill", "none", "when fewer pool images pass the gate than the budget: none picks only those "
                "(fewer than the budget); distance adds the least-distant rejected ones (default none)",
                opts.choice(*FILLS), "|".join(FILLS)),
    opts.Option("share_k", 50, "neighbours (in seed + pool reference) of the seed-share gate (default 50)",
                opts.integer(1), "K"),
    opts.Option("share_reference", "auto", "pool rows the seed share and the classifier compare against (a uniform "
                "sample of a larger pool); auto = max(10 x seed size, 10000)", opts.or_auto(opts.integer(1)), "N"),
    opts.Option("tail", "ratio", "tail score: ratio (a low seed-vs-pool classifier logit) or ecle (MAK's "
                "tailness) (default ratio)", opts.choice(*TAILS), "|".join(TAILS)),
    opts.Option("fusion", "rank", "rank: score = the tail's percentile over the gated pool; z: the paper's "
                "alpha*z(tail) - (1-alpha)*z(distance) (default rank)", opts.choice(*FUSIONS), "|".join(FUSIONS)),
    opts.Option("ratio_bags", 5, "independent cross-fitted fits of the classifier whose logits are averaged "
                "(default 5)", opts.integer(1), "B"),
    opts.Option("ratio_folds", 5, "cross-fitting folds of the seed-vs-pool classifier (default 5)",
                opts.integer(2), "F"),
    opts.Option("ratio_hidden", DEFAULT_HIDDEN, f"hidden units of the classifier (default {DEFAULT_HIDDEN})",
                opts.integer(1), "H"),
    opts.Option("ratio_epochs", DEFAULT_EPOCHS, "training epochs of the classifier over seed + pool reference "
                f"(default {DEFAULT_EPOCHS})", opts.integer(1), "E"),
)
DEFAULTS: dict[str, Any] = opts.defaults(OPTIONS)


def robust_options(options: dict[str, Any]) -> dict[str, Any]:
    """The effective robust settings: :data:`DEFAULTS` updated with ``options``, validated.

    An option robust does not declare raises :class:`~mak.options.ParameterError` naming it.
    """
    return opts.resolve(OPTIONS, options, "strategy 'robust'")


class RobustRun:
    """One ``robust`` selection on a context: each score is computed once, on first use, and timed."""

    def __init__(self, ctx: Context) -> None:
        self.ctx, self.o = ctx, ops(ctx)
        self.opt = robust_options(ctx.options)
        self.seed_feats = ctx.need_seed()
        if self.opt["gate_quantile"] == "auto":
            m = int(self.seed_feats.shape[0])
            if self.opt["gate"] and m <= GATE_TAIL_IMAGES:
                raise opts.ParameterError("gate_quantile", f"gate_quantile='auto' needs more than {GATE_TAIL_IMAGES} "
                                          f"seed images (got {m}); pass gate_quantile=Q or gate=off", ("gate",))
            self.opt["gate_quantile"] = auto_gate_quantile(m)
        self.distance = ctx.distance()
        self.info: dict[str, Any] = {"robust": dict(self.opt)}
        self.columns: dict[str, np.ndarray] = {}  # scores.csv: each gate term's value and pass

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
                                device=self.ctx.device, progress=self.ctx.progress)
        pool = ratio_logits(self.ctx.pool_features, self.seed_feats, reference, self_index=position, models=models,
                            progress="robust: classifier logits of the pool" if self.ctx.progress else None)
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
                          device=self.ctx.device, bank=bank, progress="robust: seed share" if self.ctx.progress else None)
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
                                   "histogram": histograms(self.o, held, share, thr)}
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
                                   "histogram": histograms(self.o, held, logit, thr)}
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
        thresholds = {}
        for term in terms:
            value, thr, held_t, params_t = self.gate_term(term)
            mask = value <= thr if mask is None else mask & (value <= thr)
            sign = 1.0 if term == "centroid" else -1.0  # share and ratio are kept above their thresholds
            self.columns[f"gate_{term}"] = sign * np.asarray(value, dtype=np.float64)
            self.columns[f"gate_{term}_pass"] = np.asarray(value <= thr)
            thresholds[term] = sign * float(thr)
            if term == primary:
                gate_value, threshold, held, params = value, thr, held_t, params_t
        n_gated = self.o.count(mask)
        self.ctx.timings["gate"] = time.perf_counter() - t
        rejected = self.ctx.pool_size - n_gated
        self.info.update(gate_rejected=rejected, gate_kept=n_gated)
        self.info["gate"] = {"score": self.opt["gate_score"], "term": primary, "thresholds": thresholds,
                             "threshold": threshold,
                             "quantile": self.opt["gate_quantile"], **params, "rejected": rejected, "kept": n_gated,
                             "histogram": histograms(self.o, held, gate_value, threshold)}
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

    def short(self, score: np.ndarray, mask: np.ndarray, n_gated: int, gate_value: np.ndarray) -> np.ndarray:
        """The pick when fewer than the budget pass the gate: the gated ones, best first, then the fill."""
        ctx, need = self.ctx, self.ctx.budget - n_gated
        head = f"only {n_gated} pool images pass the gate for a budget of {ctx.budget}"
        if self.opt["gate_fill"] == "none":
            if n_gated == 0:
                raise opts.ParameterError("gate_fill", f"strategy 'robust': no pool image passes the in-domain gate "
                                          f"({self.opt['gate_score']} at quantile {self.opt['gate_quantile']:.4g}); "
                                          "the pool holds nothing like the seed, or pass gate_fill=distance or gate=off",
                                          ("gate",))
            self.info.update(gate_filled=0, gate_short=int(need))
            self.info["note"] = f"{head}: picked those {n_gated} (gate_fill=distance fills the budget)"
            return ctx.top_k(score, n_gated)
        fill_key = np.where(mask, np.inf, np.asarray(gate_value, dtype=np.float64))
        self.info.update(gate_filled=int(need), gate_short=0)
        self.info["note"] = f"{head}: filled with the {need} least-distant rejected ones"
        return np.concatenate([ctx.top_k(score, n_gated), ctx.top_k(fill_key, need, largest=False)])

    def select(self) -> Selection:
        ctx = self.ctx
        mask, n_gated, gate_value = self.gate()
        score = self.score(mask)
        budget = ctx.budget
        if n_gated < budget:  # too few in-domain images: take them all (then, if asked, the least-distant rejected)
            picks = cand = self.short(score, mask, n_gated, gate_value)
        else:
            ratio = self.opt["gate_core_ratio"] if mask is not None else ctx.core_ratio
            n_cand = min(n_gated, math.ceil(ratio * budget))
            if n_cand <= budget:
                picks = cand = ctx.top_k(score, budget)
            else:
                cand = ctx.top_k(score, n_cand)
                picks = ctx.kcenter(cand, budget, init=self.seed_feats)
            if mask is not None:
                self.info.update(gate_filled=0, gate_short=0)
        ecle = ctx.ecle() if self.opt["tail"] == "ecle" else None
        return Selection(np.asarray(picks, dtype=np.int64), "robust", ecle=ecle, distance=self.distance, score=score,
                         candidates=np.asarray(cand, dtype=np.int64), info=self.info, columns=self.columns)


SEED_MODEL_GATE_QUANTILE = 0.98
EXTERNAL_GATE_QUANTILE = 0.99
#: gate quantile auto on features of a model not trained on the pool, by model kind (what each
#: gave on the open-world benchmark: docs/robust.md, "Features of a model mak did not train")
MODEL_QUANTILES = {
    "seed-only": (SEED_MODEL_GATE_QUANTILE, "a seed-only model"),
    "external": (EXTERNAL_GATE_QUANTILE, "a model mak did not train on this pool (your own encoder)"),
    "unknown": (EXTERNAL_GATE_QUANTILE, "a model its meta.json does not name"),
}
SEED_MODEL_NOTE = ("{store} holds features of {model}, not of the pool-aware model robust's defaults suit "
                   "(`mak pretrain --mix-split`), so {what} (docs/robust.md#features-of-a-model-mak-did-not-train)")


def seed_model_note(meta: dict[str, Any], options: dict[str, Any], store: str) -> str | None:
    """Unless ``meta`` names a pool-aware model (:func:`mak.data.store.model_kind`): ``gate_quantile``
    auto (or unset) in ``options`` becomes the model kind's (:data:`MODEL_QUANTILES`: 0.98 for a
    seed-only model, 0.99 for an external or unnamed one), and a note says so.

    None of these models was trained on this pool, so none pushes its junk away from the seed.
    Pool-aware: None, options unchanged.
    """
    kind = model_kind(meta)
    if kind == "pool-aware":
        return None
    quantile, model = MODEL_QUANTILES[kind]
    if options.get("gate_quantile", "auto") in (None, "auto"):
        options["gate_quantile"] = quantile
        what = f"the gate quantile auto is {quantile} here"
    else:
        what = f"consider --gate-quantile {quantile} (the default here)"
    return SEED_MODEL_NOTE.format(store=store, model=model, what=what)


def robust_select(ctx: Context) -> Selection:
    """The ``robust`` strategy on a context (see the module docstring)."""
    return RobustRun(ctx).select()


register_strategy("robust", needs_seed=True, needs_views=lambda options: robust_options(options)["tail"] == "ecle",
                  options=OPTIONS, pool_aware=True, store_note=seed_model_note)(robust_select)


__all__ = ["DEFAULTS", "OPTIONS", "RobustContext", "RobustOps", "RobustRun", "auto_gate_quantile", "fuse",
           "masked_zscore", "ops", "rank_fusion", "rank_normalize", "robust_options", "robust_select", "seed_gate",
           "seed_share", "share_gate"]
