"""Selection strategies: MAK and its baselines, behind one entry point, :func:`select`.

=====================  ==============================================================  =========
strategy               picks                                                           needs
=====================  ==============================================================  =========
``mak``                top ceil(core_ratio*budget) by alpha*z(ECLE) - (1-alpha)*z(dist),  seed, views
                       then greedy k-center over them with the seed as initial centers
``random``             a uniformly random subset                                          -
``kcenter``            greedy k-center over the whole pool, seed as initial centers      (seed)
``tailness``           highest ECLE                                                       views
``proximity``          lowest distance to the seed's k-means centroids                    seed
``tailness+proximity`` highest MAK score, no k-center                                     seed, views
=====================  ==============================================================  =========

Further strategies register themselves with :func:`register_strategy`. Ties in every ranking
go to the lowest pool index, so a fixed seed gives a bit-identical selection.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from mak._tensor import is_tensor, top_k, zscore
from mak.errors import MakError
from mak.options import Option, ParameterError, defaults, integer, number, resolve
from mak.selection.kcenter import kcenter_greedy
from mak.selection.proximity import proximity as proximity_scores
from mak.selection.tailness import ecle as ecle_scores


@dataclass
class Selection:
    """The outcome of :func:`select`: pool indices in pick order plus the per-image scores."""

    indices: np.ndarray
    strategy: str
    ecle: np.ndarray | None = None
    distance: np.ndarray | None = None
    score: np.ndarray | None = None
    candidates: np.ndarray | None = None
    timings: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    columns: dict[str, np.ndarray] = field(default_factory=dict)  # more per-image columns for scores.csv

    def __len__(self) -> int:
        return int(self.indices.shape[0])


@dataclass
class Context:
    """Everything a strategy may use; scores are computed lazily and timed."""

    seed_features: Any
    pool_features: Any
    pool_views: Any
    budget: int
    strategy: str
    alpha: float = 0.5
    clusters: int = 10
    core_ratio: float = 1.5
    temperature: float = 0.2
    batch_size: int = 512
    partitions: int = 10
    seed: int = 0
    device: Any = None
    progress: bool = False
    options: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    _ecle: np.ndarray | None = None
    _distance: np.ndarray | None = None

    @property
    def pool_size(self) -> int:
        return int(self.pool_features.shape[0])

    def need_seed(self) -> Any:
        if self.seed_features is None:
            raise MakError(f"strategy '{self.strategy}' needs seed features")
        return self.seed_features

    def need_views(self) -> Any:
        if self.pool_views is None:
            raise MakError(f"strategy '{self.strategy}' needs the pool's augmented views (views.npy)")
        return self.pool_views

    def set_ecle(self, values: Any) -> None:
        """Score with precomputed ECLE (one finite value per pool image) instead of the views."""
        e = np.asarray(values, dtype=np.float32)
        if e.shape != (self.pool_size,) or not np.isfinite(e).all():
            raise MakError(f"precomputed ECLE must be {self.pool_size} finite values, got shape {e.shape}")
        self._ecle = e

    def ecle(self) -> np.ndarray:
        if self._ecle is None:
            t = time.perf_counter()
            self._ecle = ecle_scores(self.need_views(), temperature=self.temperature, batch_size=self.batch_size,
                                     partitions=self.partitions, seed=self.seed, device=self.device,
                                     progress=self.progress)
            self.timings["ecle"] = time.perf_counter() - t
        return self._ecle

    def distance(self) -> np.ndarray:
        if self._distance is None:
            t = time.perf_counter()
            self._distance = proximity_scores(self.need_seed(), self.pool_features, clusters=self.clusters,
                                              seed=self.seed, device=self.device)
            self.timings["proximity"] = time.perf_counter() - t
        return self._distance

    # Global operations. Strategies call these (never numpy directly on score vectors), so that a
    # distributed context, whose score vectors hold only its own rows, can override them.
    def zscore(self, x: np.ndarray) -> np.ndarray:
        """z-scores over the whole pool."""
        return zscore(x)

    def top_k(self, score: np.ndarray, k: int, largest: bool = True) -> np.ndarray:
        """Global pool indices of the ``k`` best scores, best first, ties to the lowest index."""
        return top_k(score, k, largest)

    def random_subset(self, k: int) -> np.ndarray:
        """``k`` distinct pool indices drawn uniformly from ``seed``, in draw order."""
        return np.random.default_rng(self.seed).permutation(self.pool_size)[:k].astype(np.int64)

    def kcenter(self, rows: np.ndarray | None, budget: int, init: Any) -> np.ndarray:
        """Greedy k-center over pool ``rows`` (all when None); returns pool indices in pick order."""
        t = time.perf_counter()
        feats = self.pool_features if rows is None else np.asarray(self.pool_features[np.sort(rows)])
        order = np.arange(self.pool_size) if rows is None else np.sort(rows)
        picks = kcenter_greedy(feats, budget, init=init, seed=self.seed, device=self.device, progress=self.progress)
        self.timings["kcenter"] = time.perf_counter() - t
        return order[picks]


def mak_score(ctx: Context, ecle: np.ndarray, distance: np.ndarray, alpha: float) -> np.ndarray:
    """alpha * z(ECLE) - (1 - alpha) * z(distance), z-scores over the whole pool."""
    return alpha * ctx.zscore(ecle) - (1.0 - alpha) * ctx.zscore(distance)


def candidates_then_kcenter(ctx: Context, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Top ceil(core_ratio*budget) by ``score``, then k-center with the seed as init.

    When the candidate set is no larger than the budget, the top-scored are taken directly.
    Returns (picks in pick order, candidate indices).
    """
    n_cand = min(ctx.pool_size, math.ceil(ctx.core_ratio * ctx.budget))
    if n_cand <= ctx.budget:
        top = ctx.top_k(score, ctx.budget)
        return top, top
    cand = ctx.top_k(score, n_cand)
    return ctx.kcenter(cand, ctx.budget, init=ctx.need_seed()), cand


