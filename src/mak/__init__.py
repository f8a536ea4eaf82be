"""mak: open-world data sampling for self-supervised learning.

Model-Aware K-center (MAK; Jiang, Chen, Chen, Wang, NeurIPS 2021) and its baselines pick the
pool images that most help contrastive pre-training on a small, long-tailed seed set.

Public API (see each module for details)::

    mak.ecle(views, ...)                       # tailness: empirical contrastive loss expectation
    mak.nearest_centroid_distance(feats, cen)  # 1 - max cosine similarity to centroids
    mak.proximity(seed_feats, pool_feats, ...) # distance to the seed's k-means centroids
    mak.kcenter_greedy(feats, budget, init=..) # diversity: greedy k-center
    mak.select(seed_feats, pool_feats, pool_views, budget, strategy="robust", ...)  # or "mak", ...

The names load on first use (``import mak`` alone does not import torch), so ``mak --help`` and
``mak --version`` start at once.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_API = {  # public name -> the module that defines it
    "MakError": "mak.errors",
    "STRATEGIES": "mak.selection.strategies",
    "Selection": "mak.selection.strategies",
    "select": "mak.selection.strategies",
    "ecle": "mak.selection.api",  # the engine's functions, their arrays checked for NaN/Inf
    "kcenter_greedy": "mak.selection.api",
    "kmeans": "mak.selection.api",
    "nearest_centroid_distance": "mak.selection.api",
    "proximity": "mak.selection.api",
    "rank_fusion": "mak.selection.robust",
    "rank_normalize": "mak.selection.robust",
    "seed_gate": "mak.selection.robust",
}
__all__ = [*_API, "__version__"]


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'mak' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
