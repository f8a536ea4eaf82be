"""The chunked cosine top-k against a full sort, with the filtered merge on and off."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import mak._neighbours as nb


def unit(x: np.ndarray) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.from_numpy(x), dim=1)


def similarities(queries: np.ndarray, bank: np.ndarray) -> np.ndarray:
    return (unit(queries) @ unit(bank).T).numpy()


def full_sort(queries: np.ndarray, bank: np.ndarray, k: int, self_index=None) -> tuple[np.ndarray, np.ndarray]:
    """Slow reference: every similarity (float32, as the search computes them), sorted, the query's own row dropped."""
    q, b = unit(queries), unit(bank)
    vals, idx = [], []
    for i in range(len(queries)):
        sims = (q[i : i + 1] @ b.T)[0].numpy()  # the same float32 products as one row of a chunk
        order = [j for j in np.argsort(-sims, kind="stable") if self_index is None or j != self_index[i]][:k]
        vals.append(sims[order])
        idx.append(order)
    return np.array(vals), np.array(idx)


def search(queries, bank, k, **kw) -> tuple[np.ndarray, np.ndarray]:
    parts = list(nb.cosine_topk(queries, bank, k, **kw))
    assert [lo for lo, *_ in parts] == list(range(0, len(queries), kw.get("chunk", nb.CHUNK)))
    return np.concatenate([s.numpy() for *_, s, _ in parts]), np.concatenate([i.numpy() for *_, i in parts])


def close_to_reference(got: tuple[np.ndarray, np.ndarray], want: tuple[np.ndarray, np.ndarray], sims: np.ndarray):
    np.testing.assert_allclose(got[0], want[0], atol=1e-6)  # the same k values, largest first
    # each returned row holds the value the search reports for it, and no row twice
    np.testing.assert_allclose(np.take_along_axis(sims, got[1], axis=1), got[0], atol=1e-6)
    assert all(len(set(r)) == len(r) for r in got[1].tolist())


@pytest.mark.parametrize("filter_share", [4, 10**9])  # filtered merge, and the chunk's own top k only
@pytest.mark.parametrize("k", [1, 5, 12])
def test_matches_a_full_sort_over_many_bank_chunks(filter_share, k, monkeypatch):
    monkeypatch.setattr(nb, "FILTER_SHARE", filter_share)
    rng = np.random.default_rng(k)
    queries = rng.standard_normal((70, 6)).astype(np.float32)
    bank = rng.standard_normal((203, 6)).astype(np.float32)  # 13 chunks of 16, the last short
    want = full_sort(queries, bank, k)
    got = search(queries, bank, k, chunk=16)
    sims = similarities(queries, bank)
    close_to_reference(got, want, sims)
    np.testing.assert_array_equal(np.sort(got[1], axis=1), np.sort(want[1], axis=1))  # no near-ties here


def test_filtered_merge_equals_the_top_k_merge_with_exact_ties_and_an_excluded_row(monkeypatch):
    rng = np.random.default_rng(3)
    base = rng.standard_normal((40, 5)).astype(np.float32)
    bank = np.concatenate([base, base[:25], base[10:30] * 3])  # exact duplicates, some scaled: tied similarities
    queries = np.concatenate([bank[::3], rng.standard_normal((20, 5)).astype(np.float32)])
    self_index = np.full(len(queries), -1)
    self_index[: len(bank[::3])] = np.arange(0, len(bank), 3)
    runs = {}
    for share in (4, 10**9):
        monkeypatch.setattr(nb, "FILTER_SHARE", share)
        runs[share] = search(queries, bank, 6, chunk=8, self_index=self_index)
    np.testing.assert_array_equal(runs[4][0], runs[10**9][0])  # the same values, bit for bit
    sims = similarities(queries, bank)
    for got in runs.values():
        close_to_reference(got, full_sort(queries, bank, 6, self_index), sims)
        assert not (got[1] == self_index[:, None]).any()  # the excluded row never comes back


def test_k_larger_than_a_bank_chunk_and_a_short_first_chunk():
    rng = np.random.default_rng(5)
    queries = rng.standard_normal((9, 4)).astype(np.float32)
    bank = rng.standard_normal((30, 4)).astype(np.float32)
    got = search(queries, bank, 20, chunk=8)  # the first chunks hold fewer than k rows
    want = full_sort(queries, bank, 20)
    np.testing.assert_allclose(got[0], want[0], atol=1e-6)
    np.testing.assert_array_equal(np.sort(got[1], axis=1), np.sort(want[1], axis=1))
