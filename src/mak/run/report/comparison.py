"""The comparison of the strategies: takeaway cards, the comparison table, the composition bars.

``COLUMNS`` defines the table: which figure of a results entry each column shows, its group, its
legend and whether lower is better. A figure is a fraction, ``{"mean": x, "std": y}`` or None;
cells show ``mean +- std`` in percent and the best value of each column is highlighted. The
takeaway cards name the best strategy on a headline figure with its margin over the seed alone
("none"); the composition bars split each selection into out-of-domain, Few, Medium, Many and rest.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np

from mak.run.report.charts import legend
from mak.run.report.format import esc, num, pct
from mak.run.report.inputs import labels_of
from mak.run.report.style import FEW_COLOR, NEAR_COLOR, NONE_COLOR, OOD_COLOR, REST_COLOR

if TYPE_CHECKING:
    from mak.run.report.context import Context


def _fig(v: Any, std: Any = None) -> tuple[float, float | None] | None:
    """``(mean, std)`` of a figure given as a number or ``{"mean": .., "std": ..}``; None when absent."""
    if isinstance(v, Mapping):
        m = num(v.get("mean"))
        return None if m is None else (m, num(v.get("std")))
    m = num(v)
    return None if m is None else (m, num(std))


def _cell_html(f: tuple[float, float | None] | None) -> str:
    """Table cell content: ``61.2<span class="sd">&plusmn;1.3</span>`` or a dash."""
    if f is None:
        return '<span class="na">&ndash;</span>'
    m, s = f
    out = pct(m)
    if s is not None:
        out += f'<span class="sd">&plusmn;{pct(s)}</span>'
    return out


@dataclass(frozen=True)
class _Col:
    """A column of the comparison table: which figure it shows, how it is headed and ranked."""

    key: str
    head: str
    group: str
    lower_better: bool
    legend: str
    get: Callable[[Mapping[str, Any]], tuple[float, float | None] | None]
    hide_if_zero: bool = False  # dropped when every row shows 0 (a figure only some benchmarks have)


def _group_fig(g: str) -> Callable[[Mapping[str, Any]], tuple[float, float | None] | None]:
    def get(r: Mapping[str, Any]) -> tuple[float, float | None] | None:
        ga = r.get("group_acc")
        return _fig(ga.get(g)) if isinstance(ga, Mapping) else None
    return get


def _gain_fig(g: str) -> Callable[[Mapping[str, Any]], tuple[float, float | None] | None]:
    def get(r: Mapping[str, Any]) -> tuple[float, float | None] | None:
        gain = r.get("gain")
        v = gain.get(g) if isinstance(gain, Mapping) else None
        return None if not isinstance(v, Mapping) else _fig(v.get("mean"), v.get("ci95"))
    return get


COLUMNS: tuple[_Col, ...] = (
    _Col("gain_all", "All", "Gain over the seed alone (paired)", False,
         "few-shot accuracy gain over the seed alone, class by class on the same seed and draws, in points; "
         "&plusmn; is the 95% interval over seeds", _gain_fig("all")),
    _Col("gain_few", "Few", "Gain over the seed alone (paired)", False,
         "the same paired gain averaged over the seed's Few classes", _gain_fig("few")),

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
    _Col("near", "Near share", "Selection", False,
         "share of the selection in classes the seed lacks (images of the seed's kind, other classes)",
         lambda r: _fig(r.get("near_rate")), hide_if_zero=True),
    _Col("few_share", "Few share", "Selection", False,
         "share of the selection (out-of-domain included) that belongs to Few classes",
         lambda r: _fig(r.get("few_share"))),
)


RANK_REPEATS = 3  # repeats a run needs before the cards name an accuracy winner


def takeaways(ctx: Context) -> str:
    """Cards naming the best strategy on each headline figure (a note when there is nothing to compare)."""
    rows = [(str(r.get("strategy", "")), r) for r in ctx.results]
    base = next((r for n, r in rows if n == "none"), None)
    cols = {c.key: c for c in COLUMNS}
    accuracy = (cols["few"], cols["all"], cols["fullshot"], cols["knn"])
    n = _repeats(ctx.results)
    spread = any(col.get(r) is not None and col.get(r)[1] is not None for _, r in rows for col in accuracy)
    # fewer repeats: their spread says too little to name a winner (a spread without the repeats'
    # values, from results made elsewhere, is taken as it is)
    ranked = n >= RANK_REPEATS or (n == 1 and spread)
    cards = [_card(ctx, rows, base, label, cols[key]) for label, key in (
        ("Best Few-group accuracy", "few"), ("Most balanced (lowest group std)", "group_std"),
        ("Best few-shot accuracy (all)", "all"), ("Best full-shot accuracy", "fullshot"),
        ("Best kNN accuracy", "knn"))] if ranked else []
    cards += [_card(ctx, rows, base, "Lowest out-of-domain rate", cols["ood"], exclude_none=True, vs_none=False),
              _card(ctx, rows, base, "Largest Few-class share", cols["few_share"], exclude_none=True, vs_none=False)]
    cards = [c for c in cards if c]
    if not ranked and any(col.get(r) is not None for _, r in rows for col in accuracy):
        what = "one run cannot" if n == 1 else f"{n} repeats cannot"
        cards.insert(0, f'<div class="card"><div class="k">{"Single run" if n == 1 else f"{n} repeats"}</div>'
                        '<div class="v"><span>no accuracy winner</span></div><div class="d">'
                        f"{what} tell their differences from noise: run with --repeats {RANK_REPEATS} or more to "
                        "rank those beyond the seed-to-seed spread</div></div>")
    if not cards and any(col.get(r) is not None for _, r in rows for col in COLUMNS):
        return '<p class="note">No strategy leads another by more than the spread of the repeats.</p>'
    if not cards:
        return ('<p class="note">No evaluation results to compare: nothing was re-trained (a select-only '
                'run). The picks are below.</p>')
    return '<div class="cards">' + "".join(cards) + "</div>"


def _beyond_spread(vals: list[tuple[str, tuple[float, float | None]]], best: str, col: _Col) -> bool:
    """Whether ``best`` leads every other entry by more than the larger std of the two."""
    m, s = dict(vals)[best]
    for n, (m2, s2) in vals:
        if n != best and abs(m - m2) <= max(s or 0.0, s2 or 0.0):
            return False
    return True


def _card(ctx: Context, rows: list[tuple[str, Mapping[str, Any]]], base: Mapping[str, Any] | None, label: str,
          col: _Col, exclude_none: bool = False, vs_none: bool = True) -> str:
    """The takeaway card of ``col``: the best strategy, its value and margin; "" when there is no winner."""
    vals = [(n, col.get(r)) for n, r in rows if not (exclude_none and n == "none")]
    vals = [(n, f) for n, f in vals if f is not None]
    if len(vals) < 1:
        return ""
    shown = {round(100 * f[0], 1) for _, f in vals}
    if len(vals) > 1 and len(shown) == 1:
        return ""  # everyone ties: nothing to take away
    target = (min if col.lower_better else max)(shown)
    tied = [(n_, f) for n_, f in vals if round(100 * f[0], 1) == target]
    tied.sort(key=lambda t: t[0] == "none")  # on a tie, name a strategy before the seed alone
    n, (m, s) = tied[0]
    unit = " pts" if col.key == "group_std" else "%"
    if vs_none and (s is None or not _beyond_spread(vals, n, col)):
        return ""  # a single run, or a lead within the spread of the repeats: no winner to name
    detail = ""
    if len(tied) > 1:
        detail = "tied with " + ", ".join(esc(t[0]) for t in tied[1:4]) + ("&hellip;" if len(tied) > 4 else "")
    elif vs_none and base is not None and n != "none":
        b = col.get(base)
        if b is not None:
            diff = 100 * (m - b[0])
            detail = f"{diff:+.1f} pts vs seed alone ({pct(b[0])}{unit})"
    elif len(vals) > 1:
        runner = sorted(vals, key=lambda t: t[1][0], reverse=not col.lower_better)[1]
        detail = f"next: {esc(runner[0])} ({pct(runner[1][0])}{unit})"
    std = f'<span class="sd">&plusmn;{pct(s)}</span>' if s is not None else ""
    return (f'<div class="card"><div class="k">{esc(label)}</div><div class="v">{ctx.chip(n)}'
            f"<span>{pct(m)}{unit}{std}</span></div><div class=\"d\">{detail or '&nbsp;'}</div></div>")


def comparison_table(ctx: Context) -> str:
    """The comparison table, a row per results entry, and the legend of its columns (those with a value)."""
    if not ctx.results:
        return '<p class="note">No results.</p>'
    figs_all = [[c.get(r) for c in COLUMNS] for r in ctx.results]
    keep = [j for j in range(len(COLUMNS)) if any(f[j] is not None for f in figs_all)
            and not (COLUMNS[j].hide_if_zero and all(f[j] is None or f[j][0] == 0 for f in figs_all))]
    if not keep:
        return ('<p class="note">Nothing to compare: no strategy has a figure (a select-only run on '
                'unlabeled data). The picks are in the sections below.</p>')
    cols = [COLUMNS[j] for j in keep]
    figs = [[f[j] for j in keep] for f in figs_all]
    best = _best_rows(figs, cols)
    h = ['<div class="tablewrap"><table class="cmp"><thead><tr class="grp"><th></th>']
    h += [f'<th colspan="{k}" class="g">{esc(g)}</th>' for g, k in _column_groups(cols)]
    h.append('</tr><tr><th class="name">Strategy</th>')
    h += [f'<th title="{c.legend}">{esc(c.head)}{" &#8595;" if c.lower_better else ""}</th>' for c in cols]
    h.append("</tr></thead><tbody>")
    for i, r in enumerate(ctx.results):
        name = str(r.get("strategy", f"#{i}"))
        label = "none (seed alone)" if name == "none" else name
        link = (f'<a href="#{ctx.anchors[name]}" style="color:inherit">{esc(label)}</a>'
                if name in ctx.strategies else esc(label))
        h.append(f'<tr class="{"none" if name == "none" else "s"}"><td class="name">'
                 f'<span class="dot" style="background:{ctx.colors.get(name, NONE_COLOR)}"></span>{link}</td>')
        for j in range(len(cols)):
            klass = ' class="best"' if i in best[j] else ""
            h.append(f"<td{klass}>{_cell_html(figs[i][j])}</td>")
        h.append("</tr>")
    h.append("</tbody></table></div>")
    h.append('<ul class="keys">')
    h += [f"<li><b>{esc(c.head)}</b> &mdash; {c.legend}</li>" for c in cols]
    h.append("<li><b>Highlighted</b> &mdash; best value of the column (&#8595; lower is better); "
             "all figures in percent</li></ul>")
    return "".join(h)


def _best_rows(figs: list[list[tuple[float, float | None] | None]], cols: Sequence[_Col]) -> list[set[int]]:
    """Per column of ``cols``, the rows holding its best shown value (none when fewer than two values differ)."""
    best: list[set[int]] = []
    for j, c in enumerate(cols):
        vals = [(i, round(100 * f[j][0], 1)) for i, f in enumerate(figs) if f[j] is not None]
        distinct = {v for _, v in vals}
        if len(vals) < 2 or len(distinct) < 2:
            best.append(set())
            continue
        target = (min if c.lower_better else max)(distinct)
        best.append({i for i, v in vals if v == target})
    return best


def _column_groups(cols: Sequence[_Col]) -> list[tuple[str, int]]:
    """``(group, number of columns)`` of the runs of consecutive ``cols`` that share a group."""
    groups: list[tuple[str, int]] = []
    for c in cols:
        if groups and groups[-1][0] == c.group:
            groups[-1] = (c.group, groups[-1][1] + 1)
        else:
            groups.append((c.group, 1))
    return groups


BEST = ' class="best"'


def _repeats(results: Sequence[Mapping[str, Any]]) -> int:
    """How many repeats the results aggregate: the longest ``values`` list of any figure (1 without any)."""
    n = 1
    for r in results:
        for v in r.values():
            subs = v.values() if isinstance(v, Mapping) and "values" not in v else [v]
            for f in subs:
                if isinstance(f, Mapping) and isinstance(f.get("values"), (list, tuple)):
                    n = max(n, len(f["values"]))
    return n


def _first_repeat(v: Any, n: int) -> tuple[float, float | None] | None:
    """Repeat 0's value of a figure over ``n`` repeats (None when its ``values`` do not hold all ``n``)."""
    if not isinstance(v, Mapping):
        return _fig(v)  # a single run's value
    vals = v.get("values")
    return _fig(vals[0]) if isinstance(vals, (list, tuple)) and len(vals) == n else None


