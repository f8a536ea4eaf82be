"""Image sources (split, folder, array, Fashion-MNIST IDX), ImageDataset and the checks."""
from __future__ import annotations

import argparse
import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mak.data.sources import (
    ArraySource,
    FashionMNISTSource,
    FolderSource,
    ImageDataset,
    ImageError,
    SplitSource,
    infer_geometry,
    open_source,
    validate_all,
)
from mak.cli._sources import add_source_args, source_from_args
from mak.errors import MakError


def _save(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _rgb(rng, h=20, w=24):
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture
def image_tree(tmp_path, rng):
    root = tmp_path / "imgs"
    _save(root / "b" / "x1.png", _rgb(rng))
    _save(root / "a" / "y.JPG", _rgb(rng, 30, 16))
    _save(root / "a" / "z.webp", _rgb(rng))
    _save(root / "c.bmp", rng.integers(0, 256, (12, 12), dtype=np.uint8))
    (root / "notes.txt").write_text("not an image")
    _save(root / ".hidden" / "h.png", _rgb(rng))
    _save(root / ".dot.png", _rgb(rng))
    return root


# -- split files ---------------------------------------------------------------------------

def test_split_round_trips_item_lines(tmp_path, image_tree):
    split = image_tree / "train.txt"
    split.write_text("# comment\nb/x1.png 3\n\n  a/y.JPG 1 extra\tlabels  \nc.bmp\n")
    src = SplitSource(split)
    assert len(src) == 3
    assert src.items() == ["b/x1.png 3", "a/y.JPG 1 extra\tlabels", "c.bmp"]
    assert src.load(0).shape == (20, 24, 3)
    assert src.load(1).shape == (30, 16, 3)
    assert src.load(2).shape == (12, 12, 1)
    assert src.load(2).dtype == np.uint8
    d = src.describe()
    assert d["kind"] == "split" and d["count"] == 3 and Path(d["root"]) == image_tree.resolve()

    # a split file elsewhere with an explicit root
    other = tmp_path / "lists" / "s.txt"
    other.parent.mkdir()
    other.write_text("c.bmp 7\n")
    assert SplitSource(other, root=image_tree).load(0).shape == (12, 12, 1)
    with pytest.raises(ImageError, match="file not found"):
        SplitSource(other).load(0)  # default root is the split file's directory
    assert pickle.loads(pickle.dumps(src)).items() == src.items()


def test_split_errors(tmp_path):
    with pytest.raises(MakError, match="split file not found"):
        SplitSource(tmp_path / "nope.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# nothing\n")
    with pytest.raises(MakError, match="no image lines"):
        SplitSource(empty)
    ok = tmp_path / "ok.txt"
    ok.write_text("a.png\n")
    with pytest.raises(MakError, match="root directory not found"):
        SplitSource(ok, root=tmp_path / "missing")


# -- folders -------------------------------------------------------------------------------

def test_folder_recursive_sorted(image_tree):
    src = FolderSource(image_tree)
    assert src.items() == ["a/y.JPG", "a/z.webp", "b/x1.png", "c.bmp"]
    assert src.load(1).shape == (20, 24, 3)
    assert src.path(3) == str(image_tree.resolve() / "c.bmp")
    assert src.describe() == {"kind": "folder", "path": str(image_tree.resolve()), "count": 4}


def test_folder_labels_from_dirs(image_tree):
    """An ImageFolder layout: class folders sorted by name are labels 0, 1, ...; item lines carry them."""
    from mak.data.sources import labeled_source, open_source
    from mak.run.stages import labels_or_none

    (image_tree / "c.bmp").rename(image_tree / "b" / "c.bmp")
    src = FolderSource(image_tree, labels_from_dirs=True)
    assert src.items() == ["a/y.JPG 0", "a/z.webp 0", "b/c.bmp 1", "b/x1.png 1"]
    assert src.classes == ["a", "b"] and src.describe()["classes"] == ["a", "b"]
    assert list(labels_or_none(src.items())) == [0, 0, 1, 1]
    assert src.load(0).shape == (30, 16, 3)  # the image, not the label, is read
    assert labeled_source(image_tree).items() == src.items()  # a directory as an evaluation split
    with pytest.raises(MakError, match="only applies to --folder"):
        open_source("split", image_tree / "x.txt", labels_from_dirs=True)
    (image_tree / "loose.png").write_bytes((image_tree / "b" / "x1.png").read_bytes())
    with pytest.raises(MakError, match="inside a class folder"):
        FolderSource(image_tree, labels_from_dirs=True)


def test_folder_errors(tmp_path):
    with pytest.raises(MakError, match="not found"):
        FolderSource(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MakError, match="no image files"):
        FolderSource(tmp_path / "empty")


# -- arrays --------------------------------------------------------------------------------

def test_array_npy_and_npz(tmp_path, rng):
    gray = rng.integers(0, 256, (5, 9, 7), dtype=np.uint8)
    np.save(tmp_path / "g.npy", gray)
    src = ArraySource(tmp_path / "g.npy")
    assert len(src) == 5 and src.items() == ["0", "1", "2", "3", "4"]
    assert np.array_equal(src.load(3)[:, :, 0], gray[3])
    assert src.describe()["shape"] == [5, 9, 7, 1]
    assert np.array_equal(pickle.loads(pickle.dumps(src)).load(4)[:, :, 0], gray[4])

    rgb = rng.integers(0, 256, (3, 6, 6, 3), dtype=np.uint8)
    np.savez(tmp_path / "named.npz", labels=np.arange(3), images=rgb)
    np.savez_compressed(tmp_path / "single.npz", whatever=rgb)
    for name in ("named.npz", "single.npz"):
        s = ArraySource(tmp_path / name)
        assert s.items() == ["0", "1", "2"]
        assert np.array_equal(s.load(2), rgb[2])


@pytest.mark.parametrize("arr, match", [
    (np.zeros((2, 4, 4), np.float32), "uint8"),
    (np.zeros((2, 4, 4, 2), np.uint8), "1 or 3 channels"),
    (np.zeros((4, 4), np.uint8), "N x H x W"),
])
def test_array_bad_contents(tmp_path, arr, match):
    np.save(tmp_path / "bad.npy", arr)
    with pytest.raises(MakError, match=match):
        ArraySource(tmp_path / "bad.npy")


def test_array_errors(tmp_path):
    with pytest.raises(MakError, match="not found"):
        ArraySource(tmp_path / "missing.npy")
    np.savez(tmp_path / "two.npz", a=np.zeros((1, 2, 2), np.uint8), b=np.zeros((1, 2, 2), np.uint8))
    with pytest.raises(MakError, match="'images'"):
        ArraySource(tmp_path / "two.npz")
    (tmp_path / "junk.npy").write_bytes(b"garbage")
    with pytest.raises(MakError, match="unreadable"):
        ArraySource(tmp_path / "junk.npy")
    (tmp_path / "x.txt").write_text("1")
    with pytest.raises(MakError, match=".npy or .npz"):
        ArraySource(tmp_path / "x.txt")


# -- Fashion-MNIST IDX ---------------------------------------------------------------------

def _idx_bytes(arr: np.ndarray) -> bytes:
    header = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def _write_idx(directory: Path, prefix: str, images, labels, gz: bool) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for stem, arr in ((f"{prefix}-images-idx3-ubyte", images), (f"{prefix}-labels-idx1-ubyte", labels)):
        data = _idx_bytes(arr)
        if gz:
            with gzip.open(directory / (stem + ".gz"), "wb") as fh:
                fh.write(data)
        else:
            (directory / stem).write_bytes(data)


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_idx(tmp_path, rng, gz):
    images = rng.integers(0, 256, (6, 28, 28), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5, 9], np.uint8)
    _write_idx(tmp_path, "t10k", images, labels, gz)
    src = FashionMNISTSource("test", tmp_path)
    assert src.items() == ["0 3", "1 1", "2 4", "3 1", "4 5", "5 9"]
    assert np.array_equal(src.load(2)[:, :, 0], images[2])
    assert src.describe()["split"] == "test" and src.describe()["count"] == 6
    ds = ImageDataset(src, 28, 1)
    img, i, ok = ds[4]
    assert ok and i == 4 and torch.equal(img[0], torch.from_numpy(images[4]))


