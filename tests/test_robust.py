"""Tests of the ``robust`` strategy: gate terms, rank fusion, the ratio tail, options and the CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import mak
from mak.errors import MakError
from mak.selection.robust import (DEFAULTS, RobustContext, auto_gate_quantile, rank_fusion, rank_normalize, robust_options,
                        seed_gate, seed_share, share_gate)
from mak.selection.strategies import Context
from mak.data.store import write_store

D = 16


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def make_world(rng: np.random.Generator, n_seed: int = 40, n_pool: int = 60, n_junk: int = 150, classes: int = 5,
               noise: float = 0.12):
    """Seed and in-domain pool from ``classes`` Gaussian classes; junk: one far blob orthogonal to them all."""
    centers = unit(rng.standard_normal((classes, D)))
    seed = np.concatenate([c + noise * rng.standard_normal((n_seed, D)) for c in centers]).astype(np.float32)
    pool_in = np.concatenate([c + noise * rng.standard_normal((n_pool, D)) for c in centers]).astype(np.float32)
    q, _ = np.linalg.qr(np.concatenate([centers.T, rng.standard_normal((D, 1))], axis=1))
    far = q[:, classes]  # orthogonal to every class center
    junk = (far + noise * rng.standard_normal((n_junk, D))).astype(np.float32)
    return seed, pool_in, junk


def make_views(rng: np.random.Generator, feats: np.ndarray, r: int = 3, sigma: float = 0.2) -> np.ndarray:
    return (unit(feats)[None] + sigma * rng.standard_normal((r, len(feats), D))).astype(np.float32)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These arrays are tiny: one thread avoids the oversubscription of a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def world():
    rng = np.random.default_rng(7)
    seed, pool_in, junk = make_world(rng)
    pool = np.concatenate([pool_in, junk])
    views = make_views(rng, pool)
    return seed, pool_in, junk, pool, views


# ------------------------------------------------------------------------------------------ gate

def plain_heldout(seed_feats: np.ndarray, clusters: int, folds: int, seed: int) -> np.ndarray:
    """Reference held-out distances: folds from the seed's RNG, k-means without the fold, numpy cosine."""
    m = len(seed_feats)
    parts = np.array_split(np.random.default_rng(seed).permutation(m), folds)
    out = np.zeros(m)
    for held in parts:
        train = np.array(sorted(set(range(m)) - set(held.tolist())))
        c = unit(mak.kmeans(seed_feats[train], clusters=clusters, seed=seed).astype(np.float64))
        x = unit(seed_feats[held].astype(np.float64))
        for row, i in zip(x, held):
            out[i] = 1.0 - max(float(row @ cj) for cj in c)
    return out


def test_gate_threshold_is_the_quantile_of_heldout_seed_distances(world):
    seed = world[0]
    ref = plain_heldout(seed, clusters=5, folds=4, seed=3)
    for q in (0.5, 0.9, 0.99, 1.0):
        threshold, held = seed_gate(seed, clusters=5, quantile=q, folds=4, seed=3)
        np.testing.assert_allclose(held, ref, atol=1e-5)
        assert threshold == pytest.approx(float(np.quantile(ref, q)), abs=1e-5)
    assert threshold == pytest.approx(ref.max(), abs=1e-5)  # q = 1: the farthest held-out seed image


def test_centroid_gate_keeps_seed_like_images_and_rejects_a_far_cluster(world):
    seed, pool_in, junk, pool, _ = world
    jitter = seed + 1e-3 * np.random.default_rng(0).standard_normal(seed.shape).astype(np.float32)
    test = np.concatenate([jitter, pool_in, junk])
    threshold, _ = seed_gate(seed, clusters=5, quantile=0.99)
    value = mak.proximity(seed, test, clusters=5)
    kept = value <= threshold
    n_seed, n_in = len(seed), len(pool_in)
    # q 0.99 of the held-out distances leaves 1% of the seed beyond by construction; centroids fitted
    # on the whole seed sit no farther from its own images, so at most that many are out
    assert (~kept[:n_seed]).sum() <= int(np.ceil(0.01 * n_seed))
    assert kept[n_seed:n_seed + n_in].mean() >= 0.97  # fresh in-domain draws: ~1% lost by construction
    assert not kept[n_seed + n_in:].any()  # the planted far cluster is rejected entirely


