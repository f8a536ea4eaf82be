"""The charts of a selection's gates: the pool images a strategy rejects before scoring.

robust's in-domain gate (``info.gate``) passes a pool image only when every term does; its
centroid term (distance to the nearest seed centroid) is drawn as the histogram of held-out seed
distances against pool distances (the pool's from ``scores.csv`` when the summary holds none),
and its density-ratio terms (``RATIO_GATES``) come as ready-made
histograms in ``summary["info"]``. Each gate gives a chart and a one-line fact for the heading;
a gate without usable data gives none, never an error.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from mak.run.report.charts import legend, Series, svg_histogram
from mak.run.report.format import fmt_count, esc, num
from mak.run.report.inputs import find_gate, Gate, Scores

if TYPE_CHECKING:
    from mak.run.report.context import Context

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


def gate_charts(ctx: Context, name: str, summary: Any, sc: Scores | None) -> tuple[str, list[str]]:
    """The charts of every gate in the selection's summary (one html string) and a fact line for each."""
    charts, text = _gate_hist(ctx, name, summary, sc)
    facts = [text] if text else []
    for key in RATIO_GATES:
        chart, text = _ratio_gate_hist(ctx, name, summary, key)
        if text:
            facts.append(text)
        charts += chart
    return charts, facts


def _gate_hist(ctx: Context, name: str, summary: Any, sc: Scores | None) -> tuple[str, str]:
    """(chart html, one-line text) for the selection's in-domain gate, if its summary holds one.

    The chart is the centroid term's (the other terms have charts of their own, ``RATIO_GATES``).
    """
    g = find_gate(summary)
    if g is None:
        return "", ""
    bits = [f"{g.term} threshold {g.threshold:.4g}"]
    if g.quantile is not None:
        bits.append(f"quantile {g.quantile:g} of the held-out seed")
    if g.rejected is not None:
        bits.append(f"{fmt_count(g.rejected)} pool images rejected by the whole gate (all its terms)")
    text = "in-domain gate: " + ", ".join(bits)
    hist = _gate_counts(g, sc)
    if hist is None:
        return "", text
    edges, seed_counts, pool_counts = hist
    series = [Series(f"held-out seed (n={fmt_count(np.sum(seed_counts))})", "#111827",
                     np.asarray(seed_counts, dtype=np.float64), filled=True)]
    if pool_counts is not None:
        series.insert(0, Series(f"pool (n={fmt_count(np.sum(pool_counts))})", ctx.colors[name],
                                np.asarray(pool_counts, dtype=np.float64), filled=True))
    svg = svg_histogram(np.asarray(edges, dtype=np.float64), [("", series)],
                        "distance to the nearest seed centroid", f"gate histogram {name}",
                        threshold=g.threshold, threshold_label=f"gate {g.threshold:.3g}")
    sub = ("pool images right of the line are rejected before scoring"
           + (f" ({fmt_count(g.rejected)} rejected by all terms together)" if g.rejected is not None else ""))
    leg = [(s.label, s.color, "fill") for s in series] + [("threshold", "#111827", "thr")]
    html_ = (f'<figure class="gate"><figcaption><b>Centroid gate: held-out seed vs pool distances</b>'
             f"<span>{esc(sub)}</span></figcaption>{svg}{legend(leg)}</figure>")
    return html_, text


def _gate_counts(g: Gate, sc: Scores | None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None] | None:
    """``(edges, held-out seed counts, pool counts or None)`` of the centroid gate's chart, else None.

    Without pool counts in the summary, the pool's are binned from ``scores.csv``'s distances.
    """
    if g.term != "centroid" or g.edges is None or g.seed_counts is None:
        return None
    pool_counts = g.pool_counts
    if pool_counts is None and sc is not None and np.isfinite(sc.distance).any():
        d = sc.distance[np.isfinite(sc.distance)]
        pool_counts = np.histogram(np.clip(d, g.edges[0], g.edges[-1]), g.edges)[0]
    return g.edges, g.seed_counts, pool_counts


def _ratio_gate_hist(ctx: Context, name: str, summary: Any, key: str) -> tuple[str, str]:
    """(chart html, one-line text) for one of robust's density-ratio gates (``RATIO_GATES``), if present."""
    title, xlabel, line, note = RATIO_GATES[key]
    info = summary.get("info") if isinstance(summary, Mapping) else None
    gate = info.get(key) if isinstance(info, Mapping) else None
    hist = gate.get("histogram") if isinstance(gate, Mapping) else None
    thr = num(gate.get("threshold")) if isinstance(gate, Mapping) else None
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
    text = line.format(thr=thr, k=gate.get("k"), rejected=fmt_count(rejected) if rejected is not None else "?")
    series = [Series(f"pool (n={fmt_count(pool_counts.sum())})", ctx.colors[name], pool_counts, filled=True),
              Series(f"held-out seed (n={fmt_count(seed_counts.sum())})", "#111827", seed_counts, filled=True)]
    svg = svg_histogram(edges, [("", series)], xlabel, f"{title} histogram {name}", threshold=thr,
                        threshold_label=f"gate {thr:.3g}")
    leg = [(x.label, x.color, "fill") for x in series] + [("threshold", "#111827", "thr")]
    html_ = (f'<figure class="gate"><figcaption><b>{esc(title)}: held-out seed vs pool</b>'
             f"<span>{esc(note)}</span></figcaption>{svg}{legend(leg)}</figure>")
    return html_, text
