"""SimCLR pre-training: NT-Xent reference, schedule, loss falls, bit-identical resume, DDP, errors."""
from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest

from conftest import torchrun as _torchrun
import torch

from mak.errors import MakError
from mak.train.losses import nt_xent, nt_xent_global, nt_xent_per_sample

FMNIST = Path("/usr/share/datasets/fashion-mnist")


def fashion_subset(path: Path, n: int) -> Path:
    """The first ``n`` Fashion-MNIST training images as an .npy array (synthetic if absent)."""
    try:
        from mak.data.sources import FashionMNISTSource

        src = FashionMNISTSource("train")
        arr = np.stack([src.load(i)[:, :, 0] for i in range(n)])
    except MakError:
        rng = np.random.default_rng(0)
        arr = (rng.random((n, 28, 28)) * 255).astype(np.uint8)
    np.save(path, arr)
    return path


def array_source(path: Path):
    from mak.data.sources import ArraySource

    return ArraySource(path)


# --------------------------------------------------------------------------------------------
# the loss

def _reference_nt_xent(a: torch.Tensor, b: torch.Tensor, t: float) -> list[float]:
    """Per-image NT-Xent with plain Python loops (SimCLR's definition)."""
    n = a.shape[0]
    z = [v / v.norm() for v in list(a.double()) + list(b.double())]
    losses = []
    for i in range(2 * n):
        pos = i + n if i < n else i - n
        denom = sum(math.exp(float(z[i] @ z[k]) / t) for k in range(2 * n) if k != i)
        losses.append(-math.log(math.exp(float(z[i] @ z[pos]) / t) / denom))
    return [0.5 * (losses[i] + losses[i + n]) for i in range(n)]


def test_nt_xent_matches_python_reference():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(7, 5, generator=g), torch.randn(7, 5, generator=g)
    ref = _reference_nt_xent(a, b, 0.2)
    got = nt_xent_per_sample(a, b, 0.2)
    assert torch.allclose(got.double(), torch.tensor(ref, dtype=torch.float64), atol=1e-4)
    assert abs(float(nt_xent(a, b, 0.2)) - sum(ref) / len(ref)) < 1e-4
    # one process: the global-negatives variant is the plain loss, gradient included
    a1, a2 = a.clone().requires_grad_(), a.clone().requires_grad_()
    nt_xent(a1, b).backward()
    nt_xent_global(a2, b).backward()
    assert torch.allclose(a1.grad, a2.grad)


