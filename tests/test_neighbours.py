"""The chunked cosine top-k against a full sort, with the filtered merge on and off."""
from __future__ import annotations

import math

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


# --------------------------------------------------------------------------- exact, canonical k rows


def exact_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Slow reference: the correctly rounded dot product of the float32 rows over their norms (math.fsum)."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    dot = math.fsum(a * b)  # float32 x float32 products are exact in float64
    na, nb = math.sqrt(math.fsum(a * a)), math.sqrt(math.fsum(b * b))
    return dot / (na * nb) if na and nb else 0.0


def exact_rows(queries: np.ndarray, bank: np.ndarray, k: int, self_index=None) -> list[list[int]]:
    """Slow reference: each query's k bank rows by (exact cosine, lower row first)."""
    out = []
    for i, q in enumerate(queries):
        keys = [(-exact_cosine(q, b), j) for j, b in enumerate(bank) if self_index is None or j != self_index[i]]
        out.append([j for _, j in sorted(keys)[:k]])
    return out


def near_tied(rng: np.random.Generator, n_base: int = 30, d: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Queries and a bank full of ties: exact duplicates, power-of-two multiples (the same unit row)
    and copies nudged by one float32 step in one entry (cosines apart by far less than float32 resolves)."""
    base = rng.standard_normal((n_base, d)).astype(np.float32)
    nudged = base.copy()
    nudged[:, 0] = np.nextafter(nudged[:, 0], np.float32(np.inf))
    bank = np.concatenate([base, base[::2] * np.float32(4), nudged, base[5:20], base[::3] * np.float32(0.5)])
    bank = bank[rng.permutation(len(bank))]
    queries = np.concatenate([base[:12] + np.float32(0.01) * rng.standard_normal((12, d)).astype(np.float32),
                              rng.standard_normal((25, d)).astype(np.float32)])
    return queries, bank


@pytest.mark.parametrize("k", [1, 4, 9])
def test_the_k_rows_are_the_exact_cosines_best_with_lower_rows_first(k):
    rng = np.random.default_rng(11 + k)
    queries, bank = near_tied(rng)
    got = search(queries, bank, k, chunk=7, bank_chunk=16)
    want = exact_rows(queries, bank, k)
    np.testing.assert_array_equal(np.sort(got[1], axis=1), np.sort(np.array(want), axis=1))
    cos = np.array([[exact_cosine(queries[i], bank[j]) for j in row] for i, row in enumerate(got[1])])
    assert np.abs(got[0] - cos).max() <= nb.tolerance(bank.shape[1])  # values: each row's similarity


def test_the_k_rows_do_not_depend_on_chunks_filtering_threads_or_excluded_rows(monkeypatch):
    rng = np.random.default_rng(4)
    queries, bank = near_tied(rng, d=24)
    queries = np.concatenate([queries, bank[::4]])  # some queries are bank rows, excluded from their own search
    self_index = np.full(len(queries), -1)
    self_index[-len(bank[::4]):] = np.arange(0, len(bank), 4)
    want = exact_rows(queries, bank, 5, self_index)
    threads = torch.get_num_threads()
    runs = []
    try:
        for chunk, bank_chunk, share, n_threads in [(1, 5, 4, 1), (3, 16, 4, 2), (64, 300, 4, 2), (16, 7, 10**9, 1),
                                                    (5, 11, 10**9, 2)]:
            monkeypatch.setattr(nb, "FILTER_SHARE", share)
            torch.set_num_threads(n_threads)
            runs.append(search(queries, bank, 5, chunk=chunk, bank_chunk=bank_chunk, self_index=self_index)[1])
    finally:
        torch.set_num_threads(threads)
    for got in runs:
        np.testing.assert_array_equal(np.sort(got, axis=1), np.sort(np.array(want), axis=1))


def test_a_pile_of_duplicates_is_cut_to_the_lowest_rows_while_searching(monkeypatch):
    """More tied rows than k + max(k, 32) in one query's band: cut to the exact k best as they come."""
    rng = np.random.default_rng(8)
    row = rng.standard_normal(6).astype(np.float32)
    bank = rng.standard_normal((400, 6)).astype(np.float32)
    copies = np.sort(rng.choice(400, size=150, replace=False))
    bank[copies] = row * np.float32(2.0) ** rng.integers(-3, 4, size=(150, 1)).astype(np.float32)
    queries = np.stack([row, row + np.float32(1e-3), rng.standard_normal(6).astype(np.float32)])
    calls = []
    exact_best = nb._Candidates._exact_best
    monkeypatch.setattr(nb._Candidates, "_exact_best", lambda self, *a: calls.append(int(a[-1].max())) or exact_best(self, *a))
    got = search(queries, bank, 3, chunk=3, bank_chunk=50)
    assert got[1][0].tolist() == copies[:3].tolist() and got[1][1].tolist() == copies[:3].tolist()
    assert sorted(got[1][2].tolist()) == sorted(exact_rows(queries[2:], bank, 3)[0])
    assert max(calls) <= 35 + 50  # never more candidates than the cap (k + max(k, 32)) plus one bank chunk


def test_float32_similarities_stay_within_the_tolerance_of_the_float64_cosine():
    rng = np.random.default_rng(2)
    for d in (3, 64, 700):
        x = rng.standard_normal((40, d)) * np.exp(rng.uniform(-20, 20, size=(40, 1)))  # norms far apart
        x[:, :3] *= 1e3  # a few large entries
        x[:4] = rng.standard_normal((4, d)) * np.array([1e22, 1e-25, 1e35, 1e-40])[:, None]  # squares that
        # overflow or underflow float32, entries that are subnormal
        x = x.astype(np.float32)
        unit_x = nb.unit_rows(torch.from_numpy(x))
        approx = (unit_x @ unit_x.T).numpy().astype(np.float64)
        exact = np.array([[exact_cosine(a, b) for b in x] for a in x])
        assert np.abs(approx - exact).max() <= nb.tolerance(d)
        key, cos = nb.cosine64(torch.from_numpy(x), torch.from_numpy(np.broadcast_to(x, (40, 40, d)).copy()))
        np.testing.assert_allclose(cos.numpy(), exact, rtol=0, atol=1e-14)
        np.testing.assert_allclose(key.numpy(), exact * np.abs(exact), rtol=0, atol=1e-14)  # orders like the cosine


def test_unit_rows_are_the_plain_normalisation_where_it_neither_overflows_nor_underflows():
    x = torch.from_numpy(np.random.default_rng(1).standard_normal((300, 33)).astype(np.float32))
    x = x * torch.exp(torch.linspace(-20, 20, 300))[:, None]
    assert torch.equal(nb.unit_rows(x), unit(x.numpy()))
    huge = np.array([[1e20, 0.0], [1.0, 1.0]], dtype=np.float32)
    assert search(np.array([[1.0, 0.0]], dtype=np.float32), huge, 1)[1].tolist() == [[0]]  # not a zero row


def test_tree_sum_is_the_halving_sum_whatever_the_rows_around():
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((9, 13)))
    want = []
    for row in x.tolist():
        row = row + [0.0] * 3  # padded to 16
        while len(row) > 1:
            row = [a + b for a, b in zip(row[: len(row) // 2], row[len(row) // 2:])]
        want.append(row[0])
    assert nb.tree_sum(x).tolist() == want
    assert nb.tree_sum(x[2:5]).tolist() == want[2:5]


@pytest.mark.parametrize("reduce", ["legacy", "leaves"])
def test_a_reduced_matmul_precision_is_lifted_for_the_search_and_restored(reduce):
    rng = np.random.default_rng(6)
    queries, bank = near_tied(rng)
    leaves = [torch.backends.cuda.matmul, torch.backends.mkldnn.matmul]
    before = [leaf.fp32_precision for leaf in leaves]
    try:
        if reduce == "legacy":
            torch.set_float32_matmul_precision("medium")
        else:  # the per-backend settings, with which the legacy getter raises
            torch.backends.cuda.matmul.fp32_precision = "tf32"
            torch.backends.mkldnn.matmul.fp32_precision = "bf16"
        reduced = [leaf.fp32_precision for leaf in leaves]
        assert reduced != ["ieee", "ieee"]
        got = search(queries, bank, 4, chunk=8)
        assert [leaf.fp32_precision for leaf in leaves] == reduced
    finally:
        for leaf, value in zip(leaves, before):
            leaf.fp32_precision = value
    np.testing.assert_array_equal(np.sort(got[1], axis=1), np.sort(np.array(exact_rows(queries, bank, 4)), axis=1))


def test_the_callers_loop_runs_outside_inference_mode():
    rng = np.random.default_rng(7)
    queries, bank = near_tied(rng)
    for *_, idx in nb.cosine_topk(queries, bank, 3, chunk=4):
        assert not torch.is_inference_mode_enabled()


def test_seed_shares_with_tied_neighbours_are_the_same_for_any_split_of_the_pool():
    """The seed share counts the exact k rows, so ranks holding other slices of the pool agree bit for bit."""
    from mak.selection.robust import seed_share

    rng = np.random.default_rng(9)
    seed, other = near_tied(rng, n_base=20, d=16)
    ref = np.concatenate([other, seed[::2] * np.float32(4)])  # references tied exactly with seed images
    pool = np.concatenate([ref, seed[:10] * np.float32(2)])
    self_index = np.full(len(pool), -1)
    self_index[: len(ref)] = len(seed) + np.arange(len(ref))
    bank = np.concatenate([seed, ref])
    want = np.array([np.mean(np.array(r) < len(seed)) for r in exact_rows(pool, bank, 3, self_index)])
    whole = seed_share(pool, seed, ref, k=3, self_index=self_index)
    np.testing.assert_array_equal(whole, want.astype(np.float32))
    for cuts in ([0, 1, 2, len(pool)], [0, 17, 40, len(pool)]):  # the pool split as ranks would hold it
        parts = [seed_share(pool[a:b], seed, ref, k=3, self_index=self_index[a:b], chunk=5)
                 for a, b in zip(cuts, cuts[1:])]
        np.testing.assert_array_equal(np.concatenate(parts), whole)


def test_zero_rows_have_cosine_zero_and_ties_go_to_the_lower_rows():
    bank = np.zeros((6, 4), dtype=np.float32)
    bank[[2, 5]] = [[1, 0, 0, 0], [0, 1, 0, 0]]
    bank[4] = np.float32(1e-30)  # a tiny row: a direction like any other
    queries = np.array([[0, 0, 0, 0], [0, 0, 1, 0]], dtype=np.float32)
    vals, idx = search(queries, bank, 3)
    assert not np.isnan(vals).any()
    assert idx.tolist() == [[0, 1, 2], [4, 0, 1]]  # cosine 0.5 with the tiny row, then ties at 0: lower rows
    key, cos = nb.cosine64(torch.from_numpy(queries), torch.from_numpy(np.broadcast_to(bank, (2, 6, 4)).copy()))
    assert cos[0].tolist() == [0.0] * 6 and key[0].tolist() == [0.0] * 6
    assert cos[1].tolist() == [0.0, 0.0, 0.0, 0.0, 0.5, 0.0]
