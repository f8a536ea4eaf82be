"""Sharded feature stores: same selection as the merged store, lazy row access, one-line shard errors."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from mak.data.pool_array import PoolArray, store_arrays
from mak.run.select_job import iter_items
from mak.data.store import open_store, write_shards_index, write_store
from mak.errors import MakError

STRATEGIES = ["mak", "random", "kcenter", "tailness", "proximity", "tailness+proximity"]
try:
    import mak.selection.robust  # noqa: F401

    STRATEGIES.append("robust")
except ImportError:  # pragma: no cover
    pass

N = 257
CUTS = [0, 100, 101, 180, N]


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(11)
    seed = rng.normal(size=(40, 12)).astype(np.float32)
    pool = rng.normal(size=(N, 12)).astype(np.float16)
    pool[200] = pool[13]  # an exact duplicate pair
    views = rng.normal(size=(3, N, 6)).astype(np.float32)
    items = [f"pool/{i:04d}.png {i % 4}" for i in range(N)]
    write_store(root / "seed", seed, [f"seed/{i}.png 0" for i in range(40)])
    write_store(root / "merged", pool, items, views=views)
    names = []
    for k in range(len(CUTS) - 1):
        a, b = CUTS[k], CUTS[k + 1]
        write_store(root / "sharded" / f"shard-{k:05d}", pool[a:b], items[a:b], views=views[:, a:b])
        names.append(f"shard-{k:05d}")
    write_shards_index(root / "sharded", names)
    return root, pool, views, items


def run(cli, root, store, out, *extra):
    return cli("select", "--seed-store", root / "seed", "--pool-store", root / store, "--budget", "20",
               "--out", out, "--ecle-batch-size", "32", "--partitions", "2", "--clusters", "3", "--no-progress", *extra)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_sharded_and_merged_give_identical_selections(cli, stores, tmp_path, strategy):
    root = stores[0]
    assert run(cli, root, "merged", tmp_path / "m", "--strategy", strategy) == 0
    assert run(cli, root, "sharded", tmp_path / "s", "--strategy", strategy) == 0
    assert (tmp_path / "m/selection.txt").read_bytes() == (tmp_path / "s/selection.txt").read_bytes()
    assert (tmp_path / "m/scores.csv").read_bytes() == (tmp_path / "s/scores.csv").read_bytes()
    sm = json.loads((tmp_path / "m/summary.json").read_text())
    ss = json.loads((tmp_path / "s/summary.json").read_text())
    assert sm["counts"] == ss["counts"] and sm["parameters"] == ss["parameters"]


@pytest.mark.parametrize("extra", [("--dedup", "0.9"), ("--kcenter", "two-round", "--kcenter-parts", "3")])
def test_sharded_and_merged_identical_with_scale_options(cli, stores, tmp_path, extra):
    root = stores[0]
    strategy = "kcenter" if "--kcenter" in extra else "mak"
    assert run(cli, root, "merged", tmp_path / "m", "--strategy", strategy, *extra) == 0
    assert run(cli, root, "sharded", tmp_path / "s", "--strategy", strategy, *extra) == 0
    for f in ("selection.txt", "scores.csv") + (("dedup.csv",) if "--dedup" in extra else ()):
        assert (tmp_path / "m" / f).read_bytes() == (tmp_path / "s" / f).read_bytes(), f
    if "--dedup" in extra:
        rows = (tmp_path / "m/dedup.csv").read_text().splitlines()
        assert rows[1].startswith("200,pool/0200.png 0,13,pool/0013.png 1,")


def test_pool_array_reads_like_the_merged_arrays(stores):
    root, pool, views, items = stores
    st = open_store(root / "sharded")
    f = PoolArray(st, "features")
    v = PoolArray(st, "views")
    assert f.shape == (N, 12) and v.shape == (3, N, 6) and f.ndim == 2 and v.ndim == 3
    np.testing.assert_array_equal(np.asarray(f), pool.astype(np.float32))
    sub = f[95:190]
    assert isinstance(sub, PoolArray) and sub.shape == (95, 12)
    np.testing.assert_array_equal(np.asarray(sub[3:10]), pool[98:105].astype(np.float32))
    idx = np.array([0, 99, 100, 101, 179, 180, 256])
    np.testing.assert_array_equal(f[idx], pool[idx].astype(np.float32))
    np.testing.assert_array_equal(f[idx[::-1]], pool[idx[::-1]].astype(np.float32))
    np.testing.assert_array_equal(v[:, idx], views[:, idx])
    np.testing.assert_array_equal(np.asarray(v[:, 99:102]), views[:, 99:102])
    # through an index map (the rows kept by --dedup)
    keep = np.array([1, 5, 100, 101, 200, 250])
    fk = PoolArray(st, "features", keep)
    assert fk.shape == (6, 12)
    np.testing.assert_array_equal(np.asarray(fk[2:5]), pool[keep[2:5]].astype(np.float32))
    np.testing.assert_array_equal(PoolArray(st, "views", keep)[:, [0, 4]], views[:, keep[[0, 4]]])
    assert list(iter_items(st)) == items
    assert list(iter_items(st, 99, 102)) == items[99:102]
    # a plain store is passed as its memmaps, exactly as the single-process job does
    plain = open_store(root / "merged")
    fm, vm = store_arrays(plain)
    assert isinstance(fm, np.memmap) and isinstance(vm, np.memmap)


def _assert_one_line_error(capsys, *needles):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for s in needles:
        assert s in err, err


def test_missing_shard_is_a_one_line_error(cli, stores, tmp_path, capsys):
    root = stores[0]
    bad = tmp_path / "bad"
    shutil.copytree(root / "sharded", bad)
    shutil.rmtree(bad / "shard-00002")
    out = tmp_path / "o"
    assert cli("select", "--pool-store", bad, "--budget", "5", "--strategy", "random", "--out", out) == 2
    _assert_one_line_error(capsys, "shard-00002", "missing")
    assert not out.exists()


def test_wrong_dimension_shard_is_a_one_line_error(cli, stores, tmp_path, capsys):
    root = stores[0]
    bad = tmp_path / "bad"
    shutil.copytree(root / "sharded", bad)
    np.save(bad / "shard-00003" / "features.npy", np.zeros((N - 180, 7), dtype=np.float16))
    out = tmp_path / "o"
    assert cli("select", "--pool-store", bad, "--budget", "5", "--strategy", "random", "--out", out) == 2
    _assert_one_line_error(capsys, "shard-00003", "features.npy", "dimension 7")
    assert not out.exists()


def test_shard_with_wrong_views_is_a_one_line_error(cli, stores, tmp_path, capsys):
    root = stores[0]
    bad = tmp_path / "bad"
    shutil.copytree(root / "sharded", bad)
    np.save(bad / "shard-00001" / "views.npy", np.zeros((3, 1, 5), dtype=np.float32))
    out = tmp_path / "o"
    assert run(cli, root, bad, out, "--strategy", "tailness") == 2
    _assert_one_line_error(capsys, "shard-00001", "views.npy")
    assert not out.exists()


def test_subprocess_exit_code_for_a_bad_shard(stores, tmp_path):
    import subprocess
    import sys

    root = stores[0]
    bad = tmp_path / "bad"
    shutil.copytree(root / "sharded", bad)
    (bad / "shards.json").write_text(json.dumps({"shards": ["shard-00000", "shard-00009"]}))
    res = subprocess.run([sys.executable, "-m", "mak", "select", "--pool-store", str(bad), "--budget", "3",
                          "--strategy", "random", "--out", str(tmp_path / "o")], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 2
    assert len(res.stderr.strip().splitlines()) == 1 and "shard-00009" in res.stderr


@pytest.mark.parametrize("index", ['{"shards": []}', '{"shards": "shard-00000"}', '["shard-00000"]', '{"shard', ''])
def test_a_malformed_shard_index_is_named(stores, tmp_path, index):
    bad = tmp_path / "bad"
    shutil.copytree(stores[0] / "sharded", bad)
    (bad / "shards.json").write_text(index)
    with pytest.raises(MakError, match=r"shards\.json: malformed"):
        open_store(bad)
