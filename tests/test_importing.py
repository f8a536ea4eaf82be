"""`mak store import` from several arrays (a sharded store) and from parquet items."""
from __future__ import annotations

import json

import numpy as np
import pytest

from mak.data.importing import expand, import_store, natural_key
from mak.errors import MakError
from mak.data.store import EXTERNAL_META, SHARDS, open_store

SIZES = {0: 30, 1: 25, 2: 20, 10: 45}  # emb_10 sorts after emb_2 in natural order, before it as text


@pytest.fixture
def shards(tmp_path, rng):
    for i, n in SIZES.items():
        np.save(tmp_path / f"emb_{i}.npy", rng.normal(size=(n, 6)).astype(np.float32))
        (tmp_path / f"meta_{i}.txt").write_text("".join(f"https://x/{i}/{j}.jpg\n" for j in range(n)))
    np.save(tmp_path / "seed.npy", rng.normal(size=(40, 6)).astype(np.float32))
    return tmp_path


def _whole(d):
    order = sorted(SIZES)
    feats = np.concatenate([np.load(d / f"emb_{i}.npy") for i in order])
    items = [line for i in order for line in (d / f"meta_{i}.txt").read_text().splitlines()]
    return feats, items


def _parquet(d, with_caption=True):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    for i in SIZES:
        urls = (d / f"meta_{i}.txt").read_text().splitlines()
        cols = {"url": urls, **({"caption": [f"a photo {j}" for j in range(len(urls))]} if with_caption else {})}
        pq.write_table(pa.table(cols), d / f"meta_{i}.parquet", row_group_size=7)


def test_natural_order():
    names = ["e_10.npy", "e_2.npy", "e_1.npy", "e_0.npy"]
    assert sorted(names, key=natural_key) == ["e_0.npy", "e_1.npy", "e_2.npy", "e_10.npy"]


def test_a_glob_of_arrays_becomes_a_sharded_store(shards):
    import_store(str(shards / "emb_*.npy"), shards / "st", model="clip-b32")
    st = open_store(shards / "st")
    feats, _ = _whole(shards)
    np.testing.assert_array_equal(st.features(), feats)
    assert st.items == [str(i) for i in range(len(feats))]  # no items: the global row index
    assert len(json.loads((shards / "st" / SHARDS).read_text())["shards"]) == 4
    assert {k: st.meta[k] for k in EXTERNAL_META} == EXTERNAL_META and st.meta["model_name"] == "clip-b32"
    assert st.meta["imported_from"]["features"] == [str(shards / f"emb_{i}.npy") for i in sorted(SIZES)]


@pytest.mark.parametrize("items", ["one text file", "a text file per array", "parquet per array"])
def test_items_for_every_row(shards, items):
    feats, lines = _whole(shards)
    column = None
    if items == "one text file":
        (shards / "all.txt").write_text("".join(f"{x}\n" for x in lines))
        spec = shards / "all.txt"
    elif items == "a text file per array":
        spec = str(shards / "meta_*.txt")
    else:
        _parquet(shards)
        spec, column = str(shards / "meta_*.parquet"), "url"
    import_store(str(shards / "emb_*.npy"), shards / "st", items=spec, items_column=column)
    st = open_store(shards / "st")
    np.testing.assert_array_equal(st.features(), feats)
    assert st.items == lines


def test_the_only_parquet_column_needs_no_name(shards):
    _parquet(shards, with_caption=False)
    import_store(str(shards / "emb_*.npy"), shards / "st", items=str(shards / "meta_*.parquet"))
    assert open_store(shards / "st").items == _whole(shards)[1]


def test_linked_and_copied_stores_select_the_same_as_one_array(shards, cli):
    feats, lines = _whole(shards)
    np.save(shards / "whole.npy", feats)
    (shards / "whole.txt").write_text("".join(f"{x}\n" for x in lines))
    assert cli("store", "import", "--features", shards / "emb_0.npy", shards / "emb_1.npy", shards / "emb_2.npy",
               shards / "emb_10.npy", "--items", str(shards / "meta_*.txt"), "--out", shards / "copied", "-q") == 0
    assert cli("store", "import", "--features", str(shards / "emb_*.npy"), "--items", str(shards / "meta_*.txt"),
               "--link", "--out", shards / "linked", "-q") == 0
    assert (shards / "linked" / "shard-00003" / "features.npy").is_symlink()
    assert not (shards / "copied" / "shard-00003" / "features.npy").is_symlink()
    outs = []
    for pool, extra in (("copied", []), ("linked", []), ("whole.npy", ["--pool-items", shards / "whole.txt"])):
        out = shards / f"sel-{pool}"
        assert cli("select", "--seed-store", shards / "seed.npy", "--pool-store", shards / pool, *extra,
                   "--budget", "15", "--strategy", "kcenter", "--no-progress", "--out", out) == 0
        outs.append({n: (out / n).read_bytes() for n in ("selection.txt", "scores.csv")})
    assert outs[0] == outs[1] == outs[2]
    assert all(line.startswith("https://x/") for line in (shards / "sel-linked" / "selection.txt").read_text().split())



