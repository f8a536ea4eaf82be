"""Reading what a run left on disk: item labels, ``scores.csv``, training ``log.csv`` and gates.

Item labels are the last whitespace-separated token of an item line (``-1`` = out-of-domain);
items without an integer label give no labels at all. ``scores.csv`` is read in blocks into flat
numeric arrays (O(N) floats, not O(N) Python objects), keeping the item text only of the first
picks; other items' text is fetched by another pass. Empty or unparsable cells become NaN (or a
default for integer columns), never an error. :func:`find_gate` reads a selection's in-domain
gate from the named fields of its ``summary.json``.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from mak.run.report.format import num


def _last_token(line: str) -> str:
    return str(line).rsplit(None, 1)[1]  # IndexError for a single token


def without_label(line: str) -> str:
    """An item line without its trailing integer label (the line itself when it has none)."""
    parts = str(line).rsplit(None, 1)
    try:
        int(parts[1])
    except (IndexError, ValueError):
        return str(line)
    return parts[0]


def labels_of(items: Sequence[str]) -> np.ndarray | None:
    """Labels of every item, or None as soon as one item has no integer label."""
    if not len(items):
        return None
    try:
        return np.fromiter((int(_last_token(x)) for x in items), dtype=np.int64, count=len(items))
    except (ValueError, IndexError):
        return None


@dataclass
class Scores:
    """One selection's scores.csv as flat arrays (row order of the file)."""

    path: Path
    index: np.ndarray
    ecle: np.ndarray
    distance: np.ndarray
    score: np.ndarray
    selected: np.ndarray
    rank: np.ndarray
    csv_labels: np.ndarray | None
    items: dict[int, str] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return int(self.index.size)


CHUNK_ROWS = 1 << 16
_TRUE = frozenset(("1", "true", "True", "TRUE"))


def _float(v: str) -> float:
    """A csv cell as a float: empty or unparsable cells are NaN."""
    if not v:
        return math.nan
    try:
        return float(v)
    except ValueError:
        return math.nan


def _floats(col: Sequence[str]) -> np.ndarray:
    """A column of csv cells as float64 (empty or junk cells become NaN)."""
    m = len(col)
    filled = np.fromiter(map(bool, col), dtype=bool, count=m)
    if not filled.any():
        return np.full(m, np.nan)
    try:
        if filled.all():
            return np.fromiter(map(float, col), dtype=np.float64, count=m)
        out = np.full(m, np.nan)
        nz = np.flatnonzero(filled)
        out[nz] = np.fromiter(map(float, (col[i] for i in nz)), dtype=np.float64, count=nz.size)
        return out
    except ValueError:
        return np.fromiter(map(_float, col), dtype=np.float64, count=m)


def _ints(col: Sequence[str], default: int) -> np.ndarray:
    """A column of csv cells as int64 (empty or junk cells become ``default``)."""
    m = len(col)
    out = np.full(m, default, dtype=np.int64)
    nz = np.flatnonzero(np.fromiter(map(bool, col), dtype=bool, count=m))
    if not nz.size:
        return out
    try:
        out[nz] = np.fromiter(map(int, (col[i] for i in nz)), dtype=np.int64, count=nz.size)
    except ValueError:
        f = _floats(col)
        out = np.where(np.isfinite(f), np.nan_to_num(f), default).astype(np.int64)
    return out


def _chunks(rd: Any, width: int) -> Iterable[Callable[[int], list[str]]]:
    """Blocks of up to CHUNK_ROWS csv rows (padded to ``width``), each as a column getter."""
    import itertools
    from operator import itemgetter

    while True:
        rows = list(itertools.islice(rd, CHUNK_ROWS))
        if not rows:
            return
        if set(map(len, rows)) != {width}:
            rows = [(r + [""] * width)[:width] for r in rows if r]
            if not rows:
                continue
        yield lambda j, rows=rows: list(map(itemgetter(j), rows))


def _block_columns(cols: Callable[[int], list[str]], col: Mapping[str, int], n: int,
                   m: int) -> dict[str, np.ndarray]:
    """The numeric columns of a block of ``m`` rows that starts at row ``n``; absent columns filled in."""
    idx = _ints(cols(col["index"]), -1) if "index" in col else np.arange(n, n + m, dtype=np.int64)
    if "index" in col and (idx < 0).any():
        idx = np.where(idx < 0, np.arange(n, n + m), idx)
    rank = _ints(cols(col["pick_rank"]), -1) if "pick_rank" in col else np.full(m, -1, np.int64)
    if "selected" in col:
        c = cols(col["selected"])
        sel = np.fromiter(map(_TRUE.__contains__, c), dtype=bool, count=m)
        if not sel.any() and (rank >= 0).any():  # an empty selected column: trust pick_rank
            sel = rank >= 0
    else:
        sel = rank >= 0
    out = {"index": idx, "pick_rank": rank, "selected": sel}
    for k in ("ecle", "distance", "score"):
        out[k] = _floats(cols(col[k])) if k in col else np.full(m, np.nan)
    return out


