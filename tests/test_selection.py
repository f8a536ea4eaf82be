"""Strategies of mak.select against their definitions."""
from __future__ import annotations

import math

import numpy as np
import pytest

import mak
from mak._tensor import top_k


def z(x):
    x = np.asarray(x, dtype=np.float64)
    return (x - x.mean()) / x.std()


@pytest.fixture
def data(rng):
    seed = rng.normal(size=(60, 8)).astype(np.float32)
    pool = rng.normal(size=(300, 8)).astype(np.float32)
    views = rng.normal(size=(3, 300, 6)).astype(np.float32)
    return seed, pool, views


def test_mak_is_topk_then_kcenter(data):
    seed, pool, views = data
    sel = mak.select(seed, pool, views, 40, strategy="mak", batch_size=64, partitions=2, seed=3)
    e = mak.ecle(views, batch_size=64, partitions=2, seed=3)
    d = mak.proximity(seed, pool, clusters=10, seed=3)
    score = 0.5 * z(e) - 0.5 * z(d)
    np.testing.assert_allclose(sel.score, score)
    cand = np.sort(np.argsort(-score, kind="stable")[: math.ceil(1.5 * 40)])
    assert sorted(sel.candidates.tolist()) == cand.tolist()
    expect = cand[mak.kcenter_greedy(pool[cand], 40, init=seed)]
    assert sel.indices.tolist() == expect.tolist()


def test_mak_small_core_ratio_takes_top_scored(data):
    seed, pool, views = data
    sel = mak.select(seed, pool, views, 30, strategy="mak", core_ratio=1.0, batch_size=64, partitions=1)
    assert sel.indices.tolist() == np.argsort(-sel.score, kind="stable")[:30].tolist()


def test_baselines_follow_definitions(data):
    seed, pool, views = data
    kw = dict(batch_size=64, partitions=2, seed=1)
    tail = mak.select(None, pool, views, 20, strategy="tailness", **kw)
    assert tail.indices.tolist() == np.argsort(-tail.ecle, kind="stable")[:20].tolist()
    prox = mak.select(seed, pool, None, 20, strategy="proximity", **kw)
    assert prox.indices.tolist() == np.argsort(prox.distance, kind="stable")[:20].tolist()
    tp = mak.select(seed, pool, views, 20, strategy="tailness+proximity", **kw)
    assert tp.indices.tolist() == np.argsort(-tp.score, kind="stable")[:20].tolist()
    kc = mak.select(seed, pool, None, 20, strategy="kcenter", **kw)
    assert kc.indices.tolist() == mak.kcenter_greedy(pool, 20, init=seed).tolist()
    rnd = mak.select(None, pool, None, 20, strategy="random", **kw)
    assert len(set(rnd.indices.tolist())) == 20 and rnd.indices.max() < 300


def test_strategies_ask_only_for_what_they_need(data):
    _, pool, _ = data
    mak.select(None, pool, None, 5, strategy="random")
    mak.select(None, pool, None, 5, strategy="kcenter")
    with pytest.raises(mak.MakError, match="needs the pool's augmented views"):
        mak.select(None, pool, None, 5, strategy="tailness")
    with pytest.raises(mak.MakError, match="needs seed features"):
        mak.select(None, pool, None, 5, strategy="proximity")


def test_top_k_ties_and_partition_path():
    s = np.array([1, 3, 3, 2, 3, 0, 3], dtype=np.float64)
    assert top_k(s, 3).tolist() == [1, 2, 4]
    assert top_k(s, 2, largest=False).tolist() == [5, 0]
    big = np.repeat(np.arange(50.0), 40)  # many ties, exercise the argpartition branch
    assert top_k(big, 7).tolist() == np.argsort(-big, kind="stable")[:7].tolist()


@pytest.mark.parametrize("strategy", list(mak.STRATEGIES))
def test_deterministic_per_seed(data, strategy):
    seed, pool, views = data
    a = mak.select(seed, pool, views, 25, strategy=strategy, batch_size=64, partitions=2, seed=4)
    b = mak.select(seed, pool, views, 25, strategy=strategy, batch_size=64, partitions=2, seed=4)
    assert a.indices.tolist() == b.indices.tolist()
    assert len(set(a.indices.tolist())) == 25


def test_far_blob_rejected_by_mak_and_proximity_not_random(rng):
    seed = rng.normal(size=(200, 16)) + np.r_[6.0, np.zeros(15)]
    inliers = rng.normal(size=(300, 16)) + np.r_[6.0, np.zeros(15)]
    blob = rng.normal(size=(300, 16)) + np.r_[np.zeros(15), -6.0]  # as spread as the inliers, far away
    pool = np.concatenate([inliers, blob]).astype(np.float32)
    views = np.stack([pool + 0.3 * rng.normal(size=pool.shape) for _ in range(3)]).astype(np.float32)
    junk = set(range(300, 600))
    for strategy in ("mak", "proximity"):
        sel = mak.select(seed, pool, views, 60, strategy=strategy, batch_size=128, partitions=2)
        assert not junk & set(sel.indices.tolist()), strategy
    rnd = mak.select(None, pool, None, 60, strategy="random")
    assert junk & set(rnd.indices.tolist())


def test_precomputed_ecle_gives_the_same_selection(data):
    seed, pool, views = data
    kw = dict(batch_size=64, partitions=2, seed=2)
    fresh = mak.select(seed, pool, views, 30, strategy="mak", **kw)
    e = mak.ecle(views, **kw)
    reused = mak.select(seed, pool, views, 30, strategy="mak", ecle_scores=e, **kw)
    assert reused.indices.tolist() == fresh.indices.tolist()
    with pytest.raises(mak.MakError, match="precomputed ECLE"):
        mak.select(seed, pool, views, 30, strategy="mak", ecle_scores=e[:-1], **kw)


@pytest.mark.parametrize("where", ["pool", "seed", "views"])
@pytest.mark.parametrize("kind", ["numpy", "memmap", "torch"])
def test_nan_or_inf_in_the_api_inputs_is_named_with_its_row(data, tmp_path, where, kind):
    import torch

    seed, pool, views = (np.array(a, dtype=np.float32) for a in data)
    arr = {"pool": pool, "seed": seed, "views": views}[where]
    if where == "views":
        arr[1, 7, 0] = np.inf
    else:
        arr[7, 2] = np.nan
    if kind == "memmap":
        np.save(tmp_path / "x.npy", arr)
        arr = np.load(tmp_path / "x.npy", mmap_mode="r")
    elif kind == "torch":
        arr = torch.from_numpy(arr)
    args = {"pool": (seed, arr, views), "seed": (arr, pool, views), "views": (seed, pool, arr)}[where]
    name = {"pool": "pool features", "seed": "seed features", "views": "pool views"}[where]
    for strategy in ("mak", "random"):
        if strategy == "random" and where == "views":
            continue
        with pytest.raises(mak.MakError, match=rf"^{name} contain NaN or Inf \(row 7\)$"):
            mak.select(*args, budget=5, strategy=strategy)


def test_check_finite_reads_in_chunks_and_names_the_first_bad_row():
    from mak.selection.strategies import check_finite

    x = np.ones((3, 10, 2), np.float32)
    x[1, 6, 1] = np.nan
    x[2, 8, 0] = np.inf
    check_finite(x[:, :6], "v", axis=1, chunk=4)
    with pytest.raises(mak.MakError, match=r"row 6\)"):
        check_finite(x, "v", axis=1, chunk=4)
    with pytest.raises(mak.MakError, match=r"row 1\)"):
        check_finite(x, "v", axis=0, chunk=2)
