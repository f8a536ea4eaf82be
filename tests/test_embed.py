"""mak embed: store format, determinism, batch-size independence, corrupt images, resume, torchrun."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import torchrun as _torchrun

from mak.errors import MakError
from mak.data.store import open_store


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny checkpoint (1 epoch on 64 images) and a 90-image pool array."""
    from mak.data.sources import ArraySource
    from mak.train.pretrain import pretrain

    d = tmp_path_factory.mktemp("embed")
    rng = np.random.default_rng(0)
    try:
        from mak.data.sources import FashionMNISTSource

        src = FashionMNISTSource("test")
        pool = np.stack([src.load(i)[:, :, 0] for i in range(90)])
    except MakError:
        pool = (rng.random((90, 28, 28)) * 255).astype(np.uint8)
    np.save(d / "pool.npy", pool)
    np.save(d / "seed.npy", pool[:64])
    ckpt = pretrain(ArraySource(d / "seed.npy"), d / "run", epochs=1, batch_size=32, num_workers=0, progress=False)
    return d, ckpt


def _pool(d: Path):
    from mak.data.sources import ArraySource

    return ArraySource(d / "pool.npy")


def _embed(d, ckpt, out, **kw):
    from mak.train.embed import embed

    kw.setdefault("views", 3)
    kw.setdefault("num_workers", 0)
    kw.setdefault("progress", False)
    return embed(_pool(d), ckpt, out, **kw)


def _arrays(path: Path):
    st = open_store(path)
    return st.features(dtype=np.float32), st.views(dtype=np.float32) if st.has_views else None, st.items


def test_store_format_and_meta(setup, tmp_path):
    d, ckpt = setup
    out = _embed(d, ckpt, tmp_path / "store", batch_size=32)
    st = open_store(out)
    assert st.num_rows == 90 and st.num_views == 3 and st.view_dim == 128
    assert st.items == [str(i) for i in range(90)]
    assert np.load(out / "features.npy", mmap_mode="r").dtype == np.float16
    v = st.views()
    assert np.allclose(np.linalg.norm(v, axis=2), 1.0, atol=2e-3)  # L2-normalised views
    assert not np.allclose(v[0], v[1])  # different augmentations per view
    meta = json.loads((out / "meta.json").read_text())
    assert meta["views"] == 3 and meta["seed"] == 0 and meta["dtype"] == "float16" and meta["skipped"] == 0
    import hashlib

    assert meta["checkpoint_sha256"] == hashlib.sha256(Path(ckpt).read_bytes()).hexdigest()
    assert meta["source"]["kind"] == "array"
    assert meta["model_trained_on"]["pool_rows"] == 0  # a seed-only model (what `robust` warns about)
    from mak.train.embed import model_trained_on

    assert model_trained_on({"num_images": 30, "source": {"kind": "combined", "pool_rows": 20}}) == {
        "images": 30, "pool_rows": 20}
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no work dir left behind

    # features are the evaluation features (no augmentation)
    from mak.train.embed import compute_features
    from mak.train.pretrain import load_model

    model, cfg = load_model(ckpt)
    f = compute_features(model, _pool(d), cfg["image_size"], cfg["channels"], batch_size=40)
    assert f.dtype == np.float32 and f.shape == (90, model.feat_dim)
    assert np.allclose(f.astype(np.float16), st.features(dtype=np.float16), atol=2e-2, rtol=2e-2)

    with pytest.raises(MakError, match="already exists"):
        _embed(d, ckpt, out)


def test_deterministic_and_batch_size_independent(setup, tmp_path):
    d, ckpt = setup
    a = _arrays(_embed(d, ckpt, tmp_path / "a", batch_size=32, dtype="float32"))
    b = _arrays(_embed(d, ckpt, tmp_path / "b", batch_size=32, dtype="float32"))
    c = _arrays(_embed(d, ckpt, tmp_path / "c", batch_size=25, dtype="float32"))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])  # same run, same bits
    assert a[2] == c[2]
    assert np.allclose(a[0], c[0], atol=1e-4, rtol=1e-4)  # other batches: same augmentations
    assert np.allclose(a[1], c[1], atol=1e-4)
    other_seed = _arrays(_embed(d, ckpt, tmp_path / "s", batch_size=32, dtype="float32", seed=1))
    assert np.array_equal(a[0], other_seed[0]) and not np.allclose(a[1], other_seed[1])


