"""Cosine top-k in chunks: the ``k`` most similar rows of a bank for each query, a query chunk at a time.

:func:`cosine_topk` is the one search behind the seed share of the robust selection
(:func:`mak.selection.robust.neighbours.knn_chunks`) and the kNN classifier of the evaluation
(:func:`mak.bench.evaluate.knn_predict`). Callers check their own inputs (``1 <= k <= bank
rows``, equal feature dimensions) and word their own errors.

**Which k rows** is exact and canonical: the k largest cosines of the raw rows as
:func:`cosine64` computes them in float64, equal ones by lower bank row, whatever the chunk sizes,
thread count, process count or device. The float32
similarity matmuls round their last bits by shape, so they only find the candidates: every bank row
within ``2 x tol`` of a query's k-th best similarity, where ``tol`` (:func:`tolerance`) bounds the
distance of a float32 similarity of normalised rows from the float64 cosine. When more than k rows
fall in that band (a near-tie at the k-th place, or tied rows straddling it) the ones not certainly
among the k best are re-scored in float64 with a fixed summation order (:func:`cosine64`) and the
k best taken by (cosine, lower row). A row whose band grows past
``k + max(k, 32)`` is cut to its exact k best at once, so memory stays O(chunk x (bank_chunk + k)).

Merging a bank chunk into the running candidates: on a CPU, once a query row holds k candidates,
only the chunk's similarities within the band of its k-th best can enter, and after the first
chunks they are few. Those are gathered with one comparison pass and merged with the running ones,
instead of a top-k selection over every row of the chunk (the costliest step after the matmul).
The chunk's own k-th best sets the band when many pass (more than ``bank_chunk / FILTER_SHARE`` on
a row), for the first chunk, and on a GPU. Values are the float32 similarities (float64 cosines
rounded to float32 for re-scored rows); the order of near-equal values may follow the shapes.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

import numpy as np
import torch

from mak._tensor import l2_normalize, resolve_device, to_tensor

CHUNK = 4096
FILTER_SHARE = 4  # the filtered merge while at most bank_chunk / FILTER_SHARE candidates pass on a row
SPARE = 8  # similarities kept beyond the k-th by a top-k selection; more only where the band needs them
RESCORE_ELEMENTS = 1 << 22  # float64 elements per re-scoring block (32 MiB)
ZERO_ROW = 1e-300  # floor of a product of squared norms: below any two nonzero float32 rows' (4e-180); a zero row gives 0


def tolerance(dim: int) -> float:
    """A bound on |float32 similarity of two L2-normalised float32 rows - their float64 cosine|.

    Normalising a row of ``dim`` entries in float32 (:func:`unit_rows`) moves each entry by at most
    (dim/2 + 2) units of roundoff u = 2^-24 (relative), both rows together (dim + 4) u; the float32
    product of ``dim`` terms adds at most dim u for unit rows, in any summation order: (2 dim + 4) u.
    The 12 u more cover the float32 rounding of the band's own thresholds, with room to spare.
    """
    return (2 * int(dim) + 16) * 2.0**-24


def tree_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over the last dimension by halving (zero-padded to a power of two): elementwise adds
    only, so the same bits for a row whatever the shape, threads or device around it."""
    n = x.shape[-1]
    width = 1 << max(0, (n - 1).bit_length())
    if width != n:
        x = torch.nn.functional.pad(x, (0, width - n))
    while x.shape[-1] > 1:
        half = x.shape[-1] // 2
        x = x[..., :half] + x[..., half:]
    return x[..., 0]


