"""Near-duplicate removal (mak.selection.scale.dedup) and `mak select --dedup`."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from mak.selection.scale.dedup import find_duplicates, near_duplicates
from mak.errors import MakError
from mak.data.store import write_store


def planted(seed: int = 1, groups: int = 150, d: int = 32, noise: float = 0.01):
    """Well-separated base points, each repeated 1-5 times with a little noise, shuffled."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(groups, d))
    sizes = rng.integers(1, 6, size=groups)
    group = np.repeat(np.arange(groups), sizes)
    x = base[group] + noise * rng.normal(size=(group.size, d))
    perm = rng.permutation(group.size)
    return x[perm].astype(np.float32), group[perm]


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("clusters", [None, 1, 7, 60])
def test_keeps_exactly_one_per_planted_group(clusters):
    x, group = planted()
    keep, rep = near_duplicates(x, 0.95, clusters=clusters, seed=3)
    assert sorted(group[keep].tolist()) == list(range(group.max() + 1))  # one per group, nothing else dropped
    for g in range(group.max() + 1):
        members = np.flatnonzero(group == g)
        assert keep[members.min()]  # the lowest index is the one kept
        assert (rep[members] == members.min()).all()


def test_guarantees_hold_against_brute_force():
    """Kept rows never pair up within the compared cluster links; reps are kept and similar enough."""
    rng = np.random.default_rng(7)
    # loose groups (similarity around the threshold) and many clusters: boundaries get crossed
    base = rng.normal(size=(60, 6))
    x = (base[rng.integers(60, size=600)] + 0.12 * rng.normal(size=(600, 6))).astype(np.float32)
    thr = 0.97
    r = find_duplicates(x, thr, clusters=40, seed=0)
    u = unit(x.astype(np.float64))
    sim = u @ u.T
    kept = np.flatnonzero(r.keep)
    assert r.keep[r.rep].all()
    dropped = np.flatnonzero(~r.keep)
    assert (r.rep[dropped] < dropped).all()
    np.testing.assert_allclose(r.similarity[dropped], sim[dropped, r.rep[dropped]], atol=1e-5)
    assert (r.similarity[dropped] >= 2 * thr**2 - 1 - 1e-5).all()
    h, s = r.home, r.second
    for i in kept:
        close = kept[(sim[i, kept] >= thr) & (kept != i)]
        linked = (h[close] == h[i]) | (h[close] == s[i]) | (s[close] == h[i])
        assert not linked.any(), (i, close[linked])
    assert r.info["dropped_across_clusters"] > 0  # the boundary pass did some work here


def test_exact_copies_at_threshold_one():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 8)).astype(np.float32)
    x = np.concatenate([x, x[[3, 7, 7]]])
    keep, rep = near_duplicates(x, 1.0)
    assert np.flatnonzero(~keep).tolist() == [50, 51, 52]
    assert rep[50:].tolist() == [3, 7, 7]


def test_bad_threshold():
    x = np.ones((4, 3), dtype=np.float32)
    for t in (0.0, 1.5, -0.2):
        with pytest.raises(MakError):
            near_duplicates(x, t)


def test_big_cluster_is_split_and_copies_still_found(monkeypatch):
    import mak.selection.scale.dedup as dd

    monkeypatch.setattr(dd, "SPLIT_MIN", 100)
    monkeypatch.setattr(dd, "SPLIT_FACTOR", 1.5)
    rng = np.random.default_rng(5)
    # one broad blob of 2000 distinct points, 20 far clusters, copies of three blob points; 2 clusters to start
    blob = (np.array([6.0] + [0.0] * 15) + rng.normal(size=(2000, 16))).astype(np.float32)
    far = rng.normal(size=(200, 16)) * 10
    x = np.concatenate([blob, far.astype(np.float32), blob[[10, 20, 30]]])
    r = dd.find_duplicates(x, 0.999, clusters=2, seed=1)
    assert r.info["splits"] >= 1 and r.clusters > 2
    assert np.bincount(r.home).max() < 1500
    assert np.flatnonzero(~r.keep).tolist() == [2200, 2201, 2202]
    assert r.rep[2200:].tolist() == [10, 20, 30]


def test_cli_dedup_writes_csv_and_never_selects_a_dropped_row(cli, tmp_path):
    x, group = planted(seed=2, groups=60, d=16)
    n = x.shape[0]
    rng = np.random.default_rng(0)
    views = rng.normal(size=(2, n, 8)).astype(np.float32)
    items = [f"pool/{i}.png {group[i]}" for i in range(n)]
    seed = write_store(tmp_path / "seed", rng.normal(size=(30, 16)).astype(np.float32),
                       [f"s/{i}" for i in range(30)])
    pool = write_store(tmp_path / "pool", x, items, views=views)
    out = tmp_path / "out"
    assert cli("select", "--seed-store", seed, "--pool-store", pool, "--budget", "40", "--out", out,
               "--strategy", "mak", "--clusters", "3", "--ecle-batch-size", "32", "--partitions", "2",
               "--dedup", "0.95", "--no-progress") == 0
    keep, rep = near_duplicates(x, 0.95, seed=0)
    rows = list(csv.DictReader(open(out / "dedup.csv")))
    assert [int(r["index"]) for r in rows] == np.flatnonzero(~keep).tolist()
    for r in rows:
        i, k = int(r["index"]), int(r["representative"])
        assert k == rep[i] and r["item"] == items[i] and r["representative_item"] == items[k]
        assert float(r["similarity"]) >= 0.95 - 1e-6
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["dedup_dropped"] == int((~keep).sum())
    assert summary["parameters"]["dedup"] == 0.95
    chosen = (out / "selection.txt").read_text().splitlines()
    assert len(chosen) == 40 and len(set(chosen)) == 40
    picked = [items.index(c) for c in chosen]
    assert keep[picked].all()
    assert len({group[p] for p in picked}) == 40  # duplicates do not fill the pick
    scores = list(csv.DictReader(open(out / "scores.csv")))
    assert len(scores) == n
    for r in scores:
        i = int(r["index"])
        assert (r["ecle"] != "") == bool(keep[i]) and (r["score"] != "") == bool(keep[i])
    # a re-run without --dedup replaces the outputs; dedup.csv goes, the user's own file stays
    (out / "notes.txt").write_text("the user's")
    assert cli("select", "--seed-store", seed, "--pool-store", pool, "--budget", "40", "--out", out,
               "--strategy", "kcenter", "--overwrite", "--no-progress") == 0
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "scores.csv", "selection.txt", "summary.json"]


def test_cli_dedup_errors(cli, tmp_path, capsys):
    rng = np.random.default_rng(0)
    x = np.repeat(rng.normal(size=(5, 4)).astype(np.float32), 4, axis=0)
    pool = write_store(tmp_path / "pool", x, [f"p/{i}" for i in range(20)])
    out = tmp_path / "o"
    assert cli("select", "--pool-store", pool, "--budget", "6", "--strategy", "random", "--out", out,
               "--dedup", "0.99", "--no-progress") == 2
    err = capsys.readouterr().err.strip()
    assert "after --dedup" in err and "5 of 20" in err and len(err.splitlines()) == 1
    with pytest.raises(SystemExit, match="2"):
        cli("select", "--pool-store", pool, "--budget", "3", "--strategy", "random", "--out", out,
            "--dedup", "2", "--no-progress")
    assert "argument --dedup: '2' must be a number in (0, 1]" in capsys.readouterr().err
    assert not out.exists()
