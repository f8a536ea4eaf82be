"""Bring your own embeddings: plain arrays as stores, `mak store import`, and robust on external features."""
from __future__ import annotations

import json

import numpy as np
import pytest

from mak.data.store import EXTERNAL_META, model_kind, open_store, write_store

ROBUST_SMALL = ["--ratio-bags", "1", "--ratio-epochs", "2", "--ratio-hidden", "8"]


@pytest.fixture
def arrays(tmp_path, rng):
    seed = rng.normal(size=(60, 8)).astype(np.float32)
    pool = np.concatenate([rng.normal(size=(100, 8)), rng.normal(size=(100, 8)) + 2.0]).astype(np.float32)
    views = rng.normal(size=(3, 200, 4)).astype(np.float32)
    np.save(tmp_path / "seed.npy", seed)
    np.save(tmp_path / "pool.npy", pool)
    np.savez(tmp_path / "pool.npz", features=pool, views=views)
    (tmp_path / "pool.txt").write_text("".join(f"web/{i:05d}.jpg\n" for i in range(200)))
    return tmp_path


def _select(cli, out, pool, *extra, strategy="kcenter", seed="seed.npy"):
    d = out.parent
    return cli("select", "--seed-store", d / seed, "--pool-store", d / pool, "--budget", "20", "--out", out,
               "--strategy", strategy, "--no-progress", "--ecle-batch-size", "32", "--partitions", "2", *extra)


def _files(out):
    return {n: (out / n).read_bytes() for n in ("selection.txt", "scores.csv")}


@pytest.mark.parametrize("strategy", ["kcenter", "robust", "random"])
def test_an_array_selects_as_the_same_store_directory_does(cli, arrays, strategy):
    extra = ROBUST_SMALL if strategy == "robust" else []
    assert _select(cli, arrays / "a", "pool.npy", "--pool-items", arrays / "pool.txt", *extra, strategy=strategy) == 0
    write_store(arrays / "pool-store", np.load(arrays / "pool.npy"), (arrays / "pool.txt").read_text().split("\n")[:-1])
    write_store(arrays / "seed-store", np.load(arrays / "seed.npy"), [str(i) for i in range(60)])
    assert _select(cli, arrays / "b", "pool-store", *extra, strategy=strategy, seed="seed-store") == 0
    assert _files(arrays / "a") == _files(arrays / "b")
    picked = (arrays / "a" / "selection.txt").read_text().split()
    assert len(picked) == 20 and all(p.startswith("web/") for p in picked)
    inputs = json.loads((arrays / "a" / "summary.json").read_text())["inputs"]
    assert inputs["pool_model"] == "external" and inputs["pool_items"].endswith("pool.txt")


def test_without_items_the_row_index_is_the_item(cli, arrays):
    assert _select(cli, arrays / "a", "pool.npy") == 0
    rows = [int(x) for x in (arrays / "a" / "selection.txt").read_text().split()]
    scores = (arrays / "a" / "scores.csv").read_text().splitlines()[1:]
    assert all(line.split(",")[0] == line.split(",")[1] for line in scores)  # index == item
    assert len(set(rows)) == 20 and max(rows) < 200


def test_an_npz_with_views_serves_mak(cli, arrays):
    assert _select(cli, arrays / "a", "pool.npz", strategy="mak") == 0
    assert _select(cli, arrays / "b", "pool.npy", strategy="mak") == 2


@pytest.mark.parametrize("case, message", [
    ("items", "pool.txt: 200 item lines but"),
    ("ndim", "expected a 2-D feature array"),
    ("npz", "name the feature array 'features'"),
    ("dir-items", "an items file goes with a plain array"),
    ("missing", "feature array not found"),
    ("parquet items", "pool.parquet: items here are text, one line per row"),
])
def test_bad_arrays_are_one_line(cli, arrays, capsys, case, message):
    pool, extra = "pool.npy", []
    if case == "items":
        np.save(arrays / "pool.npy", np.load(arrays / "pool.npy")[:150])
        extra = ["--pool-items", arrays / "pool.txt"]
    elif case == "ndim":
        np.save(arrays / "pool.npy", np.zeros((200, 2, 4), np.float32))
    elif case == "npz":
        np.savez(arrays / "pool.npz", a=np.ones((200, 8), np.float32), b=np.ones((200, 8), np.float32))
        pool = "pool.npz"
    elif case == "parquet items":
        (arrays / "pool.parquet").write_bytes(b"PAR1")
        extra = ["--pool-items", arrays / "pool.parquet"]
    elif case == "dir-items":
        write_store(arrays / "dir", np.load(arrays / "pool.npy"), [str(i) for i in range(200)])
        pool, extra = "dir", ["--pool-items", arrays / "pool.txt"]
    else:
        pool = "absent.npy"
    assert _select(cli, arrays / "a", pool, *extra) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and not (arrays / "a").exists()


