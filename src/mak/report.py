"""The run report: one self-contained HTML file comparing the strategies of a ``mak run``.

:func:`write_report` writes ``report.html``: a page that opens offline (inline CSS, charts as
inline SVG drawn here, thumbnails as ``data:`` PNG URIs; no script, no external resource) and
that a person can read at a glance:

* a header with the run's key takeaways (best Few-group accuracy, most balanced, lowest
  out-of-domain rate, ...), each with its margin over the seed alone ("none");
* the comparison table (strategies x few-shot All / Many / Medium / Few / group std, full-shot,
  kNN, out-of-domain rate, Few share; ``mean +- std`` over repeats, the best value of each column
  highlighted) with a legend, and a bar per strategy of what its selection is made of;
* one collapsible section per strategy: per-class counts of seed vs seed + selection (plus the
  selection's out-of-domain count), histograms of ECLE and of distance for selected vs not
  selected pool images (split by in-domain / out-of-domain when the items carry labels), the
  seed-calibrated gate (held-out seed distances vs pool distances with the threshold) when the
  selection's ``summary.json`` holds one, thumbnail grids of the first-picked images, a random
  sample of the selection and the farthest not-selected images, and a table of the first picks;
* a grid of random pool images, the training-loss curves and the run's notes.

Item labels are the last whitespace-separated token of an item line (``-1`` = out-of-domain);
items without an integer label get no in-domain / out-of-domain split. ``scores.csv`` is read
once, streaming, into flat numeric arrays (O(N) floats, not O(N) Python objects), so a pool of
millions of images is fine. Every text taken from the inputs is HTML-escaped, and the file is
pure ASCII (other characters become character references), written atomically.
"""
from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from .atomic import write_text

__all__ = ["write_report"]

PALETTE = ("#3b6fd4", "#e8833a", "#2a9d8f", "#d1495b", "#8e6cc0", "#c9a227", "#4aa3df", "#b5651d",
           "#6a994e", "#e07bb5")
NONE_COLOR = "#6b7280"
SEED_COLOR = "#c3cad5"
REST_COLOR = "#aab4c2"
OOD_COLOR = "#d64545"
FEW_COLOR = "#2f9e6a"
EXTRA_COLORS = ("#374151", "#9ca3af", "#7c3aed", "#0f766e")
THUMB_PX = 56
GRID_COLS = 8
GRID_ROWS = 4
HIST_BINS = 40
FIRST_PICKS_TABLE = 12
RANDOM_SEED = 0

# ---------------------------------------------------------------------------------------------
# Figures and formatting
# ---------------------------------------------------------------------------------------------


def _num(v: Any) -> float | None:
    """A finite float or None (None, NaN, infinities, bools and non-numbers give None)."""
    if v is None or isinstance(v, bool):
        return None
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _fig(v: Any, std: Any = None) -> tuple[float, float | None] | None:
    """``(mean, std)`` of a figure given as a number or ``{"mean": .., "std": ..}``; None when absent."""
    if isinstance(v, Mapping):
        m = _num(v.get("mean"))
        return None if m is None else (m, _num(v.get("std")))
    m = _num(v)
    return None if m is None else (m, _num(std))


def _pct(x: float) -> str:
    """A fraction as a percentage with one decimal (no sign)."""
    return f"{100.0 * x:.1f}"


def _cell_html(f: tuple[float, float | None] | None) -> str:
    """Table cell content: ``61.2<span class="sd">&plusmn;1.3</span>`` or a dash."""
    if f is None:
        return '<span class="na">&ndash;</span>'
    m, s = f
    out = _pct(m)
    if s is not None:
        out += f'<span class="sd">&plusmn;{_pct(s)}</span>'
    return out


def _esc(s: Any) -> str:
    return html.escape(str(s), quote=True)


def _count(n: float) -> str:
    return f"{int(round(n)):,}"


def _short(n: float) -> str:
    """Compact tick label for counts: 950, 1.5k, 12k, 3.2M."""
    a = abs(n)
    if a >= 1e6:
        return f"{n / 1e6:.3g}M"
    if a >= 1e4:
        return f"{n / 1e3:.3g}k"
    if a >= 1e3:
        return f"{n / 1e3:.2g}k"
    return f"{n:g}"


@dataclass(frozen=True)
class _Col:
    key: str
    head: str
    group: str
    lower_better: bool
    legend: str
    get: Callable[[Mapping[str, Any]], tuple[float, float | None] | None]


def _group_fig(g: str) -> Callable[[Mapping[str, Any]], tuple[float, float | None] | None]:
    def get(r: Mapping[str, Any]) -> tuple[float, float | None] | None:
        ga = r.get("group_acc")
        return _fig(ga.get(g)) if isinstance(ga, Mapping) else None
    return get


COLUMNS: tuple[_Col, ...] = (
    _Col("all", "All", "Few-shot linear probe", False,
         "few-shot linear-probe accuracy over all test classes (labeled images drawn per class; "
         "&plusmn; is the std over repeats, or over the labeled draws of a single run)",
         lambda r: _fig(r.get("fewshot_acc"), r.get("fewshot_std"))),
    _Col("many", "Many", "Few-shot linear probe", False,
         "few-shot accuracy averaged over the classes that are large in the seed", _group_fig("many")),
    _Col("medium", "Medium", "Few-shot linear probe", False,
         "few-shot accuracy averaged over the medium-sized seed classes", _group_fig("medium")),
    _Col("few", "Few", "Few-shot linear probe", False,
         "few-shot accuracy averaged over the tail classes of the seed: what sampling should help most",
         _group_fig("few")),
    _Col("group_std", "Group std", "Few-shot linear probe", True,
         "std of the Many / Medium / Few means in points: balancedness, lower is better",
         lambda r: _fig(r.get("group_std"))),
    _Col("fullshot", "Full-shot", "Full labels", False,
         "linear-probe accuracy trained on the full balanced labeled split",
         lambda r: _fig(r.get("fullshot_acc"))),
    _Col("knn", "kNN", "Full labels", False,
         "k-nearest-neighbour accuracy (cosine) on the full labeled split",
         lambda r: _fig(r.get("knn_acc"))),
    _Col("ood", "OOD rate", "Selection", True,
         "share of the selection that is out-of-domain (label -1): lower is better",
         lambda r: _fig(r.get("ood_rate"))),
    _Col("few_share", "Few share", "Selection", False,
         "share of the selection (out-of-domain included) that belongs to Few classes",
         lambda r: _fig(r.get("few_share"))),
)

# ---------------------------------------------------------------------------------------------
# Inputs: labels, scores.csv, loss logs, gate
# ---------------------------------------------------------------------------------------------


def _last_token(line: str) -> str:
    return str(line).rsplit(None, 1)[1]  # IndexError for a single token


def _labels_of(items: Sequence[str]) -> np.ndarray | None:
    """Labels of every item, or None as soon as one item has no integer label."""
    if not len(items):
        return None
    try:
        return np.fromiter((int(_last_token(x)) for x in items), dtype=np.int64, count=len(items))
    except (ValueError, IndexError):
        return None


@dataclass
class _Scores:
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


def _read_scores(path: Path, keep_rank: int, parse_labels: bool = True) -> _Scores:
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
            first = cols(0)
            m = len(first)
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
            parts["index"].append(idx)
            parts["pick_rank"].append(rank)
            parts["selected"].append(sel)
            for k in ("ecle", "distance", "score"):
                parts[k].append(_floats(cols(col[k])) if k in col else np.full(m, np.nan))
            items_col = cols(cit) if cit >= 0 else None
            if labeled:
                lab = _labels_of(items_col)
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

    return _Scores(path=path, index=cat("index", np.int64), ecle=cat("ecle", np.float64),
                   distance=cat("distance", np.float64), score=cat("score", np.float64),
                   selected=cat("selected", bool), rank=cat("pick_rank", np.int64),
                   csv_labels=np.concatenate(labs) if (labeled and labs) else None, items=items)


def _fetch_items(path: Path, wanted: Iterable[int]) -> dict[int, str]:
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