def read_scores(path: Path, keep_rank: int, parse_labels: bool = True) -> Scores:
    """Read ``scores.csv`` in blocks into flat arrays; the item text only of the first picks.

    Memory is O(N) numbers plus one block of Python strings, however long the file.
    """
    names = ("index", "ecle", "distance", "score", "selected", "pick_rank")
    parts: dict[str, list[np.ndarray]] = {k: [] for k in names}
    labs: list[np.ndarray] = []
    items: dict[int, str] = {}
    n = 0
    with open(path, newline="", encoding="utf-8") as fh:
        rd = csv.reader(fh)
        header = next(rd, None) or []
        col = {h.strip().lower(): j for j, h in enumerate(header)}
        cit = col.get("item", -1)
        labeled = parse_labels and cit >= 0
        for cols in _chunks(rd, len(header)):
            m = len(cols(0))
            block = _block_columns(cols, col, n, m)
            for k, a in block.items():
                parts[k].append(a)
            idx, rank = block["index"], block["pick_rank"]
            items_col = cols(cit) if cit >= 0 else None
            if labeled:
                lab = labels_of(items_col)
                if lab is None:
                    labeled, labs = False, []
                else:
                    labs.append(lab)
            if cit >= 0:
                for r in np.flatnonzero((rank >= 0) & (rank < keep_rank)):
                    items[int(idx[r])] = items_col[r]
            n += m

    def cat(k: str, dtype: Any) -> np.ndarray:
        return np.concatenate(parts[k]).astype(dtype, copy=False) if parts[k] else np.zeros(0, dtype)

    return Scores(path=path, index=cat("index", np.int64), ecle=cat("ecle", np.float64),
                  distance=cat("distance", np.float64), score=cat("score", np.float64),
                  selected=cat("selected", bool), rank=cat("pick_rank", np.int64),
                  csv_labels=np.concatenate(labs) if (labeled and labs) else None, items=items)


def fetch_items(path: Path, wanted: Iterable[int]) -> dict[int, str]:
    """Item text of the given pool indices, by another pass over ``scores.csv``."""
    want = np.asarray(sorted(set(int(i) for i in wanted)), dtype=np.int64)
    found: dict[int, str] = {}
    if not want.size:
        return found
    with open(path, newline="", encoding="utf-8") as fh:
        rd = csv.reader(fh)
        header = [h.strip().lower() for h in (next(rd, None) or [])]
        if "item" not in header:
            return found
        cit = header.index("item")
        n = 0
        for cols in _chunks(rd, len(header)):
            items_col = cols(cit)
            m = len(items_col)
            idx = _ints(cols(header.index("index")), -1) if "index" in header else np.arange(n, n + m)
            for r in np.flatnonzero(np.isin(idx, want)):
                found[int(idx[r])] = items_col[r]
            n += m
            if len(found) == want.size:
                break
    return found


def read_loss_log(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(epoch, loss)`` of a training ``log.csv`` (rows without both numbers are skipped)."""
    xs, ys = [], []
    with open(path, newline="", encoding="utf-8") as fh:
        for n, row in enumerate(csv.DictReader(fh)):
            row = {(k or "").strip().lower(): v for k, v in row.items()}
            y = num(row.get("loss"))
            x = num(row.get("epoch"))
            if y is None:
                continue
            xs.append(float(n + 1) if x is None else x)
            ys.append(y)
    return np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)


@dataclass
class Gate:
    threshold: float
    term: str = "centroid"  # the gate term whose values the histogram holds
    edges: np.ndarray | None = None
    seed_counts: np.ndarray | None = None
    pool_counts: np.ndarray | None = None
    quantile: float | None = None
    rejected: int | None = None
    kept: int | None = None


def _int_or_none(v: Any) -> int | None:
    x = num(v)
    return None if x is None else int(x)


def find_gate(summary: Any) -> Gate | None:
    """The in-domain gate of a selection's summary, read from ``info.gate`` (robust's layout), or None.

    Named fields only: ``threshold``, ``quantile``, ``rejected``, ``kept``, ``term`` (else the
    first of ``score``'s terms, ``centroid`` when it is one) and ``histogram`` (``edges`` with the
    counts ``seed_heldout`` and ``pool``); a malformed histogram is left out, the rest kept.
    """
    info = summary.get("info") if isinstance(summary, Mapping) else None
    gate = info.get("gate") if isinstance(info, Mapping) else None
    threshold = num(gate.get("threshold")) if isinstance(gate, Mapping) else None
    if threshold is None:
        return None
    terms = str(gate.get("score") or "centroid").split("+")
    term = gate.get("term") or ("centroid" if "centroid" in terms else terms[0])
    g = Gate(threshold=threshold, term=str(term), quantile=num(gate.get("quantile")),
             rejected=_int_or_none(gate.get("rejected")), kept=_int_or_none(gate.get("kept")))
    hist = gate.get("histogram")
    if isinstance(hist, Mapping):
        try:
            edges = np.asarray(hist["edges"], dtype=np.float64)
            seed = np.asarray(hist["seed_heldout"], dtype=np.float64)
            pool = np.asarray(hist["pool"], dtype=np.float64) if hist.get("pool") is not None else None
        except (KeyError, TypeError, ValueError):
            return g
        if edges.ndim == 1 and seed.ndim == 1 and edges.size == seed.size + 1:
            g.edges, g.seed_counts = edges, seed
            g.pool_counts = pool if pool is not None and pool.shape == seed.shape else None
    return g