def _class_key(c: str) -> tuple[int, int, str]:
    return (0, int(c), "") if re.fullmatch(r"-?\d+", c) else (1, 0, c)


_BY_SEED = "columns: the classes by seed count, most first; highlighted: the best of the column"
_SEED_VARIES = ("each repeat draws its own seed, so a class that is Many in one repeat can be Few in another; "
                "the Many / Medium / Few columns above average each repeat's own groups")


def _seed_counts(items: Sequence[str]) -> dict[str, int]:
    """Images per class label of the seed's items ({} when they carry no labels)."""
    labels = labels_of(items)
    if labels is None:
        return {}
    u, c = np.unique(labels, return_counts=True)
    return {str(int(a)): int(b) for a, b in zip(u, c)}


def _per_class_view(ctx: Context, rows: list[tuple[str, Mapping[str, Any]]]) -> tuple[list[list[Any]], list[str],
                                                                                         dict[str, int] | None, str]:
    """The table's cells, its classes, the seed counts heading them (None: columns by class id) and its caption.

    A single run: its values, by seed count. Repeats: repeat 0's values under repeat 0's seed counts
    (``seed_items``), since a class's mean over repeats mixes head and tail classes; means without
    per-repeat values: by class id, without seed counts."""
    seed_n = _seed_counts(ctx.seed_items)
    classes = sorted({c for _, pc in rows for c in pc}, key=lambda c: (-seed_n.get(c, 0), _class_key(c)))
    n = _repeats(ctx.results)
    if n > 1:
        figs = [[_first_repeat(pc.get(c), n) for c in classes] for _, pc in rows]
        return figs, classes, seed_n, f"repeat 0 of {n} only, with its seed's counts: {_SEED_VARIES}. {_BY_SEED}"
    figs = [[_fig(pc.get(c)) for c in classes] for _, pc in rows]
    if not any(f is not None and f[1] is not None for row in figs for f in row):
        return figs, classes, seed_n, _BY_SEED
    classes = sorted(classes, key=_class_key)
    figs = [[_fig(pc.get(c)) for c in classes] for _, pc in rows]
    return figs, classes, None, f"mean &plusmn; std over repeats of each class, columns by class id: {_SEED_VARIES}"


