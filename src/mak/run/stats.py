"""Statistics over repeats: per-class paired gains and 95% t-intervals of their means."""
from __future__ import annotations

from typing import Any

import numpy as np

# Two-sided 95% quantiles of Student's t (0.975 one-sided) by degrees of freedom; beyond 30 they
# are interpolated linearly in 1/df between 30, 40, 60, 120 and the normal's 1.960 (error < 2e-3).
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
         10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110,
         18: 2.101, 19: 2.093, 20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060,
         26: 2.056, 27: 2.052, 28: 2.048, 29: 2.045, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980}


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` >= 1 degrees of freedom."""
    if df < 1:
        raise ValueError(f"df={df} must be >= 1")
    if df in _T975:
        return _T975[df]
    knots = [k for k in _T975 if k >= 30] + [None]  # None: df -> infinity, 1/df = 0
    for lo, hi in zip(knots, knots[1:]):
        if hi is None or df < hi:
            x_lo, x_hi = 1.0 / lo, 0.0 if hi is None else 1.0 / hi
            y_lo, y_hi = _T975[lo], 1.960 if hi is None else _T975[hi]
            return y_hi + (y_lo - y_hi) * (1.0 / df - x_hi) / (x_lo - x_hi)
    raise AssertionError("unreachable")


def interval95(values: list[float]) -> dict[str, Any]:
    """Mean and 95% t-interval half-width of per-seed values (``ci95`` None for one value)."""
    n = len(values)
    mean = float(np.mean(values))
    half = None if n < 2 else float(t975(n - 1) * np.std(values, ddof=1) / np.sqrt(n))
    return {"mean": mean, "ci95": half, "values": [float(v) for v in values]}


def paired_gains(per_class: dict[str, float], base: dict[str, float], groups: dict[str, list]) -> dict[str, float]:
    """Mean few-shot accuracy gain over the seed alone, class by class (the same class, seed and
    evaluation draws), over all classes and within each group."""
    gain = {c: per_class[c] - base[c] for c in per_class if c in base}
    out = {"all": float(np.mean(list(gain.values())))} if gain else {}
    for g, members in (groups or {}).items():
        vals = [gain[str(c)] for c in members if str(c) in gain]
        if vals:
            out[g] = float(np.mean(vals))
    return out


__all__ = ["interval95", "paired_gains", "t975"]