def _read_loss_log(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(epoch, loss)`` of a training ``log.csv`` (rows without both numbers are skipped)."""
    xs, ys = [], []
    with open(path, newline="", encoding="utf-8") as fh:
        for n, row in enumerate(csv.DictReader(fh)):
            row = {(k or "").strip().lower(): v for k, v in row.items()}
            y = _num(row.get("loss"))
            x = _num(row.get("epoch"))
            if y is None:
                continue
            xs.append(float(n + 1) if x is None else x)
            ys.append(y)
    return np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)


def _walk(obj: Any, path: tuple[str, ...] = (), depth: int = 0) -> Iterable[tuple[tuple[str, ...], Mapping]]:
    if isinstance(obj, Mapping) and depth <= 5:
        yield path, obj
        for k, v in obj.items():
            yield from _walk(v, path + (str(k).lower(),), depth + 1)


def _numbers(v: Any) -> np.ndarray | None:
    if isinstance(v, (list, tuple)) and v and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
        return np.asarray(v, dtype=np.float64)
    return None


@dataclass
class _Gate:
    threshold: float
    edges: np.ndarray | None = None
    seed_counts: np.ndarray | None = None
    pool_counts: np.ndarray | None = None
    seed_values: np.ndarray | None = None
    pool_values: np.ndarray | None = None
    quantile: float | None = None
    rejected: int | None = None
    kept: int | None = None


def _find_gate(summary: Any) -> _Gate | None:
    """A gate threshold and held-out seed distances (raw or binned) anywhere in a summary, or None.

    Tolerant of layouts: ``gate_threshold`` in ``counts`` / ``info``, or ``threshold`` inside a
    dict named like ``gate``; the seed's held-out distances as a list (a key naming seed/held-out
    and distance) or as a histogram (``edges`` with ``seed_heldout`` / ``seed`` and ``pool``).
    """
    if not isinstance(summary, Mapping):
        return None
    threshold = quantile = None
    rejected = kept = None
    seed_vals = pool_vals = edges = seed_counts = pool_counts = None
    for path, d in _walk(summary):
        in_gate = any("gate" in p for p in path)
        for k, v in d.items():
            key = str(k).lower()
            if threshold is None and (key == "gate_threshold" or (in_gate and key == "threshold")):
                threshold = _num(v)
            elif quantile is None and (key == "gate_quantile" or (in_gate and key == "quantile")):
                quantile = _num(v)
            elif rejected is None and (key == "gate_rejected" or (in_gate and key == "rejected")):
                rejected = None if _num(v) is None else int(_num(v))  # type: ignore[arg-type]
            elif kept is None and (key == "gate_kept" or (in_gate and key == "kept")):
                kept = None if _num(v) is None else int(_num(v))  # type: ignore[arg-type]
            elif isinstance(v, (list, tuple)):
                arr = _numbers(v)
                if arr is None:
                    continue
                is_seed = ("seed" in key or "heldout" in key or "held_out" in key)
                if key == "edges" and (in_gate or "hist" in "".join(path)):
                    edges = arr if edges is None else edges
                elif "dist" in key and is_seed and seed_vals is None:
                    seed_vals = arr
                elif "dist" in key and "pool" in key and pool_vals is None:
                    pool_vals = arr
                elif (in_gate or "hist" in "".join(path)) and is_seed and seed_counts is None:
                    seed_counts = arr
                elif (in_gate or "hist" in "".join(path)) and key == "pool" and pool_counts is None:
                    pool_counts = arr
    if threshold is None:
        return None
    g = _Gate(threshold=threshold, quantile=quantile, rejected=rejected, kept=kept)
    if edges is not None and seed_counts is not None and len(edges) == len(seed_counts) + 1:
        g.edges, g.seed_counts = edges, seed_counts
        if pool_counts is not None and len(pool_counts) == len(seed_counts):
            g.pool_counts = pool_counts
    elif seed_vals is not None:
        g.seed_values, g.pool_values = seed_vals, pool_vals
    else:
        return g  # threshold only: no chart
    return g


# ---------------------------------------------------------------------------------------------
# SVG charts
# ---------------------------------------------------------------------------------------------


def _ticks(lo: float, hi: float, n: int = 5, cover: bool = False) -> tuple[list[float], float]:
    """About ``n`` round tick values inside ``[lo, hi]`` and their step (``cover``: up to one past ``hi``)."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        hi = lo + 1.0
    span = hi - lo
    step = 10.0 ** math.floor(math.log10(span / max(n, 1)))
    for m in (1.0, 2.0, 2.5, 5.0, 10.0):
        if span / (step * m) <= n:
            step *= m
            break
    t = math.ceil(lo / step - 1e-9) * step
    if cover:
        hi = math.ceil(hi / step - 1e-9) * step
    out = []
    while t <= hi + 1e-9 * span:
        out.append(0.0 if abs(t) < 1e-12 * span else t)
        t += step
    return out, step


def _tick_label(v: float, step: float) -> str:
    """A tick value with as many decimals as the step needs (1.5k style for large counts)."""
    if step >= 1 and abs(v) >= 1000:
        return _short(v)
    dec = 0
    while dec < 8 and abs(step * 10 ** dec - round(step * 10 ** dec)) > 1e-6 * max(1.0, step * 10 ** dec):
        dec += 1
    return f"{v:.{dec}f}"


def _f(x: float) -> str:
    return f"{x:.1f}"


def _svg_open(w: int, h: int, label: str) -> str:
    return (f'<svg viewBox="0 0 {w} {h}" role="img" '
            f'aria-label="{_esc(label)}" class="chart-svg">')


def _y_axis(parts: list[str], ticks: list[float], step: float, sy: Callable[[float], float],
            x0: float, x1: float, fmt: Callable[[float], str] | None = None) -> None:
    for t in ticks:
        y = sy(t)
        parts.append(f'<line x1="{_f(x0)}" x2="{_f(x1)}" y1="{_f(y)}" y2="{_f(y)}" class="grid"/>')
        parts.append(f'<text x="{_f(x0 - 5)}" y="{_f(y + 3.5)}" text-anchor="end" class="tick">'
                     f'{_esc(fmt(t) if fmt else _tick_label(t, step))}</text>')


def _x_axis(parts: list[str], ticks: list[float], step: float, sx: Callable[[float], float],
            y: float, label: str, width: float) -> None:
    for t in ticks:
        x = sx(t)
        parts.append(f'<line x1="{_f(x)}" x2="{_f(x)}" y1="{_f(y)}" y2="{_f(y + 4)}" class="axis"/>')
        parts.append(f'<text x="{_f(x)}" y="{_f(y + 15)}" text-anchor="middle" class="tick">'
                     f'{_esc(_tick_label(t, step))}</text>')
    if label:
        parts.append(f'<text x="{_f(width / 2)}" y="{_f(y + 30)}" text-anchor="middle" class="axlabel">'
                     f'{_esc(label)}</text>')


@dataclass
class _Series:
    label: str
    color: str
    counts: np.ndarray
    filled: bool = True
    dash: str = ""


def _svg_histogram(edges: np.ndarray, panels: Sequence[tuple[str, Sequence[_Series]]], xlabel: str,
                   title: str, threshold: float | None = None, threshold_label: str = "") -> str:
    """Stacked panels sharing an x axis; each series normalised to its share of images per bin."""
    w, ml, mr, mt, mb = 480, 50, 14, 8, 42
    ph, gap = 118, 26
    h = mt + len(panels) * ph + (len(panels) - 1) * gap + mb
    lo, hi = float(edges[0]), float(edges[-1])
    if threshold is not None:
        lo, hi = min(lo, threshold), max(hi, threshold)
    if hi <= lo:
        hi = lo + 1e-6
    xt, xstep = _ticks(lo, hi, 6)
    xt = [t for t in xt if lo - 1e-12 <= t <= hi + 1e-12] or [lo]

    def sx(x: float) -> float:
        return ml + (x - lo) / (hi - lo) * (w - ml - mr)

    parts = [_svg_open(w, h, title)]
    for p, (ptitle, series) in enumerate(panels):
        top = mt + p * (ph + gap) + 14
        bottom = mt + p * (ph + gap) + ph
        shares = [s.counts / s.counts.sum() if s.counts.sum() > 0 else None for s in series]
        ymax = max([float(a.max()) for a in shares if a is not None] + [1e-9])
        yt, ystep = _ticks(0.0, ymax * 1.04, 3, cover=True)
        ytop = max(yt[-1], ymax)

        def sy(y: float, top: float = top, bottom: float = bottom, ytop: float = ytop) -> float:
            return bottom - y / ytop * (bottom - top)

        _y_axis(parts, yt, ystep, sy, ml, w - mr, fmt=lambda t: f"{100 * t:.0f}%")
        if ptitle:
            parts.append(f'<text x="{ml + 4}" y="{_f(top - 4)}" class="ptitle">{_esc(ptitle)}</text>')
        for s, a in zip(series, shares):
            if a is None:
                continue
            pts = [f"M{_f(sx(edges[0]))},{_f(bottom)}"]
            for i, v in enumerate(a):
                pts.append(f"L{_f(sx(edges[i]))},{_f(sy(v))}L{_f(sx(edges[i + 1]))},{_f(sy(v))}")
            pts.append(f"L{_f(sx(edges[-1]))},{_f(bottom)}")
            d = "".join(pts)
            if s.filled:
                parts.append(f'<path d="{d}Z" fill="{s.color}" fill-opacity="0.28" stroke="{s.color}" '
                             f'stroke-width="1.4"/>')
            else:
                dash = f' stroke-dasharray="{s.dash}"' if s.dash else ""
                parts.append(f'<path d="{d}" fill="none" stroke="{s.color}" stroke-width="1.8"{dash}/>')
        if all(a is None for a in shares):
            parts.append(f'<text x="{_f((ml + w - mr) / 2)}" y="{_f((top + bottom) / 2)}" '
                         f'text-anchor="middle" class="empty">no images</text>')
        parts.append(f'<line x1="{ml}" x2="{w - mr}" y1="{_f(bottom)}" y2="{_f(bottom)}" class="axis"/>')
        if threshold is not None:
            x = sx(threshold)
            parts.append(f'<line x1="{_f(x)}" x2="{_f(x)}" y1="{_f(top - 2)}" y2="{_f(bottom)}" '
                         f'class="thr"/>')
            if p == 0 and threshold_label:
                anchor = "end" if x > w * 0.6 else "start"
                dx = -4 if anchor == "end" else 4
                parts.append(f'<text x="{_f(x + dx)}" y="{_f(top + 10)}" text-anchor="{anchor}" '
                             f'class="thrlabel">{_esc(threshold_label)}</text>')
    _x_axis(parts, xt, xstep, sx, h - mb, xlabel, w)
    parts.append("</svg>")
    return "".join(parts)


