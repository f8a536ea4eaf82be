"""Greedy k-center against a brute-force loop that recomputes every distance at every step."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import mak
from mak.selection.kcenter import covering_radius


def ref_kcenter(x: np.ndarray, budget: int, init: np.ndarray | None, seed: int) -> list[int]:
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    centers = [] if init is None else list(init / np.linalg.norm(init, axis=1, keepdims=True))
    picks: list[int] = []
    if init is None:
        picks.append(int(np.random.default_rng(seed).integers(len(x))))
        centers.append(x[picks[0]])
    while len(picks) < budget:
        best, best_d = -1, -np.inf
        for i in range(len(x)):
            if i in picks:
                continue
            d = min(1.0 - float(np.dot(x[i].astype(np.float64), c.astype(np.float64))) for c in centers)
            if d > best_d + 1e-12:  # strict: ties keep the lowest index
                best, best_d = i, d
        picks.append(best)
        centers.append(x[best])
    return picks


@pytest.mark.parametrize("with_init", [False, True])
def test_matches_bruteforce(rng, with_init):
    x = rng.normal(size=(120, 6)).astype(np.float32)
    init = rng.normal(size=(15, 6)).astype(np.float32) if with_init else None
    got = mak.kcenter_greedy(x, 25, init=init, seed=7)
    assert got.dtype == np.int64
    assert got.tolist() == ref_kcenter(x, 25, init, seed=7)


def test_ties_go_to_lowest_index():
    # Unit vectors with exactly representable dot products: many exact distance ties.
    basis = np.eye(4, dtype=np.float32)
    halves = np.array([[0.5, 0.5, 0.5, 0.5], [0.5, -0.5, 0.5, -0.5], [-0.5, 0.5, 0.5, -0.5]], dtype=np.float32)
    x = np.concatenate([halves, basis, -basis, basis, halves])  # duplicates too
    init = basis[:1]
    got = mak.kcenter_greedy(x, 8, init=init)
    assert got.tolist() == ref_kcenter(x, 8, init, seed=0)
    got2 = mak.kcenter_greedy(x, 6, seed=3)
    assert got2.tolist() == ref_kcenter(x, 6, None, seed=3)


def test_never_takes_both_duplicates(rng):
    x = rng.normal(size=(50, 8)).astype(np.float32)
    x[30] = x[10] * 2.0  # same direction: cosine duplicate
    for budget in (10, 30, 49):
        got = set(mak.kcenter_greedy(x, budget, init=x[:0] if False else None, seed=1).tolist())
        assert not {10, 30} <= got


def test_chunked_init_equals_unchunked(rng, monkeypatch):
    x = rng.normal(size=(300, 5)).astype(np.float32)
    init = rng.normal(size=(70, 5)).astype(np.float32)
    full = mak.kcenter_greedy(x, 40, init=init)
    import mak.selection.kcenter as kc

    monkeypatch.setattr(kc, "CHUNK", 16)
    assert mak.kcenter_greedy(x, 40, init=init).tolist() == full.tolist()


@pytest.mark.parametrize("with_init", [False, True])
def test_blocked_threaded_update_matches_bruteforce_for_any_thread_count(rng, monkeypatch, with_init):
    """The per-pick product over fixed column blocks spread over threads picks what the reference picks."""
    import mak.selection.kcenter as kc

    x = rng.normal(size=(1000, 6)).astype(np.float32)
    init = rng.normal(size=(9, 6)).astype(np.float32) if with_init else None
    monkeypatch.setattr(kc, "PICK_BLOCK", 64)  # 16 blocks, the last one short
    ref = ref_kcenter(x, 20, init, seed=4)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            assert mak.kcenter_greedy(x, 20, init=init, seed=4).tolist() == ref, threads
    finally:
        torch.set_num_threads(before)
    assert torch.get_num_threads() == before  # the workers' one-thread setting stays theirs


def test_ties_across_blocks_go_to_lowest_index(monkeypatch):
    """Exact ties whose copies sit in different blocks: each block's own minimum, merged, keeps the lowest index."""
    import mak.selection.kcenter as kc

    basis = np.eye(4, dtype=np.float32)
    halves = np.array([[0.5, 0.5, 0.5, 0.5], [0.5, -0.5, 0.5, -0.5], [-0.5, 0.5, 0.5, -0.5]], dtype=np.float32)
    x = np.concatenate([halves, basis, -basis, basis, halves] * 3)  # 57 rows, every direction 3-6 times
    monkeypatch.setattr(kc, "PICK_BLOCK", 8)  # 8 blocks, the last one short
    before = torch.get_num_threads()
    try:
        for threads in (1, 3):
            torch.set_num_threads(threads)
            assert mak.kcenter_greedy(x, 12, init=basis[:1]).tolist() == ref_kcenter(x, 12, basis[:1], 0), threads
            assert mak.kcenter_greedy(x, 10, seed=5).tolist() == ref_kcenter(x, 10, None, 5), threads
    finally:
        torch.set_num_threads(before)


def test_torch_input_and_radius_decreases(rng):
    x = rng.normal(size=(200, 4)).astype(np.float32)
    picks = mak.kcenter_greedy(torch.from_numpy(x), 30, seed=2)
    assert picks.tolist() == mak.kcenter_greedy(x, 30, seed=2).tolist()
    radii = [covering_radius(x, picks[:k]) for k in (5, 10, 20, 30)]
    assert all(a >= b for a, b in zip(radii, radii[1:]))


def test_budget_errors(rng):
    x = rng.normal(size=(10, 3))
    with pytest.raises(mak.MakError, match="larger"):
        mak.kcenter_greedy(x, 11)
    with pytest.raises(mak.MakError, match="> 0"):
        mak.kcenter_greedy(x, 0)
    with pytest.raises(mak.MakError, match="dimension"):
        mak.kcenter_greedy(x, 2, init=rng.normal(size=(4, 5)))