def test_store_import_round_trip(cli, arrays, capsys):
    assert cli("store", "import", "--features", arrays / "pool.npz", "--items", arrays / "pool.txt",
               "--model", "dinov2-s", "--out", arrays / "st") == 0
    st = open_store(arrays / "st", require_views=True)
    np.testing.assert_array_equal(st.features(), np.load(arrays / "pool.npy"))
    np.testing.assert_array_equal(st.views(), np.load(arrays / "pool.npz")["views"])
    assert st.items == (arrays / "pool.txt").read_text().split("\n")[:-1]
    assert model_kind(st.meta) == "external" and st.meta["model_name"] == "dinov2-s"
    assert {k: st.meta[k] for k in EXTERNAL_META} == EXTERNAL_META
    # the imported store selects exactly as the arrays it came from
    assert _select(cli, arrays / "a", "st", *ROBUST_SMALL, strategy="robust") == 0
    assert _select(cli, arrays / "b", "pool.npy", "--pool-items", arrays / "pool.txt", *ROBUST_SMALL,
                   strategy="robust") == 0
    assert _files(arrays / "a") == _files(arrays / "b")
    # bad input: nothing written
    capsys.readouterr()
    assert cli("store", "import", "--features", arrays / "pool.npy", "--views", arrays / "seed.npy",
               "--out", arrays / "bad") == 2
    assert "views" in capsys.readouterr().err and not (arrays / "bad").exists()
    np.save(arrays / "nan.npy", np.full((5, 3), np.nan, np.float32))
    assert cli("store", "import", "--features", arrays / "nan.npy", "--out", arrays / "bad") == 2
    assert "NaN" in capsys.readouterr().err and not (arrays / "bad").exists()


@pytest.mark.parametrize("meta, kind, quantile", [
    ({"model_trained_on": {"seed_rows": 60, "pool_rows": 200}}, "pool-aware", "auto"),
    ({"model_trained_on": {"seed_rows": 60, "pool_rows": 0}}, "seed-only", 0.98),
    (EXTERNAL_META, "external", 0.99),
    ({}, "unknown", 0.99),
])
def test_robust_gate_follows_the_model_that_made_the_features(cli, arrays, capsys, meta, kind, quantile):
    write_store(arrays / "p", np.load(arrays / "pool.npy"), [str(i) for i in range(200)], meta=meta)
    assert _select(cli, arrays / "a", "p", *ROBUST_SMALL, strategy="robust") == 0
    summary = json.loads((arrays / "a" / "summary.json").read_text())
    assert summary["inputs"]["pool_model"] == kind
    q = summary["info"]["robust"]["gate_quantile"]
    if quantile == "auto":
        assert q == pytest.approx(1 - 5 / 60) and "note" not in summary
    else:
        assert q == quantile and str(quantile) in summary["note"] and "note:" in capsys.readouterr().err


def test_items_are_split_at_line_feeds_only_as_they_are_counted(tmp_path):
    from mak.data.store import count_lines, item_file_lines

    f = tmp_path / "items.txt"
    f.write_bytes("a\r\nb\rc\n\x0cd\u2028e\nlast".encode())  # CRLF ends a line; a lone CR, FF, U+2028 do not
    lines = list(item_file_lines(f))
    assert lines == ["a", "b\rc", "\x0cd\u2028e", "last"] and len(lines) == count_lines(f)


@pytest.mark.parametrize("content, line", [(b"\na\nb\n", 1), (b"a\n\nb\n", 2), (b"a\r\n\r\nb\n", 2), (b"a\nb\n\n", 3)])
def test_an_empty_item_line_is_named(tmp_path, content, line):
    from mak.data.store import count_lines
    from mak.errors import MakError

    (tmp_path / "items.txt").write_bytes(content)
    with pytest.raises(MakError, match=rf"items\.txt: line {line} is empty"):
        count_lines(tmp_path / "items.txt")


def test_an_empty_line_across_a_read_chunk_is_found(tmp_path):
    from mak.data.store import count_lines
    from mak.errors import MakError

    body = b"x" * ((1 << 20) - 1) + b"\n"  # the first chunk ends with a line feed ...
    (tmp_path / "items.txt").write_bytes(body + b"\nb\n")  # ... and the second starts with one
    with pytest.raises(MakError, match=r"line 2 is empty"):
        count_lines(tmp_path / "items.txt")
    (tmp_path / "items.txt").write_bytes(body + b"b\n")
    assert count_lines(tmp_path / "items.txt") == 2


def test_all_zero_rows_are_a_warning_naming_how_many(cli, tmp_path, capsys):
    """A row of zeros is an encoder's failure, not an image: selected from with a warning, counted by --check."""
    feats = np.random.default_rng(0).normal(size=(40, 6)).astype(np.float32)
    feats[[3, 17, 30]] = 0
    np.save(tmp_path / "pool.npy", feats)
    assert cli("select", "--pool-store", tmp_path / "pool.npy", "--budget", "5", "--strategy", "random",
               "--out", tmp_path / "sel", "-q") == 0
    assert capsys.readouterr().err.strip() == (f"mak select: warning: {tmp_path / 'pool.npy'}: 3 of 40 feature rows "
                                               "are all zero (failed embeddings?)")
    assert cli("store", "info", tmp_path / "pool.npy", "--check", "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["values"], report["zero_rows"]) == ("ok", 3)
    np.save(tmp_path / "clean.npy", feats[feats.any(axis=1)])
    assert cli("select", "--pool-store", tmp_path / "clean.npy", "--budget", "5", "--strategy", "random",
               "--out", tmp_path / "sel2", "-q") == 0
    assert capsys.readouterr() == ("", "")