def test_a_linked_store_whose_arrays_moved_names_the_broken_link(shards, cli, capsys):
    assert cli("store", "import", "--features", str(shards / "emb_*.npy"), "--link", "--out", shards / "linked",
               "-q") == 0
    (shards / "emb_0.npy").rename(shards / "moved.npy")
    assert cli("store", "info", shards / "linked") == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"mak store info: error: {shards / 'linked' / 'shard-00000' / 'features.npy'}: broken link to "
                   f"{shards / 'emb_0.npy'} (the linked file was moved or deleted)")


def _bad(shards, case):
    args = {"features": str(shards / "emb_*.npy")}
    if case == "no match":
        args["features"] = str(shards / "nothing_*.npy")
    elif case == "dimension":
        np.save(shards / "emb_2.npy", np.zeros((20, 5), np.float32))
    elif case == "rows":
        (shards / "meta_2.txt").write_text("only one line\n")
        args["items"] = str(shards / "meta_*.txt")
    elif case == "one file":
        args["items"] = shards / "meta_0.txt"
    elif case == "file count":
        args["items"] = [shards / "meta_0.txt", shards / "meta_1.txt"]
    elif case == "nan":
        np.save(shards / "emb_10.npy", np.full((45, 6), np.nan, np.float32))
    elif case == "link npz":
        np.savez(shards / "emb_3.npz", features=np.zeros((4, 6), np.float32))
        args["features"], args["link"] = [shards / "emb_0.npy", shards / "emb_3.npz"], True
    elif case == "views":
        args["views"] = shards / "emb_0.npy"
    elif case == "suffix":
        (shards / "emb.csv").write_text("1,2\n")
        args["features"] = str(shards / "emb.csv")
    elif case == "column on text":
        args["items"], args["items_column"] = str(shards / "meta_*.txt"), "url"
    elif case == "column without items":
        args["items_column"] = "url"
    elif case == "missing views":
        args["features"], args["views"] = str(shards / "emb_0.npy"), shards / "nope.npy"
    elif case == "not npy":
        (shards / "emb_1.npy").write_text("this is text")
    return args