_BY_RANK = ("mean &plusmn; std over repeats of the class at each seed-count rank (1: the most seed images); each "
            "repeat draws its own seed, so the class at a rank differs between repeats; under each rank: its seed "
            "images in each repeat; highlighted: the best of the column")


def _per_rank_view(ctx: Context) -> tuple[list[tuple[str, Any]], list[list[Any]], list[str], str] | None:
    """Over repeats, the table by seed-count rank (``per_rank_acc``): rows, cells, column heads, caption;
    None unless every entry with per-class figures has one."""
    rows = [(str(r.get("strategy", "")), r.get("per_rank_acc")) for r in ctx.results
            if isinstance(r.get("per_class_acc"), Mapping) and r["per_class_acc"]]
    if not rows or not all(isinstance(pr, Mapping) and pr.get("acc") for _, pr in rows):
        return None
    ranks = min(len(pr["acc"]) for _, pr in rows)
    seeds = rows[0][1].get("seed_images") or [[] for _ in range(ranks)]
    heads = [f'<th>{k + 1}<br><span class="sd">seed {"/".join(str(n) for n in seeds[k])}</span></th>'
             for k in range(ranks)]
    figs = [[_fig(pr["acc"][k]) for k in range(ranks)] for _, pr in rows]
    return rows, figs, heads, _BY_RANK


