"""The engine's array functions as ``mak.*`` offers them: their arrays scanned for NaN and Inf first.

``mak.ecle``, ``mak.proximity``, ``mak.nearest_centroid_distance``, ``mak.kmeans`` and
``mak.kcenter_greedy`` are the functions of :mod:`.tailness`, :mod:`.proximity` and :mod:`.kcenter`
with one more keyword, ``check_values`` (default True): a NaN or Inf is a
:class:`~mak.errors.MakError` naming the array and its first bad row (one chunked read), where the
arithmetic would otherwise return NaN scores or pick the bad row first. The strategies call the
modules' functions directly: :func:`mak.select` scans its arrays once itself.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

from mak.selection import kcenter as _kcenter, proximity as _proximity, tailness as _tailness
from mak.selection.strategies import check_finite

# each function's arrays: (argument position, keyword, name in the error, axis of its rows)
_ARRAYS: dict[Callable[..., Any], tuple[tuple[int, str, str, int], ...]] = {
    _tailness.ecle: ((0, "views", "views", 1),),
    _proximity.proximity: ((0, "seed_features", "seed features", 0), (1, "pool_features", "pool features", 0)),
    _proximity.nearest_centroid_distance: ((0, "features", "features", 0), (1, "centroids", "centroids", 0)),
    _proximity.kmeans: ((0, "features", "features", 0),),
    _kcenter.kcenter_greedy: ((0, "features", "features", 0), (2, "init", "initial centers", 0)),
}


def _checked(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def call(*args: Any, check_values: bool = True, **kwargs: Any) -> Any:
        if check_values:
            for pos, key, what, axis in _ARRAYS[fn]:
                x = args[pos] if pos < len(args) else kwargs.get(key)
                if x is not None and getattr(x, "ndim", 0) > axis:
                    check_finite(x, what, axis)
        return fn(*args, **kwargs)
    return call


ecle = _checked(_tailness.ecle)
proximity = _checked(_proximity.proximity)
nearest_centroid_distance = _checked(_proximity.nearest_centroid_distance)
kmeans = _checked(_proximity.kmeans)
kcenter_greedy = _checked(_kcenter.kcenter_greedy)

__all__ = ["ecle", "kcenter_greedy", "kmeans", "nearest_centroid_distance", "proximity"]
