"""The ``mak select`` job: read feature stores, run a strategy, write the selection files.

Outputs (in ``out``): ``selection.txt`` (the chosen items' lines, pick order), ``scores.csv``
(one row per pool image) and ``summary.json`` (parameters, counts, timings, versions). They are
built in a temporary directory and renamed into place, so a failure leaves nothing behind.
"""
from __future__ import annotations

import csv
import itertools
import platform
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from mak import __version__
from mak import distributed as D
from mak._tensor import auto_device, is_auto
from mak.atomic import remove_debris, replace_dir, temp_dir, write_json
from mak.data.pool_array import store_arrays
from mak.data.store import FeatureStore, model_kind, open_store, value_problem, value_warning
from mak.errors import MakError
from mak.lock import job_lock
from mak.options import Option, ParameterError, choice, integer, number, resolve
from mak.paths import output_dir
from mak.selection.scale.context import DistributedContext
from mak.selection.strategies import (DEFAULT_STRATEGY, NEEDS, STORE_NOTES, STRATEGIES, Selection, select,
                                     strategy_name, strategy_needs)


OUTPUT_FILES = ("selection.txt", "scores.csv", "summary.json", "dedup.csv")  # what a select writes to --out
ORDERS = ("pick", "score")  # selection.txt: the strategy's pick order, or highest score first
UNSCORED = ("random", "kcenter")  # strategies that pick without a score
KCENTER_MODES = ("exact", "two-round")

# The job's own options (what the strategies take is mak.select's: SELECT_OPTIONS, STRATEGY_OPTIONS);
# a default None means off/automatic, and only a given value is parsed (mak.options.resolve).
JOB_OPTIONS: tuple[Option, ...] = (
    Option("budget", None, "number of pool images to pick", integer(1), "N", required=True),
    Option("strategy", DEFAULT_STRATEGY, f"selection strategy: {', '.join(STRATEGIES)} (default {DEFAULT_STRATEGY})",
           strategy_name, "S"),
    Option("order", ORDERS[0], "selection.txt's order: pick (the strategy's pick order; k-center reaches for the "
           "farthest images first, so it is not a ranking) or score (highest score first, for cutting the list) "
           "(default pick)", choice(*ORDERS), "pick|score"),
    Option("kcenter", KCENTER_MODES[0], "k-center over the candidates: exact greedy, or two-round (per-process "
           "greedy, then greedy on the union; radius <= 4x) for huge budgets (default exact)",
           choice(*KCENTER_MODES), "exact|two-round"),
    Option("kcenter_parts", None, "two-round k-center: candidate parts of round 1 (default: the number of "
           "processes)", integer(1), "P"),
    Option("dedup", None, "drop near-duplicate pool images (cosine similarity >= THRESHOLD, e.g. 0.95) before "
           "scoring; writes dedup.csv", number(0.0, 1.0), "THRESHOLD"),
    Option("dedup_clusters", None, "k-means clusters --dedup compares within (default: about sqrt of the pool "
           "size)", integer(1), "K"),
)


