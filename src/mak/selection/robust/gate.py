"""The centroid gate: held-out distances of the seed to k-means centroids of the other folds.

A seed image's distance to centroids fitted without it is a sample of an unseen in-domain image's
distance; the gate's threshold is a quantile of those (:func:`seed_gate`). Folds:
:func:`mak.selection.robust.density_ratio.fold_parts`. ``gate_quantile`` auto and ``gate_clusters``
auto are resolved by :func:`auto_gate_quantile` and :func:`auto_gate_clusters`.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from mak import options as opts
from mak.errors import MakError
from mak.selection.proximity import kmeans, nearest_centroid_distance
from mak.selection.robust.density_ratio import fold_parts

GATE_QUANTILE_MAX = 0.998  # gate_quantile auto = min(this, 1 - GATE_TAIL_IMAGES / seed size)
GATE_TAIL_IMAGES = 5


def check_quantile(q: float) -> None:
    opts.number(0.0, 1.0)("quantile", q)


def heldout_distances(seed_features: Any, clusters: int = 10, folds: int = 5, seed: int = 0,
                      device: str | torch.device | None = None) -> np.ndarray:
    """Each seed image's cosine distance to k-means centroids fitted on the other folds. (M,) float32."""
    m = int(seed_features.shape[0])
    if folds < 2:
        raise MakError(f"gate folds must be >= 2, got {folds}")
    if folds > m:
        raise MakError(f"gate folds ({folds}) is larger than the seed set ({m} images)")
    parts = fold_parts(m, folds, seed)
    smallest_train = m - max(len(p) for p in parts)
    if clusters > smallest_train:
        raise opts.ParameterError("gate_clusters", f"gate_clusters={clusters} is larger than a gate training fold "
                                  f"({smallest_train} seed images); use a smaller 'gate_clusters' or 'gate_folds'",
                                  ("gate_folds",))
    out = np.empty(m, dtype=np.float32)
    for held in parts:
        train = np.setdiff1d(np.arange(m, dtype=np.int64), held, assume_unique=True)
        centroids = kmeans(seed_features[train], clusters=clusters, seed=seed, device=device)
        out[held] = nearest_centroid_distance(seed_features[held], centroids, device=device)
    return out


def seed_gate(seed_features: Any, clusters: int = 10, quantile: float = 0.99, folds: int = 5, seed: int = 0,
              device: str | torch.device | None = None) -> tuple[float, np.ndarray]:
    """The in-domain gate's threshold: (``quantile`` of the held-out seed distances, those distances).

    A pool image whose distance to the full seed's centroids (:func:`mak.selection.proximity`) is greater
    than the threshold is out of domain. ``np.quantile`` default (linear) interpolation.
    """
    check_quantile(quantile)
    held = heldout_distances(seed_features, clusters=clusters, folds=folds, seed=seed, device=device)
    return float(np.quantile(held.astype(np.float64), quantile)), held


def auto_gate_quantile(seed_size: int) -> float:
    """``gate_quantile='auto'``: min(0.998, 1 - 5 / M), so each gate term's threshold lies beyond at least
    5 held-out seed images (an extreme quantile of fewer is mostly noise: with M = 620, q0.998 is the
    second-lowest value)."""
    return min(GATE_QUANTILE_MAX, 1.0 - GATE_TAIL_IMAGES / max(int(seed_size), 1))


def auto_gate_clusters(clusters: int, seed_size: int, folds: int = 5) -> int:
    """``gate_clusters='auto'``: max(clusters, round(sqrt(M / 2))), capped by the smallest training fold."""
    smallest_train = seed_size - math.ceil(seed_size / folds)
    return max(1, min(max(int(clusters), round(math.sqrt(seed_size / 2.0))), smallest_train))


__all__ = ["GATE_QUANTILE_MAX", "GATE_TAIL_IMAGES", "auto_gate_clusters", "auto_gate_quantile", "check_quantile",
           "heldout_distances", "seed_gate"]