def _svg_class_counts(classes: Sequence[str], seed: Sequence[int], added: Sequence[int], ood: int | None,
                      color: str, title: str) -> str:
    """Stacked bars: seed count (grey) + the selection's count (strategy colour), then an OOD bar."""
    n = len(classes)
    slots = n + (1.6 if ood is not None else 0)
    w, ml, mr, mt = 480, 50, 10, 20
    rotate = 12 < n <= 30
    show_labels = n <= 30
    mb = 58 if rotate else 40
    h = 250 + (18 if rotate else 0)
    top = [s + a for s, a in zip(seed, added)] + ([ood] if ood is not None else [])
    ymax = max(top + [1])
    yt, ystep = _ticks(0.0, ymax * 1.1, 4, cover=True)
    ytop = max(yt[-1], ymax)
    plot_w = w - ml - mr
    slot = plot_w / max(slots, 1)
    bw = min(slot * 0.72, 42)

    def sy(y: float) -> float:
        return (h - mb) - y / ytop * (h - mb - mt)

    parts = [_svg_open(w, h, title)]
    _y_axis(parts, yt, ystep, sy, ml, w - mr)
    label_bars = n <= 16
    for i, c in enumerate(classes):
        cx = ml + slot * (i + 0.5)
        x = cx - bw / 2
        s, a = int(seed[i]), int(added[i])
        ys, ya = sy(s), sy(s + a)
        parts.append(f'<rect x="{_f(x)}" y="{_f(ys)}" width="{_f(bw)}" height="{_f(h - mb - ys)}" '
                     f'fill="{SEED_COLOR}"><title>class {_esc(c)}: seed {s:,}</title></rect>')
        if a > 0:
            parts.append(f'<rect x="{_f(x)}" y="{_f(ya)}" width="{_f(bw)}" height="{_f(ys - ya)}" '
                         f'fill="{color}"><title>class {_esc(c)}: +{a:,} selected '
                         f'(seed {s:,} &#8594; {s + a:,})</title></rect>')
        if label_bars and a > 0:
            parts.append(f'<text x="{_f(cx)}" y="{_f(ya - 4)}" text-anchor="middle" class="barlabel" '
                         f'fill="{color}">+{_short(a)}</text>')
        if not show_labels:
            pass
        elif rotate:
            parts.append(f'<text transform="translate({_f(cx + 3)},{_f(h - mb + 8)}) rotate(-55)" '
                         f'text-anchor="end" class="tick">{_esc(c[:12])}</text>')
        else:
            parts.append(f'<text x="{_f(cx)}" y="{_f(h - mb + 14)}" text-anchor="middle" class="tick">'
                         f'{_esc(c[:8])}</text>')
    if ood is not None:
        cx = ml + slot * (n + 1.1)
        x = cx - bw / 2
        yo = sy(ood)
        parts.append(f'<rect x="{_f(x)}" y="{_f(yo)}" width="{_f(bw)}" height="{_f(h - mb - yo)}" '
                     f'fill="{OOD_COLOR}"><title>out-of-domain: {ood:,} selected</title></rect>')
        parts.append(f'<text x="{_f(cx)}" y="{_f(yo - 4)}" text-anchor="middle" class="barlabel" '
                     f'fill="{OOD_COLOR}">{_short(ood)}</text>')
        parts.append(f'<text x="{_f(cx)}" y="{_f(h - mb + 14)}" text-anchor="middle" class="tick" '
                     f'fill="{OOD_COLOR}">OOD</text>')
        sep = ml + slot * (n + 0.3)
        parts.append(f'<line x1="{_f(sep)}" x2="{_f(sep)}" y1="{mt}" y2="{_f(h - mb)}" class="sep"/>')
    parts.append(f'<line x1="{ml}" x2="{w - mr}" y1="{_f(h - mb)}" y2="{_f(h - mb)}" class="axis"/>')
    parts.append(f'<text x="{_f(ml + plot_w / 2)}" y="{h - 6}" text-anchor="middle" class="axlabel">'
                 f'{"class" if show_labels else f"{n} classes"} (largest seed class first'
                 f'{"" if show_labels else "; hover a bar for its class"})</text>')
    parts.append("</svg>")
    return "".join(parts)


def _svg_lines(series: Sequence[tuple[str, str, str, np.ndarray, np.ndarray]], xlabel: str, ylabel: str,
               title: str) -> str:
    """Line chart of ``(label, colour, dash, xs, ys)`` series."""
    w, h, ml, mr, mt, mb = 500, 300, 54, 14, 14, 42
    xs_all = np.concatenate([s[3] for s in series])
    ys_all = np.concatenate([s[4] for s in series])
    xlo, xhi = float(xs_all.min()), float(xs_all.max())
    ylo, yhi = float(ys_all.min()), float(ys_all.max())
    if xhi <= xlo:
        xhi = xlo + 1
    pad = (yhi - ylo) * 0.06 or max(abs(yhi) * 0.05, 0.05)
    xt, xstep = _ticks(xlo, xhi, 8)
    xt = [t for t in xt if xlo - 1e-9 <= t <= xhi + 1e-9]
    yt, ystep = _ticks(ylo - pad, yhi + pad, 5)
    y0 = math.floor((ylo - pad) / ystep + 1e-9) * ystep
    y1 = math.ceil((yhi + pad) / ystep - 1e-9) * ystep
    yt, _ = _ticks(y0, y1, 5)
    yt = [y0 + k * ystep for k in range(int(round((y1 - y0) / ystep)) + 1)]

    def sx(x: float) -> float:
        return ml + (x - xlo) / (xhi - xlo) * (w - ml - mr)

    def sy(y: float) -> float:
        return (h - mb) - (y - y0) / (y1 - y0) * (h - mb - mt)

    parts = [_svg_open(w, h, title)]
    _y_axis(parts, [t for t in yt if y0 <= t <= y1], ystep, sy, ml, w - mr)
    parts.append(f'<line x1="{ml}" x2="{w - mr}" y1="{h - mb}" y2="{h - mb}" class="axis"/>')
    parts.append(f'<text transform="translate(13,{_f((h - mb + mt) / 2)}) rotate(-90)" text-anchor="middle" '
                 f'class="axlabel">{_esc(ylabel)}</text>')
    for label, color, dash, xs, ys in series:
        d = "".join(f"{'M' if i == 0 else 'L'}{_f(sx(x))},{_f(sy(y))}" for i, (x, y) in enumerate(zip(xs, ys)))
        dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
        parts.append(f'<path d="{d}" fill="none" stroke="{color}" stroke-width="2"{dash_attr} '
                     f'stroke-linejoin="round"><title>{_esc(label)}</title></path>')
        if len(xs) == 1:
            parts.append(f'<circle cx="{_f(sx(xs[0]))}" cy="{_f(sy(ys[0]))}" r="3" fill="{color}"/>')
    _x_axis(parts, xt or [xlo], xstep, sx, h - mb, xlabel, w + ml - mr)
    parts.append("</svg>")
    return "".join(parts)