def test_lr_schedule_warmup_then_cosine():
    from mak.train.pretrain import lr_factor

    f = [lr_factor(s, 100, 10) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(x >= y for x, y in zip(f[9:], f[10:]))
    assert f[-1] < 0.01
    assert lr_factor(0, 10, 0) == pytest.approx(1.0)


def test_channels_last_and_amp_switches():
    from mak.train.device import resolve_amp, resolve_channels_last

    cpu = torch.device("cpu")
    assert resolve_amp(cpu, False) is None
    assert resolve_amp(cpu, True) in (None, torch.bfloat16)  # tries, falls back to fp32
    assert resolve_channels_last(cpu, False) is False


# --------------------------------------------------------------------------------------------
# training

@pytest.fixture(scope="module")
def seed_array(tmp_path_factory) -> Path:
    return fashion_subset(tmp_path_factory.mktemp("seed") / "seed.npy", 128)


def _read_log(path: Path) -> list[dict]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


def _state(ckpt: Path) -> dict:
    return torch.load(ckpt, map_location="cpu", weights_only=True)


def test_pretrain_loss_falls_and_resume_is_bit_identical(seed_array, tmp_path):
    from mak.train.pretrain import load_model, pretrain

    src = array_source(seed_array)
    kw = dict(epochs=2, batch_size=32, base_lr=1.0, seed=5, num_workers=0, progress=False)
    full = pretrain(src, tmp_path / "full", **kw)
    assert full == tmp_path / "full" / "checkpoint.pt"
    log = _read_log(tmp_path / "full" / "log.csv")
    assert [int(r["epoch"]) for r in log] == [1, 2]
    assert float(log[1]["loss"]) < float(log[0]["loss"])
    assert all(float(r["images_per_s"]) > 0 for r in log)

    # interrupted after one epoch, then resumed
    part = pretrain(src, tmp_path / "split", stop_after=1, **kw)
    assert _state(part)["epoch"] == 1
    with pytest.raises(MakError, match="--resume"):
        pretrain(src, tmp_path / "split", **kw)
    pretrain(src, tmp_path / "split", resume=True, **kw)
    a, b = _state(full), _state(tmp_path / "split" / "checkpoint.pt")
    assert a["epoch"] == b["epoch"] == 2
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k, v in a["optimizer"]["state"].items():
        assert torch.equal(v["momentum_buffer"], b["optimizer"]["state"][k]["momentum_buffer"])
    assert a["log"][1]["loss"] == b["log"][1]["loss"]
    # a kill between the last checkpoint and its log.csv: the resume that finds the run finished
    # brings log.csv in line with the checkpoint
    (tmp_path / "split" / "log.csv").write_text("epoch,loss,lr,images_per_s\n1,9.0,0.1,1.0\n")
    pretrain(src, tmp_path / "split", resume=True, **kw)
    rows = _read_log(tmp_path / "split" / "log.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert [float(r["loss"]) for r in rows] == [float(f"{r['loss']:.6f}") for r in b["log"]]
    import zipfile  # records are named after no temporary file: the same names in every checkpoint

    assert {n.split("/")[0] for n in zipfile.ZipFile(full).namelist()} == {"archive"}

    # the checkpoint rebuilds the model for embed/evaluate
    model, cfg = load_model(full)
    assert cfg["image_size"] == 28 and cfg["channels"] == 1 and cfg["backbone"]
    assert not model.training
    with torch.no_grad():
        f, z = model(torch.zeros(2, 1, 28, 28))
    assert f.shape == (2, model.feat_dim) and z.shape[0] == 2

    # a resume with different settings is refused
    with pytest.raises(MakError, match="batch_size"):
        pretrain(src, tmp_path / "split", resume=True, **{**kw, "batch_size": 16})


def test_streamed_seed_set_trains_like_the_cached_one(seed_array, tmp_path, monkeypatch):
    """Seed sets too large for the in-memory cache stream through DataLoader workers: same batches."""
    import mak.train.pretrain as P

    src = array_source(seed_array)
    kw = dict(epochs=1, batch_size=64, seed=1, progress=False)
    cached = P.pretrain(src, tmp_path / "cached", num_workers=0, **kw)
    monkeypatch.setattr(P, "CACHE_BYTES", 0)
    streamed = P.pretrain(src, tmp_path / "streamed", num_workers=1, **kw)
    a, b = _state(cached), _state(streamed)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_unreadable_seed_image_fails_before_training(tmp_path):
    from PIL import Image

    from mak.data.sources import FolderSource
    from mak.train.pretrain import pretrain

    d = tmp_path / "imgs"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray((rng.random((20, 20, 3)) * 255).astype(np.uint8)).save(d / f"{i}.png")
    (d / "3.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(MakError, match="3.png"):
        pretrain(FolderSource(d), tmp_path / "out", epochs=1, batch_size=4, num_workers=0, progress=False)
    assert not (tmp_path / "out" / "checkpoint.pt").exists()


def test_unreadable_checkpoint_is_one_line_error(tmp_path):
    from mak.train.pretrain import load_model

    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes(b"this is not a checkpoint")
    with pytest.raises(MakError, match="checkpoint.pt"):
        load_model(bad)
    with pytest.raises(MakError, match="not found"):
        load_model(tmp_path / "missing.pt")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(MakError, match="not a mak"):
        load_model(tmp_path / "other.pt")


def test_cli_pretrain_and_errors(seed_array, tmp_path, cli, capsys):
    out = tmp_path / "run"
    assert cli("pretrain", "--array", seed_array, "--epochs", "1", "--batch-size", "64", "--out", out,
               "--workers", "0", "--no-progress") == 0
    assert (out / "checkpoint.pt").is_file() and (out / "log.csv").is_file()
    err = capsys.readouterr().err  # --no-progress hides the bar, not the summary
    assert err.startswith("mak pretrain: 128 images 1x28x28, backbone smallconv, batch 64 x 2 steps/epoch")
    assert cli("pretrain", "--array", seed_array, "--epochs", "1", "--batch-size", "64", "--out", tmp_path / "q",
               "--workers", "0", "-q") == 0
    assert capsys.readouterr() == ("", "")
    assert cli("pretrain", "--array", seed_array, "--epochs", "1", "--batch-size", "1000", "--out",
               tmp_path / "x", "--no-progress") == 2
    err = capsys.readouterr().err
    assert "batch-size" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit):
        cli("pretrain", "--help")
    assert "--resume" in capsys.readouterr().out


def test_cli_pretrain_mixes_a_pool_sample_into_the_seed(seed_array, tmp_path, cli, capsys):
    from PIL import Image

    from mak.data.sources import pool_mix_rows
    from mak.train.pretrain import read_checkpoint

    pool = tmp_path / "pool"
    pool.mkdir()
    rng = np.random.default_rng(1)
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)).save(pool / f"{i:02d}.png")
    out = tmp_path / "mixed"
    assert cli("pretrain", "--array", seed_array, "--mix-folder", pool, "--mix-count", "5", "--epochs", "1",
               "--batch-size", "64", "--out", out, "--workers", "0", "--no-progress", "--seed", "3") == 0
    cfg = read_checkpoint(out / "checkpoint.pt")["config"]
    n_seed = len(np.load(seed_array))
    assert cfg["num_images"] == n_seed + 5
    assert cfg["source"]["kind"] == "combined" and cfg["source"]["pool_rows"] == 5
    assert len(pool_mix_rows(12, n_seed, 5, 3)) == 5
    capsys.readouterr()
    assert cli("pretrain", "--array", seed_array, "--mix-count", "5", "--out", tmp_path / "y", "--no-progress") == 2
    assert "--mix-split or --mix-folder" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="2"):
        cli("pretrain", "--array", seed_array, "--mix-folder", pool, "--mix-count", "lots", "--out",
            tmp_path / "z", "--no-progress")
    err = capsys.readouterr().err
    assert "--mix-count: 'lots' must be an integer >= 0 or 'auto'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "y").exists() and not (tmp_path / "z").exists()
    # a pool image that cannot be decoded is left out of the sample and counted, not an error
    (pool / "03.png").write_bytes(b"garbage")
    (pool / "07.png").write_bytes(b"\x89PNG\r\n\x1a\ntruncated")
    assert cli("pretrain", "--array", seed_array, "--mix-folder", pool, "--epochs", "1", "--batch-size", "64",
               "--out", tmp_path / "bad", "--workers", "0", "--no-progress") == 0
    cfg = read_checkpoint(tmp_path / "bad" / "checkpoint.pt")["config"]
    assert cfg["num_images"] == n_seed + 10 and cfg["source"]["pool_skipped"] == 2
    err = capsys.readouterr().err
    assert "left out 2 unreadable pool images (first: " in err and "03.png" in err
    # none readable (e.g. paths relative to another root): an error, not a seed-only model
    split = tmp_path / "picked.txt"
    split.write_text("".join(f"images/{i:02d}.png\n" for i in range(12)))
    assert cli("pretrain", "--array", seed_array, "--mix-split", split, "--epochs", "1", "--out", tmp_path / "none",
               "--workers", "0", "--no-progress") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "none of the 12 sampled pool images of split:picked.txt is readable" in err
    assert not (tmp_path / "none").exists()
    split.write_text("".join(f"pool/{i:02d}.png\n" for i in (0, 1, 2, 4)))  # with the root they resolve
    assert cli("pretrain", "--array", seed_array, "--mix-split", split, "--mix-root", tmp_path, "--epochs", "1",
               "--batch-size", "64", "--out", tmp_path / "rooted", "--workers", "0", "--no-progress") == 0
    assert read_checkpoint(tmp_path / "rooted" / "checkpoint.pt")["config"]["num_images"] == n_seed + 4


