"""The SVG chart kit: histograms, class-count bars, line charts, their axes and HTML legends.

Each chart function returns one inline ``<svg>`` element (a fixed ``viewBox`` that scales to its
container, an ``aria-label`` naming it) built from the data alone: no page state, no file access.
Styling comes from the class names (``grid``, ``axis``, ``tick``, ``thr``, ...) that
:data:`.style.CSS` defines; every text is HTML-escaped.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from mak.run.report.format import esc, fmt_short
from mak.run.report.style import OOD_COLOR, SEED_COLOR

HIST_BINS = 40  # bins of a histogram drawn from raw values


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
        return fmt_short(v)
    dec = 0
    while dec < 8 and abs(step * 10 ** dec - round(step * 10 ** dec)) > 1e-6 * max(1.0, step * 10 ** dec):
        dec += 1
    return f"{v:.{dec}f}"


def _f(x: float) -> str:
    return f"{x:.1f}"


def _svg_open(w: int, h: int, label: str) -> str:
    return (f'<svg viewBox="0 0 {w} {h}" role="img" '
            f'aria-label="{esc(label)}" class="chart-svg">')


def _y_axis(parts: list[str], ticks: list[float], step: float, sy: Callable[[float], float],
            x0: float, x1: float, fmt: Callable[[float], str] | None = None) -> None:
    for t in ticks:
        y = sy(t)
        parts.append(f'<line x1="{_f(x0)}" x2="{_f(x1)}" y1="{_f(y)}" y2="{_f(y)}" class="grid"/>')
        parts.append(f'<text x="{_f(x0 - 5)}" y="{_f(y + 3.5)}" text-anchor="end" class="tick">'
                     f'{esc(fmt(t) if fmt else _tick_label(t, step))}</text>')


def _x_axis(parts: list[str], ticks: list[float], step: float, sx: Callable[[float], float],
            y: float, label: str, width: float) -> None:
    for t in ticks:
        x = sx(t)
        parts.append(f'<line x1="{_f(x)}" x2="{_f(x)}" y1="{_f(y)}" y2="{_f(y + 4)}" class="axis"/>')
        parts.append(f'<text x="{_f(x)}" y="{_f(y + 15)}" text-anchor="middle" class="tick">'
                     f'{esc(_tick_label(t, step))}</text>')
    if label:
        parts.append(f'<text x="{_f(width / 2)}" y="{_f(y + 30)}" text-anchor="middle" class="axlabel">'
                     f'{esc(label)}</text>')


@dataclass
class Series:
    label: str
    color: str
    counts: np.ndarray
    filled: bool = True
    dash: str = ""


def svg_histogram(edges: np.ndarray, panels: Sequence[tuple[str, Sequence[Series]]], xlabel: str,
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
        _hist_panel(parts, edges, ptitle, series, sx, top, bottom, ml, w - mr)
        if threshold is not None:
            _threshold_mark(parts, sx(threshold), top, bottom, threshold_label if p == 0 else "", w)
    _x_axis(parts, xt, xstep, sx, h - mb, xlabel, w)
    parts.append("</svg>")
    return "".join(parts)


def _hist_panel(parts: list[str], edges: np.ndarray, ptitle: str, series: Sequence[Series],
                sx: Callable[[float], float], top: float, bottom: float, x0: float, x1: float) -> None:
    """One panel of :func:`svg_histogram` between ``top`` and ``bottom``: its y axis, title and series."""
    shares = [s.counts / s.counts.sum() if s.counts.sum() > 0 else None for s in series]
    ymax = max([float(a.max()) for a in shares if a is not None] + [1e-9])
    yt, ystep = _ticks(0.0, ymax * 1.04, 3, cover=True)
    ytop = max(yt[-1], ymax)

    def sy(y: float) -> float:
        return bottom - y / ytop * (bottom - top)

    _y_axis(parts, yt, ystep, sy, x0, x1, fmt=lambda t: f"{100 * t:.0f}%")
    if ptitle:
        parts.append(f'<text x="{x0 + 4}" y="{_f(top - 4)}" class="ptitle">{esc(ptitle)}</text>')
    for s, a in zip(series, shares):
        if a is not None:
            parts.append(_step_path(s, a, edges, sx, sy, bottom))
    if all(a is None for a in shares):
        parts.append(f'<text x="{_f((x0 + x1) / 2)}" y="{_f((top + bottom) / 2)}" '
                     f'text-anchor="middle" class="empty">no images</text>')
    parts.append(f'<line x1="{x0}" x2="{x1}" y1="{_f(bottom)}" y2="{_f(bottom)}" class="axis"/>')


def _step_path(s: Series, share: np.ndarray, edges: np.ndarray, sx: Callable[[float], float],
               sy: Callable[[float], float], bottom: float) -> str:
    """The histogram outline of one series: filled and translucent, or a (dashed) line."""
    pts = [f"M{_f(sx(edges[0]))},{_f(bottom)}"]
    for i, v in enumerate(share):
        pts.append(f"L{_f(sx(edges[i]))},{_f(sy(v))}L{_f(sx(edges[i + 1]))},{_f(sy(v))}")
    pts.append(f"L{_f(sx(edges[-1]))},{_f(bottom)}")
    d = "".join(pts)
    if s.filled:
        return (f'<path d="{d}Z" fill="{s.color}" fill-opacity="0.28" stroke="{s.color}" '
                f'stroke-width="1.4"/>')
    dash = f' stroke-dasharray="{s.dash}"' if s.dash else ""
    return f'<path d="{d}" fill="none" stroke="{s.color}" stroke-width="1.8"{dash}/>'


def _threshold_mark(parts: list[str], x: float, top: float, bottom: float, label: str, w: int) -> None:
    """A dashed vertical line at ``x`` across one panel, with ``label`` beside it when given."""
    parts.append(f'<line x1="{_f(x)}" x2="{_f(x)}" y1="{_f(top - 2)}" y2="{_f(bottom)}" '
                 f'class="thr"/>')
    if label:
        anchor = "end" if x > w * 0.6 else "start"
        dx = -4 if anchor == "end" else 4
        parts.append(f'<text x="{_f(x + dx)}" y="{_f(top + 10)}" text-anchor="{anchor}" '
                     f'class="thrlabel">{esc(label)}</text>')


def svg_class_counts(classes: Sequence[str], seed: Sequence[int], added: Sequence[int], ood: int | None,
                     color: str, title: str) -> str:
    """Stacked bars: seed count (grey) + the selection's count (strategy colour), then an OOD bar."""
    n = len(classes)
    slots = n + (1.6 if ood is not None else 0)
    w, ml, mr, mt = 480, 50, 10, 20
    rotate = n <= 30 and (n > 12 or max((len(c) for c in classes), default=0) > 6)  # long names slant
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
    for i, c in enumerate(classes):
        cx = ml + slot * (i + 0.5)
        _class_bar(parts, c, int(seed[i]), int(added[i]), cx, bw, sy, h - mb, color, label=n <= 16)
        if show_labels:
            parts.append(_class_tick(c, cx, h - mb, rotate))
    if ood is not None:
        _ood_bar(parts, ood, ml + slot * (n + 1.1), bw, sy, h - mb)
        sep = ml + slot * (n + 0.3)
        parts.append(f'<line x1="{_f(sep)}" x2="{_f(sep)}" y1="{mt}" y2="{_f(h - mb)}" class="sep"/>')
    parts.append(f'<line x1="{ml}" x2="{w - mr}" y1="{_f(h - mb)}" y2="{_f(h - mb)}" class="axis"/>')
    parts.append(f'<text x="{_f(ml + plot_w / 2)}" y="{h - 6}" text-anchor="middle" class="axlabel">'
                 f'{"class" if show_labels else f"{n} classes"} (largest seed class first'
                 f'{"" if show_labels else "; hover a bar for its class"})</text>')
    parts.append("</svg>")
    return "".join(parts)


