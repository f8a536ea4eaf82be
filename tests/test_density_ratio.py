"""The classifier density ratio (robust's ``ratio`` tail): cross-fitting, determinism, what it ranks, errors."""
import numpy as np
import pytest
import torch

import mak
from mak.selection.robust.density_ratio import (BAG_SEED_STRIDE, RatioMLP, _fit, _set_gradients, fit_models,
                                ratio_ensemble, ratio_logits, ratio_models, reference_folds,
                                seed_folds_of, seed_heldout_logits, train_ratio_model)
from mak.errors import MakError
from mak.selection.robust import robust_options


def blobs(rng, centers, counts, dim=8, spread=0.15):
    return np.concatenate([c + spread * rng.normal(size=(n, dim)) for c, n in zip(centers, counts)]).astype(np.float32)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    centers = [np.eye(8)[i] * 2.0 for i in range(3)]
    # seed: head A 120, B 60, tail C 6; pool: A 120, B 60, C 60 -- C is what the pool has more of
    seed = blobs(rng, centers, [120, 60, 6])
    pool = blobs(rng, centers, [120, 60, 60])
    labels = np.repeat([0, 1, 2], [120, 60, 60])
    return seed, pool, labels


def test_reference_folds_partition_the_rows():
    f = reference_folds(23, 4, seed=5)
    assert f.shape == (23,) and sorted(np.bincount(f).tolist()) == [5, 6, 6, 6]
    np.testing.assert_array_equal(f, reference_folds(23, 4, seed=5))


