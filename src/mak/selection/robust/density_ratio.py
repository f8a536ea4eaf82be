"""Classifier density ratio: how much more of an image's kind the pool holds than the seed.

``robust``'s ``ratio`` tail term. A small MLP is trained to tell seed features (label 1) from pool
features (label 0), the two classes weighted equally; its logit is then ``log p_seed(x) / p_pool(x)``
up to a constant, and a *low* logit marks an image whose kind the pool has far more of than the
seed: the seed's tail, or what the seed lacks entirely (the gate removes the latter). It estimates
the same ratio as the k-NN seed share (:func:`mak.selection.robust.seed_share`), but a classifier learns
which directions of the feature space tell seed from pool, where a k-NN ball weighs every
direction alike; on the Fashion-MNIST open-world benchmark that finds tail classes that share a
neighbourhood with a head class (T-shirt among Shirts).

Cross-fitting keeps an image out of the model that scores it: the reference (the pool or a
uniform sample of it) and the seed are each cut into ``folds``; model ``f`` is trained on every
seed fold and every reference fold but ``f`` and scores the rows of fold ``f``. Queries that are
not reference rows get the mean logit of all fold models. The seed's own held-out logits
(:func:`seed_heldout_logits`) are a sample of an unseen in-domain image's logit: ``robust``'s
``ratio`` gate rejects pool images below their ``1 - gate_quantile`` quantile. Junk has almost
no seed density at all (logits far below any seed image's), the seed's tail classes only a low
one, so the same logit ranks the tail (low) and, at a loose quantile, gates the junk (lowest).
Bagging (``bags``, :func:`ratio_ensemble`) repeats the whole cross-fitted fit with other fold
cuts and initial weights and averages the logits: each image's logit otherwise comes from the one
fold model that never saw it, and that model's own noise moves the ranking of images whose seed
and pool densities are close -- the tail classes. Training costs
O(bags x (seed + reference) x epochs x folds) and scoring is chunked, O(chunk) memory beyond the
inputs. Under ``torchrun`` the ranks share the ``bags x folds`` models out (rank ``r`` trains
every ``world``-th one) and broadcast the weights, so every rank scores with the same models.
"""
from __future__ import annotations

import copy
import math
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from mak import distributed
from mak._tensor import resolve_device, to_tensor
from mak._threads import pinned_map
from mak.errors import MakError

CHUNK = 8192  # rows scored per task; fixed, so a row's chunk does not depend on the thread count
BATCH = 1024
LR = 6e-3
WEIGHT_DECAY = 1e-4
DEFAULT_FOLDS = 5
DEFAULT_HIDDEN = 128
DEFAULT_EPOCHS = 30
BAG_SEED_STRIDE = 7919  # bag b is fitted with seed + b * BAG_SEED_STRIDE (bag 0: the seed itself)


class RatioMLP(torch.nn.Module):
    """Linear(d, hidden) - ReLU - Linear(hidden, 1) on L2-normalised features; output: the seed-vs-pool logit."""

    def __init__(self, dim: int, hidden: int, generator: torch.Generator) -> None:
        super().__init__()
        self.fc1 = torch.nn.utils.skip_init(torch.nn.Linear, dim, hidden)  # no draw from the global RNG
        self.fc2 = torch.nn.utils.skip_init(torch.nn.Linear, hidden, 1)
        with torch.no_grad():  # PyTorch's default Linear init, drawn from our own generator
            for layer in (self.fc1, self.fc2):
                bound = 1.0 / math.sqrt(layer.in_features)
                layer.weight.uniform_(-bound, bound, generator=generator)
                layer.bias.uniform_(-bound, bound, generator=generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(F.normalize(x, dim=1)))).squeeze(1)