# The parameters every strategy takes (mak.select's keywords); `mak select` and `mak run` read them from here.
SELECT_OPTIONS: tuple[Option, ...] = (
    Option("alpha", 0.5, "weight of tailness vs proximity in the score (default 0.5)",
           number(0.0, 1.0, low_open=False), "A"),
    Option("clusters", 10, "k-means centroids of the seed features (default 10)", integer(1), "K"),
    Option("core_ratio", 1.5, "candidates = ceil(C * budget) best-scored before k-center (default 1.5)",
           number(0.0), "C"),
    Option("temperature", 0.2, "NT-Xent temperature for ECLE (default 0.2)", number(0.0), "T"),
    Option("batch_size", 512, "batch size of the ECLE contrastive problems (default 512)", integer(2), "B",
           key="ecle_batch_size"),
    Option("partitions", 10, "random batch orderings averaged in ECLE (default 10)", integer(1), "P"),
    Option("seed", 0, "random seed: same seed, same selection (default 0)", integer(0), "S"),
)
SELECT_DEFAULTS: dict[str, Any] = defaults(SELECT_OPTIONS)

StrategyFn = Callable[[Context], Selection]
STRATEGIES: dict[str, StrategyFn] = {}
NEEDS: dict[str, tuple[bool, bool | Callable[[dict[str, Any]], bool]]] = {}  # (seed features, views)
STRATEGY_OPTIONS: dict[str, tuple[Option, ...]] = {}  # the options each strategy declares (mak.options)
POOL_AWARE: set[str] = set()  # strategies that score features of a pool-aware model (mak run trains one)
# strategy -> hook(store meta.json, options, store name) -> note or None: adapts options to the store's model
STORE_NOTES: dict[str, Callable[[dict[str, Any], dict[str, Any], str], str | None]] = {}
DEFAULT_STRATEGY = "robust"  # the product's default (mak select, mak.select); "mak" is the paper's method
# strategy -> behaviour version (default 1), part of its select stage's cache key in `mak run`
# (mak.run.stage.stage_version): a strategy that picks differently for the same inputs and
# options has a higher version. The CHANGELOG says what each change was.
STRATEGY_VERSIONS: dict[str, int] = {"mak": 3, "kcenter": 2, "proximity": 2, "tailness+proximity": 2, "robust": 6}


def strategy_name(name: str, value: Any) -> str:
    """A parser (:mod:`mak.options`): a registered strategy's name."""
    if value not in STRATEGIES:
        raise ParameterError(name, f"unknown strategy '{value}' (choose from: {', '.join(STRATEGIES)})")
    return str(value)