def _png_folder(d: Path, folder: Path, n: int = 12) -> Path:
    """The first ``n`` pool images as img00.png, img01.png, ... in ``folder``."""
    from PIL import Image

    folder.mkdir()
    pool = np.load(d / "pool.npy")
    for i in range(n):
        Image.fromarray(pool[i]).save(folder / f"img{i:02d}.png")
    return folder


def test_corrupt_pool_image_is_skipped_and_counted(setup, tmp_path, cli, capsys):
    d, ckpt = setup
    folder = _png_folder(d, tmp_path / "pool")
    (folder / "img05.png").write_bytes(b"\x89PNG\r\n\x1a\ntruncated")
    out = tmp_path / "store"
    assert cli("embed", "--folder", folder, "--checkpoint", ckpt, "--views", "2", "--out", out,
               "--batch-size", "4", "--workers", "0", "--no-progress") == 0
    err = capsys.readouterr().err
    assert "img05.png" in err
    st = open_store(out)
    assert st.num_rows == 11
    assert "img05.png" not in st.items and st.items[5] == "img06.png"
    meta = json.loads((out / "meta.json").read_text())
    assert meta["skipped"] == 1 and "img05.png" in meta["skipped_items"][0]["item"]


def test_many_corrupt_images_name_the_first_few_on_stderr_and_all_in_meta(setup, tmp_path, cli, capsys, monkeypatch):
    import mak.train.embed as embed_module

    monkeypatch.setattr(embed_module, "SKIP_LINES", 2)
    d, ckpt = setup
    folder = _png_folder(d, tmp_path / "pool")
    for i in (1, 3, 4, 8, 9):
        (folder / f"img{i:02d}.png").write_bytes(b"garbage")
    out = tmp_path / "store"
    assert cli("embed", "--folder", folder, "--checkpoint", ckpt, "--views", "0", "--out", out,
               "--batch-size", "4", "--workers", "0", "--no-progress") == 0
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "skipping" in ln]
    assert len(lines) == 3 and "img01.png" in lines[0] and "img03.png" in lines[1] and "meta.json" in lines[2]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["skipped"] == 5 and [s["item"] for s in meta["skipped_items"]] == \
        [f"img{i:02d}.png" for i in (1, 3, 4, 8, 9)]


def test_unreadable_checkpoint_and_bad_options(setup, tmp_path, cli, capsys):
    d, _ = setup
    bad = tmp_path / "broken.pt"
    bad.write_bytes(b"\x00" * 100)
    assert cli("embed", "--array", d / "pool.npy", "--checkpoint", bad, "--out", tmp_path / "s", "--no-progress") == 2
    err = capsys.readouterr().err.strip()
    assert "broken.pt" in err and len(err.splitlines()) == 1
    with pytest.raises(MakError, match="views"):
        _embed(d, setup[1], tmp_path / "x", views=1)
    with pytest.raises(SystemExit):
        cli("embed", "--help")
    assert "--merge" in capsys.readouterr().out


class _FailingSource:
    """Wraps a source; raises a crash (not an ImageError) when loading row ``fail_at``."""

    def __init__(self, inner, fail_at: int | None):
        self.inner, self.fail_at, self.loads = inner, fail_at, 0
        self.name = inner.name

    def __len__(self):
        return len(self.inner)

    def item(self, i):
        return self.inner.item(i)

    def describe(self):
        return self.inner.describe()

    def in_memory(self):
        return True

    def load(self, i):
        if i == self.fail_at:
            raise RuntimeError("simulated crash")
        self.loads += 1
        return self.inner.load(i)


def test_killed_run_resumes_from_finished_chunks(setup, tmp_path):
    from mak.train.embed import embed

    d, ckpt = setup
    kw = dict(views=2, batch_size=10, num_workers=0, progress=False, dtype="float32", flush_rows=20)
    with pytest.raises(RuntimeError, match="simulated"):
        embed(_FailingSource(_pool(d), 55), ckpt, tmp_path / "r", **kw)
    assert not (tmp_path / "r").exists() and (tmp_path / ".r.partial").is_dir()
    src = _FailingSource(_pool(d), None)
    embed(src, ckpt, tmp_path / "r", **kw)
    assert src.loads == 50  # rows 0-39 were committed, 40-89 recomputed
    fresh = _arrays(_embed(d, ckpt, tmp_path / "f", **kw))
    got = _arrays(tmp_path / "r")
    assert np.array_equal(got[0], fresh[0]) and np.array_equal(got[1], fresh[1]) and got[2] == fresh[2]
    assert not (tmp_path / ".r.partial").exists()