def per_class_table(ctx: Context) -> str:
    """Few-shot accuracy per class for each results entry with one (see :func:`_per_class_view`);
    over repeats, by seed-count rank where the results hold it (:func:`_per_rank_view`)."""
    by_rank = _per_rank_view(ctx) if _repeats(ctx.results) > 1 else None
    if by_rank is not None:
        rows, figs, heads, caption = by_rank
        return _per_class_html(ctx, rows, figs, heads, "Few-shot accuracy by seed-count rank", caption)
    rows = [(str(r.get("strategy", "")), r["per_class_acc"]) for r in ctx.results
            if isinstance(r.get("per_class_acc"), Mapping) and r["per_class_acc"]]
    if not rows:
        return ""
    figs, classes, seed_n, caption = _per_class_view(ctx, rows)
    heads = [f'<th title="seed images: {seed_n.get(c, 0)}">{esc(ctx.class_names.get(c, c))}'
             f'<br><span class="sd">seed {seed_n.get(c, 0)}</span></th>' if seed_n is not None else
             f"<th>{esc(ctx.class_names.get(c, c))}</th>" for c in classes]
    return _per_class_html(ctx, rows, figs, heads, "Few-shot accuracy per class", caption)


def _per_class_html(ctx: Context, rows: list[tuple[str, Any]], figs: list[list[Any]], heads: list[str],
                    title: str, caption: str) -> str:
    """The per-class (or per-rank) table: a row per strategy (``heads``: the column heads' ``<th>``s),
    the best of each column highlighted."""
    best = _best_rows(figs, [_Col(str(j), "", "", False, "", lambda r: None) for j in range(len(heads))])
    h = ['<div class="tablewrap"><table class="cmp"><thead><tr><th class="name">Strategy</th>']
    h += heads
    h.append("</tr></thead><tbody>")
    for i, (name, _) in enumerate(rows):
        label = "none (seed alone)" if name == "none" else name
        h.append(f'<tr class="{"none" if name == "none" else "s"}"><td class="name"><span class="dot" '
                 f'style="background:{ctx.colors.get(name, NONE_COLOR)}"></span>{esc(label)}</td>')
        h += [f"<td{BEST if i in best[j] else ''}>{_cell_html(figs[i][j])}</td>" for j in range(len(heads))]
        h.append("</tr>")
    h.append("</tbody></table></div>")
    return f'<h3>{title}</h3><p class="note">{caption}</p>' + "".join(h)