@pytest.mark.parametrize("case, message", [
    ("no match", "nothing_*.npy: no features file matches this pattern"),
    ("dimension", "emb_2.npy: feature dimension 5 differs from"),
    ("rows", "meta_2.txt: 1 items but"),
    ("one file", "meta_0.txt: 30 items but the features have 120 rows"),
    ("file count", "2 items files for 4 feature arrays"),
    ("nan", "NaN"),
    ("link npz", "--link needs .npy arrays"),
    ("views", "goes with one feature array"),
    ("column on text", "--items-column url applies to .parquet items"),
    ("suffix", "emb.csv: not a feature array (.npy, .npz or .parquet)"),
    ("column without items", "--items-column url goes with --items"),
    ("missing views", "nope.npy: views file not found"),
    ("not npy", "emb_1.npy: unreadable .npy file (no .npy header)"),
])
def test_bad_imports_are_one_line_and_write_nothing(shards, cli, capsys, case, message):
    args = _bad(shards, case)
    argv = ["store", "import", "--features", *([args["features"]] if isinstance(args["features"], str)
                                               else args["features"]), "--out", shards / "st"]
    items = args.get("items")
    if items is not None:
        argv += ["--items", *(items if isinstance(items, list) else [items])]
    argv += ["--link"] if args.get("link") else []
    argv += ["--views", args["views"]] if "views" in args else []
    argv += ["--items-column", args["items_column"]] if "items_column" in args else []
    assert cli(*argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (shards / "st").exists()


def test_an_existing_store_is_kept_unless_overwrite(shards, cli, capsys):
    assert cli("store", "import", "--features", shards / "emb_0.npy", "--out", shards / "st", "-q") == 0
    before = (shards / "st" / "features.npy").read_bytes()
    assert cli("store", "import", "--features", shards / "emb_1.npy", "--out", shards / "st") == 2
    assert "st: already exists (choose another --out, or pass --overwrite)" in capsys.readouterr().err
    assert (shards / "st" / "features.npy").read_bytes() == before
    assert cli("store", "import", "--features", shards / "emb_1.npy", "--out", shards / "st", "--overwrite") == 0
    assert (shards / "st" / "features.npy").read_bytes() != before


@pytest.mark.parametrize("case, message", [
    ("no column", "no column 'key' (columns: url, caption)"),
    ("several columns", "2 columns (url, caption); name the item column (--items-column)"),
    ("null", "row 3 of column 'url' is null"),
    ("no pyarrow", "reading .parquet needs pyarrow"),
])
def test_bad_parquet_items(shards, monkeypatch, case, message):
    _parquet(shards)
    column = {"no column": "key", "several columns": None}.get(case, "url")
    if case == "null":
        import pyarrow as pa
        import pyarrow.parquet as pq

        urls = (shards / "meta_1.txt").read_text().splitlines()
        urls[3] = None
        pq.write_table(pa.table({"url": urls}), shards / "meta_1.parquet")
    if case == "no pyarrow":
        monkeypatch.setattr("mak.data.importing._parquet", lambda: None)
    with pytest.raises(MakError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        import_store(str(shards / "emb_*.npy"), shards / "st", items=str(shards / "meta_*.parquet"),
                     items_column=column)
    assert not (shards / "st").exists()


def test_expand_keeps_a_list_in_the_given_order(tmp_path):
    assert expand([tmp_path / "b.npy", tmp_path / "a.npy"], "features") == [tmp_path / "b.npy", tmp_path / "a.npy"]


def _parquet_features(d, rng, fixed=False, dtype="float32"):
    """emb_*.parquet with an embedding column (and url, caption), the same rows as emb_*.npy."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    for i in SIZES:
        x = np.load(d / f"emb_{i}.npy").astype(dtype)
        values = pa.array(x.ravel())
        emb = (pa.FixedSizeListArray.from_arrays(values, x.shape[1]) if fixed
               else pa.ListArray.from_arrays(pa.array(np.arange(0, x.size + 1, x.shape[1], dtype=np.int32)), values))
        urls = (d / f"meta_{i}.txt").read_text().splitlines()
        pq.write_table(pa.table({"url": urls, "embedding": emb, "caption": ["c"] * len(urls)}),
                       d / f"emb_{i}.parquet", row_group_size=11)


@pytest.mark.parametrize("fixed, dtype", [(False, "float32"), (True, "float16")])
def test_parquet_features_and_items_from_the_same_files(shards, rng, fixed, dtype):
    _parquet_features(shards, rng, fixed, dtype)
    spec = str(shards / "emb_*.parquet")
    import_store(spec, shards / "st", items=spec, items_column="url")
    st = open_store(shards / "st")
    feats, lines = _whole(shards)
    assert np.load(shards / "st" / "shard-00000" / "features.npy", mmap_mode="r").dtype == np.dtype(dtype)
    np.testing.assert_array_equal(st.features(), feats.astype(dtype))
    assert st.items == lines


def _bad_parquet_features(d, case):
    import pyarrow as pa
    import pyarrow.parquet as pq

    t = pq.read_table(d / "emb_1.parquet")
    emb = t.column("embedding").to_pylist()
    if case == "two float columns":
        t = t.append_column("other", t.column("embedding"))
    elif case == "length":
        emb[4] = emb[4][:-1]
    elif case == "null":
        emb[6] = None
    elif case == "nan":
        emb[7][2] = float("nan")
    if case in ("length", "null", "nan"):
        t = t.set_column(t.schema.get_field_index("embedding"), "embedding", pa.array(emb, pa.list_(pa.float32())))
    pq.write_table(t, d / "emb_1.parquet", row_group_size=11)


@pytest.mark.parametrize("case, column, message", [
    ("two float columns", None, "2 float-list columns (embedding, other); name the feature column"),
    ("column", "url", "no float-list column 'url' (float-list columns: embedding)"),
    ("length", None, "emb_1.parquet: row 4 of column 'embedding' has 5 values, not 6"),
    ("null", None, "emb_1.parquet: column 'embedding' has a null row"),
    ("nan", None, "emb_1.parquet: row 7 of column 'embedding' holds NaN or Inf"),
])
def test_bad_parquet_features(shards, rng, case, column, message):
    _parquet_features(shards, rng)
    _bad_parquet_features(shards, case)
    with pytest.raises(MakError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        import_store(str(shards / "emb_*.parquet"), shards / "st", features_column=column)
    assert not (shards / "st").exists()


def test_parquet_features_refuse_link_and_npy_refuses_a_feature_column(shards, rng):
    _parquet_features(shards, rng)
    with pytest.raises(MakError, match="--link needs .npy arrays"):
        import_store(str(shards / "emb_*.parquet"), shards / "st", link=True)
    with pytest.raises(MakError, match="--features-column embedding applies to .parquet features"):
        import_store(str(shards / "emb_*.npy"), shards / "st", features_column="embedding")
    assert not (shards / "st").exists()


def test_cli_imports_parquet_columns(shards, rng, cli):
    _parquet_features(shards, rng)
    spec = str(shards / "emb_*.parquet")
    assert cli("store", "import", "--features", spec, "--features-column", "embedding", "--items", spec,
               "--items-column", "url", "--model", "siglip", "--out", shards / "st", "-q") == 0
    st = open_store(shards / "st")
    feats, lines = _whole(shards)
    np.testing.assert_array_equal(st.features(), feats)
    assert st.items == lines and st.meta["imported_from"]["features_column"] == "embedding"


def test_store_info(shards, cli, capsys):
    import_store(str(shards / "emb_*.npy"), shards / "st", items=str(shards / "meta_*.txt"), model="clip-b32")
    capsys.readouterr()
    assert cli("store", "info", shards / "st", "--json", "--check") == 0
    d = json.loads(capsys.readouterr().out)
    assert d.pop("values") == "ok"
    assert d["rows"] == sum(SIZES.values()) and d["shards"] == 4 and d["views"] is None
    assert d["features"] == {"dim": 6, "dtype": "float32", "bytes": sum(SIZES.values()) * 6 * 4}
    assert (d["model"], d["model_name"]) == ("external", "clip-b32")
    assert d["first_items"] == ["https://x/0/0.jpg", "https://x/0/1.jpg", "https://x/0/2.jpg"]
    assert cli("store", "info", shards / "st") == 0
    out = capsys.readouterr().out
    assert "120 x 6 float32" in out and "(4 shards)" in out and "external (clip-b32)" in out
    np.save(shards / "bad.npy", np.full((4, 6), np.inf, np.float32))
    assert cli("store", "info", shards / "bad.npy") == 0  # opening reads no values
    assert cli("store", "info", shards / "bad.npy", "--check") == 2
    out, err = capsys.readouterr()
    assert "bad.npy" in err and len(err.strip().splitlines()) == 1
    assert "4 x 6 float32" in out and "values    not usable" in out  # the report, then the error
    assert cli("store", "info", shards / "bad.npy", "--check", "--json") == 2
    assert "NaN or Inf" in json.loads(capsys.readouterr().out)["values"]
    assert cli("store", "info", shards / "st", "--check", "-q") == 0  # the exit code alone
    assert cli("store", "info", shards / "bad.npy", "--check", "-q") == 2
    out, err = capsys.readouterr()
    assert out == "" and "bad.npy" in err and len(err.strip().splitlines()) == 1


def test_store_info_into_a_closed_pipe_is_quiet_and_errors_name_the_action(shards, tmp_path):
    import subprocess
    import sys

    import_store(str(shards / "emb_*.npy"), shards / "st")
    cmd = f"{sys.executable} -m mak store info {shards / 'st'} | head -c 0; exit ${{PIPESTATUS[0]}}"
    res = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=120)
    assert res.returncode in (0, 141) and res.stderr == ""  # 0 when it wrote before the reader closed
    res = subprocess.run([sys.executable, "-m", "mak", "store", "info", str(tmp_path / "nope")], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 2 and res.stderr.startswith("mak store info: error: ")


def test_an_array_given_twice_is_named(shards, tmp_path):
    with pytest.raises(MakError, match=r"emb_1\.npy: given twice as a features file"):
        import_store([str(shards / "emb_*.npy"), str(shards / "emb_1.npy")], tmp_path / "st")
    assert not (tmp_path / "st").exists()