def strategy_options(strategy: str, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The effective options of ``strategy``: its declared defaults updated with ``options``, validated.

    An option the strategy does not declare raises :class:`~mak.options.ParameterError` naming it.
    """
    strategy_name("strategy", strategy)
    return resolve(STRATEGY_OPTIONS[strategy], dict(options or {}), f"strategy '{strategy}'")


def strategy_needs(strategy: str, options: dict[str, Any] | None = None) -> tuple[bool, bool]:
    """(needs seed features, needs the pool's views) of ``strategy`` run with ``options``.

    ``options`` may hold other parameters too (those of :func:`select`); only the strategy's own are read.
    """
    strategy_name("strategy", strategy)
    needs_seed, needs_views = NEEDS[strategy]
    if callable(needs_views):
        own = {o.name for o in STRATEGY_OPTIONS[strategy]}
        needs_views = needs_views(strategy_options(strategy, {k: v for k, v in (options or {}).items() if k in own}))
    return needs_seed, bool(needs_views)


def register_strategy(name: str, needs_seed: bool, needs_views: bool | Callable[[dict[str, Any]], bool],
                      options: tuple[Option, ...] = (), pool_aware: bool = False,
                      store_note: Callable[[dict[str, Any], dict[str, Any], str], str | None] | None = None
                      ) -> Callable[[StrategyFn], StrategyFn]:
    """Decorator adding a strategy to :data:`STRATEGIES`.

    ``needs_views`` may be a function of the strategy's effective options; ``options`` declares
    the options the strategy takes (:class:`mak.options.Option`), from which the command line's
    flags and the config's checks are made. ``pool_aware``: the strategy wants features of a model
    trained on the seed plus a pool sample. ``store_note(meta, options, store)`` adapts the options
    to the model a store's ``meta.json`` names and returns a note for the user (or None).
    """

    def deco(fn: StrategyFn) -> StrategyFn:
        STRATEGIES[name] = fn
        NEEDS[name] = (needs_seed, needs_views)
        STRATEGY_OPTIONS[name] = tuple(options)
        if pool_aware:
            POOL_AWARE.add(name)
        if store_note is not None:
            STORE_NOTES[name] = store_note
        return fn

    return deco


@register_strategy("mak", needs_seed=True, needs_views=True)
def _mak(ctx: Context) -> Selection:
    score = mak_score(ctx, ctx.ecle(), ctx.distance(), ctx.alpha)
    picks, cand = candidates_then_kcenter(ctx, score)
    return Selection(picks, "mak", ctx.ecle(), ctx.distance(), score, cand)


@register_strategy("random", needs_seed=False, needs_views=False)
def _random(ctx: Context) -> Selection:
    return Selection(ctx.random_subset(ctx.budget), "random")


@register_strategy("kcenter", needs_seed=False, needs_views=False)
def _kcenter(ctx: Context) -> Selection:
    return Selection(ctx.kcenter(None, ctx.budget, init=ctx.seed_features), "kcenter")


@register_strategy("tailness", needs_seed=False, needs_views=True)
def _tailness(ctx: Context) -> Selection:
    e = ctx.ecle()
    return Selection(ctx.top_k(e, ctx.budget), "tailness", ecle=e, score=e)


@register_strategy("proximity", needs_seed=True, needs_views=False)
def _proximity(ctx: Context) -> Selection:
    d = ctx.distance()
    return Selection(ctx.top_k(d, ctx.budget, largest=False), "proximity", distance=d, score=-d)


@register_strategy("tailness+proximity", needs_seed=True, needs_views=True)
def _tailness_proximity(ctx: Context) -> Selection:
    score = mak_score(ctx, ctx.ecle(), ctx.distance(), ctx.alpha)
    return Selection(ctx.top_k(score, ctx.budget), "tailness+proximity", ctx.ecle(), ctx.distance(), score)


def check_finite(x: Any, what: str, axis: int = 0, chunk: int = 65_536) -> None:
    """A :class:`MakError` naming ``what`` and the first row (along ``axis``) holding NaN or Inf;
    ``x`` (an array, memmap or tensor) is read ``chunk`` rows at a time."""
    n = int(x.shape[axis])
    for start in range(0, n, chunk):
        block = x[start : start + chunk] if axis == 0 else x[:, start : start + chunk]
        if is_tensor(block):
            finite = torch.isfinite(block).movedim(axis, 0).reshape(block.shape[axis], -1).all(1).cpu().numpy()
        else:
            finite = np.isfinite(np.moveaxis(np.asarray(block), axis, 0)).reshape(block.shape[axis], -1).all(1)
        if not finite.all():
            raise MakError(f"{what} contain NaN or Inf (row {start + int(np.flatnonzero(~finite)[0])})")


def check_inputs(seed_features: Any, pool_features: Any, pool_views: Any, budget: int, strategy: str,
                 clusters: int, options: dict[str, Any] | None = None) -> None:
    """Validate shapes and parameters; raise :class:`MakError` with one line naming the problem."""
    strategy_name("strategy", strategy)
    if pool_features is None or pool_features.ndim != 2:
        raise MakError("pool features must be a 2-D array (N x D)")
    n = int(pool_features.shape[0])
    if n == 0:
        raise MakError("the pool is empty (0 images)")
    budget = integer(1)("budget", budget)
    if budget > n:
        raise MakError(f"budget ({budget}) is larger than the pool ({n} images)")
    needs_seed, needs_views = strategy_needs(strategy, options)
    if seed_features is not None:
        if seed_features.ndim != 2:
            raise MakError("seed features must be a 2-D array (M x D)")
        if seed_features.shape[1] != pool_features.shape[1]:
            raise MakError(f"seed feature dimension {seed_features.shape[1]} differs from pool's {pool_features.shape[1]}")
        if needs_seed and seed_features.shape[0] == 0:
            raise MakError("the seed set is empty (0 images)")
        if needs_seed and clusters > seed_features.shape[0]:
            raise MakError(f"clusters ({clusters}) is larger than the seed set ({seed_features.shape[0]} images)")
    elif needs_seed:
        raise MakError(f"strategy '{strategy}' needs seed features")
    if pool_views is not None:
        if pool_views.ndim != 3:
            raise MakError(f"views must be (R, N, d), got shape {tuple(pool_views.shape)}")
        if pool_views.shape[0] < 2:
            raise MakError(f"views need R >= 2 augmentations, got R = {pool_views.shape[0]}")
        if pool_views.shape[1] != n:
            raise MakError(f"views have {pool_views.shape[1]} rows but the pool has {n}")
    elif needs_views:
        raise MakError(f"strategy '{strategy}' needs the pool's augmented views")


def select(seed_features: Any, pool_features: Any, pool_views: Any, budget: int, strategy: str = DEFAULT_STRATEGY,
           alpha: float = 0.5, clusters: int = 10, core_ratio: float = 1.5, temperature: float = 0.2,
           batch_size: int = 512, partitions: int = 10, seed: int = 0, device: Any = None,
           progress: bool = False, context_cls: type[Context] | None = None, ecle_scores: Any = None,
           check_values: bool = True, **options: Any) -> Selection:
    """Pick ``budget`` pool images with ``strategy``; returns a :class:`Selection`.

    ``seed_features`` (M x D) and ``pool_features`` (N x D): backbone features (arrays, memmaps or
    tensors); ``pool_views`` (R x N x d): projection-head outputs under augmentation. Either may be
    None for strategies that do not use it. Extra keyword ``options`` are the strategy's own
    (:data:`STRATEGY_OPTIONS`); one it does not declare is a :class:`~mak.options.ParameterError`.
    ``context_cls`` swaps in another :class:`Context` (e.g. the distributed one). ``ecle_scores``:
    ECLE already computed with the same parameters (N,), reused instead of recomputed.
    ``check_values``: scan the arrays for NaN/Inf first (one read; callers that scanned them pass False).
    """
    context_cls = context_cls or Context
    options = strategy_options(strategy, options)
    base = resolve(SELECT_OPTIONS, dict(alpha=alpha, clusters=clusters, core_ratio=core_ratio, temperature=temperature,
                                        batch_size=batch_size, partitions=partitions, seed=seed), "mak.select")
    alpha, clusters, core_ratio, temperature, batch_size, partitions, seed = base.values()
    check_inputs(seed_features, pool_features, pool_views, budget, strategy, clusters, options)
    if check_values:
        for name, x, axis in (("seed features", seed_features, 0), ("pool features", pool_features, 0),
                              ("pool views", pool_views, 1)):
            if x is not None:
                check_finite(x, name, axis)
    ctx = context_cls(seed_features, pool_features, pool_views, int(budget), strategy, alpha, clusters, core_ratio,
                      temperature, batch_size, partitions, seed, device, progress, dict(options))
    if ecle_scores is not None:
        ctx.set_ecle(ecle_scores)
    t0 = time.perf_counter()
    result = STRATEGIES[strategy](ctx)
    result.indices = np.asarray(result.indices, dtype=np.int64)
    result.timings = dict(ctx.timings, total=time.perf_counter() - t0)
    return result