def test_hand_written_gradients_equal_autograd():
    g = torch.Generator().manual_seed(3)
    model = RatioMLP(8, 16, g)
    x = torch.randn(37, 8, generator=g)  # a batch that is not a multiple of anything
    y = (torch.rand(37, generator=g) < 0.3).float()
    w = torch.where(y > 0, 2.5, 0.7)
    want = RatioMLP(8, 16, torch.Generator().manual_seed(3))
    loss = (torch.nn.functional.binary_cross_entropy_with_logits(want(x), y, reduction="none") * w).mean()
    loss.backward()
    model.requires_grad_(False)
    _set_gradients(model, torch.nn.functional.normalize(x, dim=1), y, w)
    for (name, got), ref in zip(model.named_parameters(), want.parameters()):
        assert got.grad.shape == ref.shape, name
        torch.testing.assert_close(got.grad, ref.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_batched_fits_equal_one_at_a_time():
    # rows per fit: 2,048 (two full batches), 2,049 (a third batch of one row), 300 (one short batch),
    # so the fits fall into three groups by steps per epoch and the short batches carry padding
    rng = np.random.default_rng(0)
    shapes = [(300, 1748, 1), (301, 1748, 2), (300, 1749, 3), (100, 200, 4)]
    fits = [((rng.normal(size=(m, 8)) + 0.3).astype(np.float32), rng.normal(size=(n, 8)).astype(np.float32), s)
            for m, n, s in shapes]
    cpu = torch.device("cpu")
    one = [_fit(s, p, 16, 3, seed, cpu) for s, p, seed in fits]
    together = fit_models(fits, 16, 3, cpu, batched=True)
    assert fit_models(fits, 16, 3, cpu)[2].fc1.weight.equal(one[2].fc1.weight)  # CPU default: one at a time
    for a, b in zip(one, together):
        for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
            torch.testing.assert_close(pb, pa, rtol=0, atol=1e-5, msg=name)
    assert not one[0].fc1.weight.equal(one[1].fc1.weight)  # each fit its own seed


def test_cross_fitted_logits_equal_a_model_per_fold(data):
    seed, pool, _ = data
    ref = pool[::2]  # a reference sample: even pool rows
    self_index = np.where(np.arange(len(pool)) % 2 == 0, np.arange(len(pool)) // 2, -1)
    got = ratio_logits(pool, seed, ref, self_index=self_index, folds=3, hidden=16, epochs=4, seed=2)
    fold_of = reference_folds(len(ref), 3, seed=2)
    seed_fold = reference_folds(len(seed), 3, seed=3)  # the seed's folds: the next stream
    models = [train_ratio_model(seed[seed_fold != f], ref[fold_of != f], hidden=16, epochs=4, seed=2000 + f)
              for f in range(3)]
    with torch.no_grad():
        each = np.stack([m.double()(torch.from_numpy(pool).double()).numpy() for m in models], axis=1)
    want = each.mean(axis=1)  # rows outside the reference: every model
    inside = self_index >= 0
    want[inside] = each[inside, fold_of[self_index[inside]]]  # reference rows: the model that never saw them
    np.testing.assert_array_equal(got, want.astype(np.float32))
    # each seed image's held-out logit comes from the one model that never saw it
    fitted = ratio_models(seed, ref, folds=3, hidden=16, epochs=4, seed=2)
    np.testing.assert_array_equal(fitted.seed_fold, seed_fold)
    np.testing.assert_array_equal(seed_folds_of(len(seed), 3, seed=2), seed_fold)
    with torch.no_grad():
        own = np.stack([m.double()(torch.from_numpy(seed).double()).numpy() for m in models], axis=1)
    np.testing.assert_array_equal(seed_heldout_logits(seed, fitted),
                                  own[np.arange(len(seed)), seed_fold].astype(np.float32))
    np.testing.assert_array_equal(seed_heldout_logits(seed, fitted, chunk=5), seed_heldout_logits(seed, fitted))


def test_chunking_and_seed_determinism(data):
    seed, pool, _ = data
    kw = dict(folds=2, hidden=8, epochs=3, seed=1)
    a = ratio_logits(pool, seed, pool, self_index=np.arange(len(pool)), **kw)
    b = ratio_logits(pool, seed, pool, self_index=np.arange(len(pool)), chunk=7, **kw)
    np.testing.assert_array_equal(a, b)
    state = torch.random.get_rng_state()
    c = ratio_logits(pool, seed, pool, self_index=np.arange(len(pool)), **kw)
    assert torch.equal(state, torch.random.get_rng_state())  # the global RNG is untouched
    np.testing.assert_array_equal(a, c)
    d = ratio_logits(pool, seed, pool, self_index=np.arange(len(pool)), **{**kw, "seed": 9})
    assert not np.array_equal(a, d)
    models = ratio_models(seed, pool, **kw)
    np.testing.assert_array_equal(a, ratio_logits(pool, seed, pool, self_index=np.arange(len(pool)), models=models))


def test_bags_average_independent_fits(data):
    seed, pool, _ = data
    ref = pool[1::2]
    self_index = np.where(np.arange(len(pool)) % 2 == 1, np.arange(len(pool)) // 2, -1)
    kw = dict(folds=3, hidden=8, epochs=3)
    # one bag is the unbagged fit, bit for bit
    one = ratio_logits(pool, seed, ref, self_index=self_index, seed=4, **kw)
    np.testing.assert_array_equal(ratio_logits(pool, seed, ref, self_index=self_index, seed=4, bags=1, **kw), one)
    # three bags: the float64 mean of three fits with seeds 4, 4 + stride, 4 + 2 x stride
    fits = [ratio_models(seed, ref, seed=4 + b * BAG_SEED_STRIDE, **kw) for b in range(3)]
    each = [ratio_logits(pool, seed, ref, self_index=self_index, models=f) for f in fits]
    want = (np.sum([e.astype(np.float64) for e in each], axis=0) / 3).astype(np.float32)
    got = ratio_logits(pool, seed, ref, self_index=self_index, seed=4, bags=3, **kw)
    np.testing.assert_array_equal(got, want)
    assert not np.array_equal(got, one)
    ens = ratio_ensemble(seed, ref, bags=3, seed=4, **kw)
    np.testing.assert_array_equal(ratio_logits(pool, seed, ref, self_index=self_index, models=ens), got)
    held = [seed_heldout_logits(seed, f) for f in fits]
    np.testing.assert_array_equal(seed_heldout_logits(seed, ens),
                                  (np.sum([h.astype(np.float64) for h in held], axis=0) / 3).astype(np.float32))
    np.testing.assert_array_equal(seed_heldout_logits(seed, ens[:1]), held[0])


def test_the_kind_the_pool_has_more_of_gets_the_lowest_logit(data):
    seed, pool, labels = data
    logit = ratio_logits(pool, seed, pool, self_index=np.arange(len(pool)), folds=5, hidden=32, epochs=30, seed=0)
    means = [float(logit[labels == c].mean()) for c in range(3)]
    assert means[2] < means[0] - 0.5 and means[2] < means[1] - 0.5
    # the 60 tail images are (nearly) the 60 lowest
    assert np.isin(np.argsort(logit)[:60], np.flatnonzero(labels == 2)).mean() >= 0.95


def test_robust_ratio_tail_picks_every_gated_tail_image(data):
    seed, pool, labels = data
    # a loose gate (auto would take 1 - 5/186 for this small seed: its 6 tail images are the ones the
    # gate's held-out quantile sits among, and this pool has no junk to keep out)
    sel = mak.select(seed, pool, None, 60, strategy="robust", clusters=3, share_k=10, ratio_epochs=30,
                     gate_quantile=0.998)
    tail_kept = np.flatnonzero(np.isfinite(sel.score) & (labels == 2))
    assert len(tail_kept) >= 45  # the seed has 6 tail images; the gate keeps most of the pool's 60
    assert np.isin(tail_kept, sel.indices).all()


@pytest.mark.parametrize("kwargs, match", [
    (dict(folds=1), "ratio folds must be an integer >= 2"),
    (dict(hidden=0), "ratio hidden must be an integer >= 1"),
    (dict(epochs=1.5), "ratio epochs must be an integer >= 1"),
    (dict(folds=50), "cannot be cut into 50 folds"),
    (dict(bags=0), "ratio bags must be an integer >= 1"),
])
def test_bad_settings(data, kwargs, match):
    seed, pool, _ = data
    with pytest.raises(MakError, match=match):
        ratio_logits(pool[:40], seed, pool[:40], **kwargs)


def test_bad_inputs(data):
    seed, pool, _ = data
    with pytest.raises(MakError, match="do not match"):
        ratio_logits(pool, seed[:, :4], pool, folds=2, epochs=1)
    with pytest.raises(MakError, match="non-empty"):
        train_ratio_model(seed[:0], pool, epochs=1)
    with pytest.raises(MakError, match="4 seed images cannot be cut into 5 folds"):
        ratio_logits(pool, seed[:4], pool, folds=5, epochs=1)
    with pytest.raises(MakError, match="fitted on 186 seed images, not 10"):
        seed_heldout_logits(seed[:10], ratio_models(seed, pool, folds=2, hidden=4, epochs=1))
    with pytest.raises(MakError, match="self_index has 3 rows"):
        ratio_logits(pool, seed, pool, self_index=np.arange(3), folds=2, epochs=1)
    with pytest.raises(MakError, match="at least one fitted bag"):
        ratio_logits(pool, seed, pool, models=[])
    for key, bad in (("ratio_folds", 1), ("ratio_hidden", 0), ("ratio_epochs", "x"), ("ratio_bags", 0)):
        with pytest.raises(MakError, match=f"^{key}="):
            robust_options({key: bad})
