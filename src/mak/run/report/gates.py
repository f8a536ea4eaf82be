"""The charts of a selection's gates: the pool images a strategy rejects before scoring.

The in-domain gate is a threshold on the distance to the nearest seed centroid, drawn as the
histogram of held-out seed distances against pool distances (the pool's from ``scores.csv`` when
the summary holds none); robust's density-ratio gates (``RATIO_GATES``) come as ready-made
histograms in ``summary["info"]``. Each gate gives a chart and a one-line fact for the heading;
a gate without usable data gives none, never an error.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from mak.run.report.charts import HIST_BINS, _legend, _Series, _svg_histogram
from mak.run.report.format import _count, _esc, _num
from mak.run.report.inputs import _find_gate, _Gate, _Scores

if TYPE_CHECKING:
    from mak.run.report.context import _Context

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


def _gate_charts(ctx: _Context, name: str, summary: Any, sc: _Scores | None) -> tuple[str, list[str]]:
    """The charts of every gate in the selection's summary (one html string) and a fact line for each."""
    charts, text = _gate_hist(ctx, name, summary, sc)
    facts = [text] if text else []
    for key in RATIO_GATES:
        chart, text = _ratio_gate_hist(ctx, name, summary, key)
        if text:
            facts.append(text)
        charts += chart
    return charts, facts


def _gate_hist(ctx: _Context, name: str, summary: Any, sc: _Scores | None) -> tuple[str, str]:
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
    hist = _gate_counts(g, sc)
    if hist is None:
        return "", text
    edges, seed_counts, pool_counts = hist
    series = [_Series(f"held-out seed (n={_count(np.sum(seed_counts))})", "#111827",
                      np.asarray(seed_counts, dtype=np.float64), filled=True)]
    if pool_counts is not None:
        series.insert(0, _Series(f"pool (n={_count(np.sum(pool_counts))})", ctx.colors[name],
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


def _gate_counts(g: _Gate, sc: _Scores | None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None] | None:
    """``(edges, held-out seed counts, pool counts or None)`` of the gate's chart; None without seed data.

    A binned gate keeps its bins; raw distances are binned over their range and the threshold.
    """
    if g.edges is not None and g.seed_counts is not None:
        edges = g.edges
        pool_counts = g.pool_counts
        if pool_counts is None and sc is not None and np.isfinite(sc.distance).any():
            d = sc.distance[np.isfinite(sc.distance)]
            pool_counts = np.histogram(np.clip(d, edges[0], edges[-1]), edges)[0]
        return edges, g.seed_counts, pool_counts
    if g.seed_values is None:
        return None
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
    return edges, seed_counts, pool_counts


def _ratio_gate_hist(ctx: _Context, name: str, summary: Any, key: str) -> tuple[str, str]:
    """(chart html, one-line text) for one of robust's density-ratio gates (``RATIO_GATES``), if present."""
    title, xlabel, line, note = RATIO_GATES[key]
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
    series = [_Series(f"pool (n={_count(pool_counts.sum())})", ctx.colors[name], pool_counts, filled=True),
              _Series(f"held-out seed (n={_count(seed_counts.sum())})", "#111827", seed_counts, filled=True)]
    svg = _svg_histogram(edges, [("", series)], xlabel, f"{title} histogram {name}", threshold=thr,
                         threshold_label=f"gate {thr:.3g}")
    leg = [(x.label, x.color, "fill") for x in series] + [("threshold", "#111827", "thr")]
    html_ = (f'<figure class="gate"><figcaption><b>{_esc(title)}: held-out seed vs pool</b>'
             f"<span>{_esc(note)}</span></figcaption>{svg}{_legend(leg)}</figure>")
    return html_, text