def test_gate_in_the_strategy_counts_rejections_and_reports_histograms(world):
    seed, pool_in, junk, pool, views = world
    sel = mak.select(seed, pool, views, 40, strategy="robust", clusters=5, partitions=2)
    n_in = len(pool_in)
    assert (sel.indices < n_in).all()
    info = sel.info
    assert info["gate_rejected"] + info["gate_kept"] == len(pool)
    q = auto_gate_quantile(len(seed))
    assert DEFAULTS["gate_quantile"] == "auto" and q == min(0.998, 1 - 5 / len(seed)) == 0.975
    assert len(junk) <= info["gate_rejected"] <= len(junk) + 3 * (1.0 - q + 0.04) * n_in  # three terms
    g = info["gate"]
    assert g["quantile"] == q and info["robust"]["gate_quantile"] == q and g["score"] == DEFAULTS["gate_score"]
    h = g["histogram"]
    assert len(h["edges"]) == len(h["seed_heldout"]) + 1 == len(h["pool"]) + 1
    assert sum(h["seed_heldout"]) == len(seed) and sum(h["pool"]) == len(pool)
    assert h["edges"][0] <= g["threshold"] <= h["edges"][-1]
    assert np.isneginf(sel.score[n_in:]).sum() >= len(junk)
    assert info["robust"]["fusion"] == "rank" and info["robust"]["gate_clusters"] >= 5  # auto resolved
    json.dumps(info)  # lands in summary.json as is


def test_too_few_gated_images_pick_only_those(world):
    """By default a pick never reaches beyond the gate: it is smaller than the budget, and says so."""
    seed, pool_in, junk, _, _ = world
    pool = np.concatenate([pool_in[:20], junk])
    views = make_views(np.random.default_rng(1), pool)
    kw = dict(strategy="robust", clusters=5, partitions=1, gate_score="centroid", gate_clusters=5)
    sel = mak.select(seed, pool, views, 30, **kw)
    kept = sel.info["gate_kept"]
    assert 0 < kept <= 20 and len(sel.indices) == kept
    assert sel.info["gate_filled"] == 0 and sel.info["gate_short"] == 30 - kept
    assert f"only {kept} pool images pass the gate" in sel.info["note"]
    gated = np.flatnonzero(np.isfinite(sel.score))
    assert set(sel.indices) == set(gated)
    np.testing.assert_array_equal(sel.indices, gated[np.argsort(-sel.score[gated], kind="stable")])  # best first
    # the same pick is the head of the filled one
    filled = mak.select(seed, pool, views, 30, gate_fill="distance", **kw)
    np.testing.assert_array_equal(filled.indices[:kept], sel.indices)
    # nothing past the gate: an error naming the way out, not an empty pick
    with pytest.raises(MakError, match="no pool image passes the in-domain gate.*gate_fill=distance"):
        mak.select(seed, junk, make_views(np.random.default_rng(1), junk), 10, **kw)
    with pytest.raises(MakError, match="gate_fill"):
        mak.select(seed, pool, views, 30, gate_fill="nearest", **kw)


def test_cli_short_pick_is_a_warning_even_with_quiet_and_no_pass_names_flags(world, tmp_path, cli, capsys):
    seed, pool_in, junk, _, _ = world
    write_store(tmp_path / "seed", seed, [f"seed/{i}.png 0" for i in range(len(seed))])
    pool = np.concatenate([pool_in[:20], junk])
    write_store(tmp_path / "pool", pool, [f"pool/{i}.png" for i in range(len(pool))])
    write_store(tmp_path / "junk", junk, [f"junk/{i}.png" for i in range(len(junk))])
    common = ["--seed-store", tmp_path / "seed", "--budget", 30, "--clusters", 5, "--gate-score", "centroid",
              "--gate-clusters", 5, "-q"]
    capsys.readouterr()
    assert cli("select", "--pool-store", tmp_path / "pool", *common, "--out", tmp_path / "a") == 0
    picked = len((tmp_path / "a" / "selection.txt").read_text().splitlines())
    assert 0 < picked < 30
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"mak select: warning: only {picked} pool images pass the gate for a budget of 30: picked those "
                   f"{picked} (--gate-fill distance fills the budget)"]
    assert cli("select", "--pool-store", tmp_path / "junk", *common, "--out", tmp_path / "b") == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("the pool holds nothing like the seed, or pass --gate-fill distance or --gate off"), err


