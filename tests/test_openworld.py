"""The open-world benchmark builder (mak.bench.openworld), its image generators (mak.bench.glyphs) and `mak bench build`."""
from __future__ import annotations

import gzip
import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mak.bench import glyphs
from mak.bench import openworld
from mak.cli import main
from mak.errors import MakError

SCALE = 0.05
PER_CLASS_TRAIN = 240  # fake Fashion-MNIST: enough for the head class at SCALE (50+100+50+20)
PER_CLASS_TEST = 60


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb", compresslevel=1) as fh:
        fh.write(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def _fake_split(n_per_class: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    labels = np.tile(np.arange(10), n_per_class)
    rng.shuffle(labels)
    images = rng.integers(0, 256, size=(len(labels), 28, 28), dtype=np.uint8)
    # Make every image unique and traceable: its index in the first pixels.
    idx = np.arange(len(labels))
    images[:, 0, 0] = idx % 256
    images[:, 0, 1] = idx // 256
    return images, labels.astype(np.uint8)


@pytest.fixture(scope="module")
def fake_data(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("fmnist")
    rng = np.random.default_rng(0)
    for split, n, stem in (("train", PER_CLASS_TRAIN, "train"), ("test", PER_CLASS_TEST, "t10k")):
        x, y = _fake_split(n, rng)
        _write_idx(d / f"{stem}-images-idx3-ubyte.gz", x)
        _write_idx(d / f"{stem}-labels-idx1-ubyte.gz", y)
    return d


@pytest.fixture(scope="module")
def fonts() -> list[Path]:
    try:
        return glyphs.find_fonts()
    except MakError as exc:  # pragma: no cover - a machine without fonts
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def bench(tmp_path_factory, fake_data, fonts) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("b") / "bench"
    manifest = openworld.build_benchmark(out, seed=3, scale=SCALE, data_dir=fake_data)
    return out, manifest


def _read_split(path: Path) -> list[tuple[str, int]]:
    rows = []
    for line in path.read_text().splitlines():
        p, lab = line.split()
        rows.append((p, int(lab)))
    return rows


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- counts


def test_profile_formula_full_scale():
    c = openworld.benchmark_counts(1.0)
    assert c["seed"] == [1000, 599, 359, 215, 129, 77, 46, 28, 17, 10]
    assert sum(c["seed"]) == 2480
    assert c["pool"] == [2000, 1549, 1199, 928, 719, 557, 431, 334, 258, 200]
    assert c["pool_ood"] == [sum(c["pool"])] == [8175]
    assert c["fullshot"] == [1000] * 10 and c["fewshot"] == [100] * 10 and c["test"] == [1000] * 10
    for k in range(10):
        assert c["seed"][k] == int(np.floor(1000 * 100 ** (-k / 9) + 0.5))
        assert c["pool"][k] == int(np.floor(2000 * 10 ** (-k / 9) + 0.5))
    # the head class fits in Fashion-MNIST's 6,000 training images per class
    assert c["seed"][0] + c["pool"][0] + c["fullshot"][0] + c["fewshot"][0] <= 6000
    assert openworld.group_ranks() == {"many": [0, 1, 2], "medium": [3, 4, 5, 6], "few": [7, 8, 9]}


def test_profile_scaled_and_limits():
    c = openworld.benchmark_counts(0.1)
    assert c["seed"] == [100, 60, 36, 22, 13, 8, 5, 3, 2, 2]  # at least 2 per class
    assert c["pool"][0] == 200 and c["pool"][-1] == 20
    assert c["fullshot"] == [100] * 10 and c["fewshot"] == [20] * 10 and c["test"] == [100] * 10
    assert min(openworld.benchmark_counts(0.001)["seed"]) == 2
    with pytest.raises(MakError, match="at most"):
        openworld.benchmark_counts(2.0)
    with pytest.raises(MakError, match=r"^scale=0.0 must be a number > 0$"):  # BENCH_OPTIONS' check
        openworld.benchmark_counts(0.0)
    # out-of-domain images: ood_ratio x the in-domain pool (rounded); in-domain counts unchanged
    for ratio, want in ((1.0, 818), (4, 3272), (0.5, 409), (0, 0), (2.3333, 1909)):
        c4 = openworld.benchmark_counts(0.1, ood_ratio=ratio)
        assert sum(c4["pool"]) == 818 and c4["pool_ood"] == [want] and c4["seed"] == c["seed"]
    for bad in (-1, float("nan"), True, "x"):
        with pytest.raises(MakError, match=r"^ood_ratio=.* must be a number >= 0$"):
            openworld.benchmark_counts(0.1, ood_ratio=bad)


def test_counts_with_classes_the_seed_lacks():
    base = openworld.benchmark_counts(1.0)
    assert openworld.benchmark_counts(1.0, near_classes=0) == base
    c = openworld.benchmark_counts(1.0, near_classes=2)
    # the seed: the same profile over 8 ranks; the last 2 ranks only in the pool, 2,000 each
    assert c["seed"] == [int(np.floor(1000 * 100 ** (-k / 7) + 0.5)) for k in range(8)] + [0, 0]
    assert c["pool"] == [int(np.floor(2000 * 10 ** (-k / 7) + 0.5)) for k in range(8)] + [2000, 2000]
    assert c["pool_ood"] == [sum(c["pool"])]
    for split in ("fullshot", "fewshot", "test"):
        assert c[split] == base[split][:8] + [0, 0]
    d = openworld.benchmark_counts(1.0, pool_classes="disjoint")  # K defaults to 4
    assert d["seed"] == [1000, 398, 158, 63, 25, 10, 0, 0, 0, 0]
    assert d["pool"] == [0] * 6 + [2000] * 4 and d["pool_ood"] == [8000]
    assert openworld.benchmark_counts(0.5, pool_classes="disjoint", near_classes=1, ood_ratio=4)["pool"] == \
        [0] * 9 + [1000]
    assert openworld.group_ranks(num_classes=6) == {"many": [0, 1], "medium": [2, 3], "few": [4, 5]}
    assert openworld.group_ranks(num_classes=8) == {"many": [0, 1], "medium": [2, 3, 4, 5], "few": [6, 7]}
    for pool_classes, k, match in (("all", 9, "near-classes must be an integer from 0 to 8"),
                                   ("all", -1, "from 0 to 8"), ("all", 1.5, "from 0 to 8"),
                                   ("disjoint", 0, "from 1 to 8 when --pool-classes is disjoint"),
                                   ("some", None, "pool-classes must be one of all, disjoint")):
        with pytest.raises(MakError, match=match):
            openworld.benchmark_counts(1.0, pool_classes=pool_classes, near_classes=k)


# --------------------------------------------------------------------------- built benchmark


def test_layout_and_counts(bench):
    out, m = bench
    exp = openworld.benchmark_counts(SCALE)
    assert json.loads((out / "benchmark.json").read_text()) == m
    order = m["class_order"]
    assert sorted(order) == list(range(10))
    for split in openworld.SPLITS:
        rows = _read_split(out / f"{split}.txt")
        assert len(rows) == m["totals"][split]
        labels = np.array([lab for _, lab in rows])
        for rank, label in enumerate(order):
            n = int((labels == label).sum())
            assert n == exp[split][rank] == m["counts"][split][str(label)], (split, rank)
        for p, _ in rows:
            assert p.startswith(f"images/{split}/") and (out / p).is_file()
    pool = np.array([lab for _, lab in _read_split(out / "pool.txt")])
    assert int((pool == -1).sum()) == sum(exp["pool"]) == m["counts"]["pool"]["-1"]
    assert m["pool_ood"]["glyph"] + m["pool_ood"]["texture"] == sum(exp["pool"])
    assert m["budget"] == 2 * sum(exp["seed"])
    assert m["group_thresholds"] == pytest.approx({"many": 300 * SCALE, "few": 30 * SCALE})
    assert m["groups"] == {"many": order[:3], "medium": order[3:7], "few": order[7:]}
    # the pool is shuffled: out-of-domain items are not all at the end
    assert pool[: len(pool) // 2].tolist().count(-1) > 0


def test_disjoint_and_faithful(bench, fake_data):
    out, _ = bench
    train_x, train_y = openworld.load_fashion_mnist("train", fake_data)
    test_x, test_y = openworld.load_fashion_mnist("test", fake_data)
    labels = {}
    for split in openworld.SPLITS:
        labels.update(dict(_read_split(out / f"{split}.txt")))
    seen: dict[tuple[str, int], str] = {}
    kinds = set()
    for line in (out / "sources.txt").read_text().splitlines():
        path, kind, idx = line.split()
        split = path.split("/")[1]
        img = np.asarray(Image.open(out / path))
        assert img.shape == (28, 28) and img.dtype == np.uint8
        if kind in ("glyph", "texture"):
            assert split == "pool" and labels[path] == -1
            kinds.add(kind)
            continue
        key = (kind, int(idx))
        assert key not in seen, f"{key} used by {seen.get(key)} and {path}"
        seen[key] = path
        src_x, src_y = (train_x, train_y) if kind == "fmnist-train" else (test_x, test_y)
        assert kind == ("fmnist-test" if split == "test" else "fmnist-train")
        np.testing.assert_array_equal(img, src_x[int(idx)])  # the real image, losslessly
        assert labels[path] == src_y[int(idx)]  # the original Fashion-MNIST label
    assert kinds == {"glyph", "texture"}


def test_deterministic_per_seed(bench, fake_data, tmp_path):
    out, m = bench
    again = openworld.build_benchmark(tmp_path / "again", seed=3, scale=SCALE, data_dir=fake_data)
    assert again == m
    assert _tree_digest(out) == _tree_digest(tmp_path / "again")
    other = openworld.build_benchmark(tmp_path / "other", seed=4, scale=SCALE, data_dir=fake_data, budget=7)
    assert other["class_order"] != m["class_order"]
    assert other["budget"] == 7


def test_ood_ratio_sets_the_junk_share_of_the_pool(bench, fake_data, tmp_path):
    out, m = bench
    assert m["profiles"]["pool"]["ood_ratio"] == 1.0
    # the default is the explicit ratio 1, byte for byte
    one = openworld.build_benchmark(tmp_path / "one", seed=3, scale=SCALE, data_dir=fake_data, ood_ratio=1.0)
    assert one == m and _tree_digest(tmp_path / "one") == _tree_digest(out)
    m3 = openworld.build_benchmark(tmp_path / "three", seed=3, scale=SCALE, data_dir=fake_data, ood_ratio=3)
    n_in = sum(openworld.benchmark_counts(SCALE)["pool"])
    pool = np.array([lab for _, lab in _read_split(tmp_path / "three" / "pool.txt")])
    assert int((pool == -1).sum()) == 3 * n_in == m3["counts"]["pool"]["-1"]
    assert int((pool >= 0).sum()) == n_in and m3["counts"]["pool"] == {**m["counts"]["pool"], "-1": 3 * n_in}
    assert m3["pool_ood"]["glyph"] + m3["pool_ood"]["texture"] == 3 * n_in
    assert m3["profiles"]["pool"]["ood_ratio"] == 3.0
    assert m3["counts"]["seed"] == m["counts"]["seed"] and m3["class_order"] == m["class_order"]


def _labels_of(path: Path) -> np.ndarray:
    return np.array([lab for _, lab in _read_split(path)])


def test_disjoint_pool_holds_no_seed_class(bench, fake_data, fonts, tmp_path):
    m = openworld.build_benchmark(tmp_path / "d", seed=3, scale=SCALE, data_dir=fake_data, pool_classes="disjoint")
    seed_classes, near = m["seed_classes"], m["near_classes"]
    assert m["pool_classes"] == "disjoint" and len(seed_classes) == 6 and len(near) == 4
    assert seed_classes + near == m["class_order"] == bench[1]["class_order"]
    assert sorted(c for g in ("many", "medium", "few") for c in m["groups"][g]) == sorted(seed_classes)
    assert [len(m["groups"][g]) for g in ("many", "medium", "few")] == [2, 2, 2]
    pool = _labels_of(tmp_path / "d" / "pool.txt")
    assert set(pool[pool >= 0].tolist()) == set(near)
    assert all(int((pool == c).sum()) == 100 for c in near)  # 2,000 x SCALE each
    assert int((pool == -1).sum()) == 400 == m["counts"]["pool"]["-1"]  # ood_ratio 1 x 4 x 100
    for split in ("seed", "fullshot", "fewshot", "test"):
        assert set(_labels_of(tmp_path / "d" / f"{split}.txt").tolist()) == set(seed_classes), split
    assert m["budget"] == 2 * m["totals"]["seed"]
    assert "classes the seed lacks (the pool holds only these)" in openworld.summary(m)
    # seed images and pool images are still distinct Fashion-MNIST images
    prov = dict(line.split(" ", 1) for line in (tmp_path / "d" / "sources.txt").read_text().splitlines())
    fm = [v for v in prov.values() if v.startswith("fmnist-train")]
    assert len(fm) == len(set(fm))


def test_near_classes_only_in_the_pool(bench, fake_data, fonts, tmp_path):
    out, m0 = bench
    # K = 0 spelled out is the default benchmark, byte for byte
    openworld.build_benchmark(tmp_path / "k0", seed=3, scale=SCALE, data_dir=fake_data, near_classes=0)
    assert _tree_digest(tmp_path / "k0") == _tree_digest(out)
    m = openworld.build_benchmark(tmp_path / "k2", seed=3, scale=SCALE, data_dir=fake_data, near_classes=2)
    near, seed_classes = m["near_classes"], m["seed_classes"]
    assert near == m0["class_order"][8:] and len(seed_classes) == 8
    pool = _labels_of(tmp_path / "k2" / "pool.txt")
    assert set(pool[pool >= 0].tolist()) == set(range(10))
    assert [int((pool == c).sum()) for c in near] == [100, 100]
    assert set(_labels_of(tmp_path / "k2" / "seed.txt").tolist()) == set(seed_classes)
    assert set(_labels_of(tmp_path / "k2" / "test.txt").tolist()) == set(seed_classes)
    assert openworld.seed_counts(m) == {c: m["counts"]["seed"][str(c)] for c in seed_classes}


def test_build_errors(fake_data, tmp_path):
    with pytest.raises(MakError, match="dataset-fashion-mnist"):
        openworld.build_benchmark(tmp_path / "x", scale=SCALE, data_dir=tmp_path)
    with pytest.raises(MakError, match="training images"):
        openworld.build_benchmark(tmp_path / "y", scale=0.2, data_dir=fake_data)  # fake data too small
    assert not (tmp_path / "y").exists()
    with pytest.raises(MakError, match="budget"):
        openworld.build_benchmark(tmp_path / "z", scale=SCALE, data_dir=fake_data, budget=10**9)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    with pytest.raises(MakError, match="not empty"):
        openworld.build_benchmark(tmp_path / "full", scale=SCALE, data_dir=fake_data)
    with pytest.raises(MakError, match="IDX"):
        bad = tmp_path / "bad.gz"
        bad.write_bytes(gzip.compress(b"\x01\x02\x03\x04"))
        openworld.read_idx(bad)


# --------------------------------------------------------------------------- glyphs and textures


def test_glyph_and_texture_images(fonts):
    imgs, kinds = glyphs.make_ood_images(40, 40, seed=5, fonts=fonts)
    assert imgs.shape == (80, 28, 28) and imgs.dtype == np.uint8
    assert kinds == ["glyph"] * 40 + ["texture"] * 40
    for img in imgs:
        assert int(img.max()) - int(img.min()) >= 64  # not blank
        assert int((img > 64).sum()) >= 8
    again, _ = glyphs.make_ood_images(40, 40, seed=5, fonts=fonts)
    np.testing.assert_array_equal(imgs, again)
    other, _ = glyphs.make_ood_images(40, 40, seed=6, fonts=fonts)
    assert not np.array_equal(imgs, other)
    # an image does not depend on how many are generated
    np.testing.assert_array_equal(glyphs.glyph_image(5, 7, fonts), imgs[7])
    np.testing.assert_array_equal(glyphs.texture_image(5, 3), imgs[43])
    for kind in glyphs.TEXTURE_KINDS:
        t = glyphs.render_texture(np.random.default_rng(1), kind=kind)
        assert t.shape == (28, 28) and int(t.max()) - int(t.min()) >= 64


def test_no_fonts_is_a_clear_error(tmp_path):
    with pytest.raises(MakError, match="fonts-dejavu-core"):
        glyphs.find_fonts([tmp_path])


# --------------------------------------------------------------------------- CLI


def test_cli_bench_build(fake_data, tmp_path, capsys, fonts):
    out = tmp_path / "cli"
    rc = main(["bench", "build", "--out", str(out), "--scale", str(SCALE), "--seed", "1",
               "--data-dir", str(fake_data), "--budget", "50"])
    assert rc == 0
    m = openworld.load_manifest(out)
    assert m["budget"] == 50 and m["seed"] == 1
    assert "class order" in capsys.readouterr().out
    rc = main(["bench", "build", "--out", str(out), "--scale", str(SCALE), "--data-dir", str(fake_data)])
    assert rc == 2
    assert "not empty" in capsys.readouterr().err
    rc = main(["bench", "build", "--out", str(out), "--scale", str(SCALE), "--data-dir", str(fake_data),
               "--overwrite", "--seed", "2"])
    assert rc == 0 and openworld.load_manifest(out)["seed"] == 2
    rc = main(["bench", "build", "--out", str(tmp_path / "r"), "--scale", str(SCALE), "--data-dir", str(fake_data),
               "--ood-ratio", "2"])
    assert rc == 0 and openworld.load_manifest(tmp_path / "r")["profiles"]["pool"]["ood_ratio"] == 2.0
    with pytest.raises(SystemExit, match="2"):
        main(["bench", "build", "--out", str(tmp_path / "r2"), "--scale", str(SCALE), "--data-dir", str(fake_data),
              "--ood-ratio", "-1"])
    assert "argument --ood-ratio: '-1' must be a number >= 0" in capsys.readouterr().err
    assert not (tmp_path / "r2").exists()
    rc = main(["bench", "build", "--out", str(tmp_path / "dj"), "--scale", str(SCALE), "--data-dir", str(fake_data),
               "--pool-classes", "disjoint", "--near-classes", "3", "-q"])
    m = openworld.load_manifest(tmp_path / "dj")
    assert rc == 0 and m["pool_classes"] == "disjoint" and len(m["near_classes"]) == 3
    rc = main(["bench", "build", "--out", str(tmp_path / "r3"), "--scale", str(SCALE),
               "--data-dir", str(fake_data), "--near-classes", "9"])  # a range that depends on --pool-classes
    err = capsys.readouterr().err
    assert rc == 2 and "--near-classes" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit, match="2"):  # a value no build takes: argparse, before any work
        main(["bench", "build", "--out", str(tmp_path / "r3"), "--data-dir", str(fake_data), "--pool-classes", "none"])
    assert "argument --pool-classes: 'none' must be one of: all, disjoint" in capsys.readouterr().err
    assert not (tmp_path / "r3").exists()
    rc = main(["bench", "build", "--out", str(tmp_path / "n"), "--data-dir", str(tmp_path / "nowhere")])
    assert rc == 2
    assert "Fashion-MNIST not found" in capsys.readouterr().err


def test_real_fashion_mnist_small(tmp_path, fonts):
    try:
        openworld.find_fashion_mnist()
    except MakError:
        pytest.skip("Fashion-MNIST is not installed")
    m = openworld.build_benchmark(tmp_path / "real", seed=0, scale=0.02)
    assert m["totals"]["test"] == 200 and m["counts"]["pool"]["-1"] == sum(openworld.benchmark_counts(0.02)["pool"])


def test_build_progress_counts_every_image_generated_and_written(fake_data, tmp_path, capsys, monkeypatch, fonts):
    """The bar's last line (a log: stderr is not a terminal) reaches its total: each out-of-domain
    image generated, then every image of every split written."""
    monkeypatch.setenv("MAK_PROGRESS_INTERVAL", "0")
    m = openworld.build_benchmark(tmp_path / "b", seed=3, scale=SCALE, data_dir=fake_data, progress=True)
    written = sum(len(list((tmp_path / "b" / "images" / s).iterdir())) for s in openworld.SPLITS)
    generated = sum(m["pool_ood"].values())
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "\r" not in last and last.startswith("bench build: generate and write images: done, ")
    assert last.split("done, ")[1].split(" ")[0] == f"{generated + written}/{generated + written}"
    openworld.build_benchmark(tmp_path / "q", seed=3, scale=SCALE, data_dir=fake_data)  # no bar by default
    assert capsys.readouterr().err == ""