# bf16 keeps 8 significant bits: a rounding moves a value by up to one step, 2**-8 of itself. Two
# processes compute the same products on half batches, where oneDNN may block (and so round) a sum
# differently, so an activation can land one bf16 step away. The loss (forward only) then agrees to
# about one bf16 step of its own size. A weight update goes through every bf16-rounded product of
# the network twice (forward and backward): its relative L2 difference is bounded by two steps per
# rounding on that path, 2 x 2 x (conv + linear layers) x 2**-8 (0.19 for smallconv's 6 layers).
BF16_STEP = 2.0 ** -8


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_ddp_pretrain_two_processes_matches_one(tmp_path, precision):
    """2 gloo processes: global negatives + synced BatchNorm give the single-process step.

    One optimizer step (64 images, batch 64): early SimCLR training amplifies rounding
    differences (even 1 vs 2 threads), so only the first step is compared tightly: float32 to
    1e-4; bf16 autocast (native or emulated, on every CPU) to bf16's rounding (``BF16_STEP``).
    """
    from mak.train.models import SimCLRModel
    from mak.train.pretrain import pretrain

    arr = fashion_subset(tmp_path / "seed64.npy", 64)
    flag = "--no-amp" if precision == "float32" else "--amp"
    args = ["--epochs", "1", "--batch-size", "64", "--lr", "0.5", "--seed", "2", "--workers", "0", "--no-progress", flag]
    res = _torchrun(2, "pretrain", "--array", arr, "--out", tmp_path / "ddp", *args)
    assert res.returncode == 0, res.stderr[-3000:]
    ddp = _state(tmp_path / "ddp" / "checkpoint.pt")
    assert ddp["config"]["world_size"] == 2 and ddp["epoch"] == 1 and ddp["config"]["amp"] == precision
    assert (tmp_path / "ddp" / "log.csv").is_file()

    pretrain(array_source(arr), tmp_path / "one", epochs=1, batch_size=64, base_lr=0.5, seed=2,
             num_workers=0, progress=False, amp=precision != "float32")
    one = _state(tmp_path / "one" / "checkpoint.pt")
    assert one["config"]["amp"] == precision
    loss_ddp, loss_one = ddp["log"][0]["loss"], one["log"][0]["loss"]
    if precision == "float32":
        assert abs(loss_ddp - loss_one) < 1e-4
        for k, v in one["model"].items():
            if v.is_floating_point():
                assert torch.allclose(ddp["model"][k], v, atol=1e-4, rtol=1e-4), k
        return
    assert abs(loss_ddp - loss_one) <= BF16_STEP * abs(loss_one)
    torch.manual_seed(2)  # the initial weights, built as pretrain builds them
    init = SimCLRModel(one["config"]["backbone"], int(one["config"]["channels"]))
    layers = sum(isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) for m in init.modules())
    w0 = init.state_dict()
    for k, v in one["model"].items():
        if v.is_floating_point() and "running" not in k:
            step_one, step_ddp = (v - w0[k]).double(), (ddp["model"][k] - w0[k]).double()
            assert (step_ddp - step_one).norm() <= 4 * layers * BF16_STEP * step_one.norm(), k