def check_settings(folds: Any, hidden: Any, epochs: Any, bags: Any = 1) -> None:
    """Raise MakError unless folds >= 2, hidden >= 1, epochs >= 1 and bags >= 1 are integers."""
    for name, v, lo in (("ratio folds", folds, 2), ("ratio hidden", hidden, 1), ("ratio epochs", epochs, 1),
                        ("ratio bags", bags, 1)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < lo:
            raise MakError(f"{name} must be an integer >= {lo}, got {v!r}")


def _checked_pair(seed_features: Any, pool_features: Any) -> tuple[np.ndarray, np.ndarray]:
    """Both as float32 arrays; MakError unless they are non-empty matrices of one width."""
    s = np.asarray(seed_features, dtype=np.float32)
    p = np.asarray(pool_features, dtype=np.float32)
    if s.ndim != 2 or p.ndim != 2 or s.shape[1] != p.shape[1]:
        raise MakError(f"density ratio: seed features {s.shape} and pool features {p.shape} do not match")
    if s.shape[0] == 0 or p.shape[0] == 0:
        raise MakError("density ratio: the seed and the pool reference must both be non-empty")
    return s, p


def train_ratio_model(seed_features: Any, pool_features: Any, hidden: int = DEFAULT_HIDDEN,
                      epochs: int = DEFAULT_EPOCHS, seed: int = 0,
                      device: str | torch.device | None = None) -> RatioMLP:
    """One seed-vs-pool classifier: fused Adam (lr 6e-3, weight decay 1e-4), balanced BCE, batches of 1,024.

    Deterministic for a fixed ``seed`` on one machine, whatever the thread count (its own
    generator for the weights and the batch order, the global RNG untouched; on a CPU it runs on
    one intra-op thread, see :func:`fit_models`).
    """
    s, p = _checked_pair(seed_features, pool_features)
    return fit_models([(s, p, int(seed))], hidden, epochs, resolve_device(device, s))[0]


def _fit(s: np.ndarray, p: np.ndarray, hidden: int, epochs: int, seed: int, dev: torch.device) -> RatioMLP:
    """The training loop of :func:`train_ratio_model` on the calling thread's intra-op threads."""
    g = torch.Generator().manual_seed(int(seed))
    model = RatioMLP(s.shape[1], int(hidden), g).to(dev)
    x = F.normalize(torch.cat([to_tensor(s, dev), to_tensor(p, dev)]), dim=1)  # once; a row's bits do not change
    y = torch.cat([torch.ones(s.shape[0], device=dev), torch.zeros(p.shape[0], device=dev)])
    n = x.shape[0]
    w = torch.where(y > 0, n / (2.0 * s.shape[0]), n / (2.0 * p.shape[0]))  # both classes weigh the same
    model.requires_grad_(False)  # gradients by hand (:func:`_set_gradients`), no autograd graph
    opt = _adam(list(model.parameters()), dev)
    with torch.no_grad():
        for _ in range(int(epochs)):
            order = torch.randperm(n, generator=g).to(dev)
            for lo in range(0, n, BATCH):
                j = order[lo: lo + BATCH]
                _set_gradients(model, x.index_select(0, j), y.index_select(0, j), w.index_select(0, j))
                opt.step()
    return model.requires_grad_(True).eval()


def _adam(params: list[torch.Tensor], dev: torch.device) -> torch.optim.Adam:
    """The classifier's Adam (lr 6e-3, weight decay 1e-4), fused into one kernel a step where torch has one."""
    return torch.optim.Adam(params, lr=LR, weight_decay=WEIGHT_DECAY, fused=dev.type in ("cpu", "cuda") or None)


def _set_gradients(model: RatioMLP, xb: torch.Tensor, yb: torch.Tensor, wb: torch.Tensor) -> None:
    """Each parameter's ``.grad`` of the weighted mean BCE ``mean(wb * bce(model(xb), yb))``, ``xb`` L2-normalised.

    Back-propagation written out for the two layers: the same products, rounded as autograd rounds
    them, without recording a graph. With the fused Adam step a CPU step takes 0.58x the time of
    autograd and per-parameter Adam (``benchmarks/bench_select.py`` section 6).
    """
    w1, b1, w2, b2 = model.fc1.weight, model.fc1.bias, model.fc2.weight, model.fc2.bias
    h = torch.addmm(b1, xb, w1.t()).clamp_(min=0)
    z = torch.addmv(b2, h, w2[0])
    dz = (torch.sigmoid(z) - yb).mul_(wb * (1.0 / xb.shape[0]))  # d loss / d logit, rounded as autograd does
    dh = torch.ops.aten.threshold_backward(torch.outer(dz, w2[0]), h, 0)  # zero where the ReLU was
    w1.grad, b1.grad = dh.t() @ xb, dh.sum(0)
    w2.grad, b2.grad = (h.t() @ dz).unsqueeze(0), dz.sum().reshape(1)


class FitRows(NamedTuple):
    """One classifier fit of :func:`fit_rows`: the seed rows and reference rows it trains on, and its seed."""

    seed_rows: np.ndarray
    reference_rows: np.ndarray
    seed: int


def fit_models(fits: Sequence[tuple[np.ndarray, np.ndarray, int]], hidden: int, epochs: int,
               device: torch.device, progress: bool = False, batched: bool | None = None) -> list[RatioMLP]:
    """:func:`train_ratio_model` of each ``(seed rows, reference rows, seed)``, in order (:func:`fit_rows`)."""
    plans, a, b = [], 0, 0
    for fs, fp, seed in fits:
        plans.append(FitRows(np.arange(a, a + len(fs)), np.arange(b, b + len(fp)), int(seed)))
        a, b = a + len(fs), b + len(fp)
    return fit_rows(np.concatenate([f[0] for f in fits]), np.concatenate([f[1] for f in fits]), plans, hidden,
                    epochs, device, progress, batched)


def fit_rows(seed_features: np.ndarray, reference: np.ndarray, fits: Sequence[FitRows], hidden: int, epochs: int,
             device: torch.device, progress: bool = False, batched: bool | None = None) -> list[RatioMLP]:
    """:func:`train_ratio_model` of each fit's rows of ``seed_features`` and ``reference``, in order.

    On a CPU each fit runs on one intra-op thread (:func:`mak._threads.pinned_map`): BLAS splits
    the 1,024-row gradient product across threads, and the split changes the float32 rounding, so
    a fit on the caller's threads would give other weights for another thread count. Pinned, a
    fit's weights are the same bits on any thread count and on any torchrun rank; the cores are
    used by fitting several models at once, and only those hold a copy of their rows. ``batched``
    (default: on any device but a CPU) trains all fits as one batched model instead
    (:func:`_fit_batched`).
    """
    label = "robust: seed-vs-pool classifier fits" if progress else None
    if device.type != "cpu" if batched is None else batched:
        return _fit_batched(seed_features, reference, fits, int(hidden), int(epochs), device, label)

    def one(fit: FitRows) -> RatioMLP:
        return _fit(seed_features[fit.seed_rows], reference[fit.reference_rows], int(hidden), int(epochs),
                    fit.seed, device)

    return pinned_map(one, fits, device, progress=label, unit="fit")


def _fit_batched(seed_features: np.ndarray, reference: np.ndarray, fits: Sequence[FitRows], hidden: int,
                 epochs: int, dev: torch.device, progress: str | None = None) -> list[RatioMLP]:
    """Every fit of :func:`fit_rows` at once, as one model with a batch dimension over the fits.

    Each fit keeps what :func:`_fit` gives it (its initial weights, its rows, its batch orders, its
    Adam state), so the weights equal one-at-a-time training up to float rounding; each step is a
    few batched kernels for all fits, where one at a time a GPU would wait on ~15 small launches
    per fit and step. The seed and the reference are on the device once; each fit's batches are
    gathered from them. Fits with another number of steps per epoch (fold sizes differ by a row)
    train as a group of their own.
    """
    m = len(seed_features)
    x = F.normalize(torch.cat([to_tensor(seed_features, dev), to_tensor(reference, dev)]), dim=1)
    groups: dict[int, list[int]] = {}
    for i, fit in enumerate(fits):
        groups.setdefault(math.ceil((len(fit.seed_rows) + len(fit.reference_rows)) / BATCH), []).append(i)
    out: list[RatioMLP | None] = [None] * len(fits)
    for members in groups.values():
        for i, model in zip(members, _train_group(x, m, [fits[i] for i in members], hidden, epochs, dev, progress)):
            out[i] = model
    return out  # type: ignore[return-value]


def _train_group(x: torch.Tensor, m: int, fits: Sequence[FitRows], hidden: int, epochs: int, dev: torch.device,
                 progress: str | None) -> list[RatioMLP]:
    """:func:`_fit_batched` for fits with the same number of steps per epoch; ``x``: seed rows then reference rows."""
    gens = [torch.Generator().manual_seed(int(fit.seed)) for fit in fits]
    models = [RatioMLP(x.shape[1], hidden, g).to(dev) for g in gens]
    sizes = [len(fit.seed_rows) + len(fit.reference_rows) for fit in fits]
    k, steps = len(fits), math.ceil(sizes[0] / BATCH)
    rows, y, w = (t.to(dev) for t in _fit_tables(fits, m, sizes))
    with torch.no_grad():
        params = [torch.stack([mod.fc1.weight for mod in models]), torch.stack([mod.fc1.bias for mod in models]),
                  torch.stack([mod.fc2.weight[0] for mod in models]), torch.stack([mod.fc2.bias for mod in models])]
    opt = _adam(params, dev)
    valid = (torch.arange(steps * BATCH) < torch.tensor(sizes)[:, None]).to(dev)  # padding: position 0 at weight 0
    from mak.progress import bar as progress_bar

    with torch.no_grad(), progress_bar(epochs, f"{progress} ({k} batched)", unit="epoch",
                                       enabled=progress is not None) as bar:
        for _ in range(epochs):
            order = torch.zeros(k, steps * BATCH, dtype=torch.int64)
            for i, g in enumerate(gens):
                order[i, :sizes[i]] = torch.randperm(sizes[i], generator=g)
            order = order.to(dev)
            for t in range(steps):
                j, v = order[:, t * BATCH:(t + 1) * BATCH], valid[:, t * BATCH:(t + 1) * BATCH]
                _set_batched_gradients(params, x[rows.gather(1, j)], y.gather(1, j), w.gather(1, j) * v, v.sum(1))
                opt.step()
            bar.update(1)
    with torch.no_grad():
        for i, mod in enumerate(models):
            mod.fc1.weight.copy_(params[0][i]), mod.fc1.bias.copy_(params[1][i])
            mod.fc2.weight[0].copy_(params[2][i]), mod.fc2.bias.copy_(params[3][i])
    return [mod.eval() for mod in models]


def _fit_tables(fits: Sequence[FitRows], m: int, sizes: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per fit, padded to the longest: its rows of seed + reference (seed rows first, as :func:`_fit` stacks
    them), their labels and their class-balancing weights (0 on padding). Each (fits, max size)."""
    rows = torch.zeros(len(fits), max(sizes), dtype=torch.int64)
    y, w = torch.zeros(len(fits), max(sizes)), torch.zeros(len(fits), max(sizes))
    for i, (fit, n) in enumerate(zip(fits, sizes)):
        ms = len(fit.seed_rows)
        rows[i, :n] = torch.from_numpy(np.concatenate([fit.seed_rows, m + np.asarray(fit.reference_rows)]))
        y[i, :ms] = 1.0
        w[i, :n] = torch.where(y[i, :n] > 0, n / (2.0 * ms), n / (2.0 * (n - ms)))
    return rows, y, w


def _set_batched_gradients(params: list[torch.Tensor], xb: torch.Tensor, yb: torch.Tensor, wb: torch.Tensor,
                           count: torch.Tensor) -> None:
    """:func:`_set_gradients` for ``k`` fits at once: ``xb`` (k, B, d), ``yb`` and ``wb`` (k, B), ``count`` (k,) rows
    in each fit's batch (padding rows have weight 0)."""
    w1, b1, w2, b2 = params  # (k, H, d), (k, H), (k, H), (k, 1)
    h = torch.baddbmm(b1[:, None, :], xb, w1.transpose(1, 2)).clamp_(min=0)  # (k, B, H)
    z = torch.baddbmm(b2[:, :, None], h, w2[:, :, None])[:, :, 0]  # (k, B)
    dz = (torch.sigmoid(z) - yb).mul_(wb * (1.0 / count.to(wb.dtype))[:, None])
    dh = torch.ops.aten.threshold_backward(dz[:, :, None] * w2[:, None, :], h, 0)
    w1.grad, b1.grad = torch.bmm(dh.transpose(1, 2), xb), dh.sum(1)
    w2.grad, b2.grad = torch.bmm(h.transpose(1, 2), dz[:, :, None])[:, :, 0], dz.sum(1, keepdim=True)


def fold_parts(n: int, folds: int, seed: int = 0) -> list[np.ndarray]:
    """A k-fold split of ``n`` rows: a permutation from ``seed`` cut by ``np.array_split`` (in permutation order)."""
    return np.array_split(np.random.default_rng(seed).permutation(n).astype(np.int64), folds)


def reference_folds(n: int, folds: int, seed: int = 0) -> np.ndarray:
    """Fold of each of ``n`` reference rows, as :func:`fold_parts` cuts them. (n,) int64."""
    fold_of = np.empty(n, dtype=np.int64)
    for f, rows in enumerate(fold_parts(n, folds, seed)):
        fold_of[rows] = f
    return fold_of


class RatioModels(NamedTuple):
    """The cross-fitted classifiers of :func:`ratio_models`."""

    models: list[RatioMLP]
    reference_fold: np.ndarray  # (n_reference,) fold of each reference row
    seed_fold: np.ndarray       # (M,) fold of each seed row


def seed_folds_of(m: int, folds: int, seed: int = 0) -> np.ndarray:
    """Fold of each of ``m`` seed rows: :func:`reference_folds` with the stream ``seed + 1``."""
    return reference_folds(m, folds, seed + 1)


def ratio_models(seed_features: Any, reference: Any, folds: int = DEFAULT_FOLDS, hidden: int = DEFAULT_HIDDEN,
                 epochs: int = DEFAULT_EPOCHS, seed: int = 0, device: str | torch.device | None = None
                 ) -> RatioModels:
    """The cross-fitted classifiers: model ``f`` never sees seed fold ``f`` nor reference fold ``f``."""
    return ratio_ensemble(seed_features, reference, bags=1, folds=folds, hidden=hidden, epochs=epochs, seed=seed,
                          device=device)[0]


def ratio_ensemble(seed_features: Any, reference: Any, bags: int = 1, folds: int = DEFAULT_FOLDS,
                   hidden: int = DEFAULT_HIDDEN, epochs: int = DEFAULT_EPOCHS, seed: int = 0,
                   device: str | torch.device | None = None, progress: bool = False) -> list[RatioModels]:
    """``bags`` independent cross-fitted fits (:func:`ratio_models`), bag ``b`` with seed ``seed + b * 7919``.

    Bag 0 is ``ratio_models(..., seed=seed)`` itself, so one bag scores exactly as an unbagged fit.
    Under ``torchrun`` on CPUs the ``bags x folds`` models are shared out over the ranks (model
    ``j`` is trained by rank ``j % world``) and each is broadcast from the rank that trained it, so
    every rank scores with the same weights, trained as on one process. On a GPU every rank trains
    all of them as one batched model (:func:`_fit_batched`), which is what one process does.
    """
    check_settings(folds, hidden, epochs, bags)
    s, ref = _checked_pair(seed_features, reference)
    if ref.shape[0] < folds:
        raise MakError(f"density ratio: {ref.shape[0]} pool reference rows cannot be cut into {folds} folds")
    if s.shape[0] < folds:
        raise MakError(f"density ratio: {s.shape[0]} seed images cannot be cut into {folds} folds; "
                       "use fewer --ratio-folds")
    world, me = distributed.world_size(), distributed.rank()  # 1 and 0 outside torchrun
    dev = resolve_device(device, ref)
    plans, fits = [], []
    for b in range(int(bags)):
        bag_seed = int(seed) + b * BAG_SEED_STRIDE
        fold_of, seed_fold = reference_folds(ref.shape[0], folds, bag_seed), seed_folds_of(s.shape[0], folds, bag_seed)
        plans.append((fold_of, seed_fold))
        for f in range(folds):
            fits.append(FitRows(np.flatnonzero(seed_fold != f), np.flatnonzero(fold_of != f), bag_seed * 1000 + f))
    share_out = dev.type == "cpu"  # elsewhere every rank trains all models as one batched model, as one process does
    if not share_out:
        world, me = 1, 0
    mine = [j for j in range(len(fits)) if j % world == me]
    trained = dict(zip(mine, fit_rows(s, ref, [fits[j] for j in mine], hidden, epochs, dev, progress)))
    models = []
    for j in range(len(fits)):  # another rank trains the rest; their weights arrive below
        models.append(trained[j] if j in trained
                      else RatioMLP(ref.shape[1], int(hidden), torch.Generator().manual_seed(0)).to(dev).eval())
    if distributed.active() and share_out:
        for j, model in enumerate(models):
            for t in model.state_dict().values():
                torch.distributed.broadcast(t, src=j % world)
    return [RatioModels(models[b * folds:(b + 1) * folds], fold_of, seed_fold)
            for b, (fold_of, seed_fold) in enumerate(plans)]


def _members(models: RatioModels | Sequence[RatioModels]) -> list[RatioModels]:
    if isinstance(models, RatioModels):
        return [models]
    members = list(models)
    if not members:
        raise MakError("density ratio: an ensemble needs at least one fitted bag")
    return members


def _bag_mean(parts: list[np.ndarray]) -> np.ndarray:
    """Mean of the bags' float32 logits, summed in float64 (one bag: that bag's logits, bit for bit)."""
    if len(parts) == 1:
        return parts[0]
    return (np.sum([p.astype(np.float64) for p in parts], axis=0) / len(parts)).astype(np.float32)


def _fold_logits(models: list[RatioMLP], queries: Any, own_fold: np.ndarray | None, chunk: int,
                 bar: Any = None) -> np.ndarray:
    """Each query's logit from the model of its ``own_fold`` (-1 or None: the mean of all models). (n,) float32.

    Chunks of ``chunk`` rows are scored on one intra-op thread each (:func:`mak._threads.pinned_map`),
    so a logit does not depend on the thread count; in float64, so it does not depend on which rows
    share its chunk (torchrun shards) beyond float64 rounding, far below the float32 it is stored in.
    ``bar``: a progress bar advanced by the rows of each chunk scored.
    """
    mods = [copy.deepcopy(m).double() for m in models]
    dev = next(mods[0].parameters()).device
    n = int(queries.shape[0])

    def score(lo: int) -> np.ndarray:
        hi = min(n, lo + chunk)
        with torch.no_grad():
            xb = to_tensor(np.asarray(queries[lo:hi], dtype=np.float32), dev, dtype=torch.float64)
            logits = torch.stack([m(xb) for m in mods], dim=1)  # (b, folds)
            val = logits.mean(dim=1)
            if own_fold is not None:
                f = np.asarray(own_fold[lo:hi], dtype=np.int64)
                inside = np.flatnonzero(f >= 0)
                if inside.size:
                    idx = torch.as_tensor(inside, device=dev)
                    val[idx] = logits[idx, torch.as_tensor(f[inside], device=dev)]
            return val.cpu().numpy().astype(np.float32)

    parts = pinned_map(score, range(0, n, chunk), dev, progress=bar, size=lambda lo: min(n, lo + chunk) - lo)
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)


def seed_heldout_logits(seed_features: Any, models: RatioModels | Sequence[RatioModels],
                        chunk: int = CHUNK) -> np.ndarray:
    """Each seed image's logit from the one fold model that never saw it (bags: their mean). (M,) float32."""
    m = int(seed_features.shape[0])
    parts = []
    for fitted in _members(models):
        if len(fitted.seed_fold) != m:
            raise MakError(f"density ratio: the models were fitted on {len(fitted.seed_fold)} seed images, not {m}")
        parts.append(_fold_logits(fitted.models, seed_features, fitted.seed_fold, chunk))
    return _bag_mean(parts)


def ratio_logits(queries: Any, seed_features: Any, reference: Any, self_index: np.ndarray | None = None,
                 folds: int = DEFAULT_FOLDS, hidden: int = DEFAULT_HIDDEN, epochs: int = DEFAULT_EPOCHS,
                 seed: int = 0, device: str | torch.device | None = None, chunk: int = CHUNK,
                 *, models: RatioModels | Sequence[RatioModels] | None = None, bags: int = 1,
                 progress: str | None = None) -> np.ndarray:
    """Cross-fitted seed-vs-pool logit of each query (high: seed-like; low: the pool has more of it). (n,) float32.

    ``self_index[i]`` is the reference row query ``i`` itself is (-1: none): such a query is scored
    by the one model that never saw it; any other query by the mean of all fold models. With
    ``bags`` > 1 (:func:`ratio_ensemble`) the logit is the mean over the bags. Pass ``models``
    (:func:`ratio_models`, or a list from :func:`ratio_ensemble`) to score several query sets with
    the same classifiers. ``progress``: a label for one progress bar over the rows all bags score
    (n x bags images).
    """
    fitted = _members(models) if models is not None else ratio_ensemble(
        seed_features, reference, bags=bags, folds=folds, hidden=hidden, epochs=epochs, seed=seed, device=device)
    n = int(queries.shape[0])
    own = None
    if self_index is not None:
        if len(self_index) != n:
            raise MakError(f"density ratio: self_index has {len(self_index)} rows for {n} queries")
        own = np.asarray(self_index, dtype=np.int64)
    from mak.progress import bar as progress_bar

    parts = []
    with progress_bar(n * len(fitted), progress, unit="img", enabled=progress is not None and n > 0) as bar:
        for bag in fitted:
            own_fold = None if own is None else np.where(own >= 0, bag.reference_fold[np.maximum(own, 0)], -1)
            parts.append(_fold_logits(bag.models, queries, own_fold, chunk, bar=bar))
    return _bag_mean(parts)


__all__ = ["FitRows", "RatioMLP", "RatioModels", "check_settings", "fit_models", "fit_rows", "fold_parts", "ratio_ensemble", "ratio_logits", "ratio_models", "reference_folds",
           "seed_folds_of", "seed_heldout_logits", "train_ratio_model"]