@pytest.mark.parametrize("merge", [True, False])
def test_a_run_killed_while_it_publishes_is_finished_without_embedding_again(setup, tmp_path, monkeypatch, merge):
    from mak.train import embed as E

    d, ckpt = setup
    kw = dict(views=2, batch_size=10, num_workers=0, progress=False, dtype="float32", merge=merge)
    publish = E._publish

    def killed(final, out, overwrite):
        raise KeyboardInterrupt  # after the arrays went to work/final, before the store is out

    monkeypatch.setattr(E, "_publish", killed)
    with pytest.raises(KeyboardInterrupt):
        E.embed(_FailingSource(_pool(d), None), ckpt, tmp_path / "r", **kw)
    monkeypatch.setattr(E, "_publish", publish)
    src = _FailingSource(_pool(d), None)
    E.embed(src, ckpt, tmp_path / "r", **kw)
    assert src.loads == 0  # every block was kept
    fresh, got = open_store(_embed(d, ckpt, tmp_path / "f", **kw)), open_store(tmp_path / "r")
    assert np.array_equal(got.features(), fresh.features()) and np.array_equal(got.views(), fresh.views())
    assert got.items == fresh.items and not (tmp_path / ".r.partial").exists()


@pytest.mark.slow
def test_torchrun_embed_equals_single_process(setup, tmp_path):
    d, ckpt = setup
    common = ["--array", d / "pool.npy", "--checkpoint", ckpt, "--views", "2", "--batch-size", "16",
              "--workers", "0", "--no-progress", "--dtype", "float32"]
    res = _torchrun(2, "embed", *common, "--out", tmp_path / "merged")
    assert res.returncode == 0, res.stderr[-3000:]
    res = _torchrun(2, "embed", *common, "--out", tmp_path / "sharded", "--no-merge")
    assert res.returncode == 0, res.stderr[-3000:]
    # the single-process reference in a fresh process with the ranks' thread count (1)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-m", "mak", "embed", *map(str, common), "--out", tmp_path / "single"],
                         capture_output=True, text=True, timeout=240, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    single = _arrays(tmp_path / "single")
    merged = _arrays(tmp_path / "merged")
    assert merged[2] == single[2]
    assert np.array_equal(merged[0], single[0]) and np.array_equal(merged[1], single[1])
    assert not (tmp_path / "merged" / "shards.json").exists()
    sharded = open_store(tmp_path / "sharded")
    assert sharded.sharded and len(sharded.shards) == 2
    assert sharded.items == single[2]
    assert np.array_equal(sharded.features(), single[0]) and np.array_equal(sharded.views(), single[1])
    # the merged store is the single-process one: same meta too
    m1 = json.loads((tmp_path / "merged" / "meta.json").read_text())
    m2 = json.loads((tmp_path / "single" / "meta.json").read_text())
    assert m1 == m2


def test_a_full_disk_is_one_line_and_leaves_no_store(tmp_path, cli, capsys, monkeypatch):
    """The store's arrays are allocated on disk before the memmaps are written: ENOSPC is an error
    there, not a SIGBUS during the writes."""
    import errno
    import os

    import numpy as np

    from mak.train.pretrain import pretrain
    from mak.data.sources import ArraySource

    arr = np.random.default_rng(0).integers(0, 255, (40, 28, 28), dtype=np.uint8)
    np.save(tmp_path / "a.npy", arr)
    ckpt = pretrain(ArraySource(tmp_path / "a.npy"), tmp_path / "pre", epochs=1, batch_size=16, seed=0, num_workers=0,
                    progress=False)

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    capsys.readouterr()
    rc = cli("embed", "--array", tmp_path / "a.npy", "--checkpoint", ckpt, "--views", "2", "--out",
             tmp_path / "store", "--no-progress", "--workers", "0")
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "No space left on device" in err[0] and "features.npy" in err[0], err
    assert not (tmp_path / "store").exists()