def _class_bar(parts: list[str], c: str, s: int, a: int, cx: float, bw: float, sy: Callable[[float], float],
               base: float, color: str, label: bool) -> None:
    """Class ``c``'s bar at ``cx``: ``s`` seed images in grey, ``a`` selected ones in ``color`` on top."""
    x = cx - bw / 2
    ys, ya = sy(s), sy(s + a)
    parts.append(f'<rect x="{_f(x)}" y="{_f(ys)}" width="{_f(bw)}" height="{_f(base - ys)}" '
                 f'fill="{SEED_COLOR}"><title>class {esc(c)}: seed {s:,}</title></rect>')
    if a > 0:
        parts.append(f'<rect x="{_f(x)}" y="{_f(ya)}" width="{_f(bw)}" height="{_f(ys - ya)}" '
                     f'fill="{color}"><title>class {esc(c)}: +{a:,} selected '
                     f'(seed {s:,} &#8594; {s + a:,})</title></rect>')
    if label and a > 0:
        parts.append(f'<text x="{_f(cx)}" y="{_f(ya - 4)}" text-anchor="middle" class="barlabel" '
                     f'fill="{color}">+{fmt_short(a)}</text>')


def _class_tick(c: str, cx: float, base: float, rotate: bool) -> str:
    """Class ``c``'s name under its bar, slanted when there are many classes."""
    if rotate:
        return (f'<text transform="translate({_f(cx + 3)},{_f(base + 8)}) rotate(-55)" '
                f'text-anchor="end" class="tick">{esc(c[:12])}</text>')
    return (f'<text x="{_f(cx)}" y="{_f(base + 14)}" text-anchor="middle" class="tick">'
            f'{esc(c[:8])}</text>')