def cosine64(queries: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 (key, cosine) of raw query rows (r, d) with their candidate rows (r, w, d): (r, w) each.

    ``key`` = cos x |cos| orders like the cosine and is made of exactly rounded products, sums
    in a fixed order (:func:`tree_sum`) and one division (no square root, which some CPU kernels
    round differently), so its bits depend on the two rows alone, on any device. ``cosine`` is
    the value to report. A zero row gives 0 (as :func:`unit_rows`).
    """
    q = queries.double()
    b = rows.double()
    dot = tree_sum(b * q[:, None, :])
    squares = (tree_sum(q * q)[:, None] * tree_sum(b * b)).clamp_min(ZERO_ROW)
    return dot * dot.abs() / squares, dot / squares.sqrt()


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """Each row's direction in float32 (a zero row stays zero): :func:`mak._tensor.l2_normalize` of
    the row scaled by a power of two to a largest entry in [0.5, 1) (at most 2^125 up, for rows of
    subnormal entries). The same bits as plain
    normalisation where its squares neither overflow nor underflow (and the norm is above its
    1e-12 floor), and a unit row for any other nonzero finite row."""
    x = x.float()
    exponent = torch.frexp(x.abs().amax(dim=1, keepdim=True)).exponent.clamp_min(-125)
    return l2_normalize(torch.ldexp(x, -exponent))


@contextmanager
def _ieee_float32(dev: torch.device) -> Iterator[None]:
    """Float32 matmuls in full precision (no TF32 or bf16, whatever the caller set), no autocast."""
    leaves = [getattr(getattr(torch.backends, name, None), "matmul", None) for name in ("cuda", "mkldnn")]
    if all(hasattr(leaf, "fp32_precision") for leaf in leaves):  # torch >= 2.9: per-backend settings
        saved = [(leaf, "fp32_precision", leaf.fp32_precision) for leaf in leaves if leaf.fp32_precision != "ieee"]
        for leaf, attr, _ in saved:
            setattr(leaf, attr, "ieee")
    else:  # older torch: the legacy switch
        saved = [(torch.backends.cuda.matmul, "allow_tf32", torch.backends.cuda.matmul.allow_tf32)]
        torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.autocast(dev.type, enabled=False):
            yield
    finally:
        for leaf, attr, before in saved:
            setattr(leaf, attr, before)


def cosine_topk(queries: Any, bank: Any, k: int, *, device: str | torch.device | None = None, chunk: int = CHUNK,
                bank_chunk: int | None = None, self_index: np.ndarray | None = None
                ) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
    """The ``k`` most cosine-similar bank rows of each query row, ``chunk`` query rows at a time.

    Yields ``(lo, hi, sim, idx)``: similarities (hi-lo, k), largest first, and the bank rows they
    belong to; which rows is exact (see the module docstring). The bank is searched ``bank_chunk``
    rows at a time (default ``chunk``); running candidates per query row are merged with each bank
    chunk, so memory is O(chunk x (bank_chunk + k)) beyond what the caller keeps. A bank of at most
    8 chunks is normalised once and stays on the device; a bigger one is re-read for every query
    chunk. ``self_index[i]`` (int64, one per query row): a bank row query ``i`` never matches (-1:
    none). ``device``: ``None`` is the queries' device (CPU for arrays). Rows are normalised in
    float32 (:func:`unit_rows`).
    """
    m = int(bank.shape[0])
    n = int(queries.shape[0])
    bank_chunk = chunk if bank_chunk is None else int(bank_chunk)
    dev = resolve_device(device, queries)
    excl = None if self_index is None else torch.from_numpy(np.asarray(self_index, dtype=np.int64)).to(dev)
    with torch.inference_mode():
        resident = [unit_rows(to_tensor(bank[lo : lo + bank_chunk], dev)) for lo in range(0, m, bank_chunk)] \
            if m <= 8 * bank_chunk else None
    read_rows, band = _row_reader(bank, dev), 2.0 * tolerance(bank.shape[1])
    for qlo in range(0, n, chunk):
        with torch.inference_mode(), _ieee_float32(dev):
            raw = to_tensor(queries[qlo : qlo + chunk], dev)
            run = _Candidates(raw, read_rows, k, band)
            q = unit_rows(raw)
            for i, slo in enumerate(range(0, m, bank_chunk)):
                s = resident[i] if resident else unit_rows(to_tensor(bank[slo : slo + bank_chunk], dev))
                sim = q @ s.T
                if excl is not None:
                    cols = excl[qlo : qlo + q.shape[0]] - slo
                    hit = (cols >= 0) & (cols < s.shape[0])
                    sim[hit.nonzero().flatten(), cols[hit]] = -float("inf")
                run.add(sim, slo)
            best, best_idx = run.result()
        yield qlo, qlo + q.shape[0], best, best_idx


def _row_reader(bank: Any, dev: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """Raw float32 bank rows (..., d) on ``dev`` for an index tensor (...)."""
    def read(idx: torch.Tensor) -> torch.Tensor:
        flat = idx.reshape(-1)
        rows = bank[flat.to(bank.device)] if isinstance(bank, torch.Tensor) else bank[flat.cpu().numpy()]
        return to_tensor(rows, dev).reshape(*idx.shape, -1)
    return read


class _Candidates:
    """One query chunk's running candidates: every bank row seen so far that may be among its k best.

    ``vals``/``idx`` (rows, w), each row sorted largest first: at least every bank row within
    ``band`` of the row's k-th best similarity (w >= k once k rows were seen; the width is the
    widest row's, so others hold rows below their band too; -inf pads and marks excluded rows).
    Every kept finite value is within ``band / 2`` of its float64 cosine.
    """

    def __init__(self, raw_queries: torch.Tensor, read_rows: Callable[[torch.Tensor], torch.Tensor], k: int,
                 band: float) -> None:
        self.q, self.read_rows, self.k, self.band = raw_queries, read_rows, k, band
        self.vals: torch.Tensor | None = None
        self.idx: torch.Tensor | None = None

    def kth(self) -> torch.Tensor | None:
        if self.vals is None or self.vals.shape[1] < self.k:
            return None
        return self.vals[:, self.k - 1 : self.k]

    def add(self, sim: torch.Tensor, slo: int) -> None:
        """Merge bank chunk ``sim`` (its columns are bank rows from ``slo``)."""
        kth = self.kth()
        cand = None
        if kth is not None and sim.device.type == "cpu":
            cand = _passing(sim, kth - self.band, slo, max(1, sim.shape[1] // FILTER_SHARE))
        if cand is None:  # the band from the chunk's own k-th best (or the running one, if higher)
            cand = self._chunk_best(sim, slo, kth)
        if self.vals is not None:
            cand = (torch.cat([self.vals, cand[0]], dim=1), torch.cat([self.idx, cand[1]], dim=1))
        self._keep(*cand)

    def _chunk_best(self, sim: torch.Tensor, slo: int, kth: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The chunk's rows within the band of its own k-th best (or of ``kth``, if higher): its top
        k + SPARE when the band fits in them on every row, else one comparison pass."""
        top, pos = _sorted_top(sim, self.k + SPARE)
        if top.shape[1] < self.k:
            return top, pos + slo
        floor = top[:, self.k - 1 : self.k] if kth is None else torch.maximum(top[:, self.k - 1 : self.k], kth)
        if top.shape[1] == sim.shape[1] or not bool((top[:, -1:] >= floor - self.band).any()):
            return top, pos + slo
        return _passing(sim, floor - self.band, slo, sim.shape[1])

    def _keep(self, vals: torch.Tensor, idx: torch.Tensor) -> None:
        top, order = _sorted_top(vals, self.k + SPARE)
        if top.shape[1] < vals.shape[1] and bool((top[:, -1:] >= top[:, self.k - 1 : self.k] - self.band).any()):
            top, order = torch.sort(vals, dim=1, descending=True)  # a band wider than k + SPARE somewhere
        vals, idx = top, torch.gather(idx, 1, order)
        inside = self._inside(vals)
        wide = inside > self.k + max(self.k, 32)
        if bool(wide.any()):  # cut those rows to their exact k best now
            rows = wide.nonzero().flatten()
            top, top_idx = self._exact_best(rows, vals[rows], idx[rows], inside[rows])
            vals[rows] = -float("inf")
            vals[rows, : self.k] = top
            idx[rows, : self.k] = top_idx
            inside = torch.where(wide, torch.full_like(inside, self.k), inside)
        width = max(int(inside.max()), min(self.k, vals.shape[1]))
        self.vals, self.idx = vals[:, :width], idx[:, :width]

    def _inside(self, vals: torch.Tensor) -> torch.Tensor:
        """How many of each sorted row are within the band of its k-th best (all, below k)."""
        if vals.shape[1] < self.k:
            return torch.full((vals.shape[0],), vals.shape[1], dtype=torch.int64, device=vals.device)
        return (vals >= vals[:, self.k - 1 : self.k] - self.band).sum(dim=1)

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, k) values and bank rows: the exact k best (see :func:`cosine_topk`)."""
        vals, idx = self.vals, self.idx
        k = min(self.k, vals.shape[1])
        inside = self._inside(vals)
        near_tie = inside > self.k
        vals, idx = vals[:, :k].clone(), idx[:, :k].clone()
        if bool(near_tie.any()):
            rows = near_tie.nonzero().flatten()
            vals[rows], idx[rows] = self._exact_best(rows, self.vals[rows], self.idx[rows], inside[rows])
        return vals, idx

    def _exact_best(self, rows: torch.Tensor, vals: torch.Tensor, idx: torch.Tensor, inside: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The k best of query ``rows``' candidates by (float64 cosine, lower bank row), largest first.

        ``vals``/``idx``: those rows' sorted candidates, ``inside``: how many are within the band.
        A candidate above the (k+1)-th best by more than the band is among the k best whatever the
        rounding; only the ones below that are re-scored, and their values become float64 cosines
        rounded to float32.
        """
        k, width = self.k, int(inside.max())
        vals, idx = vals[:, :width], idx[:, :width]
        sure = (vals > vals[:, k : k + 1] + self.band).sum(dim=1, keepdim=True)
        pos = sure + torch.arange(int((inside[:, None] - sure).max()), device=vals.device)
        unsure = pos < inside[:, None]
        pos = torch.where(unsure, pos, torch.full_like(pos, width))  # a spare last column takes the rest
        key, cos = self._cosines(rows, torch.gather(idx, 1, pos.clamp_max(width - 1)))
        live = unsure & torch.isfinite(torch.gather(vals, 1, pos.clamp_max(width - 1)))
        key = torch.where(live, key, torch.full_like(key, -float("inf")))
        spare = torch.full((len(rows), 1), -float("inf"), dtype=torch.float64, device=vals.device)
        col = torch.arange(width, device=vals.device)
        keys = torch.where(col < sure, float("inf"), -float("inf")).double()
        keys = torch.cat([keys, spare], dim=1).scatter_(1, pos, key)[:, :width]
        vals = torch.cat([vals, spare.float()], dim=1).scatter_(1, pos, cos.float())[:, :width]
        by_row = torch.argsort(idx, dim=1, stable=True)  # lower bank row first among equal cosines
        order = torch.gather(by_row, 1, torch.sort(torch.gather(keys, 1, by_row), dim=1, descending=True,
                                                   stable=True).indices)[:, :k]
        vals, idx = torch.gather(vals, 1, order), torch.gather(idx, 1, order)
        largest = torch.sort(vals, dim=1, descending=True, stable=True).indices
        return torch.gather(vals, 1, largest), torch.gather(idx, 1, largest)

    def _cosines(self, rows: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`cosine64` of query ``rows`` with bank rows ``idx`` (len(rows), w), in blocks."""
        step = max(1, RESCORE_ELEMENTS // max(1, idx.shape[1] * self.q.shape[1]))
        queries = self.q[rows]
        parts = [cosine64(queries[lo : lo + step], self.read_rows(idx[lo : lo + step]))
                 for lo in range(0, len(rows), step)]
        return torch.cat([key for key, _ in parts]), torch.cat([cos for _, cos in parts])


def _sorted_top(x: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's ``width`` largest values (all, if fewer), largest first, and their columns."""
    return torch.topk(x, min(width, x.shape[1]), dim=1, largest=True, sorted=True)


def _passing(sim: torch.Tensor, floor: torch.Tensor, slo: int, limit: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Each row's similarities >= its ``floor``, packed left into a (rows, c) -inf-padded matrix
    with their bank rows; None when some row has more than ``limit``."""
    rows, cols = (sim >= floor).nonzero(as_tuple=True)  # row-major: each row's columns in order
    counts = torch.bincount(rows, minlength=sim.shape[0])
    c = int(counts.max()) if rows.numel() else 0
    if c > limit:
        return None
    slot = torch.arange(rows.numel(), device=sim.device) - (torch.cumsum(counts, 0) - counts)[rows]
    vals = torch.full((sim.shape[0], c), -float("inf"), dtype=sim.dtype, device=sim.device)
    idx = torch.zeros((sim.shape[0], c), dtype=torch.int64, device=sim.device)
    vals[rows, slot] = sim[rows, cols]
    idx[rows, slot] = cols + slo
    return vals, idx


__all__ = ["CHUNK", "FILTER_SHARE", "cosine64", "cosine_topk", "tolerance", "tree_sum", "unit_rows"]
