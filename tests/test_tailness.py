"""ECLE against a plainly written reference."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

import mak
from mak.train.losses import nt_xent_per_sample
from mak.selection.tailness import batch_plan, partition_order


def ref_batch_loss(a: np.ndarray, b: np.ndarray, t: float) -> np.ndarray:
    """Per-image NT-Xent written straight from the definition, in float64 loops."""
    bsz = a.shape[0]
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    z = np.concatenate([a, b]).astype(np.float64)
    out = np.zeros(bsz)
    for i in range(bsz):
        for anchor, positive in ((i, i + bsz), (i + bsz, i)):
            den = sum(math.exp(z[anchor] @ z[k] / t) for k in range(2 * bsz) if k != anchor)
            out[i] += 0.5 * -math.log(math.exp(z[anchor] @ z[positive] / t) / den)
    return out


def ref_ecle(views: np.ndarray, t: float, batch_size: int, partitions: int, seed: int) -> np.ndarray:
    r, n, _ = views.shape
    total = np.zeros(n)
    count = np.zeros(n)
    for p in range(partitions if n > batch_size else 1):
        order = np.arange(n) if n <= batch_size else partition_order(n, seed, p).numpy()
        scored = np.zeros(n, dtype=bool)
        starts = list(range(0, n, batch_size))
        for s in starts:
            rows = order[s : s + batch_size]
            if len(rows) < batch_size and n > batch_size:
                rows = order[n - batch_size :]  # last batch overlaps the previous one
            for a, b in itertools.combinations(range(r), 2):
                loss = ref_batch_loss(views[a, rows], views[b, rows], t)
                for j, row in enumerate(rows):
                    if not scored[row]:
                        total[row] += loss[j]
                        count[row] += 1
            scored[rows] = True
    return total / count


def test_nt_xent_per_sample_matches_reference(rng):
    a, b = rng.normal(size=(2, 7, 5))
    got = nt_xent_per_sample(torch.tensor(a), torch.tensor(b), 0.2).numpy()
    np.testing.assert_allclose(got, ref_batch_loss(a, b, 0.2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("r", [2, 3, 4])
def test_ecle_full_batch_matches_reference(rng, r):
    views = rng.normal(size=(r, 20, 6)).astype(np.float32)
    got = mak.ecle(views, temperature=0.2, batch_size=64, partitions=3, seed=5)
    np.testing.assert_allclose(got, ref_ecle(views, 0.2, 64, 3, 5), rtol=1e-5, atol=1e-5)


def test_ecle_full_batch_independent_of_seed(rng):
    views = rng.normal(size=(3, 30, 8)).astype(np.float32)
    a = mak.ecle(views, batch_size=30, seed=0)
    b = mak.ecle(views, batch_size=100, seed=99)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("n,bs", [(23, 5), (20, 5), (11, 10), (9, 2)])
def test_ecle_batching_rule_matches_reference(rng, n, bs):
    views = rng.normal(size=(3, n, 4)).astype(np.float32)
    got = mak.ecle(views, temperature=0.5, batch_size=bs, partitions=2, seed=3)
    np.testing.assert_allclose(got, ref_ecle(views, 0.5, bs, 2, 3), rtol=1e-5, atol=1e-5)


def test_batch_plan_covers_every_position_once():
    for n in range(1, 40):
        for bs in range(2, 12):
            plan = batch_plan(n, bs)
            scored = np.concatenate([np.arange(first, hi) for lo, hi, first in plan])
            assert sorted(scored.tolist()) == list(range(n))
            assert all(hi - lo == min(bs, n) for lo, hi, _ in plan)


def test_ecle_torch_input_and_seed_changes_batches(rng):
    views = rng.normal(size=(2, 50, 8)).astype(np.float32)
    a = mak.ecle(torch.from_numpy(views), batch_size=10, partitions=2, seed=0)
    b = mak.ecle(views, batch_size=10, partitions=2, seed=0)
    c = mak.ecle(views, batch_size=10, partitions=2, seed=1)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(b, c)


def test_ecle_small_temperature_is_finite(rng):
    views = rng.normal(size=(2, 40, 8)).astype(np.float32)
    got = mak.ecle(views, temperature=0.01, batch_size=40)
    ref = ref_ecle(views, 0.01, 40, 1, 0)
    np.testing.assert_allclose(got, ref, rtol=1e-4)


def test_ecle_unstable_images_score_higher(rng):
    # A model that has not learned an image maps its augmentations far apart: high loss.
    base = rng.normal(size=(100, 16))
    noise = np.where(np.arange(100)[:, None] < 90, 0.05, 1.0)
    views = np.stack([base + noise * rng.normal(size=base.shape) for _ in range(4)]).astype(np.float32)
    e = mak.ecle(views, batch_size=32, partitions=4)
    assert e[90:].min() > e[:90].max()


def test_ecle_rejects_single_view(rng):
    with pytest.raises(mak.MakError, match="at least 2"):
        mak.ecle(rng.normal(size=(1, 10, 4)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gram_block_and_block_row_sums_agree(rng, dtype):
    # the CPU path (one B x B block at a time) and the GPU path (a block row of G batches per
    # matmul) form the same sums; they differ only in the order of float additions
    from mak._tensor import l2_normalize
    from mak.selection.tailness import _block_row_sums, _block_sums

    z = l2_normalize(torch.from_numpy(rng.normal(size=(3 * 4 * 9, 6))).to(dtype)).view(3, 4, 9, 6)
    s_block, pos_block = _block_sums(z, 5.0)
    s_row, pos_row = _block_row_sums(z, 5.0)
    torch.testing.assert_close(s_row, s_block, rtol=1e-6, atol=0)
    torch.testing.assert_close(pos_row, pos_block, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("group", [1, 2, 3, 7])
def test_grouped_device_loop_matches_host_loop(rng, group):
    # the loop for views resident on a GPU scores `group` batches per call, across orderings,
    # with the overlapping last batch and batches owned by another rank skipped
    from tqdm import tqdm

    from mak.selection.tailness import _ecle_sum_resident, ecle_sum

    views = rng.normal(size=(3, 23, 5)).astype(np.float32)
    owner = lambda p, k: (p + k) % 3 != 1  # noqa: E731
    host, terms = ecle_sum(views, batch_size=5, partitions=3, seed=4, owner=owner)
    acc = torch.zeros(23, dtype=torch.float64)
    with tqdm(disable=True) as bar:
        _ecle_sum_resident(torch.from_numpy(views), acc, 0.2, 5, 3, 4, owner, bar, group=group)
    np.testing.assert_allclose(acc.numpy(), host, rtol=1e-6)
    assert terms == 3 * 3
