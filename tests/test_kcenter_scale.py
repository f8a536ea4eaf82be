"""Sharded greedy k-center and the two-round composable coreset (mak.selection.scale.kcenter)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mak._tensor import l2_normalize
from mak.selection.kcenter import covering_radius, kcenter_greedy
from mak.selection.scale.kcenter import (
    _pack,
    angle,
    cos_distance,
    greedy_sharded,
    kcenter_two_round,
)


def brute_greedy(x: np.ndarray, budget: int, init: np.ndarray | None = None, seed: int = 0) -> list[int]:
    """Recompute every point's distance to every center at every step (float64), lowest index on ties."""
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    centers = [] if init is None else list(init / np.linalg.norm(init, axis=1, keepdims=True))
    picks: list[int] = []
    if not centers:
        first = int(np.random.default_rng(seed).integers(len(x)))
        picks.append(first)
        centers.append(x[first])
    while len(picks) < budget:
        sim = np.max(x @ np.array(centers).T, axis=1)
        sim[picks] = np.inf
        j = int(np.flatnonzero(sim == sim.min())[0])
        picks.append(j)
        centers.append(x[j])
    return picks


def clustered(rng: np.random.Generator, n: int, d: int, k: int, spread: float = 0.3) -> np.ndarray:
    c = rng.normal(size=(k, d))
    return (c[rng.integers(k, size=n)] + spread * rng.normal(size=(n, d))).astype(np.float32)


def test_pack_orders_like_similarity_then_position(rng):
    vals = np.concatenate([rng.normal(size=200).astype(np.float32), [0.0, -0.0, np.inf, -1.0, 1.0, 1e-30, -1e-30]])
    pos = rng.integers(0, 2**32 - 1, size=vals.size)
    keys = [_pack(float(v), int(p)) for v, p in zip(vals, pos)]
    order_keys = sorted(range(vals.size), key=lambda i: keys[i])
    order_pairs = sorted(range(vals.size), key=lambda i: (float(vals[i]) + 0.0, int(pos[i])))
    assert order_keys == order_pairs
    assert _pack(0.5, 3) < _pack(0.5, 4) < _pack(0.50001, 0)


@pytest.mark.parametrize("with_init", [False, True])
def test_single_process_matches_kcenter_greedy(rng, with_init):
    x = clustered(rng, 700, 24, 6)
    init = rng.normal(size=(30, 24)).astype(np.float32) if with_init else None
    res = greedy_sharded(l2_normalize(torch.from_numpy(x)), 40, init=init, seed=3, sharded=False)
    ref = kcenter_greedy(x, 40, init=init, seed=3)
    assert res.picks.tolist() == ref.tolist()
    assert res.radius == pytest.approx(covering_radius(x, ref, init=init), abs=1e-6)


def test_ties_go_to_lowest_index():
    # one-hot rows (with repeats): every similarity is exactly 0 or 1, so ties are exact
    x = np.eye(6, dtype=np.float32)[[3, 1, 1, 4, 0, 3, 5, 2, 2, 0, 5, 4]]
    for init in (None, np.eye(6, dtype=np.float32)[[1]]):
        res = greedy_sharded(torch.from_numpy(x), 6, init=init, seed=5, sharded=False)
        assert res.picks.tolist() == brute_greedy(x, 6, init, seed=5)


def test_two_round_one_part_is_exact_greedy(rng):
    x = clustered(rng, 500, 16, 5)
    seed_feats = rng.normal(size=(20, 16)).astype(np.float32)
    assert kcenter_two_round(x, 30, parts=1, init=seed_feats).tolist() == kcenter_greedy(x, 30, init=seed_feats).tolist()


@pytest.mark.parametrize("trial", range(4))
def test_two_round_radius_within_guarantee(trial):
    """radius(two-round) <= 4 x radius(exact greedy) in angle; also <= the per-run bound r1 + r2."""
    rng = np.random.default_rng(100 + trial)
    n, d = 900, 8 + 8 * trial
    x = clustered(rng, n, d, 3 + 4 * trial, spread=0.2 + 0.2 * trial)
    init = rng.normal(size=(10, d)).astype(np.float32) if trial % 2 else None
    budget = 25 + 10 * trial
    parts = 2 + trial
    res = kcenter_two_round(x, budget, parts=parts, init=init, seed=trial, return_result=True)
    picks = res.picks
    assert len(set(picks.tolist())) == budget and picks.min() >= 0 and picks.max() < n
    r_two = covering_radius(x, picks, init=init)
    r_exact = covering_radius(x, kcenter_greedy(x, budget, init=init, seed=trial), init=init)
    assert angle(r_two) <= 4 * angle(r_exact) + 1e-6
    assert angle(r_two) <= angle(res.round1_radius) + angle(res.round2_radius) + 1e-5
    assert r_two <= res.radius_bound + 1e-5
    assert res.union <= parts * budget


def test_two_round_parts_are_contiguous_and_deterministic(rng):
    x = clustered(rng, 400, 12, 4)
    a = kcenter_two_round(x, 20, parts=3, seed=9)
    b = kcenter_two_round(x, 20, parts=3, seed=9)
    assert a.tolist() == b.tolist()
    # a part no larger than the budget is taken whole: with parts of <= budget rows the union is everything
    res = kcenter_two_round(x[:60], 20, parts=3, seed=9, return_result=True)
    assert res.union == 60 and res.round1_radius == 0.0


def test_angle_helpers():
    assert angle(0.0) == 0.0
    assert angle(1.0) == pytest.approx(math.pi / 2)
    assert cos_distance(angle(0.3)) == pytest.approx(0.3)
    assert cos_distance(10.0) == pytest.approx(2.0)


def test_bad_budget_is_an_error(rng):
    from mak.errors import MakError

    x = rng.normal(size=(10, 4)).astype(np.float32)
    with pytest.raises(MakError):
        kcenter_two_round(x, 11, parts=2)
    with pytest.raises(MakError):
        kcenter_two_round(x, 3, parts=0)