def test_fashion_mnist_errors(tmp_path, rng):
    with pytest.raises(MakError, match="apt-get install dataset-fashion-mnist"):
        FashionMNISTSource("train", tmp_path)
    with pytest.raises(MakError, match="--data-dir"):
        FashionMNISTSource("train", tmp_path)
    with pytest.raises(MakError, match="'train' or 'test'"):
        FashionMNISTSource("val", tmp_path)
    _write_idx(tmp_path, "train", rng.integers(0, 256, (3, 4, 4), dtype=np.uint8),
               np.zeros(2, np.uint8), gz=False)
    with pytest.raises(MakError, match="2 labels for 3 images"):
        FashionMNISTSource("train", tmp_path)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(b"\x00\x00\x0d\x01" + b"\x00" * 8)
    with pytest.raises(MakError, match="magic"):
        FashionMNISTSource("train", tmp_path)


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz").exists(),
                    reason="dataset-fashion-mnist not installed")
def test_fashion_mnist_system_copy():
    src = open_source("fashion-mnist", "test")
    assert len(src) == 10000
    assert src.load(0).shape == (28, 28, 1)
    assert src.item(0).split()[0] == "0" and 0 <= int(src.item(0).split()[1]) <= 9


# -- corrupt images ------------------------------------------------------------------------