def test_too_few_gated_images_are_filled_with_the_least_distant_rejected(world):
    seed, pool_in, junk, _, _ = world
    pool = np.concatenate([pool_in[:20], junk])
    views = make_views(np.random.default_rng(1), pool)
    sel = mak.select(seed, pool, views, 30, strategy="robust", clusters=5, partitions=1, gate_score="centroid",
                     gate_clusters=5, gate_fill="distance")
    kept = sel.info["gate_kept"]
    assert kept <= 20 and sel.info["gate_filled"] == 30 - kept and sel.info["gate_short"] == 0
    assert "filled" in sel.info["note"]
    assert len(np.unique(sel.indices)) == 30
    rejected = np.flatnonzero(~np.isfinite(sel.score))
    fill = sel.indices[kept:]
    assert set(fill) <= set(rejected)
    dist = sel.distance  # gate_clusters == clusters: the gate value is the proximity distance
    others = np.delete(dist, np.concatenate([sel.indices, np.flatnonzero(np.isfinite(sel.score))]))
    assert dist[fill].max() <= np.min(others, initial=np.inf)


# ------------------------------------------------------------------------------------ fusion

def test_rank_normalize_matches_a_plain_reference_with_ties():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 6, size=40).astype(np.float64)
    mask = rng.random(40) < 0.7
    got = rank_normalize(x, mask)
    vals = x[mask]
    n = len(vals)
    for i in range(40):
        if not mask[i]:
            assert np.isnan(got[i])
            continue
        less, equal = np.sum(vals < x[i]), np.sum(vals == x[i])
        avg_rank = less + (equal + 1) / 2.0
        assert got[i] == pytest.approx((avg_rank - 0.5) / n)
    assert rank_normalize(np.array([3.0]))[0] == 0.5


def test_rank_fusion_is_invariant_to_a_pile_of_far_junk():
    rng = np.random.default_rng(1)
    n, n_junk = 200, 800
    tail, dist = rng.normal(3.2, 0.3, n), rng.normal(0.17, 0.05, n)
    junk_tail, junk_dist = rng.normal(5.0, 0.3, n_junk), rng.normal(0.4, 0.03, n_junk)
    mask = np.r_[np.ones(n, bool), np.zeros(n_junk, bool)]
    alone = rank_fusion(tail, dist, 0.5)
    mixed = rank_fusion(np.r_[tail, junk_tail], np.r_[dist, junk_dist], 0.5, mask)
    np.testing.assert_array_equal(mixed[:n], alone)
    assert np.isneginf(mixed[n:]).all()
    # the paper's z-scores over the whole pool do change the in-domain order
    z_alone = 0.5 * mak.selection.strategies.zscore(tail) - 0.5 * mak.selection.strategies.zscore(dist)
    z_mixed = 0.5 * mak.selection.strategies.zscore(np.r_[tail, junk_tail]) - 0.5 * mak.selection.strategies.zscore(np.r_[dist, junk_dist])
    assert not np.array_equal(np.argsort(z_alone, kind="stable"), np.argsort(z_mixed[:n], kind="stable"))


def test_robust_selection_ignores_junk_that_the_gate_rejects(world):
    """Behind a per-image gate, rank fusion of a per-image tail ranks the in-domain rows as if the junk were absent."""
    seed, pool_in, junk, pool, views = world
    ecle = mak.ecle(views, partitions=1)  # one fixed tail for both pools
    kw = dict(strategy="robust", clusters=5, tail="ecle", gate_score="centroid", gate_clusters=5)
    alone = mak.select(seed, pool_in, views[:, : len(pool_in)], 30, ecle_scores=ecle[: len(pool_in)], **kw)
    mixed = mak.select(seed, pool, views, 30, ecle_scores=ecle, **kw)
    assert mixed.info["gate_rejected"] - alone.info["gate_rejected"] == len(junk)
    inside = np.isfinite(alone.score)
    np.testing.assert_array_equal(mixed.score[: len(pool_in)], alone.score)
    assert inside.sum() > 0.95 * len(pool_in)
    np.testing.assert_array_equal(mixed.indices, alone.indices)


# ------------------------------------------------------------------------------- equivalence

@pytest.mark.parametrize("core_ratio", [1.5, 0.8])
def test_robust_without_gate_with_ecle_and_z_is_mak(world, core_ratio):
    seed, _, _, pool, views = world
    kw = dict(clusters=5, core_ratio=core_ratio, partitions=2, seed=4, alpha=0.3)
    ref = mak.select(seed, pool, views, 25, strategy="mak", **kw)
    got = mak.select(seed, pool, views, 25, strategy="robust", gate="off", tail="ecle", fusion="z", **kw)
    np.testing.assert_array_equal(got.indices, ref.indices)
    np.testing.assert_array_equal(got.score, ref.score)
    np.testing.assert_array_equal(got.candidates, ref.candidates)