def test_an_unfinished_pretraining_is_recorded_warned_and_refused_with_strict(tmp_path, cli, capsys):
    import hashlib
    import json

    import numpy as np

    from mak.data.sources import ArraySource
    from mak.train.pretrain import pretrain

    arr = np.random.default_rng(1).integers(0, 255, (40, 28, 28), dtype=np.uint8)
    np.save(tmp_path / "a.npy", arr)
    ckpt = pretrain(ArraySource(tmp_path / "a.npy"), tmp_path / "pre", epochs=3, batch_size=16, seed=0,
                    num_workers=0, progress=False, stop_after=1)  # killed after epoch 1 of 3
    args = ["embed", "--array", tmp_path / "a.npy", "--checkpoint", ckpt, "--views", "0", "--no-progress",
            "--workers", "0"]
    capsys.readouterr()
    assert cli(*args, "--out", tmp_path / "strict", "--strict") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "epoch 1 of 3" in err[0] and "did not finish" in err[0], err
    assert not (tmp_path / "strict").exists()
    assert cli(*args, "--out", tmp_path / "store") == 0
    assert "warning" in capsys.readouterr().err
    meta = json.loads((tmp_path / "store" / "meta.json").read_text())
    assert (meta["checkpoint_epoch"], meta["checkpoint_epochs"], meta["pretraining_finished"]) == (1, 3, False)
    assert meta["checkpoint_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()


def _tar_shards(folder: Path, pool: np.ndarray, per_shard: int, bad: int) -> None:
    """WebDataset shards of ``pool``'s images as PNG (key.png + key.json), image ``bad`` corrupt."""
    import io
    import tarfile

    from PIL import Image

    for k in range(0, len(pool), per_shard):
        with tarfile.open(folder / f"pool-{k // per_shard:03d}.tar", "w") as tar:
            for i in range(k, min(len(pool), k + per_shard)):
                buf = io.BytesIO()
                Image.fromarray(pool[i]).save(buf, format="PNG")
                data = b"\x89PNG\r\n\x1a\nbroken" if i == bad else buf.getvalue()
                for name, payload in ((f"s/{i:05d}.png", data), (f"s/{i:05d}.json", b"{}")):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))


def test_webdataset_shards_embed_as_the_same_images_do(setup, tmp_path, cli, capsys):
    """--webdataset 'pool-{000..002}.tar': SHARD/KEY items, the same features as the images from an
    array, a corrupt sample skipped and counted; a missing shard is a one-line error."""
    from mak.data.sources import WebDatasetSource, expand_braces

    d, ckpt = setup
    pool = np.load(d / "pool.npy")[:30]
    _tar_shards(tmp_path, pool, per_shard=12, bad=13)
    assert expand_braces("a-{008..010}.tar") == ["a-008.tar", "a-009.tar", "a-010.tar"]
    assert expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]
    src = WebDatasetSource(tmp_path / "pool-{000..002}.tar")
    assert len(src) == 30 and src.item(0) == "pool-000/s/00000" and src.item(29) == "pool-002/s/00029"
    np.testing.assert_array_equal(src.load(29)[:, :, 0], pool[29])
    out = tmp_path / "store"
    assert cli("embed", "--webdataset", str(tmp_path / "pool-{000..002}.tar"), "--checkpoint", ckpt, "--views", "0",
               "--out", out, "--batch-size", "8", "--workers", "0", "--no-progress") == 0
    assert "pool-001/s/00013" in capsys.readouterr().err
    st = open_store(out)
    assert st.num_rows == 29 and "pool-001/s/00013" not in st.items
    np.save(tmp_path / "pool30.npy", pool)
    ref = tmp_path / "ref"
    assert cli("embed", "--array", tmp_path / "pool30.npy", "--checkpoint", ckpt, "--views", "0", "--out", ref,
               "--batch-size", "8", "--workers", "0", "--no-progress") == 0
    keep = [i for i in range(30) if i != 13]
    np.testing.assert_array_equal(st.features(), open_store(ref).features()[keep])
    assert cli("embed", "--webdataset", str(tmp_path / "pool-{000..003}.tar"), "--checkpoint", ckpt,
               "--out", tmp_path / "x", "--no-progress") == 2
    assert "pool-003.tar: shard not found" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_pretrained_weights_as_a_frozen_encoder(setup, tmp_path, cli, capsys):
    """embed --weights: the backbone of a saved state dict, no head; features equal the checkpoint's
    own backbone features, views are normalised backbone outputs, meta.json names the model external."""
    import torch

    from mak.data.store import model_kind

    d, ckpt = setup
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    cfg = state["config"]
    torch.save({k: v for k, v in state["model"].items() if k.startswith("backbone.")}, tmp_path / "w.pt")
    args = ["embed", "--array", d / "pool.npy", "--views", "2", "--batch-size", "32", "--workers", "0",
            "--no-progress"]
    assert cli(*args, "--checkpoint", ckpt, "--out", tmp_path / "a") == 0
    assert cli(*args, "--weights", tmp_path / "w.pt", "--backbone", cfg["backbone"], "--image-size",
               str(cfg["image_size"]), "--channels", str(cfg["channels"]), "--out", tmp_path / "b") == 0
    a, b = open_store(tmp_path / "a"), open_store(tmp_path / "b", require_views=True)
    np.testing.assert_array_equal(a.features(), b.features())
    assert b.view_dim == b.feature_dim  # views come from the backbone, not a projection head
    np.testing.assert_allclose(np.linalg.norm(b.views(dtype=np.float32), axis=2), 1.0, atol=2e-3)
    assert model_kind(b.meta) == "external" and b.meta["weights_loaded"]["loaded"] > 0
    capsys.readouterr()
    assert cli(*args, "--weights", tmp_path / "w.pt", "--out", tmp_path / "c") == 2
    assert "--weights needs --backbone" in capsys.readouterr().err
    assert cli(*args, "--checkpoint", ckpt, "--backbone", "resnet18", "--out", tmp_path / "c") == 2
    assert "go with --weights" in capsys.readouterr().err and not (tmp_path / "c").exists()


