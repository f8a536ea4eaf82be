"""The ``mak.*`` array functions: the engine's functions with their arrays scanned for NaN and Inf."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import mak
from mak.errors import MakError
from mak.selection import kcenter, proximity, tailness

RNG = np.random.default_rng(0)
SEED = RNG.normal(size=(40, 8)).astype(np.float32)
POOL = RNG.normal(size=(150, 8)).astype(np.float32)
VIEWS = RNG.normal(size=(2, 150, 4)).astype(np.float32)


def _bad(x: np.ndarray, index: tuple, value: float = np.nan) -> np.ndarray:
    y = x.copy()
    y[index] = value
    return y


@pytest.mark.parametrize("call, message", [
    (lambda: mak.ecle(_bad(VIEWS, (1, 7, 0)), batch_size=64), "views contain NaN or Inf (row 7)"),
    (lambda: mak.proximity(SEED, _bad(POOL, (42, 3), np.inf)), "pool features contain NaN or Inf (row 42)"),
    (lambda: mak.proximity(_bad(SEED, (17, 0)), POOL), "seed features contain NaN or Inf (row 17)"),
    (lambda: mak.nearest_centroid_distance(POOL, _bad(SEED[:3], (2, 1))), "centroids contain NaN or Inf (row 2)"),
    (lambda: mak.kmeans(_bad(SEED, (5, 5)), 3), "features contain NaN or Inf (row 5)"),
    (lambda: mak.kcenter_greedy(torch.from_numpy(_bad(POOL, (99, 0))), 5), "features contain NaN or Inf (row 99)"),
    (lambda: mak.kcenter_greedy(POOL, 5, init=_bad(SEED, (3, 2))), "initial centers contain NaN or Inf (row 3)"),
])
def test_a_nan_or_inf_is_an_error_naming_the_array_and_row(call, message):
    with pytest.raises(MakError) as exc:
        call()
    assert str(exc.value) == message


def test_clean_arrays_give_the_engines_results_and_the_check_can_be_skipped():
    assert np.array_equal(mak.ecle(VIEWS, batch_size=64, partitions=2), tailness.ecle(VIEWS, batch_size=64, partitions=2))
    assert np.array_equal(mak.proximity(SEED, POOL, clusters=3), proximity.proximity(SEED, POOL, clusters=3))
    assert np.array_equal(mak.kcenter_greedy(POOL, 7, init=SEED), kcenter.kcenter_greedy(POOL, 7, init=SEED))
    bad = _bad(POOL, (42, 0))
    assert len(mak.kcenter_greedy(bad, 3, check_values=False)) == 3  # the caller scanned them already
