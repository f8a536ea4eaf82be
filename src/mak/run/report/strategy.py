"""One strategy's section of the page: what its selection is and how it was made.

The section is a collapsible block headed by the strategy's facts (selection size, out-of-domain
share, gates, time taken) and parameters, with per-class counts of seed vs seed + selection,
histograms of ECLE and of distance for selected vs not selected pool images (split by in-domain /
out-of-domain when the items carry labels), the gate charts, thumbnail grids (first picks, a
seeded sample of the selection, the farthest not-selected images) and a table of the first picks.
An unreadable ``summary.json`` or ``scores.csv`` leaves its parts out and adds a warning.
"""
from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping

import numpy as np

from mak.run.report.charts import HIST_BINS, legend, Series, svg_class_counts, svg_histogram
from mak.run.report.format import fmt_count, esc, num
from mak.run.report.gates import gate_charts
from mak.run.report.inputs import labels_of, read_scores, Scores, without_label
from mak.run.report.style import OOD_COLOR, SEED_COLOR
from mak.run.report.thumbs import GRID_COLS, GRID_ROWS, ood_note, RANDOM_SEED, thumb_grid

if TYPE_CHECKING:
    from mak.run.report.context import Context

FIRST_PICKS_TABLE = 12


def strategy_section(ctx: Context, name: str, info: Mapping[str, Any]) -> str:
    """The section of strategy ``name`` from its ``strategies`` entry ``info``."""
    summary = _load_summary(ctx, name, info.get("summary"))
    sc = _load_scores(ctx, name, info.get("scores_csv"))
    labels = ctx.labels_for(sc) if sc is not None else None
    gate_html, gate_facts = gate_charts(ctx, name, summary, sc)
    facts = _facts(summary, sc, labels, gate_facts)
    parts = [f'<details class="strat" open id="{ctx.anchors[name]}"><summary>{ctx.chip(name)}'
             f'<span class="facts">{esc(" · ".join(facts))}</span></summary>', _params(summary),
             _file_links(ctx, info.get("scores_csv"))]
    charts = [_class_chart(ctx, name, info, sc, labels)]
    if sc is not None:
        charts.append(_score_hist(ctx, name, sc, labels, "ecle"))
        charts.append(_score_hist(ctx, name, sc, labels, "distance"))
    charts.append(gate_html)
    charts = [c for c in charts if c]
    if charts:
        parts.append('<div class="charts">' + "".join(charts) + "</div>")
    elif sc is None:
        parts.append('<p class="note">No scores.csv for this strategy.</p>')
    if sc is not None:
        parts.append(_selection_grids(ctx, sc, labels))
        parts.append(_picks_table(ctx, sc, labels))
    parts.append("</details>")
    return "".join(parts)


def _file_links(ctx: Context, scores_csv: Any) -> str:
    """Links to the selection's files beside ``scores_csv``, relative to the page; "" when none exist."""
    if not isinstance(scores_csv, (str, os.PathLike)) or ctx.out_dir is None:
        return ""
    folder = Path(scores_csv).parent
    links = []
    for name in ("selection.txt", "scores.csv", "summary.json"):
        if (folder / name).is_file():
            href = Path(os.path.relpath(folder / name, ctx.out_dir)).as_posix()
            links.append(f'<a href="{esc(href)}">{name}</a>')
    return f'<p class="files">files: {" · ".join(links)}</p>' if links else ""