def composition(ctx: Context) -> str:
    """A bar per strategy of what its selection is made of, with the legend; "" without shares."""
    rows = []
    for r in ctx.results:
        name = str(r.get("strategy", ""))
        ood = _fig(r.get("ood_rate"))
        few = _fig(r.get("few_share"))
        if name == "none" or (ood is None and few is None):
            continue
        rows.append(f'<div>{ctx.chip(name)}</div><div class="bar">{_composition_bar(r, ood, few)}</div>')
    if not rows:
        return ""
    has_mm = any(_fig(r.get("many_share")) is not None for r in ctx.results)
    leg = [("out-of-domain", OOD_COLOR, "fill"), ("Few classes", FEW_COLOR, "fill")]
    if any((_fig(r.get("near_rate")) or (0.0,))[0] > 0 for r in ctx.results):
        leg.append(("classes the seed lacks", NEAR_COLOR, "fill"))
    if has_mm:
        leg += [("Medium classes", "#7fb3a0", "fill"), ("Many classes", "#98a6b8", "fill")]
    leg.append(("other in-domain" if not has_mm else "rest", REST_COLOR, "fill"))
    return ('<div class="comp"><h3>What each selection is made of</h3><div class="rows">' + "".join(rows)
            + "<div></div>" + legend(leg).replace('class="legend"', 'class="legend" style="margin-left:0"')
            + "</div></div>")


def _composition_bar(r: Mapping[str, Any], ood: tuple[float, float | None] | None,
                     few: tuple[float, float | None] | None) -> str:
    """The segments of one selection's bar: each share clipped to what is left, then the rest."""
    segs = []
    used = 0.0
    for label, f, color in (("out-of-domain", ood, OOD_COLOR), ("Few classes", few, FEW_COLOR),
                            ("classes the seed lacks", _fig(r.get("near_rate")), NEAR_COLOR),
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
    return "".join(segs)
