"""Greedy k-center at scale: across processes, and the two-round composable coreset.

Sharded exact greedy (:func:`greedy_sharded`)
    The candidates are split into contiguous blocks, one per rank (global position = the
    candidate's place in the sorted candidate list, so ties still go to the lowest pool index).
    Each rank keeps the running max-similarity vector of its own block. Per step: a local
    argmin; one ``all_reduce(MIN)`` of a single int64 that packs (similarity, global position)
    so that the smallest similarity wins and ties go to the lowest position; the winner's
    normalised feature vector broadcast from its owner; a local matrix-vector update.
    Communication is O(d) per step, memory O(block x d) per rank.

    Bit-exactness: a BLAS matrix-vector product may round the last few entries of its result
    differently depending on its length, so the same candidate could get a different float32
    similarity in a block of another size. Every block is therefore padded with zero columns to a
    multiple of :data:`PAD` (their similarity is pinned to +inf), which makes each candidate's
    similarity independent of how the candidates are split: the picks are identical for any
    number of ranks.

Two-round k-center (:func:`kcenter_two_round`, ``mak select --kcenter two-round``)
    For budgets too large for one greedy pass (budget x candidates too big): split the
    candidates into ``parts`` contiguous parts; round 1 runs greedy k-center on each part
    (``budget`` picks each, or the whole part when it is no larger; the seed features as initial
    centers); round 2 runs one greedy k-center over the union of the round-1 picks (again with
    the seed as init) and returns its ``budget`` picks. Under ``torchrun`` each rank runs round 1
    on its own parts with no communication; round 2 is the sharded exact greedy over the union.
    The single-process function with ``parts = P`` returns exactly what P ranks return.

Guarantee (angles, the metric behind cosine similarity). Let R* be the optimal k-center radius of
the candidates (with the same initial centers). Greedy k-center is a 2-approximation, and its
argument (k+1 points pairwise >= r apart, two of them share an optimal cluster) only needs the
points to lie in the candidate set, so every round-1 part radius r1 <= 2 R* and the round-2
radius over the union r2 <= 2 R*. A candidate is within r1 of a round-1 center (or init),
which is within r2 of a final center (or init), so::

    radius(two-round) <= r1 + r2 <= 4 R* <= 4 radius(exact greedy)       (in angle)

since any solution, greedy's included, has radius >= R*. ``1 - cos`` itself is not a metric;
the factor holds for the angle ``arccos(1 - d)``. The per-run bound ``r1 + r2`` is returned too
(:class:`TwoRoundResult`), and is usually far tighter than 4x.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from mak import distributed as D
from mak._tensor import l2_normalize, resolve_device, to_tensor
from mak.errors import MakError
from mak.selection.kcenter import max_similarity

PAD = 64  # rows per block are padded to a multiple of this (see the module docstring)
SIM_CHUNK = 4096  # rows x centers per similarity block against the init: 4096^2 float32 = 64 MiB
_INF = float("inf")


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------

def angle(cos_distance: float) -> float:
    """Angle (radians) of a cosine distance ``1 - cos``."""
    return float(math.acos(max(-1.0, min(1.0, 1.0 - float(cos_distance)))))


def cos_distance(theta: float) -> float:
    """Cosine distance ``1 - cos`` of an angle in radians (capped at pi)."""
    return float(1.0 - math.cos(min(math.pi, max(0.0, theta))))


def _pack(sim: float, pos: int) -> int:
    """Pack (float32 similarity, position) into one int64 ordered like the pair (sim, pos)."""
    s = np.float32(sim) + np.float32(0.0)  # -0.0 -> +0.0
    b = int(np.array([s], dtype=np.float32).view(np.int32)[0])
    if b < 0:
        b ^= 0x7FFFFFFF  # negative floats: reverse the magnitude order
    return (b << 32) | int(pos)


def _unpack_pos(key: int) -> int:
    return int(key) & 0xFFFFFFFF


class _Block:
    """A rank's (or part's) normalised candidate rows as the columns of a d x rows matrix, zero-padded
    to a multiple of :data:`PAD` columns (see :mod:`mak.selection.kcenter` for the layout)."""

    def __init__(self, x: torch.Tensor):
        self.n = int(x.shape[0])
        rows = max(PAD, -(-self.n // PAD) * PAD)
        self.xt = torch.zeros((x.shape[1], rows), dtype=torch.float32, device=x.device)
        self.xt[:, : self.n] = x.T
        self.sim = torch.full((rows,), _INF, dtype=torch.float32, device=x.device)

    def row(self, i: int) -> torch.Tensor:
        return self.xt[:, i]

    def init_sim(self, init: Any) -> None:
        if self.n:
            self.sim[: self.n] = max_similarity(self.xt.T, init, chunk=SIM_CHUNK)[: self.n]

    def update(self, w: torch.Tensor) -> None:
        torch.maximum(self.sim, w @ self.xt, out=self.sim)

    def radius(self) -> float:
        """Cosine distance from the farthest unpicked row to its nearest center (0 when none)."""
        if not self.n:
            return 0.0
        m = float(self.sim[: self.n].min())
        return 0.0 if m == _INF else max(0.0, 1.0 - m)


@dataclass
class GreedyResult:
    """Picks of a (sharded) greedy run as global candidate positions, in pick order."""

    picks: np.ndarray
    radius: float  # covering radius of the candidates (cosine distance) after the last pick
    step_seconds: float = 0.0  # mean wall time per pick


class _Layout:
    """Where the candidates live: rank ``me``'s block starts at global position ``offset``; rows
    are fetched from (and broadcast by) their owner when ``comm``."""

    def __init__(self, blk: "_Block", counts: list[int], comm: bool) -> None:
        self.blk, self.comm = blk, comm
        self.total = sum(counts)
        self.me = D.rank() if comm else 0
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.offset = int(self.offsets[self.me])

    def take(self, pos: int) -> torch.Tensor:
        """The normalised row at global ``pos``, broadcast from its owner."""
        blk = self.blk
        if not self.comm:
            return blk.row(pos - self.offset).clone()
        src = int(np.searchsorted(self.offsets, pos, side="right") - 1)
        if src == self.me:
            buf = blk.row(pos - self.offset).contiguous().to(D.comm_device())
        else:
            buf = torch.empty(blk.xt.shape[0], dtype=torch.float32, device=D.comm_device())
        torch.distributed.broadcast(buf, src=src)
        return buf.to(blk.xt.device)

    def center(self, pos: int) -> None:
        """Make global ``pos`` a center: update every similarity and never pick it again."""
        self.blk.update(self.take(pos))
        if self.offset <= pos < self.offset + self.blk.n:
            self.blk.sim[pos - self.offset] = _INF

    def next_pick(self) -> int:
        """The global position with the smallest largest-similarity, ties to the lowest."""
        blk = self.blk
        if blk.n:
            j = int(torch.argmin(blk.sim))  # first occurrence: lowest local index among ties
            key = _pack(float(blk.sim[j]), self.offset + j) if j < blk.n else _pack(_INF, self.total)
        else:
            key = _pack(_INF, self.total)
        if self.comm:
            key = int(D.all_reduce_scalar(key, "min", dtype=np.int64))
        return _unpack_pos(key)


def greedy_sharded(x_local: torch.Tensor, budget: int, init: Any = None, seed: int = 0, sharded: bool = True,
                   progress: bool = False, first_rng: np.random.Generator | None = None) -> GreedyResult:
    """Greedy k-center over candidates split across ranks (or one process).

    ``x_local``: this rank's block of L2-normalised candidate rows; blocks are in rank order, so
    global position = sum of the earlier ranks' block sizes + local row. With ``sharded=False``
    (or one process) the block is all the candidates. Each step picks the candidate with the
    smallest largest-similarity to the centers (``init`` rows and earlier picks), ties to the
    lowest global position. Without ``init`` the first pick is uniform over all candidates from
    ``seed`` (``np.random.default_rng(seed)``, or ``first_rng``) and counts toward the budget.
    """
    import time

    from mak.progress import bar as progress_bar

    comm = sharded and D.active()
    counts = D.all_gather_counts(x_local.shape[0]) if comm else [int(x_local.shape[0])]
    total = sum(counts)
    _check_budget(budget, total)
    lay = _Layout(_Block(x_local), counts, comm)
    blk = lay.blk
    picks = np.empty(budget, dtype=np.int64)
    start = 0
    with torch.inference_mode():
        if init is not None and int(init.shape[0]) > 0:
            blk.init_sim(init)
        else:
            rng = first_rng if first_rng is not None else np.random.default_rng(seed)
            picks[0] = int(rng.integers(total))
            blk.sim.fill_(_INF)
            blk.sim[: blk.n] = -_INF
            lay.center(int(picks[0]))
            start = 1
        bar = progress_bar(budget, "k-center", unit="pick", enabled=progress, initial=start)
        t_steps = time.perf_counter()
        for step in range(start, budget):
            picks[step] = lay.next_pick()
            lay.center(int(picks[step]))
            bar.update(1)
        bar.close()
        steps = budget - start
        per_step = (time.perf_counter() - t_steps) / steps if steps else 0.0
        radius = blk.radius()
        if comm:
            radius = float(D.all_reduce_scalar(radius, "max"))
    return GreedyResult(picks, radius, per_step)


def _check_budget(budget: int, total: int) -> None:
    """One-line errors for a budget k-center cannot meet over ``total`` candidates."""
    if budget <= 0:
        raise MakError(f"budget must be > 0, got {budget}")
    if budget > total:
        raise MakError(f"budget ({budget}) is larger than the number of candidates ({total})")
    if total >= 2**32:
        raise MakError(f"too many k-center candidates for one run ({total} >= 2^32)")


# --------------------------------------------------------------------------------------------
# Two-round composable coreset
# --------------------------------------------------------------------------------------------

@dataclass
class TwoRoundResult:
    """Outcome of :func:`kcenter_two_round` / :func:`two_round_sharded`."""

    picks: np.ndarray  # positions into the candidates, pick order
    parts: int
    union: int  # size of the round-1 union
    round1_radius: float  # max over parts (cosine distance)
    round2_radius: float  # over the union (cosine distance)
    info: dict = field(default_factory=dict)

    @property
    def radius_bound(self) -> float:
        """Upper bound on the covering radius of the candidates: r1 + r2 in angle, as a cosine distance."""
        return cos_distance(angle(self.round1_radius) + angle(self.round2_radius))


def _part_rng(seed: int, part: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(part), 0x6B63])


def _round1(x_part: torch.Tensor, budget: int, init: Any, seed: int, part: int) -> tuple[np.ndarray, float]:
    """Round-1 picks of one part (sorted positions within the part) and its radius."""
    n = int(x_part.shape[0])
    if n <= budget:
        return np.arange(n, dtype=np.int64), 0.0
    res = greedy_sharded(x_part, budget, init=init, seed=seed, sharded=False, first_rng=_part_rng(seed, part))
    return np.sort(res.picks), res.radius


def kcenter_two_round(features: Any, budget: int, parts: int, init: Any = None, seed: int = 0,
                      device: str | torch.device | None = None, return_result: bool = False
                      ) -> np.ndarray | TwoRoundResult:
    """Two-round (composable coreset) greedy k-center on one process, ``parts`` simulating ranks.

    Part p is rows ``shard_range(N, p, parts)`` of ``features``. Returns int64 indices into
    ``features`` in pick order (or a :class:`TwoRoundResult` with the radii when
    ``return_result``). With ``parts == 1`` it is exact greedy k-center. See the module
    docstring for the guarantee: radius <= 4x exact greedy's, in angle.
    """
    n = int(features.shape[0])
    if parts < 1:
        raise MakError(f"k-center parts must be >= 1, got {parts}")
    if budget <= 0:
        raise MakError(f"budget must be > 0, got {budget}")
    if budget > n:
        raise MakError(f"budget ({budget}) is larger than the number of candidates ({n})")
    dev = resolve_device(device, features)
    with torch.inference_mode():
        x = l2_normalize(to_tensor(features, dev))
        if parts == 1:
            res = greedy_sharded(x, budget, init=init, seed=seed, sharded=False)
            out = TwoRoundResult(res.picks, 1, n, res.radius, 0.0)
            return out if return_result else out.picks
        union, r1 = [], 0.0
        for p in range(parts):
            lo, hi = D.shard_range(n, p, parts)
            pk, r = _round1(x[lo:hi], budget, init, seed, p)
            union.append(lo + pk)
            r1 = max(r1, r)
        u = np.concatenate(union)
        res = greedy_sharded(x[torch.as_tensor(u, device=dev)], budget, init=init, seed=seed, sharded=False)
    out = TwoRoundResult(u[res.picks], parts, int(u.size), r1, res.radius)
    return out if return_result else out.picks


def two_round_sharded(x_block: torch.Tensor, block_start: int, total: int, budget: int, parts: int,
                      init: Any = None, seed: int = 0, progress: bool = False) -> TwoRoundResult:
    """The distributed two-round k-center; every rank gets the same result.

    The ``total`` candidates are cut into ``parts`` contiguous parts (``shard_range(total, p,
    parts)``); rank r owns parts ``shard_range(parts, r, world)`` and passes their rows as
    ``x_block`` (normalised), which start at candidate position ``block_start``. Round 1 needs no
    communication; round 2 is :func:`greedy_sharded` over the ranks' round-1 picks.
    """
    w, me = (D.world_size(), D.rank()) if D.active() else (1, 0)
    p_lo, p_hi = D.shard_range(parts, me, w)
    mine, r1 = [], 0.0
    for p in range(p_lo, p_hi):
        lo, hi = D.shard_range(total, p, parts)
        pk, r = _round1(x_block[lo - block_start: hi - block_start], budget, init, seed, p)
        mine.append(lo + pk)
        r1 = max(r1, r)
    mine_u = np.concatenate(mine) if mine else np.zeros(0, dtype=np.int64)
    r1 = float(D.all_reduce_scalar(r1, "max")) if D.active() else r1
    counts = D.all_gather_counts(mine_u.size) if D.active() else [mine_u.size]
    with torch.inference_mode():
        xu = x_block[torch.as_tensor(mine_u - block_start, device=x_block.device)] if mine_u.size else \
            x_block[:0]
    res = greedy_sharded(xu, budget, init=init, seed=seed, sharded=True, progress=progress)
    # union position -> candidate position: each rank fills the picks it owns, then one sum
    off = int(sum(counts[:me]))
    own = (res.picks >= off) & (res.picks < off + mine_u.size)
    picked = np.zeros(budget, dtype=np.int64)
    picked[own] = mine_u[res.picks[own] - off]
    if D.active():
        picked = D.all_reduce_array(picked, "sum")
    return TwoRoundResult(picked, parts, int(sum(counts)), r1, res.radius, {"step_seconds": res.step_seconds})


def exact_sharded(x_block: torch.Tensor, budget: int, init: Any = None, seed: int = 0,
                  progress: bool = False) -> GreedyResult:
    """Exact greedy over candidates split into rank blocks (see :func:`greedy_sharded`)."""
    return greedy_sharded(x_block, budget, init=init, seed=seed, sharded=True, progress=progress)


def covering_radius_sharded(x_block: torch.Tensor, centers: Any, init: Any = None) -> float:
    """Covering radius (cosine distance) of all ranks' candidate blocks by ``centers`` (+ ``init``)."""
    with torch.inference_mode():
        if x_block.shape[0]:
            sim = max_similarity(x_block, centers, chunk=SIM_CHUNK)
            if init is not None and int(init.shape[0]) > 0:
                torch.maximum(sim, max_similarity(x_block, init, chunk=SIM_CHUNK), out=sim)
            r = max(0.0, 1.0 - float(sim.min()))
        else:
            r = 0.0
    return float(D.all_reduce_scalar(r, "max")) if D.active() else r


__all__ = [
    "GreedyResult",
    "TwoRoundResult",
    "angle",
    "cos_distance",
    "covering_radius_sharded",
    "exact_sharded",
    "greedy_sharded",
    "kcenter_two_round",
    "two_round_sharded",
]