def versions() -> dict[str, str]:
    import torch

    return {"mak": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


def check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse to clobber an existing selection unless ``overwrite``."""
    output_dir(out)
    if not overwrite and (out / "selection.txt").exists():
        raise MakError(f"{out}: already holds a selection (use --overwrite to replace it)")


def load_inputs(seed_store: str | Path | None, pool_store: str | Path, strategy: str,
                options: dict[str, Any] | None = None, items: tuple[Any, Any] = (None, None)
                ) -> tuple[FeatureStore | None, FeatureStore]:
    """Open the stores ``strategy`` (with ``options``) needs and validate them: the pool's values
    scanned once, each rank its own rows (all of them on one process); dimensions cross-checked.
    A store may be a plain array; ``items`` = (seed, pool) items files of such arrays."""
    pool = open_store(pool_store, require_views=strategy_needs(strategy, options)[1], check_finite=False,
                      items=items[1])
    lo, hi = D.shard_range(pool.num_rows)
    scans = D.all_gather_object(pool.scan(lo, hi))
    problem = value_problem(pool, scans)
    if problem:
        raise MakError(problem)
    warning = value_warning(pool, scans)
    if warning and D.rank() == 0:
        print(f"mak select: warning: {warning}", file=sys.stderr)
    return open_seed_store(seed_store, pool, strategy, items[0]), pool


def open_seed_store(seed_store: str | Path | None, pool: FeatureStore, strategy: str,
                    items: str | Path | None = None) -> FeatureStore | None:
    """The seed store when ``strategy`` uses it, else None; a seed store given is validated (its
    files, its items, the pool's dimension) whether or not the strategy reads it."""
    needs_seed = NEEDS[strategy][0]
    if seed_store is None:
        if needs_seed:
            raise MakError(f"strategy '{strategy}' needs --seed-store")
        if items is not None:
            raise MakError(f"--seed-items {items} goes with a --seed-store array")
        return None
    seed = open_store(seed_store, items=items)
    if seed.feature_dim != pool.feature_dim:
        raise MakError(f"{seed.shards[0].file('features.npy')}: feature dimension {seed.feature_dim} "
                       f"differs from the pool's {pool.feature_dim} ({pool.shards[0].file('features.npy')})")
    return seed if needs_seed or strategy == "kcenter" else None


def model_note(pool: FeatureStore, strategy: str, params: dict[str, Any], echo: bool = True) -> str | None:
    """What ``strategy`` adapts to the model that embedded ``pool`` (its ``meta.json``), with a note.

    The strategy's hook (:data:`mak.selection.strategies.STORE_NOTES`) may set options in
    ``params``; its note is printed to stderr when ``echo`` and returned (None: nothing to say).
    """
    hook = STORE_NOTES.get(strategy)
    note = hook(pool.meta or {}, params, str(pool.path)) if hook is not None else None
    if note and echo:
        print(f"mak select: note: {note}", file=sys.stderr)
    return note


# --------------------------------------------------------------------------------------------
# The job: one process is a world of size 1 of the same code path
# --------------------------------------------------------------------------------------------

def iter_items(store: FeatureStore, lo: int = 0, hi: int | None = None) -> Iterator[str]:
    """Item lines of pool rows ``[lo, hi)``, streamed from the shards' items (as ``store.items`` reads them)."""
    hi = store.num_rows if hi is None else hi
    for sh in store.shards:
        n = sh.features.shape[0]
        a, b = max(lo, sh.start), min(hi, sh.start + n)
        if a < b:
            yield from itertools.islice(sh.item_lines(), a - sh.start, b - sh.start)


def _fmt(a: np.ndarray | None, present: np.ndarray) -> list[str]:
    if a is None:
        return [""] * present.size
    if a.dtype == bool:
        return [("1" if v else "0") if ok else "" for v, ok in zip(a, present)]
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
            e, d, s, *extra = (_fmt(None if c is None else c[c0:c1], ok) for c in cols)
            for j in range(c1 - c0):
                r = int(rank[c0 + j])
                w.writerow([lo + c0 + j, next(items), e[j], d[j], s[j], 1 if r >= 0 else 0, r if r >= 0 else "",
                            *(x[j] for x in extra)])


def select_stores(seed_store: str | Path | None, pool_store: str | Path, out: str | Path, budget: int,
                  strategy: str = DEFAULT_STRATEGY, overwrite: bool = False, progress: bool = True,
                  dedup: float | None = None, dedup_clusters: int | None = None, kcenter: str | None = None,
                  kcenter_parts: int | None = None, pool_items: str | Path | None = None,
                  seed_items: str | Path | None = None, order: str | None = None, **params: Any) -> Selection:
    """Run ``strategy`` on feature stores; write ``selection.txt``, ``scores.csv``, ``summary.json``
    (and ``dedup.csv`` with ``dedup``, a cosine threshold) to ``out``. A store is a store directory
    or a plain array (``.npy``/``.npz``), whose items file is ``seed_items``/``pool_items``.
    ``selection.txt`` lists the picks in the strategy's pick order (k-center's: farthest first, not
    a ranking), or with ``order="score"`` by score, highest first (ties: pick order). The job's
    options (budget, strategy, order, kcenter, kcenter_parts, dedup, dedup_clusters) are
    :data:`JOB_OPTIONS`; None takes the declared default.

    The same job on one process and under torchrun: rank r scores its contiguous share of the pool
    (:class:`~mak.selection.scale.context.DistributedContext`), one process being a world of size
    1. It initialises the process group under torchrun (gloo on CPU, NCCL with ``device='cuda'``)
    and tears it down again when it started it. ``params`` are :func:`mak.select`'s.
    """
    # before the stores: the first error names the first problem
    job = resolve(JOB_OPTIONS, dict(budget=budget, strategy=strategy, order=order, kcenter=kcenter,
                                    kcenter_parts=kcenter_parts, dedup=dedup, dedup_clusters=dedup_clusters),
                  "select_stores")
    for store in (seed_store, pool_store):
        if store is not None and Path(store).resolve() == Path(out).resolve():
            raise MakError(f"{out}: is the input store {store}; choose another --out")
    if job["order"] == "score" and job["strategy"] in UNSCORED:
        raise ParameterError("order", f"order='score': strategy '{job['strategy']}' picks without a score; use "
                                      "order='pick'")
    device = params.get("device")
    if is_auto(device):
        device = params["device"] = str(auto_device(device))
    with D.process_group(device or "cpu") as on:
        if on and device and torch.device(device).type == "cuda":
            params["device"] = str(D.local_device(device))
        with job_lock(out):  # one writer per --out
            sel = _run_job(seed_store, pool_store, Path(out), job, overwrite, progress, params,
                           (seed_items, pool_items))
            if D.rank() == 0:
                remove_debris(out)  # what killed selects of this --out left beside it
            return sel


def _run_job(seed_store: Any, pool_store: Any, out: Path, job: dict[str, Any], overwrite: bool, progress: bool,
             params: dict[str, Any], items: tuple[Any, Any] = (None, None)) -> Selection:
    """Check, load, drop duplicates, select, write: the job's steps on every rank."""
    check_out_dir(out, overwrite)
    budget, strategy = job["budget"], job["strategy"]
    # the work directory beside --out first: an unwritable --out fails before any work
    tmp = Path(D.broadcast_object(str(temp_dir(out)) if D.rank() == 0 else None))
    try:
        t0 = time.perf_counter()
        seed, pool = load_inputs(seed_store, pool_store, strategy, options=params, items=items)
        if budget > pool.num_rows:
            raise MakError(f"budget ({budget}) is larger than the pool ({pool.num_rows} images in {pool_store})")
        # every rank resolves the same settings; the note shows before the work when bars do
        note = model_note(pool, strategy, params, echo=progress and D.rank() == 0)
        timings: dict[str, float] = {"load": time.perf_counter() - t0}
        dd = _drop_duplicates(pool, job["dedup"], job["dedup_clusters"], budget, params, progress, timings)
        kept = None if dd is None else dd.kept_rows
        sel, ctx = _select(seed, pool, kept, budget, strategy, progress, job["kcenter"], job["kcenter_parts"], params)
        picks = sel.indices if kept is None else kept[sel.indices]
        cand = None if sel.candidates is None else (sel.candidates if kept is None else kept[sel.candidates])
        t1 = time.perf_counter()
        _write_own_scores(tmp, pool, sel, picks, dd)
        D.barrier()
        if D.rank() == 0:
            scale = {k: job[k] for k in ("dedup", "dedup_clusters", "kcenter", "kcenter_parts")}
            scale["order"] = None if job["order"] == "pick" else job["order"]
            _finish(tmp, out, pool, seed, sel, picks, cand, dd, ctx, strategy, budget, seed_store, pool_store,
                    params, scale, timings, t1, D.world_size(), note=note, items=items)
    except BaseException:
        if D.rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    D.barrier()
    sel.indices = np.asarray(picks, dtype=np.int64)
    sel.candidates = cand
    if note:
        sel.info["model_note"] = note
    return sel


def _score_order(scores_csv: Path, picks: np.ndarray) -> list[int]:
    """Positions of ``picks`` ordered by their ``score`` in ``scores_csv``, highest first; ties and
    empty scores keep the pick order (empty last)."""
    pos_of = {int(p): i for i, p in enumerate(picks)}
    score = np.full(len(picks), -np.inf)
    with open(scores_csv, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            i = pos_of.get(int(row["index"]))
            if i is not None and row["score"]:
                score[i] = float(row["score"])
    return sorted(range(len(picks)), key=lambda i: (-score[i], i))


def _drop_duplicates(pool: FeatureStore, dedup: float | None, dedup_clusters: int | None, budget: int,
                     params: dict[str, Any], progress: bool, timings: dict[str, float]) -> Any:
    """``--dedup``: the near-duplicate groups of the pool (None without it); the budget must fit what is kept."""
    if dedup is None:
        return None
    from mak.selection.scale.dedup import find_duplicates

    t = time.perf_counter()
    feats_all, _ = store_arrays(pool, None, views=False)
    dd = find_duplicates(feats_all, dedup, clusters=dedup_clusters, seed=int(params.get("seed", 0)),
                         device=params.get("device"), progress=progress and D.rank() == 0)
    timings["dedup"] = time.perf_counter() - t
    if budget > dd.kept_rows.size:
        raise MakError(f"budget ({budget}) is larger than the pool after --dedup {dedup} "
                       f"({dd.kept_rows.size} of {pool.num_rows} images kept)")
    return dd


def _select(seed: FeatureStore | None, pool: FeatureStore, kept: np.ndarray | None, budget: int, strategy: str,
            progress: bool, kcenter: str, kcenter_parts: int | None, params: dict[str, Any]
            ) -> tuple[Selection, DistributedContext | None]:
    """The strategy on the kept pool rows, across the ranks; (selection, the context it ran in)."""
    ecle_file = params.pop("ecle_file", None)
    extra = {}
    if ecle_file is not None:  # ECLE computed earlier for the whole pool (e.g. by `mak run`)
        e = np.load(ecle_file, mmap_mode="r", allow_pickle=False)
        if e.ndim != 1 or e.shape[0] != pool.num_rows:
            raise MakError(f"{ecle_file}: precomputed ECLE must hold {pool.num_rows} values, found shape {e.shape}")
        extra["ecle_scores"] = np.asarray(e if kept is None else e[kept], dtype=np.float32)
    feats, views = store_arrays(pool, kept, views=strategy_needs(strategy, params)[1] if strategy in NEEDS else False)
    holder: dict[str, DistributedContext] = {}

    @dataclass(eq=False)
    class _Ctx(DistributedContext):
        def __post_init__(self) -> None:
            super().__post_init__()
            self.kcenter_mode = kcenter
            self.kcenter_parts = None if kcenter_parts is None else int(kcenter_parts)
            holder["ctx"] = self

    seed_feats = seed.features() if seed is not None else None
    sel = select(seed_feats, feats, views, budget, strategy=strategy, progress=progress and D.rank() == 0,
                 context_cls=_Ctx, check_values=False, **params, **extra)  # load_inputs scanned them
    if ecle_file is not None:
        params["ecle_file"] = str(ecle_file)
    return sel, holder.get("ctx")


def _write_own_scores(tmp: Path, pool: FeatureStore, sel: Selection, picks: np.ndarray, dd: Any) -> None:
    """This rank's part of scores.csv: pool rows [bounds[r], bounds[r+1]) (its selection rows and the
    dropped duplicates among them), streamed to ``tmp/.scores.part-RANK``."""
    w, me, n_pool = D.world_size(), D.rank(), pool.num_rows
    kept = None if dd is None else dd.kept_rows
    n_sel = n_pool if kept is None else int(kept.size)
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
    for a in (sel.ecle, sel.distance, sel.score, *sel.columns.values()):
        if a is None:
            cols.append(None)
            continue
        a = np.asarray(a)
        if a.shape[0] != shi - slo:
            raise RuntimeError(f"per-image vector of length {a.shape[0]} on rank {me}, expected {shi - slo}")
        full = np.zeros(rows.size, dtype=bool if a.dtype == bool else np.float64)
        full[present] = a[where[present]]
        cols.append(full)
    rank_of = np.full(rows.size, -1, dtype=np.int64)
    inside = (picks >= plo) & (picks < phi)
    rank_of[picks[inside] - plo] = np.flatnonzero(inside)
    _write_scores_part(tmp / f".scores.part-{me:05d}", pool, plo, phi, cols, present, rank_of)


def _finish(tmp: Path, out: Path, pool: FeatureStore, seed: FeatureStore | None, sel: Selection, picks: np.ndarray,
            cand: np.ndarray | None, dd: Any, ctx: DistributedContext | None, strategy: str, budget: int,
            seed_store: Any, pool_store: Any, params: dict[str, Any], scaled: dict[str, Any],
            timings: dict[str, float], t1: float, w: int, note: str | None = None,
            items: tuple[Any, Any] = (None, None)) -> None:
    """Rank 0: scores.csv from the parts, selection.txt, dedup.csv, summary.json; then publish."""
    _join_scores(tmp, sel, w)
    chosen = _pick_items(tmp, pool, picks, dd)
    if scaled.get("order") == "score":
        chosen = [chosen[p] for p in _score_order(tmp / "scores.csv", picks)]
    (tmp / "selection.txt").write_text("".join(f"{it}\n" for it in chosen), encoding="utf-8")
    parameters, counts, info = _summary_fields(pool, seed, sel, picks, cand, dd, ctx, budget, params, scaled, w)
    summary = _summary(strategy, parameters, counts, info, pool, sel, seed_store, pool_store, items,
                       timings, t1, note)
    write_json(tmp / "summary.json", summary)
    # the files appear together; what else `out` holds stays, but not an earlier select's dedup.csv
    replace_dir(tmp, out, carry=True, owned=OUTPUT_FILES)


def _join_scores(tmp: Path, sel: Selection, w: int) -> None:
    """Write ``tmp/scores.csv``: the header, then the ranks' parts in rank order, each part removed once copied."""
    with open(tmp / "scores.csv", "wb") as fh:
        fh.write(",".join(["index", "item", "ecle", "distance", "score", "selected", "pick_rank",
                           *sel.columns]).encode() + b"\r\n")
        for r in range(w):
            part = tmp / f".scores.part-{r:05d}"
            with open(part, "rb") as src:
                shutil.copyfileobj(src, fh, 1 << 20)
            part.unlink()


def _pick_items(tmp: Path, pool: FeatureStore, picks: np.ndarray, dd: Any) -> list[str | None]:
    """The picks' item lines in pick order, from one pass over the pool's items (writing dedup.csv with ``dd``)."""
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
    return chosen


def _summary_fields(pool: FeatureStore, seed: FeatureStore | None, sel: Selection, picks: np.ndarray,
                    cand: np.ndarray | None, dd: Any, ctx: DistributedContext | None, budget: int,
                    params: dict[str, Any], scaled: dict[str, Any], w: int
                    ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """summary.json's parameters, counts and info (strategy details, dedup, k-center, distributed run)."""
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
    return parameters, counts, info


def _summary(strategy: str, parameters: dict[str, Any], counts: dict[str, Any], info: dict[str, Any],
             pool: FeatureStore, sel: Selection, seed_store: Any, pool_store: Any, items: tuple[Any, Any],
             timings: dict[str, float], t1: float, note: str | None) -> dict[str, Any]:
    """summary.json's content: the given fields plus inputs, timings (``write`` from ``t1``), versions, command."""
    return {
        "strategy": strategy,
        "parameters": parameters,
        "inputs": {"seed_store": str(seed_store) if seed_store is not None else None, "pool_store": str(pool_store),
                   **{k: str(v) for k, v in zip(("seed_items", "pool_items"), items) if v is not None},
                   "pool_model": model_kind(pool.meta)},
        "counts": counts,
        "timings_s": {**{k: round(v, 4) for k, v in timings.items()},
                      **{k: round(v, 4) for k, v in sel.timings.items()},
                      "write": round(time.perf_counter() - t1, 4)},
        "info": info,
        "versions": versions(),
        "command": " ".join(sys.argv),
        **({"note": note} if note else {}),
    }


__all__ = [
    "check_out_dir",
    "iter_items",
    "load_inputs",
    "model_note",
    "select_stores",
]