def _ood_bar(parts: list[str], ood: int, cx: float, bw: float, sy: Callable[[float], float], base: float) -> None:
    """The bar of the selection's out-of-domain images at ``cx``, with its count and an OOD tick."""
    x = cx - bw / 2
    yo = sy(ood)
    parts.append(f'<rect x="{_f(x)}" y="{_f(yo)}" width="{_f(bw)}" height="{_f(base - yo)}" '
                 f'fill="{OOD_COLOR}"><title>out-of-domain: {ood:,} selected</title></rect>')
    parts.append(f'<text x="{_f(cx)}" y="{_f(yo - 4)}" text-anchor="middle" class="barlabel" '
                 f'fill="{OOD_COLOR}">{fmt_short(ood)}</text>')
    parts.append(f'<text x="{_f(cx)}" y="{_f(base + 14)}" text-anchor="middle" class="tick" '
                 f'fill="{OOD_COLOR}">OOD</text>')


def _x_ticks(xs: np.ndarray) -> tuple[list[float], float]:
    """Ticks within the data's x range; whole numbers at a whole step when every x is whole (epochs)."""
    lo, hi = float(xs.min()), float(xs.max())
    xt, step = _ticks(lo, hi if hi > lo else lo + 1, 8)
    if np.all(xs == np.round(xs)) and step != round(step):  # whole epochs: whole ticks
        step = next(m * 10.0 ** e for e in range(16) for m in (1, 2, 5) if m * 10.0 ** e >= step)
        xt = [k * step for k in range(math.ceil(lo / step), math.floor(hi / step) + 1)]
    return [t for t in xt if lo - 1e-9 <= t <= hi + 1e-9], step


def svg_lines(series: Sequence[tuple[str, str, str, np.ndarray, np.ndarray]], xlabel: str, ylabel: str,
              title: str) -> str:
    """Line chart of ``(label, colour, dash, xs, ys)`` series."""
    w, h, ml, mr, mt, mb = 500, 300, 54, 14, 14, 42
    xs_all = np.concatenate([s[3] for s in series])
    ys_all = np.concatenate([s[4] for s in series])
    xt, xstep = _x_ticks(xs_all)
    xlo, xhi = float(xs_all.min()), float(xs_all.max())
    ylo, yhi = float(ys_all.min()), float(ys_all.max())
    if xhi <= xlo:  # a single x: the point in the middle of a unit-wide axis
        xlo, xhi = xlo - 0.5, xhi + 0.5
    pad = (yhi - ylo) * 0.06 or max(abs(yhi) * 0.05, 0.05)
    _, ystep = _ticks(ylo - pad, yhi + pad, 5)
    y0 = math.floor((ylo - pad) / ystep + 1e-9) * ystep
    y1 = math.ceil((yhi + pad) / ystep - 1e-9) * ystep
    yt = [y0 + k * ystep for k in range(int(round((y1 - y0) / ystep)) + 1)]

    def sx(x: float) -> float:
        return ml + (x - xlo) / (xhi - xlo) * (w - ml - mr)

    def sy(y: float) -> float:
        return (h - mb) - (y - y0) / (y1 - y0) * (h - mb - mt)

    parts = [_svg_open(w, h, title)]
    _y_axis(parts, [t for t in yt if y0 <= t <= y1], ystep, sy, ml, w - mr)
    parts.append(f'<line x1="{ml}" x2="{w - mr}" y1="{h - mb}" y2="{h - mb}" class="axis"/>')
    parts.append(f'<text transform="translate(13,{_f((h - mb + mt) / 2)}) rotate(-90)" text-anchor="middle" '
                 f'class="axlabel">{esc(ylabel)}</text>')
    for label, color, dash, xs, ys in series:
        d = "".join(f"{'M' if i == 0 else 'L'}{_f(sx(x))},{_f(sy(y))}" for i, (x, y) in enumerate(zip(xs, ys)))
        dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
        parts.append(f'<path d="{d}" fill="none" stroke="{color}" stroke-width="2"{dash_attr} '
                     f'stroke-linejoin="round"><title>{esc(label)}</title></path>')
        if len(xs) == 1:
            parts.append(f'<circle cx="{_f(sx(xs[0]))}" cy="{_f(sy(ys[0]))}" r="3" fill="{color}"/>')
    _x_axis(parts, xt or [float(xs_all.min())], xstep, sx, h - mb, xlabel, w + ml - mr)
    parts.append("</svg>")
    return "".join(parts)


def legend(entries: Sequence[tuple[str, str, str]]) -> str:
    """HTML legend of ``(label, colour, kind)``; kind 'fill', 'line', 'dash' or 'thr'."""
    out = ['<div class="legend">']
    for label, color, kind in entries:
        if kind == "fill":
            sw = f'<i class="sw" style="background:{color}"></i>'
        else:
            style = {"line": "solid", "dash": "dashed", "thr": "dashed"}.get(kind, "solid")
            sw = f'<i class="ln" style="border-top:2px {style} {color}"></i>'
        out.append(f"<span>{sw}{esc(label)}</span>")
    out.append("</div>")
    return "".join(out)