def test_pretrain_starts_from_pretrained_backbone_weights(seed_array, tmp_path):
    """--weights: the backbone starts from a saved state dict (prefixes stripped, head and classifier
    tensors left out); lr 0 keeps it exactly; the hash keys the run; bad files are one-line errors."""
    from mak.train.pretrain import pretrain

    src = array_source(seed_array)
    kw = dict(epochs=1, batch_size=32, seed=5, num_workers=0, progress=False)
    donor = _state(pretrain(src, tmp_path / "donor", base_lr=1.0, **kw))["model"]
    weights = {f"module.{k}": v for k, v in donor.items()}  # as a DDP-wrapped model saves them
    weights["classifier.weight"] = torch.zeros(3, 3)
    torch.save(weights, tmp_path / "w.pt")
    got = _state(pretrain(src, tmp_path / "init", base_lr=0.0, weights=tmp_path / "w.pt", **kw))
    for k, v in donor.items():
        if k.startswith("backbone.") and "running" not in k and "num_batches" not in k:
            assert torch.equal(got["model"][k], v), k
    loaded = got["config"]["init_weights_loaded"]
    assert loaded["unused"] >= 1 and loaded["loaded"] > 0 and len(got["config"]["init_weights"]) == 64
    with pytest.raises(MakError, match="resume"):  # another weights file is another run
        torch.save({"backbone." + k: v for k, v in donor.items() if k.startswith("backbone.")}, tmp_path / "v.pt")
        pretrain(src, tmp_path / "init", base_lr=0.0, weights=tmp_path / "v.pt", resume=True, **{**kw, "epochs": 2})
    torch.save({"something.else": torch.zeros(2)}, tmp_path / "bad.pt")
    with pytest.raises(MakError, match="none of its 1 tensors"):
        pretrain(src, tmp_path / "bad", weights=tmp_path / "bad.pt", **kw)
    first = next(k for k in donor if k.startswith("backbone.") and donor[k].ndim == 4)
    torch.save({first: torch.zeros(1, 1, 1, 1)}, tmp_path / "shape.pt")
    with pytest.raises(MakError, match="has shape"):
        pretrain(src, tmp_path / "shape", weights=tmp_path / "shape.pt", **kw)
    for name, content in (("junk.pt", b"not a checkpoint"), ("empty.pt", b"")):  # torch's EOFError('') too
        (tmp_path / name).write_bytes(content)
        with pytest.raises(MakError, match=f"{name}: unreadable weights"):
            pretrain(src, tmp_path / "junk", weights=tmp_path / name, **kw)


def test_default_batch_is_the_one_mak_run_takes_for_a_small_set(tmp_path):
    """By hand (no batch size) and in `mak run` (its 256 capped to the set) a 127-image seed trains in one batch of 126."""
    from mak.data.sources import ArraySource
    from mak.run.stages import _pretrain_kwargs
    from mak.train.pretrain import pretrain, read_checkpoint

    np.save(tmp_path / "s.npy", np.random.default_rng(0).integers(0, 255, (127, 8, 8), dtype=np.uint8))
    ckpt = pretrain(ArraySource(tmp_path / "s.npy"), tmp_path / "run", epochs=1, num_workers=0, progress=False)
    by_hand = read_checkpoint(ckpt)["config"]["batch_size"]
    params = {"batch_size": 256, "backbone": None, "epochs": 1, "lr": 0.5, "warmup_epochs": None, "seed": 0,
              "image_size": None, "device": "cpu", "amp": None, "channels_last": None, "workers": 0}
    assert by_hand == _pretrain_kwargs(params, 127)["batch_size"] == 126