def test_corrupt_and_missing_images(tmp_path, rng):
    root = tmp_path / "pool"
    _save(root / "good.png", _rgb(rng))
    (root / "bad.png").write_bytes(b"\x89PNG not really a png" + bytes(range(200)))
    good_jpg = root / "trunc.jpg"
    Image.fromarray(_rgb(rng, 64, 64)).save(good_jpg, quality=95)
    good_jpg.write_bytes(good_jpg.read_bytes()[:300])  # truncated
    src = FolderSource(root)
    assert src.items() == ["bad.png", "good.png", "trunc.jpg"]
    with pytest.raises(ImageError) as err:
        src.load(0)
    assert "bad.png" in str(err.value) and err.value.reason
    assert isinstance(err.value, MakError)
    e2 = pickle.loads(pickle.dumps(err.value))
    assert str(e2) == str(err.value) and e2.path == err.value.path

    ds = ImageDataset(src, 16, 3)
    img, i, ok = ds[0]
    assert not ok and i == 0 and img.shape == (3, 16, 16) and int(img.sum()) == 0
    assert ds[1][2] is True
    assert not ds[2][2]
    assert "bad.png" in ds.check(0) and ds.check(1) is None and "trunc.jpg" in ds.check(2)

    bad = validate_all(src, progress=False)
    assert [i for i, _ in bad] == [0, 2]
    assert "bad.png" in bad[0][1] and "trunc.jpg" in bad[1][1]

    split = root / "list.txt"
    split.write_text("good.png 0\nmissing.png 1\n")
    bad = validate_all(SplitSource(split), progress=False)
    assert len(bad) == 1 and bad[0][0] == 1 and "missing.png" in bad[0][1] and "not found" in bad[0][1]

    # a DataLoader batch: the corrupt rows come back flagged, never raising
    for workers in (0, 1):
        loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=workers)
        imgs, idx, oks = next(iter(loader))
        assert imgs.dtype == torch.uint8 and imgs.shape == (3, 3, 16, 16)
        assert idx.tolist() == [0, 1, 2] and oks.tolist() == [False, True, False]


# -- dataset geometry ----------------------------------------------------------------------

def test_dataset_resize_center_and_channels(tmp_path):
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, 10:30] = (255, 0, 0)  # the central square is red, the sides black
    _save(tmp_path / "i" / "wide.png", arr)
    src = FolderSource(tmp_path / "i")

    center = ImageDataset(src, 10, 3, mode="center")[0][0]
    assert center.shape == (3, 10, 10) and center.dtype == torch.uint8
    # only the red middle survives (the outer columns may blend in a little of the sides)
    assert center[0, :, 1:-1].min() >= 250 and center[1:].max() <= 5 and center[0].min() >= 128
    resized = ImageDataset(src, 10, 3, mode="resize")[0][0]
    assert resized.shape == (3, 10, 10) and resized[0, :, 0].max() <= 5  # whole width squeezed
    grey = ImageDataset(src, 8, 1, mode="center")[0][0]
    assert grey.shape == (1, 8, 8) and 70 <= int(grey.float().mean()) <= 80  # luma of red = 76

    g = np.full((6, 28, 28), 7, np.uint8)
    np.save(tmp_path / "g.npy", g)
    three = ImageDataset(ArraySource(tmp_path / "g.npy"), 28, 3)[5][0]
    assert three.shape == (3, 28, 28) and int(three.min()) == int(three.max()) == 7
    small = ImageDataset(ArraySource(tmp_path / "g.npy"), 14, 1, mode="center")[0][0]
    assert small.shape == (1, 14, 14)

    with pytest.raises(MakError):
        ImageDataset(src, 10, 2)
    with pytest.raises(MakError):
        ImageDataset(src, 10, 3, mode="stretch")


