"""The ``mak select`` job: read feature stores, run a strategy, write the selection files.

Outputs (in ``out``): ``selection.txt`` (the chosen items' lines, pick order), ``scores.csv``
(one row per pool image) and ``summary.json`` (parameters, counts, timings, versions). They are
built in a temporary directory and renamed into place, so a failure leaves nothing behind.
"""
from __future__ import annotations

import csv
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .atomic import write_json
from .errors import MakError
from .selection import NEEDS, Selection, select, strategy_needs
from .store import FeatureStore, open_store

OUTPUT_FILES = ("selection.txt", "scores.csv", "summary.json")


def versions() -> dict[str, str]:
    import torch

    return {"mak": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


def check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse to clobber an existing selection unless ``overwrite``."""
    if out.exists() and not out.is_dir():
        raise MakError(f"{out}: output path exists and is not a directory")
    if not overwrite and (out / "selection.txt").exists():
        raise MakError(f"{out}: already holds a selection (use --overwrite to replace it)")


def publish(tmp: Path, out: Path) -> None:
    """Move every file of ``tmp`` into ``out`` (created if needed) by rename, then drop ``tmp``."""
    out.mkdir(parents=True, exist_ok=True)
    for f in sorted(tmp.iterdir()):
        os.replace(f, out / f.name)
    shutil.rmtree(tmp, ignore_errors=True)


def write_scores_csv(path: Path, items: list[str], sel: Selection) -> None:
    """One row per pool image: index, item, ecle, distance, score, selected, pick_rank."""
    n = len(items)
    rank = np.full(n, -1, dtype=np.int64)
    rank[sel.indices] = np.arange(len(sel.indices))

    def col(a: np.ndarray | None) -> list[str]:
        if a is None:
            return [""] * n
        return [repr(float(v)) for v in np.asarray(a, dtype=np.float64)]

    e, d, s = col(sel.ecle), col(sel.distance), col(sel.score)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["index", "item", "ecle", "distance", "score", "selected", "pick_rank"])
        for i in range(n):
            r = int(rank[i])
            w.writerow([i, items[i], e[i], d[i], s[i], 1 if r >= 0 else 0, r if r >= 0 else ""])


def load_inputs(seed_store: str | Path | None, pool_store: str | Path, strategy: str, check_finite: bool = True,
                options: dict[str, Any] | None = None) -> tuple[FeatureStore | None, FeatureStore]:
    """Open the stores a strategy (with ``options``) needs, validating them, and cross-check dimensions."""
    pool = open_store(pool_store, require_views=strategy_needs(strategy, options)[1], check_finite=check_finite)
    return open_seed_store(seed_store, pool, strategy), pool


def open_seed_store(seed_store: str | Path | None, pool: FeatureStore, strategy: str) -> FeatureStore | None:
    """The seed store when ``strategy`` uses it (validated against the pool's dimension), else None."""
    needs_seed = NEEDS[strategy][0]
    if seed_store is not None and (needs_seed or strategy == "kcenter"):
        seed = open_store(seed_store)
        if seed.feature_dim != pool.feature_dim:
            raise MakError(f"{Path(seed_store) / 'features.npy'}: feature dimension {seed.feature_dim} "
                           f"differs from the pool's {pool.feature_dim} ({pool.path / 'features.npy'})")
        return seed
    if needs_seed:
        raise MakError(f"strategy '{strategy}' needs --seed-store")
    return None


SEED_MODEL_GATE_QUANTILE = 0.98
SEED_MODEL_NOTE = ("robust's defaults were chosen for features of a pool-aware model (SimCLR on seed + a pool "
                   "sample: `mak pretrain --mix-split`); {store} was embedded with a seed-only model, which does "
                   "not push junk away, so {what} (benchmark tuning seed 7, seed-only model: q0.98 1.2% junk, "
                   "the pool-aware setting 16.8%; a pool-aware model does better still)")


def model_note(pool: FeatureStore, strategy: str, params: dict[str, Any] | None = None,
               echo: bool = True) -> str | None:
    """For ``robust`` on features of a seed-only model: a note (printed to stderr when ``echo``, returned),
    and ``gate_quantile`` auto (or unset) in ``params`` resolved to :data:`SEED_MODEL_GATE_QUANTILE`."""
    trained = (pool.meta or {}).get("model_trained_on")
    if strategy != "robust" or not isinstance(trained, dict) or trained.get("pool_rows", 0) != 0:
        return None
    if params is not None and params.get("gate_quantile", "auto") in (None, "auto"):
        params["gate_quantile"] = SEED_MODEL_GATE_QUANTILE
        what = f"the gate quantile auto is {SEED_MODEL_GATE_QUANTILE} here"
    else:
        what = f"consider --gate-quantile {SEED_MODEL_GATE_QUANTILE} (the default here)"
    note = SEED_MODEL_NOTE.format(store=pool.path, what=what)
    if echo:
        print(f"mak select: note: {note}", file=sys.stderr)
    return note


def select_stores(seed_store: str | Path | None, pool_store: str | Path, out: str | Path, budget: int,
                  strategy: str = "mak", overwrite: bool = False, progress: bool = True,
                  **params: Any) -> Selection:
    """Run ``strategy`` on stores and write ``selection.txt``, ``scores.csv``, ``summary.json`` to ``out``.

    Under ``torchrun``, on a sharded pool store, with ``dedup`` (a cosine threshold) or with
    ``kcenter='two-round'`` the job is :func:`mak.distributed_select.select_stores_scaled` (same
    outputs, plus ``dedup.csv``); the options ``dedup``, ``dedup_clusters``, ``kcenter`` and
    ``kcenter_parts`` are only meaningful there.
    """
    from .distributed_select import SCALED_OPTIONS, select_stores_scaled, wants_scaled_path

    scaled = {k: params.pop(k) for k in SCALED_OPTIONS if k in params}
    if wants_scaled_path(pool_store, scaled):
        return select_stores_scaled(seed_store, pool_store, out, budget, strategy=strategy, overwrite=overwrite,
                                    progress=progress, **scaled, **params)
    out = Path(out)
    check_out_dir(out, overwrite)
    t0 = time.perf_counter()
    seed, pool = load_inputs(seed_store, pool_store, strategy, options=params)
    if budget > pool.num_rows:
        raise MakError(f"budget ({budget}) is larger than the pool ({pool.num_rows} images in {pool_store})")
    t_load = time.perf_counter() - t0
    note = model_note(pool, strategy, params)
    seed_feats = seed.features() if seed is not None else None
    pool_feats = pool.shards[0].features if len(pool.shards) == 1 else pool.features()
    views = None
    if pool.has_views and strategy_needs(strategy, params)[1]:
        views = pool.shards[0].views if len(pool.shards) == 1 else pool.views()
    ecle_file = params.pop("ecle_file", None)
    if ecle_file is not None:
        params_ecle = np.load(ecle_file, allow_pickle=False)
        sel = select(seed_feats, pool_feats, views, budget, strategy=strategy, progress=progress,
                     ecle_scores=params_ecle, **params)
        params["ecle_file"] = str(ecle_file)
    else:
        sel = select(seed_feats, pool_feats, views, budget, strategy=strategy, progress=progress, **params)
    items = pool.items
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        t1 = time.perf_counter()
        (tmp / "selection.txt").write_text("".join(items[i] + "\n" for i in sel.indices), encoding="utf-8")
        write_scores_csv(tmp / "scores.csv", items, sel)
        summary = {
            "strategy": strategy,
            "parameters": {"budget": int(budget), **{k: v for k, v in params.items()}},
            "inputs": {"seed_store": str(seed_store) if seed_store is not None else None,
                       "pool_store": str(pool_store)},
            "counts": {"pool": pool.num_rows, "seed": seed.num_rows if seed is not None else None,
                       "selected": len(sel), "candidates": None if sel.candidates is None else int(len(sel.candidates)),
                       **{k: v for k, v in sel.info.items() if isinstance(v, (int, float, str))}},
            "timings_s": {"load": round(t_load, 4), **{k: round(v, 4) for k, v in sel.timings.items()},
                          "write": round(time.perf_counter() - t1, 4)},
            "info": {k: v for k, v in sel.info.items() if not isinstance(v, (int, float, str))},
            "versions": versions(),
            "command": " ".join(sys.argv),
            **({"note": note} if note else {}),
        }
        write_json(tmp / "summary.json", summary)
        publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return sel