def test_options_are_validated():
    assert robust_options({}) == DEFAULTS
    assert robust_options({"gate": "off"})["gate"] is False
    assert robust_options({"gate_quantile": "0.95", "ratio_bags": "2"}) == DEFAULTS | {"gate_quantile": 0.95,
                                                                                      "ratio_bags": 2}  # CLI text
    assert robust_options({"gate_score": "ratio+centroid"})["gate_score"] == "ratio+centroid"  # order kept
    for bad, name in (({"gate_quantile": 0.0}, "gate_quantile"), ({"gate_quantile": 1.5}, "gate_quantile"),
                      ({"tail": "x"}, "tail"), ({"tail": "knn"}, "tail"), ({"tail": "ecle+ratio"}, "tail"),
                      ({"fusion": "x"}, "fusion"), ({"gate_folds": 1}, "gate_folds"), ({"gate": "maybe"}, "gate"),
                      ({"gate_score": "x"}, "gate_score"), ({"gate_score": "lof"}, "gate_score"),
                      ({"gate_clusters": "many"}, "gate_clusters"), ({"share_k": 0}, "share_k"),
                      ({"share_reference": "all"}, "share_reference"), ({"gate_core_ratio": 0}, "gate_core_ratio"),
                      ({"gate_score": "share+share"}, "gate_score"), ({"gate_score": ""}, "gate_score"),
                      ({"ratio_epochs": 1.5}, "ratio_epochs"), ({"ratio_bags": True}, "ratio_bags")):
        with pytest.raises(MakError, match=f"^{name}="):
            robust_options(bad)


@pytest.mark.parametrize("removed", ["lof_k", "share_smooth", "knn_k", "fusion_distance", "gate_quantil"])
def test_an_unknown_option_is_an_error_naming_it_and_the_valid_ones(world, removed):
    seed, _, _, pool, views = world
    hint = "did you mean 'gate_quantile'\\? " if removed == "gate_quantil" else ""
    with pytest.raises(MakError, match=f"unknown option '{removed}' for strategy 'robust' "
                                       f"\\({hint}valid: fusion, gate,"):
        mak.select(seed, pool, views, 10, strategy="robust", clusters=5, **{removed: 1})
    with pytest.raises(MakError, match=f"unknown option '{removed}' for strategy 'mak' \\(it takes none\\)"):
        mak.select(seed, pool, views, 10, strategy="mak", clusters=5, **{removed: 1})


def test_a_context_with_foreign_global_operations_is_refused(world):
    seed, _, _, pool, views = world

    class Sharded(Context):
        def top_k(self, score, k, largest=True):  # pretends to be distributed
            return super().top_k(score, k, largest)

    class ShardedRobust(RobustContext):
        def top_k(self, score, k, largest=True):
            return super().top_k(score, k, largest)

    with pytest.raises(MakError, match="RobustOps"):
        mak.select(seed, pool, views, 10, strategy="robust", clusters=5, partitions=1, context_cls=Sharded)
    sel = mak.select(seed, pool, views, 10, strategy="robust", clusters=5, partitions=1, context_cls=ShardedRobust)
    assert len(sel) == 10


# -------------------------------------------------------------------------------------- CLI

def test_cli_flags_are_the_declared_options(tmp_path, cli, capsys):
    from mak.cli import build_parser
    from mak.cli.select import params_from_args
    from mak.selection.robust import OPTIONS

    given = dict(gate="off", gate_quantile="0.95", gate_folds="3", gate_score="centroid+ratio", gate_clusters="auto",
                 tail="ecle", fusion="z", share_k="20", share_reference="5000", gate_core_ratio="1.25",
                 ratio_folds="3", ratio_hidden="16", ratio_epochs="9", ratio_bags="2", gate_fill="distance")
    assert set(given) == {o.name for o in OPTIONS} == set(DEFAULTS)  # every declared option has its flag
    argv = [x for k, v in given.items() for x in ("--" + k.replace("_", "-"), v)]
    params = params_from_args(build_parser().parse_args(
        ["select", "--pool-store", "p", "--budget", "3", "--out", "o", "--strategy", "robust", *argv]))
    assert robust_options({k: params[k] for k in DEFAULTS}) == dict(
        gate=False, gate_quantile=0.95, gate_folds=3, gate_score="centroid+ratio", gate_clusters="auto", tail="ecle",
        fusion="z", share_k=20, share_reference=5000, gate_core_ratio=1.25, ratio_folds=3, ratio_hidden=16,
        ratio_epochs=9, ratio_bags=2, gate_fill="distance")
    params = params_from_args(build_parser().parse_args(["select", "--pool-store", "p", "--budget", "3", "--out", "o"]))
    assert not set(params) & set(DEFAULTS)  # unset options keep the strategy's defaults
    for flag in ("--lof-k", "--share-smooth", "--knn-k", "--fusion-distance"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["select", "--pool-store", "p", "--budget", "3", "--out", "o", flag, "1"])