def _load_summary(ctx: Context, name: str, summary: Any) -> Mapping[str, Any]:
    """The selection's summary: the dict given, or read from the path given; {} when neither."""
    if isinstance(summary, (str, os.PathLike)) and Path(summary).is_file():
        try:
            summary = json.loads(Path(summary).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            ctx.warnings.append(f"{name}: could not read {summary}: {exc}")
    return summary if isinstance(summary, Mapping) else {}


def _load_scores(ctx: Context, name: str, path: Any) -> Scores | None:
    """The selection's ``scores.csv``, or None when it is not given, missing or unreadable."""
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        ctx.warnings.append(f"{name}: {p} not found")
        return None
    try:
        return read_scores(p, GRID_COLS * GRID_ROWS, parse_labels=ctx.pool_labels() is None)
    except (OSError, ValueError, csv.Error) as exc:
        ctx.warnings.append(f"{name}: could not read {p}: {exc}")
        return None


def _facts(summary: Mapping[str, Any], sc: Scores | None, labels: np.ndarray | None,
           gate_facts: list[str]) -> list[str]:
    """The one-line facts of the section's heading: selection size, out-of-domain share, gates, time."""
    facts = []
    counts = summary.get("counts") if isinstance(summary.get("counts"), Mapping) else {}
    if sc is not None:
        facts.append(f"{fmt_count(sc.selected.sum())} selected of {fmt_count(sc.n)} pool images")
    elif counts.get("selected") is not None:
        facts.append(f"{fmt_count(counts['selected'])} selected")
    if labels is not None and sc is not None and sc.selected.any():
        facts.append(f"{100 * float((labels[sc.selected] < 0).mean()):.1f}% out-of-domain")
    facts += gate_facts
    timings = summary.get("timings_s") if isinstance(summary.get("timings_s"), Mapping) else {}
    total = num(timings.get("total"))  # the steps' timings are parts of it (the gate holds its terms)
    if total is not None and total > 0:
        facts.append(f"selection took {total:.1f}s")
    return facts


def _params(summary: Mapping[str, Any]) -> str:
    """The selection's scalar parameters as ``key=value`` tags; "" when it has none."""
    params = summary.get("parameters") if isinstance(summary.get("parameters"), Mapping) else {}
    shown = [f"<code>{esc(k)}={esc(v)}</code>" for k, v in params.items()
             if not isinstance(v, (Mapping, list, tuple))]
    return '<div class="params">' + "".join(shown) + "</div>" if shown else ""


def _class_chart(ctx: Context, name: str, info: Mapping[str, Any], sc: Scores | None,
                 labels: np.ndarray | None) -> str:
    """Per-class counts of the seed and of seed + selection, plus the selection's OOD bar."""
    seed = {str(k): int(v) for k, v in (info.get("class_counts_seed") or {}).items() if num(v) is not None}
    sel = {str(k): int(v) for k, v in (info.get("class_counts_selected") or {}).items() if num(v) is not None}
    if not seed:
        sl = labels_of(ctx.seed_items)
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
    shown = [ctx.class_names.get(k, k) for k in classes]  # Fashion-MNIST's names where the benchmark has them
    svg = svg_class_counts(shown, seed_v, add_v, ood, ctx.colors[name], f"class counts {name}")
    total_sel = sum(sel.values())
    sub = (f"seed {fmt_count(sum(seed_v))} &#8594; seed + selection {fmt_count(sum(seed_v) + sum(add_v))} in-domain"
           + (f"; {fmt_count(ood)} of {fmt_count(total_sel)} selected are out-of-domain" if ood is not None else ""))
    leg = [("seed", SEED_COLOR, "fill"), (f"added by {name}", ctx.colors[name], "fill")]
    if ood is not None:
        leg.append(("selected out-of-domain", OOD_COLOR, "fill"))
    return (f"<figure><figcaption><b>Per-class counts: seed vs seed + selection</b><span>{sub}</span>"
            f"</figcaption>{svg}{legend(leg)}</figure>")


def _score_hist(ctx: Context, name: str, sc: Scores, labels: np.ndarray | None, metric: str) -> str:
    """Histograms of ``metric`` (``ecle`` or ``distance``) for selected vs not selected images."""
    vals = sc.ecle if metric == "ecle" else sc.distance
    fin = np.isfinite(vals)
    if not fin.any():
        return ""
    lo, hi = float(vals[fin].min()), float(vals[fin].max())
    if hi <= lo:
        hi = lo + (abs(lo) * 1e-3 or 1e-3)
    edges = np.linspace(lo, hi, HIST_BINS + 1)
    color = ctx.colors[name]

    def series(mask: np.ndarray) -> list[Series]:
        ns = mask & ~sc.selected & fin
        s = mask & sc.selected & fin
        return [Series(f"not selected (n={fmt_count(ns.sum())})", "#8b95a3", np.histogram(vals[ns], edges)[0]),
                Series(f"selected (n={fmt_count(s.sum())})", color, np.histogram(vals[s], edges)[0])]

    if labels is not None:
        ind = labels >= 0
        panels = [(f"in-domain · not selected {fmt_count((ind & ~sc.selected & fin).sum())}, "
                   f"selected {fmt_count((ind & sc.selected & fin).sum())}", series(ind)),
                  (f"out-of-domain · not selected {fmt_count((~ind & ~sc.selected & fin).sum())}, "
                   f"selected {fmt_count((~ind & sc.selected & fin).sum())}", series(~ind))]
    else:
        allm = np.ones(sc.n, dtype=bool)
        panels = [(f"all pool images · not selected {fmt_count((~sc.selected & fin).sum())}, "
                   f"selected {fmt_count((sc.selected & fin).sum())}", series(allm))]
    label = "ECLE (tailness: higher = looks rarer to the model)" if metric == "ecle" else \
        "distance to the seed's centroids (higher = farther from the seed)"
    svg = svg_histogram(edges, panels, label, f"{metric} histogram {name}")
    head = "ECLE" if metric == "ecle" else "Distance"
    sub = "each bar series normalised to its own total"
    return (f"<figure><figcaption><b>{head}: selected vs not selected</b><span>{sub}</span></figcaption>"
            f"{svg}{legend([('not selected', '#8b95a3', 'fill'), ('selected', color, 'fill')])}</figure>")


def _selection_grids(ctx: Context, sc: Scores, labels: np.ndarray | None) -> str:
    """Thumbnail grids of the first picks, a seeded sample of the selection and the farthest rejects."""
    if ctx.thumbs.loader is None:
        return ""
    k = GRID_COLS * GRID_ROWS
    grids = []
    picked = np.flatnonzero(sc.rank >= 0)
    first = picked[np.argsort(sc.rank[picked], kind="stable")][:k]
    ood = ood_note(labels)
    grids.append(thumb_grid(ctx, "First picked", "in pick order (left to right, top to bottom)" + ood,
                            _grid_entries(sc, first, labels), sc))
    sel_rows = np.flatnonzero(sc.selected)
    if sel_rows.size > k:
        rng = np.random.default_rng(RANDOM_SEED)
        sample = np.sort(rng.choice(sel_rows, size=k, replace=False))
        grids.append(thumb_grid(ctx, "Random sample of the selection", "seeded" + ood,
                                _grid_entries(sc, sample, labels), sc))
    cand = np.flatnonzero(~sc.selected & np.isfinite(sc.distance))
    if cand.size:
        kk = min(k, cand.size)
        far = cand[np.argpartition(-sc.distance[cand], kk - 1)[:kk]]
        far = far[np.argsort(-sc.distance[far], kind="stable")]
        grids.append(thumb_grid(ctx, "Most rejected as outliers", "not selected, farthest from the seed first" + ood,
                                _grid_entries(sc, far, labels), sc))
    grids = [g for g in grids if g]
    return '<div class="grids">' + "".join(grids) + "</div>" if grids else ""


def _grid_entries(sc: Scores, rows: Iterable[int], labels: np.ndarray | None) -> list[tuple[int, int | None, str]]:
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


def _picks_table(ctx: Context, sc: Scores, labels: np.ndarray | None) -> str:
    """A collapsible table of the first picks: rank, item, label and scores."""
    order = np.flatnonzero((sc.rank >= 0) & (sc.rank < FIRST_PICKS_TABLE))
    if not order.size:
        return ""
    order = order[np.argsort(sc.rank[order], kind="stable")]
    texts = ctx.item_text(sc, [int(sc.index[r]) for r in order])
    head = "<tr><th>pick</th><th style=\"text-align:left\">item</th>" + ("<th>label</th>" if labels is not None else "")
    cols = [(n, a) for n, a in (("ECLE", sc.ecle), ("distance", sc.distance), ("score", sc.score))
            if np.isfinite(a).any()]
    head += "".join(f"<th>{n}</th>" for n, _ in cols) + "</tr>"
    rows = []
    for r in order:
        i = int(sc.index[r])
        t = texts.get(i, "") if labels is None else without_label(texts.get(i, ""))  # the label has its column
        cells = f'<td>{int(sc.rank[r])}</td><td class="item" title="{esc(t)}">{esc(t)}</td>'
        if labels is not None:
            lab = int(labels[r])
            cells += f'<td>{"OOD" if lab < 0 else lab}</td>'
        cells += "".join(f"<td>{a[r]:.4g}</td>" if np.isfinite(a[r]) else "<td>&ndash;</td>" for _, a in cols)
        rows.append(f"<tr>{cells}</tr>")
    return (f'<details class="sub"><summary>First {len(order)} picks</summary>'
            f'<table class="picks"><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table></details>')
