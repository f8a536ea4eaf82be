"""The same selection whatever the thread count: 1 vs 2 intra-op threads, torchrun with OMP_NUM_THREADS unset or 2.

BLAS splits large reductions (a gradient product over a 1,024-row batch) across threads, so any
float32 sum computed on the caller's threads can change with ``OMP_NUM_THREADS``. The stores here
are large enough that robust's seed-vs-pool classifier trains on full 1,024-row batches.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mak.selection.robust.density_ratio import train_ratio_model
from mak.data.store import write_store

OUTPUTS = ("selection.txt", "scores.csv")


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("threads")
    rng = np.random.default_rng(11)
    centers = rng.normal(size=(6, 32))
    seed_cls = rng.choice(6, size=240, p=[0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
    seed = centers[seed_cls] + 0.6 * rng.normal(size=(240, 32))
    n_in = 1300
    pool_in = centers[rng.integers(0, 6, size=n_in)] + 0.6 * rng.normal(size=(n_in, 32))
    junk = 2.0 * rng.normal(size=(1200, 32))
    pool = np.concatenate([pool_in, junk])[rng.permutation(n_in + 1200)]
    views = rng.normal(size=(3, pool.shape[0], 16))
    write_store(root / "seed", seed.astype(np.float32), [f"seed/{i}.png" for i in range(240)])
    write_store(root / "pool", pool.astype(np.float16), [f"pool/{i}.png" for i in range(pool.shape[0])],
                views=views.astype(np.float16))
    return root


def _select(root: Path, out: str, strategy: str, threads: str | None, nproc: int = 0) -> Path:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("OMP_NUM_THREADS", None)
    if threads is not None:
        env["OMP_NUM_THREADS"] = threads
    args = ["select", "--seed-store", "seed", "--pool-store", "pool", "--strategy", strategy, "--budget", "200",
            "--seed", "3", "--no-progress", "--out", out]
    if strategy == "robust":  # 25 fits (5 bags x 5 folds) of 15 epochs: each still sums 1,024-row batches
        args += ["--ratio-epochs", "15"]
    launcher = [sys.executable, "-m"] if not nproc else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m"]
    res = subprocess.run([*launcher, "mak", *args], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    return root / out


def _same(a: Path, b: Path) -> None:
    for name in OUTPUTS:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["robust", "mak"])
def test_one_and_two_threads_give_the_same_bytes(stores, strategy):
    _same(_select(stores, f"{strategy}-t1", strategy, "1"), _select(stores, f"{strategy}-t2", strategy, "2"))


@pytest.mark.slow
def test_torchrun_with_any_thread_setting_gives_one_process_bytes(stores):
    one = stores / "robust-t2"
    if not one.is_dir():
        one = _select(stores, "robust-t2", "robust", "2")
    _same(one, _select(stores, "robust-tr-unset", "robust", None, nproc=2))
    _same(one, _select(stores, "robust-tr-2", "robust", "2", nproc=2))


def test_classifier_weights_do_not_depend_on_the_thread_count():
    rng = np.random.default_rng(0)
    s = rng.normal(size=(300, 64)).astype(np.float32)
    p = rng.normal(0.3, 1.0, size=(2000, 64)).astype(np.float32)
    before = torch.get_num_threads()
    weights = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            model = train_ratio_model(s, p, epochs=3, seed=4)
            weights.append(torch.cat([t.flatten() for t in model.state_dict().values()]))
            assert torch.get_num_threads() == threads  # the caller's setting survives the fit
    finally:
        torch.set_num_threads(before)
    assert torch.equal(weights[0], weights[1])
