"""Numbers read from loose inputs, and the text the page shows for them.

:func:`num` turns anything (None, NaN, strings, bools, numbers) into a finite float or None;
the other helpers render numbers and free text as HTML-safe strings.
"""
from __future__ import annotations

import html
import math
from typing import Any


def num(v: Any) -> float | None:
    """A finite float or None (None, NaN, infinities, bools and non-numbers give None)."""
    if v is None or isinstance(v, bool):
        return None
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def pct(x: float) -> str:
    """A fraction as a percentage with one decimal (no sign)."""
    return f"{100.0 * x:.1f}"


def esc(s: Any) -> str:
    return html.escape(str(s), quote=True)


def fmt_count(n: float) -> str:
    return f"{int(round(n)):,}"


def fmt_short(n: float) -> str:
    """Compact tick label for counts: 950, 1.5k, 12k, 3.2M."""
    a = abs(n)
    if a >= 1e6:
        return f"{n / 1e6:.3g}M"
    if a >= 1e4:
        return f"{n / 1e3:.3g}k"
    if a >= 1e3:
        return f"{n / 1e3:.2g}k"
    return f"{n:g}"