def test_torchrun_embeds_webdataset_shards_as_one_process_does(setup, tmp_path):
    """Two ranks take contiguous rows, so contiguous shards; the merged store is one process's."""
    d, ckpt = setup
    _tar_shards(tmp_path, np.load(d / "pool.npy")[:40], per_shard=10, bad=-1)
    common = ["--webdataset", str(tmp_path / "pool-{000..003}.tar"), "--checkpoint", ckpt, "--views", "0",
              "--batch-size", "8", "--workers", "0", "--no-progress", "--dtype", "float32"]
    res = _torchrun(2, "embed", *common, "--out", tmp_path / "two")
    assert res.returncode == 0, res.stderr[-3000:]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-m", "mak", "embed", *map(str, common), "--out", tmp_path / "one"],
                         capture_output=True, text=True, timeout=240, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    two, one = _arrays(tmp_path / "two"), _arrays(tmp_path / "one")
    assert two[2] == one[2] and two[2][10] == "pool-001/s/00010"
    assert np.array_equal(two[0], one[0])


def test_mak_evaluate_shows_a_bar_of_images_per_split_and_no_progress_hides_it(setup, tmp_path, capsys, monkeypatch):
    """`mak evaluate` on labeled split files: a bar per split counting its images, then the table;
    --no-progress keeps the summary lines and drops the bars; the results do not change."""
    from PIL import Image

    from mak.cli import main

    d, ckpt = setup
    pool = np.load(d / "pool.npy")
    (tmp_path / "img").mkdir()
    for i, img in enumerate(pool):
        Image.fromarray(img).save(tmp_path / "img" / f"{i}.png")
    (tmp_path / "train.txt").write_text("".join(f"img/{i}.png {i % 3}\n" for i in range(60)))
    (tmp_path / "test.txt").write_text("".join(f"img/{i}.png {i % 3}\n" for i in range(60, 90)))
    monkeypatch.setenv("MAK_PROGRESS_INTERVAL", "0")
    args = ["evaluate", "--checkpoint", str(ckpt), "--train-split", str(tmp_path / "train.txt"),
            "--test-split", str(tmp_path / "test.txt"), "--shots", "5", "--draws", "2"]
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "a.json")]) == 0
    err = capsys.readouterr().err
    for what, n in (("train", 60), ("test", 30)):
        assert f"features: {what}: done, {n}/{n}" in err
        assert f"features: {what} ({n}, " in err  # the summary line
    assert main([*args, "--out", str(tmp_path / "b.json"), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "done," not in err and "features: train (60, " in err
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("a.json", "b.json"))
    assert a["fullshot_acc"] == b["fullshot_acc"] and a["fewshot_accs"] == b["fewshot_accs"]