@pytest.mark.parametrize("bad", [["--tail", "x"], ["--fusion", "x"], ["--gate", "x"], ["--gate-clusters", "x"],
                                 ["--share-reference", "x"], ["--gate-core-ratio", "x"], ["--ratio-folds", "x"],
                                 ["--ratio-epochs", "1.5"], ["--ratio-bags", "0"], ["--gate-score", "share+x"], ["--gate-fill", "x"],
                                 ["--gate-quantile", "x"]])
def test_cli_bad_option_values_are_one_line_naming_the_flag(tmp_path, cli, capsys, bad):
    with pytest.raises(SystemExit) as exc:
        cli("select", "--pool-store", tmp_path / "p", "--budget", "5", "--strategy", "robust", "--out", tmp_path / "o",
            *bad)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"argument {bad[0]}: {bad[1]!r} must be" in err, err
    assert not (tmp_path / "o").exists()


def test_cli_robust_avoids_a_far_junk_blob(world, tmp_path, cli, capsys):
    seed, pool_in, junk, pool, views = world
    write_store(tmp_path / "seed", seed, [f"seed/{i}.png 0" for i in range(len(seed))])
    items = [f"pool/in_{i}.png" for i in range(len(pool_in))] + [f"pool/junk_{i}.png" for i in range(len(junk))]
    write_store(tmp_path / "pool", pool.astype(np.float16), items, views=views)
    out = tmp_path / "out"
    rc = cli("select", "--seed-store", tmp_path / "seed", "--pool-store", tmp_path / "pool", "--budget", 40,
             "--strategy", "robust", "--clusters", 5, "--partitions", 2, "--no-progress", "--out", out)
    assert rc == 0
    picked = (out / "selection.txt").read_text().splitlines()
    assert len(picked) == 40 and not any("junk" in line for line in picked)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["gate_rejected"] >= len(junk)
    assert summary["info"]["gate"]["threshold"] > 0
    assert summary["info"]["robust"]["tail"] == DEFAULTS["tail"]
    # a bad option value is an error naming its flag, exit code 2
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        cli("select", "--seed-store", tmp_path / "seed", "--pool-store", tmp_path / "pool", "--budget", 5,
            "--strategy", "robust", "--clusters", 5, "--gate-quantile", 1.5, "--out", tmp_path / "bad")
    assert exc.value.code == 2 and "argument --gate-quantile: '1.5' must be" in capsys.readouterr().err
    assert not (tmp_path / "bad" / "selection.txt").exists()


# ------------------------------------------------------------------------------ seed share

def brute_share(queries: np.ndarray, seed: np.ndarray, ref: np.ndarray, k: int, self_index=None) -> np.ndarray:
    """Slow reference: sort every bank row by cosine similarity (stable), drop the query's own row."""
    bank = unit(np.concatenate([seed, ref]).astype(np.float64))
    q = unit(queries.astype(np.float64))
    out = []
    for i in range(len(q)):
        sims = bank @ q[i]
        order = [j for j in np.argsort(-sims, kind="stable") if self_index is None or j != self_index[i]]
        out.append(np.mean(np.array(order[:k]) < len(seed)))
    return np.array(out)


@pytest.mark.parametrize("k", [1, 4, 9])
def test_seed_share_matches_brute_force_and_excludes_the_query_itself(k):
    rng = np.random.default_rng(k)
    seed = rng.standard_normal((40, 5)).astype(np.float32)
    near_copies = seed[:4] * 2 + 1e-3 * rng.standard_normal((4, 5))  # near, not exact (exact ties are ambiguous)
    pool = np.concatenate([rng.standard_normal((60, 5)) + 1.5, near_copies]).astype(np.float32)
    ref_rows = np.arange(0, len(pool), 2)  # a sample of the pool: every other row
    self_index = np.full(len(pool), -1)
    self_index[ref_rows] = len(seed) + np.arange(len(ref_rows))
    want = brute_share(pool, seed, pool[ref_rows], k, self_index)
    got = seed_share(pool, seed, pool[ref_rows], k=k, self_index=self_index, chunk=16)  # many chunks
    np.testing.assert_allclose(got, want, atol=1e-6)
    held_t, held = share_gate(seed, pool[ref_rows], k=k, quantile=0.9)
    want_held = brute_share(seed, seed, pool[ref_rows], k, np.arange(len(seed)))
    np.testing.assert_allclose(held, want_held, atol=1e-6)
    assert held_t == pytest.approx(np.quantile(want_held, 0.1))  # the (1 - q) quantile of held-out shares
    if k == 1:  # pool rows next to a seed image find it first
        assert (got[60:] == 1.0).all()


