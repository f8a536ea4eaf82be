"""Proximity: how far a pool image lies from the seed set's feature clusters.

``kmeans`` clusters the L2-normalised seed features: ``n_init`` (default 10) greedy k-means++ starts,
each refined by Lloyd iterations, the one of least inertia kept, as the paper's code does with
scikit-learn's KMeans; in torch, deterministic for a seed, on CPU or GPU, chunked so memory is
O(chunk x K). Start ``i`` is seeded with ``seed + i * START_SEED_STRIDE``, so ``n_init=1`` is the
start of ``seed`` alone.
``nearest_centroid_distance`` is 1 - the largest cosine similarity to the L2-normalised
centroids; ``proximity`` chains the two. Low distance = in-domain.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from mak._tensor import l2_normalize, resolve_device, to_tensor
from mak.errors import MakError

CHUNK = 65536
N_INIT = 10  # k-means++ starts; the least inertia wins (ties: the earliest start)
START_SEED_STRIDE = 104729  # start i of kmeans(seed=s) is seeded with s + i * this


def _rows(x: Any) -> int:
    return int(x.shape[0])


def _chunk(x: Any, lo: int, hi: int, device: torch.device) -> torch.Tensor:
    return to_tensor(x[lo:hi], device)


def kmeans(features: Any, clusters: int = 10, seed: int = 0, iters: int = 50, normalize: bool = True,
           device: str | torch.device | None = None, tol: float = 1e-6, n_init: int = N_INIT) -> np.ndarray:
    """K-means centroids (clusters x d, float32) of ``features`` (L2-normalised first by default).

    The best (least inertia: the sum of squared distances to the nearest centroid, in float64) of
    ``n_init`` starts; each start is k-means++ seeding then Lloyd iterations until the assignment
    is stable (or ``iters``), an emptied cluster re-seeded at the point farthest from its centroid.
    """
    dev = resolve_device(device, features)
    n = _rows(features)
    if n == 0:
        raise MakError("k-means needs at least one seed feature (got 0 rows)")
    if clusters < 1:
        raise MakError(f"clusters must be >= 1, got {clusters}")
    if clusters > n:
        raise MakError(f"clusters ({clusters}) is larger than the seed set ({n} images)")
    if not isinstance(n_init, (int, np.integer)) or n_init < 1:
        raise MakError(f"n_init={n_init!r} must be an integer >= 1")
    x = to_tensor(features, dev)
    if normalize:
        x = l2_normalize(x)
    best, best_inertia = None, float("inf")
    for i in range(int(n_init)):
        c = _lloyd(x, _plus_plus(x, clusters, int(seed) + i * START_SEED_STRIDE), iters, tol)
        inertia = inertia_of(x, c) if n_init > 1 else 0.0
        if best is None or inertia < best_inertia:
            best, best_inertia = c, inertia
    return best.cpu().numpy().astype(np.float32)


def inertia_of(x: Any, centroids: Any) -> float:
    """Sum over rows of the squared Euclidean distance to the nearest centroid, summed in float64."""
    xt = x if isinstance(x, torch.Tensor) else to_tensor(x, torch.device("cpu"))
    c = centroids if isinstance(centroids, torch.Tensor) else to_tensor(centroids, xt.device)
    return float(_assign(xt, c)[1].double().sum())


def _plus_plus(x: torch.Tensor, clusters: int, seed: int) -> torch.Tensor:
    """Greedy k-means++ seeding from ``seed`` (as scikit-learn's): each next center is the best, by the
    potential it leaves, of ``2 + ln(clusters)`` candidates drawn with probability ~ squared distance.
    (clusters, d) rows of ``x``. Squared distances as ``|x|^2 - 2 x.c + |c|^2`` (one matmul for all
    candidates), as scikit-learn and :func:`_assign` compute them."""
    n = x.shape[0]
    trials = 2 + int(math.log(clusters))
    g = torch.Generator(device="cpu")
    g.manual_seed(int(seed))
    xn = (x * x).sum(1)
    first = int(torch.randint(n, (1,), generator=g))
    centers = [x[first]]
    d2 = _sq_dist(x, xn, [first])[:, 0]
    for _ in range(1, clusters):
        total = float(d2.double().sum())
        if total <= 0:
            idx = int(torch.randint(n, (1,), generator=g))
            d2 = torch.minimum(d2, _sq_dist(x, xn, [idx])[:, 0])
        else:
            probs = (d2.double() / total).cpu()
            cand = torch.multinomial(probs, trials, replacement=True, generator=g).tolist()
            new_d2 = torch.minimum(d2[:, None], _sq_dist(x, xn, cand))  # (N, trials)
            pots = new_d2.double().sum(0).tolist()
            j = min(range(len(cand)), key=lambda t: (pots[t], t))  # least potential left (ties: the first drawn)
            idx, d2 = cand[j], new_d2[:, j].contiguous()
        centers.append(x[idx])
    return torch.stack(centers).clone()


def _sq_dist(x: torch.Tensor, xn: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """(N, len(rows)) squared Euclidean distances of every row of ``x`` to ``x[rows]`` (>= 0)."""
    c = x[rows]
    return (xn[:, None] - 2 * (x @ c.T) + (c * c).sum(1)).clamp_min(0)


def _lloyd(x: torch.Tensor, c: torch.Tensor, iters: int, tol: float) -> torch.Tensor:
    """Lloyd iterations from centroids ``c`` until the assignment is stable, the shift <= tol, or ``iters``."""
    clusters = c.shape[0]
    xn = (x * x).sum(1, keepdim=True)
    prev = None
    for _ in range(iters):
        assign, dist = _assign(x, c, xn)
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=clusters).to(x.dtype)
        empty = counts == 0
        new = sums / counts.clamp_min(1)[:, None]
        if empty.any():
            far = torch.argsort(dist, descending=True, stable=True)
            for j, e in enumerate(torch.nonzero(empty).flatten().tolist()):
                new[e] = x[far[j]]
        shift = float(((new - c) ** 2).sum())
        c = new
        if prev is not None and torch.equal(prev, assign) and not empty.any():
            break
        if shift <= tol * tol:
            break
        prev = assign
    return c


def _assign(x: torch.Tensor, c: torch.Tensor, xn: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid (squared Euclidean) of each row, chunked; returns (index, distance). ``xn``: the
    rows' squared norms (N, 1), when the caller keeps them across calls."""
    cn = (c * c).sum(1)
    idx = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    dist = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
    for lo in range(0, x.shape[0], CHUNK):
        xb = x[lo : lo + CHUNK]
        nb = (xb * xb).sum(1, keepdim=True) if xn is None else xn[lo : lo + CHUNK]
        d = torch.mm(xb, c.T).mul_(2)  # |x|^2 - 2 x.c + |c|^2, in that order, in one buffer
        torch.sub(nb, d, out=d).add_(cn)
        val, arg = d.min(1)
        idx[lo : lo + CHUNK] = arg
        dist[lo : lo + CHUNK] = val.clamp_min(0)
    return idx, dist


def nearest_centroid_distance(features: Any, centroids: Any, device: str | torch.device | None = None,
                              chunk: int = CHUNK) -> np.ndarray:
    """1 - max cosine similarity of each row of ``features`` to the L2-normalised ``centroids``.

    Streams ``features`` (array, memmap or tensor) in chunks: memory O(chunk x K). Returns (N,) float32.
    """
    dev = resolve_device(device, features)
    c = l2_normalize(to_tensor(centroids, dev))
    n = _rows(features)
    if c.ndim != 2:
        raise MakError(f"centroids must be (K, d), got shape {tuple(c.shape)}")
    if n and features.shape[1] != c.shape[1]:
        raise MakError(f"feature dimension {features.shape[1]} differs from centroid dimension {c.shape[1]}")
    out = np.empty(n, dtype=np.float32)
    with torch.inference_mode():
        for lo in range(0, n, chunk):
            xb = l2_normalize(_chunk(features, lo, lo + chunk, dev))
            sim = (xb @ c.T).max(dim=1).values
            out[lo : lo + chunk] = (1.0 - sim).cpu().numpy()
    return out


def proximity(seed_features: Any, pool_features: Any, clusters: int = 10, seed: int = 0,
              device: str | torch.device | None = None) -> np.ndarray:
    """Cosine distance of each pool image to the nearest of ``clusters`` k-means centroids of the seed.

    Returns (N,) float32; lower means closer to the seed's domain.
    """
    if seed_features.shape[1] != pool_features.shape[1]:
        raise MakError(f"seed feature dimension {seed_features.shape[1]} differs from pool's {pool_features.shape[1]}")
    centroids = kmeans(seed_features, clusters=clusters, seed=seed, device=device)
    return nearest_centroid_distance(pool_features, centroids, device=device)