def _legend(entries: Sequence[tuple[str, str, str]]) -> str:
    """HTML legend of ``(label, colour, kind)``; kind 'fill', 'line', 'dash' or 'thr'."""
    out = ['<div class="legend">']
    for label, color, kind in entries:
        if kind == "fill":
            sw = f'<i class="sw" style="background:{color}"></i>'
        else:
            style = {"line": "solid", "dash": "dashed", "thr": "dashed"}.get(kind, "solid")
            sw = f'<i class="ln" style="border-top:2px {style} {color}"></i>'
        out.append(f"<span>{sw}{_esc(label)}</span>")
    out.append("</div>")
    return "".join(out)


# ---------------------------------------------------------------------------------------------
# Thumbnails
# ---------------------------------------------------------------------------------------------


def _to_uint8_image(a: Any) -> np.ndarray:
    """HxW or HxWxC (C in 1, 3, 4; CxHxW accepted) uint8 array from whatever the loader returns."""
    a = np.asarray(a)
    if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[2] not in (1, 3, 4):
        a = np.transpose(a, (1, 2, 0))
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.ndim == 3 and a.shape[2] == 2:
        a = a[..., 0]
    if a.ndim not in (2, 3) or a.size == 0:
        raise ValueError(f"cannot show an image of shape {a.shape}")
    if a.dtype != np.uint8:
        f = a.astype(np.float64)
        if np.nanmax(f) <= 1.0:
            f = f * 255.0
        a = np.clip(np.nan_to_num(f), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(a)


def _thumb_uri(a: Any, px: int = THUMB_PX) -> str:
    """``data:image/png;base64,...`` of a thumbnail about ``px`` pixels on its long side."""
    from PIL import Image

    resampling = getattr(Image, "Resampling", Image)
    img = Image.fromarray(_to_uint8_image(a))
    w, h = img.size
    long_side = max(w, h)
    if long_side <= px:
        f = max(1, int(round(px / long_side)))
        if f > 1:
            img = img.resize((w * f, h * f), resampling.NEAREST)
    else:
        s = px / long_side
        img = img.resize((max(1, round(w * s)), max(1, round(h * s))), resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


class _Thumbs:
    """Thumbnail cache over ``pool_images`` (a failing image becomes a placeholder, not an error)."""

    def __init__(self, loader: Callable[[int], np.ndarray] | None) -> None:
        self.loader = loader
        self.cache: dict[int, str | None] = {}
        self.failed = 0

    def get(self, i: int) -> str | None:
        if self.loader is None:
            return None
        if i not in self.cache:
            try:
                self.cache[i] = _thumb_uri(self.loader(int(i)))
            except Exception:  # a corrupt or missing image must not sink the whole report
                self.cache[i] = None
                self.failed += 1
        return self.cache[i]


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------

CSS = """
:root{--fg:#1f2933;--muted:#5f6b7a;--bg:#f3f5f8;--card:#fff;--line:#e2e7ee;--best:#e3f4e8;--bestfg:#14532d}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--fg);
 font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif}
main{max-width:1180px;margin:0 auto;padding:26px 28px 64px}
header h1{font-size:27px;margin:0 0 2px;letter-spacing:-.01em}
.sub{color:var(--muted);font-size:14px}
.nav{margin:10px 0 0;display:flex;flex-wrap:wrap;gap:6px}
.nav a{text-decoration:none}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(205px,1fr));gap:12px;margin:18px 0 6px}
.card{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:11px 14px}
.card .k{font-size:11.5px;text-transform:uppercase;letter-spacing:.05em;color:var(--muted)}
.card .v{font-size:19px;font-weight:650;margin-top:5px;display:flex;align-items:center;gap:8px;flex-wrap:wrap}
.card .d{font-size:13px;color:var(--muted);margin-top:2px}
.chip{display:inline-block;padding:1px 9px;border-radius:999px;color:#fff;font-weight:600;font-size:13.5px;
 line-height:1.6;white-space:nowrap}
section,details.strat{background:var(--card);border:1px solid var(--line);border-radius:12px;
 padding:16px 20px;margin:18px 0}
h2{font-size:19px;margin:0 0 10px}
h3{font-size:15px;margin:18px 0 8px}
.tablewrap{overflow-x:auto}
table.cmp{border-collapse:collapse;width:100%;font-variant-numeric:tabular-nums;font-size:14.5px}
table.cmp th,table.cmp td{padding:7px 9px;text-align:right;border-bottom:1px solid var(--line);white-space:nowrap}
table.cmp th{font-weight:600;color:#374151;font-size:13px}
table.cmp thead tr.grp th{color:var(--muted);font-weight:500;font-size:12px;text-transform:uppercase;
 letter-spacing:.04em;border-bottom:none;text-align:center}
table.cmp thead tr.grp th.g{border-bottom:2px solid var(--line)}
table.cmp td.name,table.cmp th.name{text-align:left}
table.cmp td.best{background:var(--best);color:var(--bestfg);font-weight:700}
table.cmp tr.none td{color:#4b5563}
.sd{color:var(--muted);font-size:.82em;font-weight:400;margin-left:2px}
td.best .sd{color:#3f7a52}
.na{color:#c0c6cf}
.dot{display:inline-block;width:10px;height:10px;border-radius:50%;margin-right:7px;vertical-align:0}
.keys{margin:12px 0 0;padding:0;list-style:none;display:grid;grid-template-columns:repeat(auto-fill,minmax(330px,1fr));
 gap:3px 22px;font-size:13px;color:var(--muted)}
.keys b{color:var(--fg);font-weight:600}
.comp{margin-top:16px}
.comp .rows{display:grid;grid-template-columns:max-content 1fr;align-items:center;gap:6px 12px}
.comp .bar{display:flex;height:22px;border-radius:5px;overflow:hidden;background:#edf0f4}
.comp .bar span{display:flex;align-items:center;justify-content:center;color:#fff;font-size:11.5px;
 font-weight:600;overflow:hidden;white-space:nowrap}
details.strat>summary{cursor:pointer;font-size:18px;font-weight:650;list-style:none;display:flex;
 align-items:center;gap:10px;flex-wrap:wrap}
details.strat>summary::-webkit-details-marker{display:none}
details.strat>summary::before{content:"\\25B8";color:var(--muted);font-size:14px;transition:transform .15s}
details.strat[open]>summary::before{transform:rotate(90deg)}
.facts{font-size:13.5px;color:var(--muted);font-weight:400}
.params{margin:8px 0 2px;display:flex;flex-wrap:wrap;gap:5px}
.params code{background:#f1f3f6;border:1px solid var(--line);border-radius:5px;padding:0 6px;font-size:12px}
.charts{display:grid;grid-template-columns:repeat(auto-fill,minmax(430px,1fr));gap:14px 22px;margin-top:12px}
figure{margin:0}
figcaption{font-size:14px;margin-bottom:4px}
figcaption b{font-weight:600}
figcaption span{display:block;color:var(--muted);font-size:12.5px}
.chart-svg{width:100%;height:auto;display:block}
.chart-svg text{font-family:inherit}
.chart-svg .tick{font-size:10.5px;fill:#6b7280}
.chart-svg .axlabel{font-size:11.5px;fill:#4b5563}
.chart-svg .ptitle{font-size:11.5px;fill:#374151;font-weight:600}
.chart-svg .barlabel{font-size:10px;font-weight:600}
.chart-svg .empty{font-size:12px;fill:#9ca3af}
.chart-svg .grid{stroke:#edf0f4;stroke-width:1}
.chart-svg .axis{stroke:#9aa3af;stroke-width:1}
.chart-svg .sep{stroke:#d5dae1;stroke-dasharray:3 3}
.chart-svg .thr{stroke:#111827;stroke-width:1.6;stroke-dasharray:5 3}
.chart-svg .thrlabel{font-size:11px;fill:#111827;font-weight:600}
.legend{display:flex;flex-wrap:wrap;gap:4px 14px;font-size:12.5px;color:#374151;margin:4px 0 0 50px}
.legend span{display:inline-flex;align-items:center;gap:5px}
.legend .sw{width:12px;height:12px;border-radius:3px;display:inline-block;opacity:.85}
.legend .ln{width:18px;height:0;display:inline-block}
.grids{display:grid;grid-template-columns:repeat(auto-fill,minmax(500px,1fr));gap:14px 22px;margin-top:12px}
.thumbs{display:grid;grid-template-columns:repeat(8,56px);gap:3px;margin-top:4px}
.thumbs img,.thumbs .miss{width:56px;height:56px;border-radius:3px;image-rendering:pixelated;
 background:#000;display:block;outline:1px solid #e5e7eb}
.thumbs img.ood{outline:2.5px solid #d64545;outline-offset:-2.5px}
.thumbs .miss{background:repeating-linear-gradient(45deg,#f3f4f6,#f3f4f6 4px,#e5e7eb 4px,#e5e7eb 8px)}
.note{font-size:13px;color:var(--muted)}
table.picks{border-collapse:collapse;font-size:12.5px;font-variant-numeric:tabular-nums;margin-top:6px}
table.picks th,table.picks td{padding:3px 9px;border-bottom:1px solid var(--line);text-align:right}
table.picks td.item{text-align:left;font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;
 max-width:460px;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
details.sub>summary{cursor:pointer;font-size:14px;font-weight:600;margin-top:12px}
ul.notes{margin:0;padding-left:20px;color:#374151}
footer{color:var(--muted);font-size:12px;text-align:center;margin-top:26px}
"""


class _Report:
    """Builds the HTML of :func:`write_report` (see there for the inputs)."""

    def __init__(self, title: str, results: list[dict], strategies: Mapping[str, Mapping[str, Any]],
                 seed_items: Sequence[str], pool_images: Callable[[int], np.ndarray] | None,
                 pool_items: Sequence[str], loss_logs: Mapping[str, str | Path],
                 notes: Sequence[str] | None) -> None:
        self.title = str(title)
        self.results = [r for r in (results or []) if isinstance(r, Mapping)]
        self.strategies = dict(strategies or {})
        self.seed_items = list(seed_items or [])
        self.pool_items = pool_items if pool_items is not None else []
        self.loss_logs = dict(loss_logs or {})
        self.notes = [str(n) for n in (notes or [])]
        self.thumbs = _Thumbs(pool_images)
        self.warnings: list[str] = []
        names = [str(r.get("strategy", f"#{i}")) for i, r in enumerate(self.results)]
        names += [n for n in self.strategies if n not in names]
        self.names = names
        self.colors: dict[str, str] = {}
        k = 0
        for n in names:
            if n == "none":
                self.colors[n] = NONE_COLOR
            else:
                self.colors[n] = PALETTE[k % len(PALETTE)]
                k += 1
        self.anchors = {n: f"s{i}-{re.sub(r'[^A-Za-z0-9_-]+', '-', n)[:40]}" for i, n in enumerate(names)}
        self._pool_labels: np.ndarray | None | bool = False  # False = not computed yet

    # ----------------------------------------------------------------------------- helpers
    def chip(self, name: str) -> str:
        return f'<span class="chip" style="background:{self.colors.get(name, NONE_COLOR)}">{_esc(name)}</span>'

    def pool_labels(self) -> np.ndarray | None:
        if self._pool_labels is False:
            self._pool_labels = _labels_of(self.pool_items)
        return self._pool_labels  # type: ignore[return-value]

    def labels_for(self, sc: _Scores) -> np.ndarray | None:
        """Labels of the rows of ``sc``: from ``pool_items`` when they cover it, else from the csv items."""
        pl = self.pool_labels()
        if pl is not None and sc.n and int(sc.index.min()) >= 0 and int(sc.index.max()) < len(pl):
            return pl[sc.index]
        if sc.csv_labels is None and pl is not None:  # labels were skipped on the first read
            sc.csv_labels = _read_scores(sc.path, 0, parse_labels=True).csv_labels
        return sc.csv_labels

    def item_text(self, sc: _Scores | None, indices: Sequence[int]) -> dict[int, str]:
        out: dict[int, str] = {}
        missing = []
        for i in indices:
            i = int(i)
            if 0 <= i < len(self.pool_items):
                out[i] = str(self.pool_items[i])
            elif sc is not None and i in sc.items:
                out[i] = sc.items[i]
            else:
                missing.append(i)
        if missing and sc is not None:
            got = _fetch_items(sc.path, missing)
            sc.items.update(got)
            out.update(got)
        return out

    # ----------------------------------------------------------------------------- pieces
    def takeaways(self) -> str:
        rows = [(str(r.get("strategy", "")), r) for r in self.results]
        base = next((r for n, r in rows if n == "none"), None)
        cards = []

        def card(label: str, col: _Col, exclude_none: bool = False, vs_none: bool = True) -> None:
            vals = [(n, col.get(r)) for n, r in rows if not (exclude_none and n == "none")]
            vals = [(n, f) for n, f in vals if f is not None]
            if len(vals) < 1:
                return
            shown = {round(100 * f[0], 1) for _, f in vals}
            if len(vals) > 1 and len(shown) == 1:
                return  # everyone ties: nothing to take away
            target = (min if col.lower_better else max)(shown)
            tied = [(n_, f) for n_, f in vals if round(100 * f[0], 1) == target]
            tied.sort(key=lambda t: t[0] == "none")  # on a tie, name a strategy before the seed alone
            n, (m, s) = tied[0]
            unit = " pts" if col.key == "group_std" else "%"
            detail = ""
            if len(tied) > 1:
                detail = "tied with " + ", ".join(_esc(t[0]) for t in tied[1:4]) + ("&hellip;" if len(tied) > 4 else "")
            elif vs_none and base is not None and n != "none":
                b = col.get(base)
                if b is not None:
                    diff = 100 * (m - b[0])
                    detail = f"{diff:+.1f} pts vs seed alone ({_pct(b[0])}{unit})"
            elif len(vals) > 1:
                runner = sorted(vals, key=lambda t: t[1][0], reverse=not col.lower_better)[1]
                detail = f"next: {_esc(runner[0])} ({_pct(runner[1][0])}{unit})"
            std = f'<span class="sd">&plusmn;{_pct(s)}</span>' if s is not None else ""
            cards.append(f'<div class="card"><div class="k">{_esc(label)}</div><div class="v">{self.chip(n)}'
                         f"<span>{_pct(m)}{unit}{std}</span></div><div class=\"d\">{detail or '&nbsp;'}</div></div>")

        cols = {c.key: c for c in COLUMNS}
        card("Best Few-group accuracy", cols["few"])
        card("Most balanced (lowest group std)", cols["group_std"])
        card("Best few-shot accuracy (all)", cols["all"])
        card("Best full-shot accuracy", cols["fullshot"])
        card("Best kNN accuracy", cols["knn"])
        card("Lowest out-of-domain rate", cols["ood"], exclude_none=True, vs_none=False)
        card("Largest Few-class share", cols["few_share"], exclude_none=True, vs_none=False)
        if not cards:
            return '<p class="note">No evaluation results to compare.</p>'
        return '<div class="cards">' + "".join(cards) + "</div>"

    def table(self) -> str:
        if not self.results:
            return '<p class="note">No results.</p>'
        figs = [[c.get(r) for c in COLUMNS] for r in self.results]
        best: list[set[int]] = []
        for j, c in enumerate(COLUMNS):
            vals = [(i, round(100 * f[j][0], 1)) for i, f in enumerate(figs) if f[j] is not None]
            distinct = {v for _, v in vals}
            if len(vals) < 2 or len(distinct) < 2:
                best.append(set())
                continue
            target = (min if c.lower_better else max)(distinct)
            best.append({i for i, v in vals if v == target})
        groups: list[tuple[str, int]] = []
        for c in COLUMNS:
            if groups and groups[-1][0] == c.group:
                groups[-1] = (c.group, groups[-1][1] + 1)
            else:
                groups.append((c.group, 1))
        h = ['<div class="tablewrap"><table class="cmp"><thead><tr class="grp"><th></th>']
        h += [f'<th colspan="{k}" class="g">{_esc(g)}</th>' for g, k in groups]
        h.append('</tr><tr><th class="name">Strategy</th>')
        h += [f'<th title="{c.legend}">{_esc(c.head)}{" &#8595;" if c.lower_better else ""}</th>' for c in COLUMNS]
        h.append("</tr></thead><tbody>")
        for i, r in enumerate(self.results):
            name = str(r.get("strategy", f"#{i}"))
            label = "none (seed alone)" if name == "none" else name
            link = (f'<a href="#{self.anchors[name]}" style="color:inherit">{_esc(label)}</a>'
                    if name in self.strategies else _esc(label))
            h.append(f'<tr class="{"none" if name == "none" else "s"}"><td class="name">'
                     f'<span class="dot" style="background:{self.colors.get(name, NONE_COLOR)}"></span>{link}</td>')
            for j, c in enumerate(COLUMNS):
                cls = ' class="best"' if i in best[j] else ""
                h.append(f"<td{cls}>{_cell_html(figs[i][j])}</td>")
            h.append("</tr>")
        h.append("</tbody></table></div>")
        h.append('<ul class="keys">')
        h += [f"<li><b>{_esc(c.head)}</b> &mdash; {c.legend}</li>" for c in COLUMNS]
        h.append("<li><b>Highlighted</b> &mdash; best value of the column (&#8595; lower is better); "
                 "all figures in percent</li></ul>")
        return "".join(h)

    def composition(self) -> str:
        rows = []
        for r in self.results:
            name = str(r.get("strategy", ""))
            ood = _fig(r.get("ood_rate"))
            few = _fig(r.get("few_share"))
            if name == "none" or (ood is None and few is None):
                continue
            segs = []
            used = 0.0
            for label, f, color in (("out-of-domain", ood, OOD_COLOR), ("Few classes", few, FEW_COLOR),
                                    ("Medium classes", _fig(r.get("medium_share")), "#7fb3a0"),
                                    ("Many classes", _fig(r.get("many_share")), "#98a6b8")):
                if f is None:
                    continue
                v = min(max(f[0], 0.0), max(0.0, 1.0 - used))
                used += v
                txt = f"{100 * v:.0f}%" if v >= 0.06 else ""
                segs.append(f'<span style="width:{100 * v:.2f}%;background:{color}" '
                            f'title="{label}: {100 * v:.1f}%">{txt}</span>')
            rest = max(0.0, 1.0 - used)
            if rest > 0:
                txt = f"{100 * rest:.0f}%" if rest >= 0.06 else ""
                segs.append(f'<span style="width:{100 * rest:.2f}%;background:{REST_COLOR}" '
                            f'title="other in-domain: {100 * rest:.1f}%">{txt}</span>')
            rows.append(f'<div>{self.chip(name)}</div><div class="bar">{"".join(segs)}</div>')
        if not rows:
            return ""
        has_mm = any(_fig(r.get("many_share")) is not None for r in self.results)
        leg = [("out-of-domain", OOD_COLOR, "fill"), ("Few classes", FEW_COLOR, "fill")]
        if has_mm:
            leg += [("Medium classes", "#7fb3a0", "fill"), ("Many classes", "#98a6b8", "fill")]
        leg.append(("other in-domain" if not has_mm else "rest", REST_COLOR, "fill"))
        return ('<div class="comp"><h3>What each selection is made of</h3><div class="rows">' + "".join(rows)
                + "<div></div>" + _legend(leg).replace('class="legend"', 'class="legend" style="margin-left:0"')
                + "</div></div>")

    def class_chart(self, name: str, info: Mapping[str, Any], sc: _Scores | None,
                    labels: np.ndarray | None) -> str:
        seed = {str(k): int(v) for k, v in (info.get("class_counts_seed") or {}).items() if _num(v) is not None}
        sel = {str(k): int(v) for k, v in (info.get("class_counts_selected") or {}).items() if _num(v) is not None}
        if not seed:
            sl = _labels_of(self.seed_items)
            if sl is not None:
                u, c = np.unique(sl, return_counts=True)
                seed = {str(int(a)): int(b) for a, b in zip(u, c)}
        if not sel and sc is not None and labels is not None:
            u, c = np.unique(labels[sc.selected], return_counts=True)
            sel = {str(int(a)): int(b) for a, b in zip(u, c)}
        ood_keys = {"-1"}
        classes = sorted({k for k in (*seed, *sel) if k not in ood_keys},
                         key=lambda k: (-seed.get(k, 0), (0, int(k)) if re.fullmatch(r"-?\d+", k) else (1, 0), k))
        if not classes and not sel:
            return ""
        ood = sel.get("-1") if sel else None
        seed_v = [seed.get(k, 0) for k in classes]
        add_v = [sel.get(k, 0) for k in classes]
        svg = _svg_class_counts(classes, seed_v, add_v, ood, self.colors[name], f"class counts {name}")
        total_sel = sum(sel.values())
        sub = (f"seed {_count(sum(seed_v))} &#8594; seed + selection {_count(sum(seed_v) + sum(add_v))} in-domain"
               + (f"; {_count(ood)} of {_count(total_sel)} selected are out-of-domain" if ood is not None else ""))
        leg = [("seed", SEED_COLOR, "fill"), (f"added by {name}", self.colors[name], "fill")]
        if ood is not None:
            leg.append(("selected out-of-domain", OOD_COLOR, "fill"))
        return (f"<figure><figcaption><b>Per-class counts: seed vs seed + selection</b><span>{sub}</span>"
                f"</figcaption>{svg}{_legend(leg)}</figure>")

    def score_hist(self, name: str, sc: _Scores, labels: np.ndarray | None, metric: str) -> str:
        vals = sc.ecle if metric == "ecle" else sc.distance
        fin = np.isfinite(vals)
        if not fin.any():
            return ""
        lo, hi = float(vals[fin].min()), float(vals[fin].max())
        if hi <= lo:
            hi = lo + (abs(lo) * 1e-3 or 1e-3)
        edges = np.linspace(lo, hi, HIST_BINS + 1)
        color = self.colors[name]

        def series(mask: np.ndarray) -> list[_Series]:
            ns = mask & ~sc.selected & fin
            s = mask & sc.selected & fin
            return [_Series(f"not selected (n={_count(ns.sum())})", "#8b95a3", np.histogram(vals[ns], edges)[0]),
                    _Series(f"selected (n={_count(s.sum())})", color, np.histogram(vals[s], edges)[0])]

        if labels is not None:
            ind = labels >= 0
            panels = [(f"in-domain · not selected {_count((ind & ~sc.selected & fin).sum())}, "
                       f"selected {_count((ind & sc.selected & fin).sum())}", series(ind)),
                      (f"out-of-domain · not selected {_count((~ind & ~sc.selected & fin).sum())}, "
                       f"selected {_count((~ind & sc.selected & fin).sum())}", series(~ind))]
        else:
            allm = np.ones(sc.n, dtype=bool)
            panels = [(f"all pool images · not selected {_count((~sc.selected & fin).sum())}, "
                       f"selected {_count((sc.selected & fin).sum())}", series(allm))]
        label = "ECLE (tailness: higher = looks rarer to the model)" if metric == "ecle" else \
            "distance to the seed's centroids (higher = farther from the seed)"
        svg = _svg_histogram(edges, panels, label, f"{metric} histogram {name}")
        head = "ECLE" if metric == "ecle" else "Distance"
        sub = "each bar series normalised to its own total"
        return (f"<figure><figcaption><b>{head}: selected vs not selected</b><span>{sub}</span></figcaption>"
                f"{svg}{_legend([('not selected', '#8b95a3', 'fill'), ('selected', color, 'fill')])}</figure>")

    def gate_hist(self, name: str, summary: Any, sc: _Scores | None) -> tuple[str, str]:
        """(chart html, one-line text) for the selection's in-domain gate, if its summary holds one."""
        g = _find_gate(summary)
        if g is None:
            return "", ""
        bits = [f"threshold {g.threshold:.4g}"]
        if g.quantile is not None:
            bits.append(f"quantile {g.quantile:g} of held-out seed distances")
        if g.rejected is not None:
            bits.append(f"{_count(g.rejected)} pool images rejected")
        text = "in-domain gate: " + ", ".join(bits)
        if g.edges is not None and g.seed_counts is not None:
            edges = g.edges
            seed_counts = g.seed_counts
            pool_counts = g.pool_counts
            if pool_counts is None and sc is not None and np.isfinite(sc.distance).any():
                d = sc.distance[np.isfinite(sc.distance)]
                pool_counts = np.histogram(np.clip(d, edges[0], edges[-1]), edges)[0]
        elif g.seed_values is not None:
            pool_vals = g.pool_values
            if pool_vals is None and sc is not None:
                pool_vals = sc.distance[np.isfinite(sc.distance)]
            allv = [g.seed_values] + ([pool_vals] if pool_vals is not None and pool_vals.size else [])
            lo = min(float(a.min()) for a in allv)
            hi = max(float(a.max()) for a in allv)
            lo, hi = min(lo, g.threshold), max(hi, g.threshold)
            if hi <= lo:
                hi = lo + 1e-6
            edges = np.linspace(lo, hi, HIST_BINS + 1)
            seed_counts = np.histogram(g.seed_values, edges)[0]
            pool_counts = None if pool_vals is None or not pool_vals.size else np.histogram(pool_vals, edges)[0]
        else:
            return "", text
        series = [_Series(f"held-out seed (n={_count(np.sum(seed_counts))})", "#111827",
                          np.asarray(seed_counts, dtype=np.float64), filled=True)]
        if pool_counts is not None:
            series.insert(0, _Series(f"pool (n={_count(np.sum(pool_counts))})", self.colors[name],
                                     np.asarray(pool_counts, dtype=np.float64), filled=True))
        svg = _svg_histogram(np.asarray(edges, dtype=np.float64), [("", series)],
                             "distance to the nearest seed centroid", f"gate histogram {name}",
                             threshold=g.threshold, threshold_label=f"gate {g.threshold:.3g}")
        sub = ("pool images right of the line are rejected before scoring"
               + (f" ({_count(g.rejected)} rejected)" if g.rejected is not None else ""))
        leg = [(s.label, s.color, "fill") for s in series] + [("threshold", "#111827", "thr")]
        html_ = (f'<figure class="gate"><figcaption><b>In-domain gate: held-out seed vs pool distances</b>'
                 f"<span>{_esc(sub)}</span></figcaption>{svg}{_legend(leg)}</figure>")
        return html_, text

    # robust's density-ratio gate terms: info key -> (title, x label, one-line text, side note)
    RATIO_GATES = {
        "seed_share": ("Seed-share gate", "share of seed images among the nearest neighbours",
                       "seed-share gate: threshold {thr:.3g} (k {k}), {rejected} pool images below it",
                       "pool images left of the line have too little seed around them and are rejected"),
        "seed_ratio": ("Seed-vs-pool classifier gate", "cross-fitted seed-vs-pool logit",
                       "classifier gate: threshold {thr:.3g}, {rejected} pool images below it",
                       "pool images left of the line are far less seed-like than any but the rarest seed "
                       "images and are rejected"),
    }

    def ratio_gate_hist(self, name: str, summary: Any, key: str) -> tuple[str, str]:
        """(chart html, one-line text) for one of robust's density-ratio gates (``RATIO_GATES``), if present."""
        title, xlabel, line, note = self.RATIO_GATES[key]
        info = summary.get("info") if isinstance(summary, Mapping) else None
        gate = info.get(key) if isinstance(info, Mapping) else None
        hist = gate.get("histogram") if isinstance(gate, Mapping) else None
        thr = _num(gate.get("threshold")) if isinstance(gate, Mapping) else None
        if not isinstance(hist, Mapping) or thr is None:
            return "", ""
        try:
            edges = np.asarray(hist["edges"], dtype=np.float64)
            seed_counts = np.asarray(hist["seed_heldout"], dtype=np.float64)
            pool_counts = np.asarray(hist["pool"], dtype=np.float64)
        except (KeyError, TypeError, ValueError):
            return "", ""
        if edges.ndim != 1 or seed_counts.shape != pool_counts.shape or edges.size != seed_counts.size + 1:
            return "", ""
        rejected = gate.get("rejected")
        text = line.format(thr=thr, k=gate.get("k"), rejected=_count(rejected) if rejected is not None else "?")
        series = [_Series(f"pool (n={_count(pool_counts.sum())})", self.colors[name], pool_counts, filled=True),
                  _Series(f"held-out seed (n={_count(seed_counts.sum())})", "#111827", seed_counts, filled=True)]
        svg = _svg_histogram(edges, [("", series)], xlabel, f"{title} histogram {name}", threshold=thr,
                             threshold_label=f"gate {thr:.3g}")
        leg = [(x.label, x.color, "fill") for x in series] + [("threshold", "#111827", "thr")]
        html_ = (f'<figure class="gate"><figcaption><b>{_esc(title)}: held-out seed vs pool</b>'
                 f"<span>{_esc(note)}</span></figcaption>{svg}{_legend(leg)}</figure>")
        return html_, text

    def grid(self, title: str, sub: str, entries: Sequence[tuple[int, int | None, str]],
             sc: _Scores | None) -> str:
        """A thumbnail grid of ``(pool index, label or None, tooltip details)`` entries."""
        if self.thumbs.loader is None or not entries:
            return ""
        texts = self.item_text(sc, [e[0] for e in entries])
        cells = []
        for i, lab, detail in entries:
            uri = self.thumbs.get(i)
            tip = " · ".join(t for t in (f"pool row {i}", detail, texts.get(i, "")) if t)
            cls = ' class="ood"' if lab is not None and lab < 0 else ""
            if uri is None:
                cells.append(f'<div class="miss" title="{_esc(tip + " (image unavailable)")}"></div>')
            else:
                cells.append(f'<img src="{uri}" width="{THUMB_PX}" height="{THUMB_PX}" alt="" '
                             f'title="{_esc(tip)}"{cls}>')
        return (f'<figure><figcaption><b>{_esc(title)}</b><span>{_esc(sub)}</span></figcaption>'
                f'<div class="thumbs">{"".join(cells)}</div></figure>')

    @staticmethod
    def entries(sc: _Scores, rows: Iterable[int], labels: np.ndarray | None) -> list[tuple[int, int | None, str]]:
        """Grid entries for rows of ``sc``: pool index, label, and pick rank / scores as a tooltip."""
        out = []
        for r in rows:
            r = int(r)
            bits = [f"pick {int(sc.rank[r])}"] if sc.rank[r] >= 0 else []
            for n_, a in (("ECLE", sc.ecle), ("distance", sc.distance), ("score", sc.score)):
                if np.isfinite(a[r]):
                    bits.append(f"{n_} {a[r]:.3g}")
            if labels is not None:
                bits.append("out-of-domain" if labels[r] < 0 else f"label {int(labels[r])}")
            out.append((int(sc.index[r]), None if labels is None else int(labels[r]), ", ".join(bits)))
        return out

    def picks_table(self, sc: _Scores, labels: np.ndarray | None) -> str:
        order = np.flatnonzero((sc.rank >= 0) & (sc.rank < FIRST_PICKS_TABLE))
        if not order.size:
            return ""
        order = order[np.argsort(sc.rank[order], kind="stable")]
        texts = self.item_text(sc, [int(sc.index[r]) for r in order])
        head = "<tr><th>pick</th><th style=\"text-align:left\">item</th>" + ("<th>label</th>" if labels is not None else "")
        cols = [(n, a) for n, a in (("ECLE", sc.ecle), ("distance", sc.distance), ("score", sc.score))
                if np.isfinite(a).any()]
        head += "".join(f"<th>{n}</th>" for n, _ in cols) + "</tr>"
        rows = []
        for r in order:
            i = int(sc.index[r])
            t = texts.get(i, "")
            cells = f'<td>{int(sc.rank[r])}</td><td class="item" title="{_esc(t)}">{_esc(t)}</td>'
            if labels is not None:
                lab = int(labels[r])
                cells += f'<td>{"OOD" if lab < 0 else lab}</td>'
            cells += "".join(f"<td>{a[r]:.4g}</td>" if np.isfinite(a[r]) else "<td>&ndash;</td>" for _, a in cols)
            rows.append(f"<tr>{cells}</tr>")
        return (f'<details class="sub"><summary>First {len(order)} picks</summary>'
                f'<table class="picks"><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table></details>')

    def strategy_section(self, name: str, info: Mapping[str, Any]) -> str:
        summary = info.get("summary")
        if isinstance(summary, (str, os.PathLike)) and Path(summary).is_file():
            try:
                summary = json.loads(Path(summary).read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                self.warnings.append(f"{name}: could not read {summary}: {exc}")
        if not isinstance(summary, Mapping):
            summary = {}
        sc: _Scores | None = None
        path = info.get("scores_csv")
        if path is not None:
            p = Path(path)
            if p.is_file():
                try:
                    sc = _read_scores(p, GRID_COLS * GRID_ROWS, parse_labels=self.pool_labels() is None)
                except (OSError, ValueError, csv.Error) as exc:
                    self.warnings.append(f"{name}: could not read {p}: {exc}")
            else:
                self.warnings.append(f"{name}: {p} not found")
        labels = self.labels_for(sc) if sc is not None else None

        facts = []
        counts = summary.get("counts") if isinstance(summary.get("counts"), Mapping) else {}
        params = summary.get("parameters") if isinstance(summary.get("parameters"), Mapping) else {}
        if sc is not None:
            facts.append(f"{_count(sc.selected.sum())} selected of {_count(sc.n)} pool images")
        elif counts.get("selected") is not None:
            facts.append(f"{_count(counts['selected'])} selected")
        if labels is not None and sc is not None and sc.selected.any():
            facts.append(f"{100 * float((labels[sc.selected] < 0).mean()):.1f}% out-of-domain")
        gate_chart, gate_text = self.gate_hist(name, summary, sc)
        if gate_text:
            facts.append(gate_text)
        for key in self.RATIO_GATES:
            chart, text = self.ratio_gate_hist(name, summary, key)
            if text:
                facts.append(text)
            gate_chart += chart
        timings = summary.get("timings_s") if isinstance(summary.get("timings_s"), Mapping) else {}
        tsum = sum(v for v in (_num(x) for x in timings.values()) if v is not None)
        if tsum > 0:
            facts.append(f"selection took {tsum:.1f}s")

        parts = [f'<details class="strat" open id="{self.anchors[name]}"><summary>{self.chip(name)}'
                 f'<span class="facts">{_esc(" · ".join(facts))}</span></summary>']
        if params:
            shown = []
            for k, v in params.items():
                if isinstance(v, (Mapping, list, tuple)):
                    continue
                shown.append(f"<code>{_esc(k)}={_esc(v)}</code>")
            if shown:
                parts.append('<div class="params">' + "".join(shown) + "</div>")

        charts = [self.class_chart(name, info, sc, labels)]
        if sc is not None:
            charts.append(self.score_hist(name, sc, labels, "ecle"))
            charts.append(self.score_hist(name, sc, labels, "distance"))
        charts.append(gate_chart)
        charts = [c for c in charts if c]
        if charts:
            parts.append('<div class="charts">' + "".join(charts) + "</div>")
        elif sc is None:
            parts.append('<p class="note">No scores.csv for this strategy.</p>')

        if sc is not None and self.thumbs.loader is not None:
            k = GRID_COLS * GRID_ROWS
            grids = []
            picked = np.flatnonzero(sc.rank >= 0)
            first = picked[np.argsort(sc.rank[picked], kind="stable")][:k]
            grids.append(self.grid("First picked", "in pick order (left to right, top to bottom); "
                                   "red frame = out-of-domain", self.entries(sc, first, labels), sc))
            sel_rows = np.flatnonzero(sc.selected)
            if sel_rows.size > k:
                rng = np.random.default_rng(RANDOM_SEED)
                sample = np.sort(rng.choice(sel_rows, size=k, replace=False))
                grids.append(self.grid("Random sample of the selection", "seeded; red frame = out-of-domain",
                                       self.entries(sc, sample, labels), sc))
            cand = np.flatnonzero(~sc.selected & np.isfinite(sc.distance))
            if cand.size:
                kk = min(k, cand.size)
                far = cand[np.argpartition(-sc.distance[cand], kk - 1)[:kk]]
                far = far[np.argsort(-sc.distance[far], kind="stable")]
                grids.append(self.grid("Most rejected as outliers", "not selected, farthest from the seed first",
                                       self.entries(sc, far, labels), sc))
            grids = [g for g in grids if g]
            if grids:
                parts.append('<div class="grids">' + "".join(grids) + "</div>")
        if sc is not None:
            parts.append(self.picks_table(sc, labels))
        parts.append("</details>")
        return "".join(parts)

    def pool_section(self) -> str:
        if self.thumbs.loader is None:
            return ""
        n = len(self.pool_items)
        if n == 0:
            return ""
        k = GRID_COLS * GRID_ROWS
        rng = np.random.default_rng(RANDOM_SEED)
        idx = np.sort(rng.choice(n, size=min(k, n), replace=False))
        pl = self.pool_labels()
        entries = [(int(i), None if pl is None else int(pl[i]),
                    "" if pl is None else ("out-of-domain" if pl[i] < 0 else f"label {int(pl[i])}")) for i in idx]
        g = self.grid("Random pool images", "a seeded sample of the whole pool, for reference; "
                      "red frame = out-of-domain", entries, None)
        return g

    def loss_section(self) -> str:
        series = []
        used: dict[str, int] = {}
        extra_k = 0
        for run, p in self.loss_logs.items():
            path = Path(p)
            try:
                xs, ys = _read_loss_log(path)
            except (OSError, csv.Error, UnicodeDecodeError) as exc:
                self.warnings.append(f"loss log {run}: {exc}")
                continue
            if not len(xs):
                continue
            strat = self.strategy_of(str(run))
            if strat is not None:
                color = self.colors[strat]
            else:
                color = EXTRA_COLORS[extra_k % len(EXTRA_COLORS)]
                extra_k += 1
            k = used.get(color, 0)
            used[color] = k + 1
            dash = ("", "6 3", "2 3", "8 3 2 3")[k % 4]
            series.append((str(run), color, dash, xs, ys))
        if not series:
            return ""
        svg = _svg_lines(series, "epoch", "training loss", "training loss curves")
        leg = _legend([(s[0], s[1], "dash" if s[2] else "line") for s in series])
        return (f"<figure><figcaption><b>Training loss</b><span>self-supervised loss per epoch, one line per "
                f"training run</span></figcaption>{svg}{leg}</figure>")

    def strategy_of(self, run: str) -> str | None:
        """The strategy a run name refers to (the longest strategy name appearing as a token)."""
        best = None
        for s in self.names:
            if re.search(rf"(?<![\w+]){re.escape(s)}(?![\w+])", run) and (best is None or len(s) > len(best)):
                best = s
        return best

    def header(self) -> str:
        n_pool = len(self.pool_items)
        if not n_pool:
            for info in self.strategies.values():
                s = info.get("summary") if isinstance(info, Mapping) else None
                c = s.get("counts") if isinstance(s, Mapping) else None
                if isinstance(c, Mapping) and _num(c.get("pool")) is not None:
                    n_pool = int(c["pool"])
                    break
        budget = None
        for info in self.strategies.values():
            s = info.get("summary") if isinstance(info, Mapping) else None
            p = s.get("parameters") if isinstance(s, Mapping) else None
            if isinstance(p, Mapping) and _num(p.get("budget")) is not None:
                budget = int(p["budget"])
                break
        facts = []
        if self.seed_items:
            facts.append(f"seed {_count(len(self.seed_items))} images")
        if n_pool:
            facts.append(f"pool {_count(n_pool)} images")
        if budget is not None:
            facts.append(f"budget {_count(budget)}")
        facts.append(f"{len([n for n in self.names if n != 'none'])} strategies")
        nav = "".join(f'<a href="#{self.anchors[n]}">{self.chip(n)}</a>' for n in self.names if n in self.strategies)
        return (f"<header><h1>{_esc(self.title)}</h1><div class=\"sub\">MAK open-world sampling report &middot; "
                f"{_esc(' · '.join(facts))}</div>"
                + (f'<div class="nav">{nav}</div>' if nav else "") + self.takeaways() + "</header>")

    def build(self) -> str:
        from . import __version__

        body = [self.header()]
        body.append(f"<section><h2>Comparison</h2>{self.table()}{self.composition()}</section>")
        strat_html = []
        for name in self.names:
            if name in self.strategies and isinstance(self.strategies[name], Mapping):
                strat_html.append(self.strategy_section(name, self.strategies[name]))
        if strat_html:
            body.append('<h2 style="margin:26px 0 0">Selections</h2>')
            body += strat_html
        tail = [x for x in (self.pool_section(), self.loss_section()) if x]
        if tail:
            body.append(f'<section><h2>Pool and training</h2><div class="charts">{"".join(tail)}</div></section>')
        notes = list(self.notes)
        if self.thumbs.failed:
            notes.append(f"{self.thumbs.failed} pool image(s) could not be loaded (shown hatched)")
        notes += self.warnings
        if notes:
            body.append("<section><h2>Notes</h2><ul class=\"notes\">"
                        + "".join(f"<li>{_esc(n)}</li>" for n in notes) + "</ul></section>")
        body.append(f"<footer>generated by mak {_esc(__version__)} &middot; self-contained: no network "
                    f"access needed</footer>")
        page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
                "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
                f"<title>{_esc(self.title)}</title><style>{CSS}</style></head><body><main>"
                + "".join(body) + "</main></body></html>\n")
        return page.encode("ascii", "xmlcharrefreplace").decode("ascii")


def write_report(out_path: str | os.PathLike, *, title: str, results: list[dict],
                 strategies: dict[str, dict], seed_items: list[str],
                 pool_images: Callable[[int], np.ndarray] | None, pool_items: list[str],
                 loss_logs: dict[str, str | Path], notes: list[str] | None = None) -> Path:
    """Write the run report, one self-contained HTML file, atomically to ``out_path``; return its path.

    Args:
        title: the page title (e.g. the run name).
        results: one dict per strategy (and ``"none"``, the seed alone) with ``strategy``,
            ``ood_rate``, ``few_share``, ``fullshot_acc``, ``fewshot_acc`` (optionally
            ``fewshot_std``), ``knn_acc``, ``group_acc`` (``many``/``medium``/``few``) and
            ``group_std``; each figure a fraction, ``{"mean": x, "std": y}`` or None.
        strategies: per strategy name, ``scores_csv`` (path of the selection's scores.csv),
            ``summary`` (its summary.json dict; an in-domain gate in it is drawn),
            ``class_counts_seed`` and ``class_counts_selected`` (``{class: count}``, ``"-1"`` =
            out-of-domain). Any key may be missing.
        seed_items: the seed's item lines (for its size, and its class counts when not given).
        pool_images: ``pool_images(i)`` -> uint8 HxW or HxWxC array of pool row ``i``; None
            leaves the thumbnail grids out.
        pool_items: the pool's item lines, by pool row (labels, tooltips, the pool size).
        loss_logs: run name -> training ``log.csv`` (``epoch, loss, lr, images_per_s``).
        notes: free-text lines shown at the end of the page.
    """
    out = Path(out_path)
    page = _Report(title, results, strategies, seed_items, pool_images, pool_items, loss_logs, notes).build()
    write_text(out, page)
    return out