def test_share_gate_keeps_seed_like_images_and_rejects_a_planted_far_cluster(world):
    seed, pool_in, junk, pool, _ = world
    threshold, held = share_gate(seed, pool, k=10, quantile=0.98)
    share = seed_share(pool, seed, pool, k=10, self_index=len(seed) + np.arange(len(pool)))
    kept = share >= threshold
    assert kept[: len(pool_in)].mean() >= 0.95
    assert not kept[len(pool_in):].any()
    assert (held >= threshold).mean() >= 0.98 - 1e-9


def test_share_k_larger_than_the_bank_is_an_error():
    with pytest.raises(MakError, match="share k"):
        seed_share(np.ones((2, 3), np.float32), np.ones((2, 3), np.float32), np.ones((1, 3), np.float32), k=3)


@pytest.mark.parametrize("gate_score", ["share", "centroid+share"])
def test_robust_with_the_share_gate_and_tail_reports_both_and_avoids_junk(world, gate_score):
    seed, pool_in, junk, pool, views = world
    sel = mak.select(seed, pool, views, 30, strategy="robust", clusters=5, partitions=1, gate_score=gate_score,
                     tail="ecle", share_k=20)
    assert (sel.indices < len(pool_in)).all() and len(set(sel.indices.tolist())) == 30
    sg = sel.info["seed_share"]
    assert sg["reference"] == len(pool) and sg["k"] == 20 and sg["rejected"] >= len(junk)
    assert sel.info["gate_kept"] + sel.info["gate_rejected"] == len(pool)
    # a subsampled reference (deterministic from the seed) gives the same kind of answer
    sub = mak.select(seed, pool, views, 30, strategy="robust", clusters=5, partitions=1, gate_score=gate_score,
                     share_k=20, share_reference=len(pool) // 2)
    again = mak.select(seed, pool, views, 30, strategy="robust", clusters=5, partitions=1, gate_score=gate_score,
                       share_k=20, share_reference=len(pool) // 2)
    assert sub.info["seed_share"]["reference"] == len(pool) // 2
    np.testing.assert_array_equal(sub.indices, again.indices)
    assert (sub.indices < len(pool_in)).all()


def test_gate_core_ratio_runs_kcenter_behind_the_gate(world):
    seed, pool_in, junk, pool, views = world
    top = mak.select(seed, pool, views, 20, strategy="robust", clusters=5, partitions=1, share_k=10)
    kc = mak.select(seed, pool, views, 20, strategy="robust", clusters=5, partitions=1, share_k=10,
                    gate_core_ratio=2.0)
    assert len(top.candidates) == 20 and len(kc.candidates) == 40
    np.testing.assert_array_equal(np.sort(top.indices), np.sort(top.candidates))  # ratio 1: the top-scored
    assert set(kc.indices.tolist()) <= set(kc.candidates.tolist())


# ------------------------------------------------------------------- defaults: ratio tail, no views

def test_default_robust_score_is_the_gated_rank_of_a_low_ratio_logit(world):
    from mak.selection.robust.density_ratio import ratio_logits

    seed, _, _, pool, views = world
    o = robust_options({})
    assert o["tail"] == "ratio" and o["fusion"] == "rank"
    sel = mak.select(seed, pool, views, 40, strategy="robust", clusters=5, partitions=2, share_k=10,
                     ratio_epochs=5, seed=3)
    assert o["ratio_bags"] == 5  # the logit: the mean of 5 independent cross-fitted fits
    hidden = DEFAULTS["ratio_hidden"]
    logit = ratio_logits(pool, seed, pool, self_index=np.arange(len(pool)), folds=5, hidden=hidden, epochs=5, seed=3,
                         bags=5)
    gated = np.isfinite(sel.score)
    # the score is the percentile rank of -logit over the gated rows, alpha and the distance unused
    np.testing.assert_allclose(sel.score[gated], rank_normalize(-logit.astype(np.float64), gated)[gated])
    assert sel.info["ratio"] == {"reference": len(pool), "folds": 5, "hidden": hidden, "epochs": 5, "bags": 5}
    again = mak.select(seed, pool, views, 40, strategy="robust", clusters=5, partitions=2, share_k=10,
                       ratio_epochs=5, seed=3, alpha=0.1)
    np.testing.assert_array_equal(again.indices, sel.indices)


def test_default_gate_is_every_term_at_its_own_held_out_seed_quantile(world):
    """centroid + share + ratio: each term's threshold is its held-out seed quantile; kept = all three pass."""
    from mak.selection.robust.density_ratio import BAG_SEED_STRIDE, ratio_logits, ratio_models, seed_heldout_logits

    seed, pool_in, junk, pool, views = world
    q = auto_gate_quantile(len(seed))
    kw = dict(strategy="robust", clusters=5, partitions=2, share_k=10, ratio_epochs=5, seed=3, gate_clusters=5)
    sel = mak.select(seed, pool, views, 40, **kw)
    assert DEFAULTS["gate_score"] == "centroid+share+ratio"
    c_thr, _ = seed_gate(seed, clusters=5, quantile=q, folds=5, seed=3)
    c_keep = mak.proximity(seed, pool, clusters=5, seed=3) <= c_thr
    s_thr, _ = share_gate(seed, pool, k=10, quantile=q)
    s_keep = seed_share(pool, seed, pool, k=10, self_index=len(seed) + np.arange(len(pool))) >= s_thr
    models = [ratio_models(seed, pool, folds=5, hidden=DEFAULTS["ratio_hidden"], epochs=5, seed=3 + b * BAG_SEED_STRIDE)
              for b in range(DEFAULTS["ratio_bags"])]  # the ratio term: the bags' mean logit
    held = seed_heldout_logits(seed, models)
    r_thr = float(np.quantile(held.astype(np.float64), 1.0 - q))
    r_keep = ratio_logits(pool, seed, pool, self_index=np.arange(len(pool)), models=models) >= r_thr
    np.testing.assert_array_equal(np.isfinite(sel.score), c_keep & s_keep & r_keep)
    info = sel.info
    assert info["seed_ratio"]["threshold"] == pytest.approx(r_thr, rel=0, abs=0)
    assert info["seed_ratio"]["rejected"] == int((~r_keep).sum())
    assert info["seed_share"]["threshold"] == s_thr and info["gate"]["threshold"] == c_thr  # the report's plots
    h = info["seed_ratio"]["histogram"]
    assert sum(h["seed_heldout"]) == len(seed) and sum(h["pool"]) == len(pool)
    assert info["gate_kept"] == int((c_keep & s_keep & r_keep).sum())
    assert (sel.indices < len(pool_in)).all()
    # the term order only changes which term info["gate"] and the fill order describe, not the gate
    other = mak.select(seed, pool, views, 40, **kw, gate_score="ratio+share+centroid")
    np.testing.assert_array_equal(other.indices, sel.indices)
    json.dumps(info)


def test_auto_gate_quantile_keeps_five_seed_images_beyond_each_threshold(world):
    assert auto_gate_quantile(100_000) == 0.998 and auto_gate_quantile(2500) == pytest.approx(0.998)
    assert auto_gate_quantile(620) == pytest.approx(1 - 5 / 620) and auto_gate_quantile(200) == pytest.approx(0.975)
    seed, _, _, pool, _ = world
    with pytest.raises(MakError, match="^gate_quantile='auto' needs more than 5 seed images .*gate_quantile=Q or gate=off"):
        mak.select(seed[:5], pool, None, 10, strategy="robust", clusters=2, gate_folds=2)
    from mak.cli import _with_flags  # the command line names the same parameters by their flags

    with pytest.raises(MakError) as exc:
        mak.select(seed[:5], pool, None, 10, strategy="robust", clusters=2, gate_folds=2)
    assert _with_flags(exc.value) == ("--gate-quantile 'auto' needs more than 5 seed images (got 5); pass "
                                      "--gate-quantile Q or --gate off")
    fixed = mak.select(seed, pool, None, 40, strategy="robust", clusters=5, share_k=10, ratio_epochs=5,
                       gate_quantile=auto_gate_quantile(len(seed)))
    auto = mak.select(seed, pool, None, 40, strategy="robust", clusters=5, share_k=10, ratio_epochs=5)
    np.testing.assert_array_equal(auto.indices, fixed.indices)


def test_ratio_gate_alone_rejects_a_planted_far_cluster(world):
    seed, pool_in, junk, pool, views = world
    sel = mak.select(seed, pool, None, 40, strategy="robust", clusters=5, gate_score="ratio", gate_quantile=0.99,
                     ratio_epochs=20, seed=1)
    kept = np.isfinite(sel.score)
    assert not kept[len(pool_in):].any()  # no junk passes
    assert kept[:len(pool_in)].mean() >= 0.9  # in-domain pool images, drawn like the seed, pass
    assert sel.info["gate"]["score"] == "ratio" and sel.info["gate"]["threshold"] == -sel.info["seed_ratio"]["threshold"]


def test_robust_without_ecle_needs_no_views_and_with_ecle_says_so(world):
    seed, _, _, pool, views = world
    from mak.selection.strategies import strategy_needs

    assert strategy_needs("robust", {}) == (True, False)
    assert strategy_needs("robust", {"tail": "ecle"}) == (True, True)
    assert strategy_needs("mak") == (True, True)
    no_views = mak.select(seed, pool, None, 40, strategy="robust", clusters=5, share_k=10)
    with_views = mak.select(seed, pool, views, 40, strategy="robust", clusters=5, share_k=10)
    np.testing.assert_array_equal(no_views.indices, with_views.indices)
    with pytest.raises(MakError, match="needs the pool's augmented views"):
        mak.select(seed, pool, None, 40, strategy="robust", clusters=5, tail="ecle")


def test_select_stores_runs_robust_on_a_store_without_views(world, tmp_path):
    from mak.run.select_job import select_stores

    seed, pool_in, _, pool, _ = world
    write_store(tmp_path / "seed", seed, [f"s{i}" for i in range(len(seed))])
    write_store(tmp_path / "pool", pool, [f"p{i}" for i in range(len(pool))])
    sel = select_stores(tmp_path / "seed", tmp_path / "pool", tmp_path / "out", 30, strategy="robust", clusters=5,
                        progress=False, share_k=10)
    assert len(sel) == 30 and (sel.indices < len(pool_in)).all()
    with pytest.raises(MakError, match="views"):
        select_stores(tmp_path / "seed", tmp_path / "pool", tmp_path / "out2", 30, strategy="robust", clusters=5,
                      progress=False, tail="ecle")
    assert not (tmp_path / "out2").exists()


@pytest.mark.parametrize("pool_rows", [0, 25])
def test_robust_on_a_seed_only_model_store_says_so(world, tmp_path, capsys, pool_rows):
    from mak.run.select_job import select_stores

    seed, _, _, pool, _ = world
    write_store(tmp_path / "seed", seed, [f"s{i}" for i in range(len(seed))])
    write_store(tmp_path / "pool", pool, [f"p{i}" for i in range(len(pool))],
                meta={"model_trained_on": {"images": 100, "pool_rows": pool_rows}})
    sel = select_stores(tmp_path / "seed", tmp_path / "pool", tmp_path / "out", 30, strategy="robust", clusters=5,
                        progress=False, share_k=10)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    err = capsys.readouterr().err
    if pool_rows == 0:  # auto means 0.98 on a seed-only model's features
        assert err == ""  # without progress bars the caller shows the note (mak select: after the work)
        assert "seed-only model" in sel.info["model_note"] == summary["note"]
        assert summary["parameters"]["gate_quantile"] == 0.98 == summary["info"]["gate"]["quantile"]
        select_stores(tmp_path / "seed", tmp_path / "pool", tmp_path / "out2", 30, strategy="robust", clusters=5,
                      progress=False, share_k=10, gate_quantile=0.95)  # an explicit setting is kept
        summary = json.loads((tmp_path / "out2" / "summary.json").read_text())
        assert summary["info"]["gate"]["quantile"] == 0.95 and "consider --gate-quantile 0.98" in summary["note"]
        select_stores(tmp_path / "seed", tmp_path / "pool", tmp_path / "out3", 30, strategy="robust", clusters=5,
                      progress=False, share_k=10, dedup=0.999)  # the scaled path (dedup) resolves it the same way
        summary = json.loads((tmp_path / "out3" / "summary.json").read_text())
        assert summary["info"]["gate"]["quantile"] == 0.98 and "seed-only model" in summary["note"]
    else:
        assert "seed-only model" not in err and "note" not in summary and "model_note" not in sel.info
        assert summary["info"]["gate"]["quantile"] == auto_gate_quantile(len(seed))
