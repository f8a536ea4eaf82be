"""CUDA paths: the same results on a GPU as on the CPU, mixed precision, DDP on one GPU.

Most tests need a CUDA device and are skipped without one (CI has none); they are run on a GPU
machine with ``python -m pytest tests/test_cuda.py`` (see ``benchmarks/device_check.sh``). The
device-choice tests at the top run everywhere.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import torchrun as _torchrun

from mak._tensor import auto_device
from mak.errors import MakError

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# -- device choice (everywhere) -------------------------------------------------------------------

def test_auto_device_follows_cuda_availability():
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert auto_device("auto").type == want
    assert auto_device(None).type == want
    assert auto_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("name", ["tpu", "mps", "cuda:x", "meta", "cpu cuda"])
def test_a_device_mak_does_not_run_on_is_named(name, tmp_path, cli, capsys):
    with pytest.raises(MakError, match=f"--device {name}: expected auto, cpu, cuda or cuda:N"):
        auto_device(name)
    np.save(tmp_path / "seed.npy", np.eye(4, 8, dtype=np.float32))
    with pytest.raises(SystemExit, match="2"):  # the flag's declaration (mak.options.DEVICE), when parsed
        cli("select", "--pool-store", tmp_path / "seed.npy", "--budget", "2", "--strategy", "kcenter",
            "--device", name, "--out", tmp_path / "o", "-q")
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"argument --device: '{name}' must be auto, cpu, cuda or cuda:N" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_cuda_request_without_cuda_is_a_clear_error(tmp_path, cli, capsys):
    with pytest.raises(MakError, match="no CUDA device"):
        auto_device("cuda")
    arr = tmp_path / "a.npy"
    np.save(arr, np.zeros((8, 28, 28), np.uint8))
    assert cli("pretrain", "--array", arr, "--out", tmp_path / "o", "--device", "cuda", "--epochs", "1",
               "--no-progress") == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "o" / "checkpoint.pt").exists()


def test_dist_backend_override(monkeypatch):
    from mak import distributed as D

    monkeypatch.delenv("MAK_DIST_BACKEND", raising=False)
    assert D.backend_for("cpu") == "gloo"
    monkeypatch.setenv("MAK_DIST_BACKEND", "GLOO")
    assert D.backend_for("cpu") == "gloo"
    monkeypatch.setenv("MAK_DIST_BACKEND", "mpi")
    with pytest.raises(MakError, match="MAK_DIST_BACKEND"):
        D.backend_for("cpu")


# -- kernels: GPU against CPU ---------------------------------------------------------------------

@cuda
@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32), (3, 96)])
def test_augment_cuda_matches_cpu(channels, size):
    from mak.train.augment import SimCLRAugment, view_key

    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (48, channels, size + 4, size), generator=g, dtype=torch.uint8)
    keys = view_key(3, 1, torch.arange(48))
    aug = SimCLRAugment(size, channels)
    a = aug(imgs, keys)
    b = aug(imgs.cuda(), keys.cuda()).cpu()
    assert b.shape == a.shape and b.dtype == torch.float32
    diff = (a - b).abs()
    assert diff.max() < 2e-2 and diff.mean() < 1e-3, (diff.max(), diff.mean())
    # an image's view does not depend on the rest of its batch on the GPU either
    part = aug(imgs[5:17].cuda(), keys[5:17].cuda()).cpu()
    assert torch.allclose(part, b[5:17], atol=1e-5)


@cuda
def test_nt_xent_and_ecle_cuda_match_cpu():
    from mak.train.losses import nt_xent_per_sample
    from mak.selection.tailness import ecle

    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(64, 16, generator=g), torch.randn(64, 16, generator=g)
    ref = nt_xent_per_sample(a, b, 0.2)
    got = nt_xent_per_sample(a.cuda(), b.cuda(), 0.2).cpu()
    assert torch.allclose(got, ref, atol=1e-5, rtol=1e-5)
    views = np.random.default_rng(2).standard_normal((4, 700, 32)).astype(np.float32)  # (R, N, D)
    e_cpu = ecle(views, batch_size=128, partitions=3, seed=5, device="cpu")
    e_gpu = ecle(views, batch_size=128, partitions=3, seed=5, device="cuda")
    np.testing.assert_allclose(e_gpu, e_cpu, rtol=1e-4, atol=1e-5)
    # views already on the GPU take the device-resident loop (orderings, sorts, scatter-adds there),
    # with an overlapping last batch (700 = 5 x 128 + 60) and partial ownership
    vt = torch.from_numpy(views).cuda()
    np.testing.assert_allclose(ecle(vt, batch_size=128, partitions=3, seed=5), e_cpu, rtol=1e-4, atol=1e-5)
    from mak.selection.tailness import ecle_sum

    own = lambda p, k: (p + k) % 2 == 0  # noqa: E731
    a_cpu, t_cpu = ecle_sum(views, batch_size=128, partitions=3, seed=5, device="cpu", owner=own)
    a_gpu, t_gpu = ecle_sum(vt, batch_size=128, partitions=3, seed=5, owner=own)
    assert t_cpu == t_gpu
    np.testing.assert_allclose(a_gpu, a_cpu, rtol=1e-4, atol=1e-4)


@cuda
def test_kcenter_and_proximity_cuda_match_cpu():
    from mak.selection.kcenter import kcenter_greedy
    from mak.selection.proximity import proximity

    rng = np.random.default_rng(3)
    pool = rng.standard_normal((3000, 32)).astype(np.float32)
    seed = rng.standard_normal((200, 32)).astype(np.float32)
    p_cpu = kcenter_greedy(pool, 100, init=seed, device="cpu")
    p_gpu = kcenter_greedy(pool, 100, init=seed, device="cuda")
    assert np.array_equal(p_cpu, p_gpu)
    d_cpu = proximity(seed, pool, clusters=10, seed=0, device="cpu")
    d_gpu = proximity(seed, pool, clusters=10, seed=0, device="cuda")
    np.testing.assert_allclose(d_gpu, d_cpu, atol=1e-4)


@cuda
def test_cosine_topk_and_seed_share_cuda_equal_cpu_bit_for_bit():
    """The k neighbours are exact and canonical (mak._neighbours), so the GPU finds the same rows,
    near-ties and exact ties included, and the seed share is the same to the bit."""
    from mak._neighbours import cosine_topk
    from mak.selection.robust import seed_share

    rng = np.random.default_rng(5)
    base = rng.standard_normal((400, 64)).astype(np.float32)
    nudged = base.copy()
    nudged[:, 0] = np.nextafter(nudged[:, 0], np.float32(np.inf))
    bank = np.concatenate([base, base[::2] * np.float32(4), nudged, rng.standard_normal((3000, 64)).astype(np.float32)])
    queries = np.concatenate([base[:300] + np.float32(1e-3) * rng.standard_normal((300, 64)).astype(np.float32),
                              rng.standard_normal((700, 64)).astype(np.float32)])
    runs = {dev: [i.cpu().numpy() for *_, i in cosine_topk(queries, bank, 20, device=dev, chunk=256)]
            for dev in ("cpu", "cuda")}
    got = {dev: np.concatenate(parts) for dev, parts in runs.items()}
    assert np.array_equal(np.sort(got["cpu"], axis=1), np.sort(got["cuda"], axis=1))
    seed, ref = bank[:600], bank[600:]
    shares = [seed_share(queries, seed, ref, k=20, device=dev) for dev in ("cpu", "cuda")]
    assert np.array_equal(shares[0], shares[1])


@cuda
def test_ratio_ensemble_cuda_batched_matches_cpu():
    from mak.selection.robust.density_ratio import ratio_ensemble, ratio_logits

    rng = np.random.default_rng(4)
    seed = (rng.standard_normal((400, 16)) + 0.5).astype(np.float32)
    pool = rng.standard_normal((2500, 16)).astype(np.float32)
    kw = dict(bags=2, folds=3, hidden=32, epochs=3, seed=1)
    own = np.arange(len(pool))
    cpu = ratio_logits(pool, seed, pool, self_index=own, models=ratio_ensemble(seed, pool, device="cpu", **kw))
    gpu_models = ratio_ensemble(seed, pool, device="cuda", **kw)  # one batched model of 6 fits
    gpu = ratio_logits(pool, seed, pool, self_index=own, models=gpu_models)
    np.testing.assert_allclose(gpu, cpu, atol=1e-3)
    again = ratio_logits(pool, seed, pool, self_index=own, models=ratio_ensemble(seed, pool, device="cuda", **kw))
    np.testing.assert_array_equal(again, gpu)


# -- pretrain / embed / select on the GPU ---------------------------------------------------------

@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("cuda")
    rng = np.random.default_rng(0)
    # two kinds of images (bright blobs, dark stripes) so SimCLR has something to learn
    x = np.zeros((256, 28, 28), np.uint8)
    yy, xx = np.mgrid[:28, :28]
    for i in range(256):
        if i % 2:
            cy, cx = rng.integers(6, 22, 2)
            x[i] = (255 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 20.0)).astype(np.uint8)
        else:
            x[i] = ((np.sin(xx * rng.uniform(0.3, 1.2)) > 0) * rng.integers(60, 200)).astype(np.uint8)
    np.save(d / "img.npy", x)
    return d / "img.npy"


@cuda
def test_pretrain_cuda_amp_loss_falls_and_resume(images, tmp_path):
    from mak.data.sources import ArraySource
    from mak.train.pretrain import pretrain, read_checkpoint

    kw = dict(epochs=4, batch_size=64, num_workers=0, progress=False, device="cuda", seed=1)
    ck = pretrain(ArraySource(images), tmp_path / "full", **kw)
    state = read_checkpoint(ck)
    losses = [row["loss"] for row in state["log"]]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    assert state["config"]["amp"] in ("bfloat16", "float16"), state["config"]
    pretrain(ArraySource(images), tmp_path / "part", stop_after=2, **kw)
    ck2 = pretrain(ArraySource(images), tmp_path / "part", resume=True, **kw)
    a, b = read_checkpoint(ck)["model"], read_checkpoint(ck2)["model"]
    # cuDNN's kernels are not bit-deterministic by default: close, not identical
    for k, v in a.items():
        if v.is_floating_point():
            assert torch.allclose(v, b[k], atol=5e-2, rtol=5e-2), k


@cuda
def test_embed_cuda_matches_cpu_and_select_cuda(images, tmp_path, cli):
    from mak.data.sources import ArraySource
    from mak.train.embed import embed
    from mak.train.pretrain import pretrain
    from mak.data.store import open_store

    ck = pretrain(ArraySource(images), tmp_path / "pt", epochs=1, batch_size=64, num_workers=0,
                  progress=False, device="cpu")
    kw = dict(views=3, num_workers=0, progress=False, dtype="float32", amp=False)
    np.save(tmp_path / "seed.npy", np.load(images)[:64])
    embed(ArraySource(tmp_path / "seed.npy"), ck, tmp_path / "seed", device="cpu", **kw)
    embed(ArraySource(images), ck, tmp_path / "cpu", device="cpu", **kw)
    embed(ArraySource(images), ck, tmp_path / "gpu", device="cuda", batch_size=64, **kw)
    embed(ArraySource(images), ck, tmp_path / "gpu2", device="cuda", batch_size=100, **kw)
    embed(ArraySource(images), ck, tmp_path / "bf16", device="cuda", views=3, num_workers=0, progress=False,
          dtype="float32")
    c, g, g2, h = (open_store(tmp_path / n) for n in ("cpu", "gpu", "gpu2", "bf16"))
    assert c.items == g.items == h.items
    scale = np.abs(c.features()).max()
    assert np.abs(g.features() - c.features()).max() < 1e-3 * scale
    assert np.abs(g.views() - c.views()).max() < 5e-2 * np.abs(c.views()).max()
    # batch size changes cuDNN's choice of kernels (TF32 by default for convolutions): equal up
    # to rounding on GPUs, bit-identical only on CPUs (test_embed)
    batch_diff = np.abs(g.features() - g2.features()).max() / scale
    print(f"embed on CUDA, batch 64 vs 100: max relative difference {batch_diff:.2e}")
    assert batch_diff < 5e-3
    assert np.abs(h.features() - c.features()).max() < 5e-2 * scale  # bf16 autocast
    # selection on the GPU: the same scores up to float rounding; the picks may part at near-ties
    # (bit-identical selections are promised per device, not across devices)
    for i, dev in enumerate(("cpu", "cuda", "cuda")):
        assert cli("select", "--seed-store", tmp_path / "seed", "--pool-store", tmp_path / "cpu", "--budget", "20",
                   "--strategy", "mak", "--device", dev, "--out", tmp_path / f"sel{i}", "--no-progress") == 0
    cols = [np.genfromtxt(tmp_path / f"sel{i}" / "scores.csv", delimiter=",", skip_header=1, usecols=(2, 3, 4))
            for i in range(3)]
    np.testing.assert_allclose(cols[1], cols[0], rtol=1e-4, atol=1e-4)
    picks = [set((tmp_path / f"sel{i}" / "selection.txt").read_text().splitlines()) for i in range(3)]
    print(f"select on CUDA vs CPU: {len(picks[0] & picks[1])} of 20 picks shared")
    assert len(picks[0] & picks[1]) >= 15
    # and on one device a fixed seed gives the identical selection
    assert (tmp_path / "sel1" / "selection.txt").read_bytes() == (tmp_path / "sel2" / "selection.txt").read_bytes()


@cuda
@pytest.mark.slow
def test_torchrun_two_processes_on_one_gpu(images, tmp_path):
    """DDP pretrain and sharded embed with 2 ranks sharing one GPU over gloo (NCCL needs one GPU
    per rank); the sharded store equals the single-process GPU store."""
    from mak.data.store import open_store

    env_backend = os.environ.get("MAK_DIST_BACKEND")
    os.environ["MAK_DIST_BACKEND"] = "gloo"
    try:
        res = _torchrun(2, "pretrain", "--array", images, "--out", tmp_path / "ddp", "--epochs", "2",
                        "--batch-size", "64", "--workers", "0", "--device", "cuda", "--no-progress")
        assert res.returncode == 0, res.stderr[-3000:]
        ck = tmp_path / "ddp" / "checkpoint.pt"
        common = ["--array", images, "--checkpoint", ck, "--views", "2", "--batch-size", "32", "--workers", "0",
                  "--no-progress", "--dtype", "float32", "--device", "cuda", "--no-amp"]
        res = _torchrun(2, "embed", *common, "--out", tmp_path / "merged")
        assert res.returncode == 0, res.stderr[-3000:]
    finally:
        if env_backend is None:
            os.environ.pop("MAK_DIST_BACKEND", None)
        else:
            os.environ["MAK_DIST_BACKEND"] = env_backend
    res = subprocess.run([sys.executable, "-m", "mak", "embed", *map(str, common), "--out", tmp_path / "single"],
                         capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    m, s = open_store(tmp_path / "merged"), open_store(tmp_path / "single")
    assert m.items == s.items
    assert np.allclose(m.features(), s.features(), atol=1e-4)
    assert np.allclose(m.views(), s.views(), atol=1e-4)


@cuda
@pytest.mark.skipif(torch.cuda.device_count() > 1, reason="checks the one-GPU NCCL error")
def test_nccl_with_more_ranks_than_gpus_is_a_clear_error(images, tmp_path):
    env_backend = os.environ.pop("MAK_DIST_BACKEND", None)
    try:
        res = _torchrun(2, "pretrain", "--array", images, "--out", tmp_path / "x", "--epochs", "1",
                        "--workers", "0", "--device", "cuda", "--no-progress", timeout=120)
    finally:
        if env_backend is not None:
            os.environ["MAK_DIST_BACKEND"] = env_backend
    assert res.returncode != 0
    assert "NCCL needs one GPU per process" in res.stderr
    assert not (tmp_path / "x" / "checkpoint.pt").exists()