def test_infer_geometry(tmp_path, rng):
    d = tmp_path / "g"
    for k in range(5):
        v = rng.integers(0, 256, (30 + k, 50, 1), dtype=np.uint8)
        _save(d / f"{k}.png", np.repeat(v, 3, axis=2))  # grey stored as RGB
    assert infer_geometry(FolderSource(d)) == (32, 1)
    _save(d / "9.png", _rgb(rng, 40, 40))
    assert infer_geometry(FolderSource(d)) == (32, 3)  # median of 30..34, 40
    np.save(tmp_path / "a.npy", np.zeros((4, 28, 28), np.uint8))
    assert infer_geometry(ArraySource(tmp_path / "a.npy")) == (28, 1)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"nope")
    with pytest.raises(MakError, match="readable"):
        infer_geometry(FolderSource(tmp_path / "bad"))


# -- command-line plumbing -----------------------------------------------------------------

def test_source_args(tmp_path, image_tree):
    parser = argparse.ArgumentParser()
    add_source_args(parser)
    args = parser.parse_args(["--folder", str(image_tree)])
    assert isinstance(source_from_args(args), FolderSource)
    (image_tree / "s.txt").write_text("c.bmp 1\n")
    args = parser.parse_args(["--split", str(image_tree / "s.txt"), "--root", str(image_tree)])
    src = source_from_args(args)
    assert isinstance(src, SplitSource) and src.items() == ["c.bmp 1"]
    args = parser.parse_args(["--folder", str(image_tree), "--root", str(tmp_path)])
    with pytest.raises(MakError, match="--root"):
        source_from_args(args)
    for bad in ([], ["--folder", "a", "--array", "b.npy"], ["--fashion-mnist", "val"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)
    args = parser.parse_args(["--fashion-mnist", "train", "--data-dir", str(tmp_path)])
    with pytest.raises(MakError, match="dataset-fashion-mnist"):
        source_from_args(args)
    with pytest.raises(MakError, match="unknown image source"):
        open_source("zip", "x")


def test_folder_symlink_loop(tmp_path, rng):
    root = tmp_path / "loop"
    _save(root / "sub" / "a.png", _rgb(rng))
    (root / "sub" / "back").symlink_to(root, target_is_directory=True)
    src = FolderSource(root)
    assert "sub/a.png" in src.items() and len(src) <= 2


@pytest.mark.parametrize("shape,channels,size,fits", [
    ((20, 28, 28), 1, 28, True),      # grey at the working size
    ((20, 28, 28), 3, 28, True),      # grey array, RGB model: channels repeated
    ((20, 16, 16, 3), 3, 16, True),   # RGB at the working size
    ((20, 16, 16, 3), 1, 16, False),  # RGB -> grey needs the luma conversion of fit()
    ((20, 28, 28), 1, 32, False),     # needs a resize
])
def test_fit_rows_equals_fit_image_by_image(tmp_path, rng, shape, channels, size, fits):
    np.save(tmp_path / "a.npy", rng.integers(0, 256, shape, dtype=np.uint8))
    ds = ImageDataset(ArraySource(tmp_path / "a.npy"), size, channels, mode="center")
    assert ds.fits_rows() is fits
    if fits:
        got = ds.fit_rows(3, 11)
        assert got.dtype == torch.uint8 and got.shape == (8, channels, size, size)
        assert torch.equal(got, torch.stack([ds.fit(i) for i in range(3, 11)]))
    with pytest.raises(MakError, match="out of range"):
        ArraySource(tmp_path / "a.npy").load_rows(5, 21)


def test_pool_mix_rows_is_a_seeded_uniform_sample_without_replacement():
    from mak.data.sources import pool_mix_rows

    rows = pool_mix_rows(10_000, 100, "auto", seed=3)
    assert len(rows) == 800 and np.all(np.diff(rows) > 0) and rows[0] >= 0 and rows[-1] < 10_000  # 8 x seed
    np.testing.assert_array_equal(rows, pool_mix_rows(10_000, 100, "auto", seed=3))
    assert not np.array_equal(rows, pool_mix_rows(10_000, 100, "auto", seed=4))
    np.testing.assert_array_equal(pool_mix_rows(50, 100, "auto"), np.arange(50))  # capped by the pool
    assert len(pool_mix_rows(50, 1, 7)) == 7 and len(pool_mix_rows(50, 1, 0)) == 0
    # uniform: over many seeds every decile of the pool gets its share
    hits = np.concatenate([pool_mix_rows(1000, 10, 100, seed=s) for s in range(200)])
    per_decile = np.bincount(hits // 100, minlength=10)
    assert per_decile.min() > 0.9 * 2000 and per_decile.max() < 1.1 * 2000
    for bad in (-1, "many", 2.5, True):
        with pytest.raises(MakError, match="pool mix count"):
            pool_mix_rows(10, 1, bad)


def test_combined_source_reads_seed_rows_then_chosen_pool_rows(tmp_path, rng):
    from mak.data.sources import CombinedSource, open_source

    a = rng.integers(0, 255, (4, 8, 8), dtype=np.uint8)
    b = rng.integers(0, 255, (6, 8, 8), dtype=np.uint8)
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", b)
    src = CombinedSource(open_source("array", tmp_path / "a.npy"), open_source("array", tmp_path / "b.npy"),
                         np.array([5, 1]))
    assert len(src) == 6
    for i, want in enumerate([*a, b[5], b[1]]):
        np.testing.assert_array_equal(np.asarray(src.load(i)).reshape(want.shape), want)


def test_pool_mix_under_torchrun_shares_the_decoding_and_agrees_with_one_process(tmp_path):
    """Each rank decodes its share of the sample; every rank ends with the one-process rows and skips."""
    import json
    import os
    import subprocess
    import sys

    from PIL import Image

    from mak.data.sources import open_source, pool_mix

    pool = tmp_path / "pool"
    pool.mkdir()
    rng = np.random.default_rng(1)
    for i in range(9):
        Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(pool / f"{i:02d}.png")
    for bad in ("02.png", "07.png"):
        (pool / bad).write_bytes(b"garbage")
    seed = tmp_path / "seed.npy"
    np.save(seed, rng.integers(0, 255, (3, 8, 8), dtype=np.uint8))
    script = tmp_path / "mix.py"
    script.write_text(
        "import json, os, sys\n"
        "from mak import distributed as D\n"
        "import mak.data.sources as S\n"
        "decoded = []\n"
        "probe = S._probe\n"
        "S._probe = lambda src, i: decoded.append(i) or probe(src, i)\n"
        "with D.process_group('cpu'):\n"
        f"    mix = S.pool_mix(S.open_source('array', {str(seed)!r}), S.open_source('folder', {str(pool)!r}), 'auto', 0)\n"
        "    out = {'rows': mix.rows.tolist(), 'skipped': [r for r, _ in mix.skipped], 'decoded': sorted(decoded)}\n"
        f"    open(os.path.join({str(tmp_path)!r}, 'rank%s.json' % D.rank()), 'w').write(json.dumps(out))\n")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(script)], capture_output=True, text=True, timeout=240, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    one = pool_mix(open_source("array", seed), open_source("folder", pool), "auto", 0)
    expected = {"rows": one.rows.tolist(), "skipped": [r for r, _ in one.skipped]}
    assert expected["skipped"] == [2, 7] and 2 not in expected["rows"]
    decoded = []
    for r in (0, 1):
        got = json.loads((tmp_path / f"rank{r}.json").read_text())
        decoded += got.pop("decoded")
        assert got == expected
    assert sorted(decoded) == list(range(9))  # each image decoded once, by one of the ranks
