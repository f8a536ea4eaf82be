"""Evaluation of frozen features: linear probes, kNN and long-tail group accuracies.

Everything here is a deterministic function of feature arrays (no randomness but the seeded
few-shot draws, zero-initialised weights, no data-order dependence):

- :func:`linear_probe`: multinomial logistic regression on features standardised with the
  training statistics, mean cross-entropy + ``l2 / 2 * ||W||^2`` (bias not penalised), fitted
  full-batch with L-BFGS (strong Wolfe line search) in float64 torch from zero weights;
- :func:`knn_accuracy`: cosine k-nearest-neighbour classification (default k = 20) with the
  standard temperature-weighted vote of instance discrimination / SimCLR monitors: each of the k
  neighbours votes for its class with weight ``exp(cos / T)``, ``T = 0.07``; ``weighted=False``
  gives a plain majority vote. Ties between classes go to the smallest label. Chunked over the
  queries: memory O(chunk x N_train);
- :func:`per_class_accuracy`, :func:`class_groups`, :func:`group_accuracy`, :func:`group_std`:
  classes are grouped by their count in the seed set (Many: > ``many``, default 300; Medium:
  ``few`` .. ``many``; Few: < ``few``, default 30); a group's accuracy is the unweighted mean of
  its classes' accuracies; ``group_std`` is the *population* standard deviation (ddof 0) of the
  (non-empty) group means: the balancedness, lower is better;
- :func:`fewshot_probe`: the linear probe on ``shots`` labeled images per class drawn from a
  few-shot pool, repeated over ``draws`` seeded draws; mean and population std over draws;
- :func:`evaluate_features`: all of the above; :func:`format_table` prints it;
- :func:`evaluate_checkpoint` (``mak evaluate``): computes the backbone features of a
  checkpoint on the benchmark's splits and evaluates them.

Items labeled -1 (out-of-domain) are dropped from every split before evaluation.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch

from mak._neighbours import cosine_topk
from mak.errors import MakError
from mak.options import Option, defaults, integer, number
from mak.paths import output_file
from mak.train.embed import DEFAULT_BATCH_SIZE

GROUPS: tuple[str, ...] = ("many", "medium", "few")
DEFAULT_L2 = 1e-3
DEFAULT_MAX_ITER = 200
DEFAULT_K = 20
DEFAULT_SHOTS = 10  # labeled images per class in a few-shot draw
DEFAULT_DRAWS = 5  # few-shot draws averaged
DEFAULT_TEMPERATURE = 0.07
DEFAULT_MANY, DEFAULT_FEW = 300.0, 30.0

# evaluate_checkpoint's options, declared once: `mak evaluate`'s flags, `mak run`'s evaluate.* keys
# (shots, draws, many, few, knn_k, batch_size) and evaluate_checkpoint()'s defaults. The group
# thresholds compare with seed-set class counts, so they are integers.
EVALUATE_OPTIONS: tuple[Option, ...] = (
    Option("shots", DEFAULT_SHOTS, f"labeled images per class in a few-shot draw (default {DEFAULT_SHOTS})",
           integer(1), "N"),
    Option("draws", DEFAULT_DRAWS, f"few-shot draws averaged (default {DEFAULT_DRAWS})", integer(1), "N"),
    Option("seed", 0, "seed of the few-shot draws, an integer >= 0 (default 0)", integer(0), "S"),
    Option("many", None, f"Many group: seed count > N, an integer >= 1 (default: the benchmark's groups, else "
           f"{DEFAULT_MANY:g})", integer(1), "N"),
    Option("few", None, f"Few group: seed count < N, an integer >= 0 (default: the benchmark's groups, else "
           f"{DEFAULT_FEW:g})", integer(0), "N"),
    Option("k", DEFAULT_K, f"neighbours of the kNN classifier (default {DEFAULT_K})", integer(1), "K"),
    Option("temperature", DEFAULT_TEMPERATURE, f"temperature of the kNN's exp(cos/T) vote weights (default "
           f"{DEFAULT_TEMPERATURE:g})", number(0.0), "T", key="knn_temperature"),
    Option("l2", DEFAULT_L2, "L2 penalty of the linear probes, >= 0 (default 1e-3)",
           number(0.0, low_open=False), "L"),
    Option("max_iter", DEFAULT_MAX_ITER, f"L-BFGS iterations of the linear probes (default {DEFAULT_MAX_ITER})",
           integer(1), "N"),
    Option("batch_size", DEFAULT_BATCH_SIZE, f"feature extraction batch size (default {DEFAULT_BATCH_SIZE})",
           integer(1), "B"),
    Option("num_workers", 0, "DataLoader workers decoding images (default 0)", integer(0), "N", key="workers"),
)


# --------------------------------------------------------------------------- helpers


def _features(x: Any, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 2:
        raise MakError(f"{name}: expected a 2-D feature array (N x D), got shape {a.shape}")
    if a.shape[0] == 0:
        raise MakError(f"{name}: no samples")
    if not np.issubdtype(a.dtype, np.number):
        raise MakError(f"{name}: features must be numeric, got {a.dtype}")
    if not np.isfinite(a).all():
        raise MakError(f"{name}: features contain NaN or infinite values")
    return a


def _labels(y: Any, n: int, name: str) -> np.ndarray:
    a = np.asarray(y)
    if a.ndim != 1 or a.shape[0] != n:
        raise MakError(f"{name}: expected {n} labels, got shape {a.shape}")
    if a.size and not np.issubdtype(a.dtype, np.integer):
        if not np.all(np.mod(a, 1) == 0):
            raise MakError(f"{name}: labels must be integers")
    return a.astype(np.int64)


def _in_domain(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    keep = y >= 0
    return (x, y) if keep.all() else (x[keep], y[keep])


@dataclass
class ProbeResult:
    """Predictions of a classifier on the test features, and its accuracy when labels are known."""

    predictions: np.ndarray
    accuracy: float | None
    classes: np.ndarray

    def __iter__(self):  # allows ``pred, acc = linear_probe(...)``
        return iter((self.predictions, self.accuracy))


# --------------------------------------------------------------------------- linear probe


@contextlib.contextmanager
def _threads_for(work: int) -> Iterator[None]:
    """Run small problems (``work`` below ~4M multiply-adds) on one thread: thread start-up and
    synchronisation cost more than they save there, badly so on a busy machine."""
    if work >= 4_000_000 or torch.get_num_threads() == 1:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _fit_softmax(X: torch.Tensor, y: torch.Tensor, C: int, l2: float, max_iter: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimise mean cross-entropy + l2/2 ||W||^2 over (W, b) with L-BFGS from zeros.

    The gradient is written out (``X^T (P - Y) / N``) rather than taken by autograd: it is
    cheaper, and the product is computed with a contiguous ``X^T`` because a transposed-view
    matmul of this shape is very slow on some CPU BLAS builds.
    """
    n, d = X.shape
    XT = X.T.contiguous()
    W = torch.zeros(d, C, dtype=X.dtype, requires_grad=True)
    b = torch.zeros(C, dtype=X.dtype, requires_grad=True)
    rows = torch.arange(n)
    opt = torch.optim.LBFGS(
        [W, b], lr=1.0, max_iter=max_iter, history_size=20,
        tolerance_grad=1e-7, tolerance_change=1e-10, line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        with torch.no_grad():
            Z = X @ W + b
            logz = torch.logsumexp(Z, dim=1)
            loss = (logz - Z[rows, y]).mean() + 0.5 * l2 * (W * W).sum()
            P = torch.exp(Z - logz[:, None])
            P[rows, y] -= 1.0
            P /= n
            W.grad = XT @ P + l2 * W
            b.grad = P.sum(0)
        return loss

    opt.step(closure)
    return W.detach(), b.detach()


def linear_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray | None = None,
    *,
    l2: float = DEFAULT_L2,
    max_iter: int = DEFAULT_MAX_ITER,
) -> ProbeResult:
    """Fit a multinomial logistic regression on ``train_x`` and predict ``test_x``.

    Features are standardised with the training mean and (population) std (constant features
    are left centred only). The objective is the mean cross-entropy plus ``l2 / 2 * ||W||^2``,
    minimised with full-batch L-BFGS for at most ``max_iter`` iterations from zero weights, in
    float64: the result is a deterministic function of the inputs. The classes are the distinct
    training labels; predictions are labels. ``accuracy`` is None when ``test_y`` is None.
    """
    tx = _features(train_x, "train features")
    ty = _labels(train_y, tx.shape[0], "train labels")
    qx = _features(test_x, "test features")
    if qx.shape[1] != tx.shape[1]:
        raise MakError(f"test features have dimension {qx.shape[1]}, train features {tx.shape[1]}")
    qy = None if test_y is None else _labels(test_y, qx.shape[0], "test labels")
    if l2 < 0 or max_iter < 1:
        raise MakError("linear_probe needs l2 >= 0 and max_iter >= 1")
    classes, y_idx = np.unique(ty, return_inverse=True)
    if len(classes) == 1:
        pred = np.full(qx.shape[0], classes[0], dtype=np.int64)
    else:
        with torch.no_grad(), _threads_for(tx.shape[0] * tx.shape[1] * len(classes)):
            X = torch.as_tensor(np.ascontiguousarray(tx), dtype=torch.float64)
            mean = X.mean(0)
            std = X.std(0, unbiased=False)
            std = torch.where(std > 1e-12, std, torch.ones_like(std))
            X = (X - mean) / std
            W, b = _fit_softmax(X, torch.as_tensor(y_idx, dtype=torch.long), len(classes), l2, int(max_iter))
            Q = (torch.as_tensor(np.ascontiguousarray(qx), dtype=torch.float64) - mean) / std
            pred_idx = torch.cat([(Q[i: i + 8192] @ W + b).argmax(1) for i in range(0, len(Q), 8192)])
        pred = classes[pred_idx.numpy()]
    acc = None if qy is None else float((pred == qy).mean())
    return ProbeResult(pred.astype(np.int64), acc, classes)


# --------------------------------------------------------------------------- kNN


def knn_predict(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    *,
    k: int = DEFAULT_K,
    temperature: float = DEFAULT_TEMPERATURE,
    weighted: bool = True,
    chunk_size: int = 1024,
) -> np.ndarray:
    """Cosine kNN predictions (labels) of ``test_x`` against ``train_x`` (see module docstring).

    ``k`` is clipped to the number of training samples. Queries are processed ``chunk_size`` at a
    time, so memory is O(chunk_size x N_train).
    """
    tx = _features(train_x, "train features")
    ty = _labels(train_y, tx.shape[0], "train labels")
    qx = _features(test_x, "test features")
    if qx.shape[1] != tx.shape[1]:
        raise MakError(f"test features have dimension {qx.shape[1]}, train features {tx.shape[1]}")
    if k < 1 or chunk_size < 1:
        raise MakError("knn needs k >= 1 and chunk_size >= 1")
    if weighted and not temperature > 0:
        raise MakError("knn temperature must be > 0")
    classes, y_idx = np.unique(ty, return_inverse=True)
    k = min(int(k), tx.shape[0])
    yt = torch.as_tensor(y_idx, dtype=torch.long)
    out = np.empty(qx.shape[0], dtype=np.int64)
    # the whole training set is one bank chunk: each query chunk's similarities come from one product
    for s, e, sims, idx in cosine_topk(qx, tx, k, device="cpu", chunk=chunk_size, bank_chunk=tx.shape[0]):
        w = torch.exp(sims.double() / temperature) if weighted else torch.ones_like(sims, dtype=torch.float64)
        votes = torch.zeros(e - s, len(classes), dtype=torch.float64)
        votes.scatter_add_(1, yt[idx], w)
        out[s:e] = votes.argmax(1).numpy()
    return classes[out].astype(np.int64)


def knn_accuracy(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    k: int = DEFAULT_K,
    temperature: float = DEFAULT_TEMPERATURE,
    *,
    weighted: bool = True,
    chunk_size: int = 1024,
) -> ProbeResult:
    """Cosine kNN classification of ``test_x``; returns predictions and accuracy."""
    pred = knn_predict(train_x, train_y, test_x, k=k, temperature=temperature, weighted=weighted, chunk_size=chunk_size)
    qy = _labels(test_y, len(pred), "test labels")
    return ProbeResult(pred, float((pred == qy).mean()), np.unique(np.asarray(train_y)))


# --------------------------------------------------------------------------- per class / groups


def per_class_accuracy(
    y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray, classes: Iterable[int] | None = None
) -> dict[int, float]:
    """Accuracy of each class present in ``y_true`` (or of ``classes``; NaN for one absent)."""
    t = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(y_pred, dtype=np.int64)
    if t.shape != p.shape:
        raise MakError(f"{len(t)} true labels but {len(p)} predictions")
    cls = np.unique(t) if classes is None else [int(c) for c in classes]
    out: dict[int, float] = {}
    for c in cls:
        m = t == c
        out[int(c)] = float((p[m] == c).mean()) if m.any() else float("nan")
    return out


def class_groups(
    seed_counts: Mapping[Any, int], many: float = DEFAULT_MANY, few: float = DEFAULT_FEW
) -> dict[str, list[int]]:
    """Group classes by seed count: Many (``> many``), Medium (``few <= n <= many``), Few (``< few``)."""
    if few > many:
        raise MakError(f"the Few threshold ({few}) must not exceed the Many threshold ({many})")
    out: dict[str, list[int]] = {g: [] for g in GROUPS}
    for c, n in sorted(((int(c), int(n)) for c, n in seed_counts.items())):
        out["many" if n > many else "few" if n < few else "medium"].append(c)
    return out


def group_accuracy(
    per_class: Mapping[Any, float],
    seed_counts: Mapping[Any, int] | None = None,
    many: float = DEFAULT_MANY,
    few: float = DEFAULT_FEW,
    *,
    groups: Mapping[str, Iterable[int]] | None = None,
) -> dict[str, float | None]:
    """Mean accuracy of the Many, Medium and Few groups.

    The groups come from ``seed_counts`` and the thresholds (:func:`class_groups`) unless given
    explicitly as ``groups``. A group's accuracy is the unweighted mean over its classes that have
    an accuracy in ``per_class`` (NaN ignored); None for an empty group.
    """
    if groups is None:
        if seed_counts is None:
            raise MakError("group_accuracy needs seed_counts or groups")
        groups = class_groups(seed_counts, many, few)
    acc = {int(c): float(a) for c, a in per_class.items()}
    out: dict[str, float | None] = {}
    for g in GROUPS:
        vals = [acc[int(c)] for c in groups.get(g, []) if int(c) in acc and not math.isnan(acc[int(c)])]
        out[g] = float(np.mean(vals)) if vals else None
    return out


def group_std(group_acc: Mapping[str, float | None]) -> float | None:
    """Population standard deviation (ddof 0) of the non-empty group means; None if all empty."""
    vals = [float(v) for v in group_acc.values() if v is not None and not math.isnan(float(v))]
    return float(np.std(vals)) if vals else None


# --------------------------------------------------------------------------- few-shot


def fewshot_draw(labels: np.ndarray, shots: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``shots`` random items of each class of ``labels`` (all of a smaller class), sorted."""
    picks = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        picks.append(idx if len(idx) <= shots else rng.choice(idx, size=shots, replace=False))
    return np.sort(np.concatenate(picks))


def fewshot_probe(
    pool_x: np.ndarray,
    pool_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    shots: int | None = DEFAULT_SHOTS,
    draws: int = DEFAULT_DRAWS,
    seed: int = 0,
    *,
    l2: float = DEFAULT_L2,
    max_iter: int = DEFAULT_MAX_ITER,
) -> dict[str, Any]:
    """Few-shot linear probe: ``draws`` times, fit on ``shots`` labeled items per class of the pool.

    ``shots=None``: the few-shot pool as given is the training set (a fixed split such as MAK's
    1% ImageNet-100 split), fitted once.

    Draw ``d`` uses ``numpy.random.default_rng([seed, d])``; a class with fewer than ``shots``
    items contributes all of them. Returns ``mean`` and ``std`` (population, ddof 0) of the
    accuracy over draws, ``accs`` (one per draw), ``per_class`` (mean over draws of each test
    class's accuracy, int keys) and ``per_class_std``.
    """
    px = _features(pool_x, "few-shot pool features")
    py = _labels(pool_y, px.shape[0], "few-shot pool labels")
    qx = _features(test_x, "test features")
    qy = _labels(test_y, qx.shape[0], "test labels")
    if (shots is not None and shots < 1) or draws < 1:
        raise MakError("few-shot probe needs shots >= 1 (or None: the split as given) and draws >= 1")
    classes = np.unique(qy)
    accs, per_class = [], []
    for d in range(int(draws) if shots is not None else 1):
        rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, d])
        pick = fewshot_draw(py, int(shots), rng) if shots is not None else np.arange(len(py))
        res = linear_probe(px[pick], py[pick], qx, qy, l2=l2, max_iter=max_iter)
        accs.append(res.accuracy)
        pc = per_class_accuracy(qy, res.predictions, classes)
        per_class.append([pc[int(c)] for c in classes])
    pcm = np.asarray(per_class)
    return {
        "mean": float(np.mean(accs)),
        "std": float(np.std(accs)),
        "accs": [float(a) for a in accs],
        "per_class": {int(c): float(v) for c, v in zip(classes, pcm.mean(0))},
        "per_class_std": {int(c): float(v) for c, v in zip(classes, pcm.std(0))},
    }


# --------------------------------------------------------------------------- all together


def _checked_splits(
    train_x: np.ndarray,
    train_y: np.ndarray,
    fewshot_x: np.ndarray | None,
    fewshot_y: np.ndarray | None,
    test_x: np.ndarray,
    test_y: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Validate the train, few-shot pool and test arrays and drop their out-of-domain (-1) items."""
    tx = _features(train_x, "train features")
    ty = _labels(train_y, tx.shape[0], "train labels")
    qx = _features(test_x, "test features")
    qy = _labels(test_y, qx.shape[0], "test labels")
    tx, ty = _in_domain(tx, ty)
    qx, qy = _in_domain(qx, qy)
    if fewshot_x is None:
        fx, fy = tx, ty
    else:
        fx = _features(fewshot_x, "few-shot pool features")
        fy = _labels(fewshot_y, fx.shape[0], "few-shot pool labels")
        fx, fy = _in_domain(fx, fy)
    for name, a in (("train", tx), ("few-shot pool", fx), ("test", qx)):
        if len(a) == 0:
            raise MakError(f"the {name} split has no labeled in-domain items")
        if a.shape[1] != tx.shape[1]:
            raise MakError(f"the {name} features have dimension {a.shape[1]}, train features {tx.shape[1]}")
    return tx, ty, fx, fy, qx, qy


def _normalised_groups(
    groups: Mapping[str, Iterable[int]] | None, seed_counts: Mapping[Any, int] | None, many: float, few: float
) -> dict[str, list[int]] | None:
    """The Many/Medium/Few class lists (given, or from seed counts and thresholds) as sorted ints, or None."""
    if groups is None and seed_counts is not None:
        groups = class_groups(seed_counts, many, few)
    if groups is not None:
        groups = {g: sorted(int(c) for c in groups.get(g, [])) for g in GROUPS}
    return groups


def _probes(
    tx: np.ndarray, ty: np.ndarray, fx: np.ndarray, fy: np.ndarray, qx: np.ndarray, qy: np.ndarray, *,
    shots: int | None, draws: int, seed: int, k: int, temperature: float, l2: float, max_iter: int,
) -> tuple[ProbeResult, ProbeResult, dict[str, Any]]:
    """Run the full-shot linear probe, the kNN classifier and the few-shot probes on the test split."""
    full = linear_probe(tx, ty, qx, qy, l2=l2, max_iter=max_iter)
    knn = knn_accuracy(tx, ty, qx, qy, k=k, temperature=temperature)
    fs = fewshot_probe(fx, fy, qx, qy, shots=shots, draws=draws, seed=seed, l2=l2, max_iter=max_iter)
    return full, knn, fs


def _grouped(
    pc: Mapping[int, float], groups: Mapping[str, Iterable[int]] | None
) -> tuple[dict[str, float | None] | None, float | None]:
    """Many/Medium/Few accuracies of per-class accuracies and their std; (None, None) without groups."""
    if groups is None:
        return None, None
    ga = group_accuracy(pc, groups=groups)
    return ga, group_std(ga)


def _str_keys(d: Mapping[int, float]) -> dict[str, float]:
    """Per-class figures keyed by the class label as a string (JSON object keys)."""
    return {str(c): float(v) for c, v in d.items()}


def _accuracy_figures(
    qy: np.ndarray, full: ProbeResult, knn: ProbeResult, fs: Mapping[str, Any],
    groups: Mapping[str, Iterable[int]] | None,
) -> dict[str, Any]:
    """Overall, Many/Medium/Few and per-class accuracy entries of an evaluation result."""
    classes = np.unique(qy)
    pc_full = per_class_accuracy(qy, full.predictions, classes)
    pc_knn = per_class_accuracy(qy, knn.predictions, classes)
    g_few, s_few = _grouped(fs["per_class"], groups)
    g_full, s_full = _grouped(pc_full, groups)
    g_knn, s_knn = _grouped(pc_knn, groups)
    return {
        "fullshot_acc": full.accuracy,
        "fewshot_acc": fs["mean"],
        "fewshot_std": fs["std"],
        "fewshot_accs": fs["accs"],
        "knn_acc": knn.accuracy,
        "group_acc": g_few,
        "group_std": s_few,
        "fullshot_group_acc": g_full,
        "fullshot_group_std": s_full,
        "knn_group_acc": g_knn,
        "knn_group_std": s_knn,
        "per_class": {
            "fullshot": _str_keys(pc_full),
            "fewshot": _str_keys(fs["per_class"]),
            "fewshot_std": _str_keys(fs["per_class_std"]),
            "knn": _str_keys(pc_knn),
        },
    }


def _sorted_seed_counts(seed_counts: Mapping[Any, int] | None) -> dict[str, int] | None:
    """Seed counts sorted by class, with string class keys; None when not given."""
    if seed_counts is None:
        return None
    return {str(int(c)): int(n) for c, n in sorted(((int(c), int(n)) for c, n in seed_counts.items()))}


def _settings(
    shots: int | None, draws: int, seed: int, k: int, temperature: float, l2: float, max_iter: int,
    many: float, few: float,
) -> dict[str, Any]:
    """The evaluation settings entry of a result (one draw when the few-shot pool is used as given)."""
    return {
        "shots": None if shots is None else int(shots), "draws": int(draws) if shots is not None else 1,
        "seed": int(seed), "k": int(k),
        "temperature": float(temperature), "l2": float(l2), "max_iter": int(max_iter),
        "many": float(many), "few": float(few),
    }


def evaluate_features(
    train_x: np.ndarray,
    train_y: np.ndarray,
    fewshot_x: np.ndarray | None,
    fewshot_y: np.ndarray | None,
    test_x: np.ndarray,
    test_y: np.ndarray,
    seed_counts: Mapping[Any, int] | None = None,
    *,
    groups: Mapping[str, Iterable[int]] | None = None,
    many: float = DEFAULT_MANY,
    few: float = DEFAULT_FEW,
    shots: int | None = DEFAULT_SHOTS,
    draws: int = DEFAULT_DRAWS,
    seed: int = 0,
    k: int = DEFAULT_K,
    temperature: float = DEFAULT_TEMPERATURE,
    l2: float = DEFAULT_L2,
    max_iter: int = DEFAULT_MAX_ITER,
) -> dict[str, Any]:
    """Evaluate frozen features; returns a JSON-ready dict.

    Full-shot linear probe and kNN use the train split; the few-shot probe draws from the
    few-shot pool (the train split when ``fewshot_x`` is None). Groups come from ``groups`` or
    else from ``seed_counts`` and the thresholds; without either, group figures are None.
    Keys: ``fullshot_acc``, ``fewshot_acc`` (mean over draws), ``fewshot_std``, ``fewshot_accs``,
    ``knn_acc``, ``group_acc`` (few-shot group means), ``group_std``, ``fullshot_group_acc``,
    ``fullshot_group_std``, ``knn_group_acc``, ``knn_group_std``, ``per_class`` (``fullshot``,
    ``fewshot``, ``fewshot_std``, ``knn``; string class keys), ``groups``, ``seed_counts``,
    ``n`` (sample counts) and ``settings``. Labels -1 are dropped first.
    """
    tx, ty, fx, fy, qx, qy = _checked_splits(train_x, train_y, fewshot_x, fewshot_y, test_x, test_y)
    groups = _normalised_groups(groups, seed_counts, many, few)
    full, knn, fs = _probes(tx, ty, fx, fy, qx, qy, shots=shots, draws=draws, seed=seed, k=k,
                            temperature=temperature, l2=l2, max_iter=max_iter)
    return {
        **_accuracy_figures(qy, full, knn, fs, groups),
        "groups": groups,
        "seed_counts": _sorted_seed_counts(seed_counts),
        "n": {"train": int(len(ty)), "fewshot_pool": int(len(fy)), "test": int(len(qy)), "dim": int(tx.shape[1])},
        "settings": _settings(shots, draws, seed, k, temperature, l2, max_iter, many, few),
    }


# --------------------------------------------------------------------------- table


def _cell(v: Any, width: int = 8, std: Any = None) -> str:
    """Format a fraction as a percentage; ``{'mean','std'}`` dicts and ``std`` as ``m+-s``."""
    if isinstance(v, Mapping) and "mean" in v:
        v, std = v.get("mean"), v.get("std")
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return f"{'-':>{width}}"
    s = f"{100 * float(v):.1f}"
    if std is not None:
        s += f"+-{100 * float(std):.1f}"
    return f"{s:>{width}}"


def format_table(results: Mapping[str, Any], title: str | None = None) -> str:
    """A printable table of evaluation results.

    ``results`` is one :func:`evaluate_features` dict or ``{name: dict}`` for several models
    (figures may be numbers or ``{'mean': .., 'std': ..}``). Columns (percent): few-shot All (mean
    +- std over draws), its Many / Medium / Few group means and their std, full-shot linear probe,
    kNN. A single result is followed by its per-class table.
    """
    single = "fullshot_acc" in results
    rows = {"model": results} if single else dict(results)
    w = 13
    header = (f"{'':<20}{'few-shot':>{w}}{'many':>8}{'medium':>8}{'few':>8}{'grp std':>9}"
              f"{'full-shot':>{w}}{'kNN':>8}")
    lines = [] if title is None else [title]
    lines += [header, "-" * len(header)]
    for name, r in rows.items():
        ga = r.get("group_acc") or {}
        fstd = r.get("fewshot_std")
        fs = r.get("fewshot_acc")
        if isinstance(fs, Mapping):
            fstd = None
        lines.append(
            f"{str(name)[:19]:<20}{_cell(fs, w, fstd)}{_cell(ga.get('many'))}{_cell(ga.get('medium'))}"
            f"{_cell(ga.get('few'))}{_cell(r.get('group_std'), 9)}{_cell(r.get('fullshot_acc'), w)}"
            f"{_cell(r.get('knn_acc'))}"
        )
    if single and isinstance(results.get("per_class"), Mapping):
        pc = results["per_class"]
        group_of = {}
        for g, cs in (results.get("groups") or {}).items():
            for c in cs:
                group_of[str(c)] = g
        counts = results.get("seed_counts") or {}
        sub = f"{'class':>6}{'group':>8}{'seed n':>8}{'few-shot':>{w}}{'full-shot':>{w}}{'kNN':>8}"
        lines += ["", sub, "-" * len(sub)]
        for c in sorted(pc.get("fullshot", {}), key=int):
            lines.append(
                f"{c:>6}{group_of.get(c, '-'):>8}{str(counts.get(c, '-')):>8}"
                f"{_cell(pc['fewshot'].get(c), w, pc.get('fewshot_std', {}).get(c))}"
                f"{_cell(pc['fullshot'].get(c), w)}{_cell(pc['knn'].get(c))}"
            )
    return "\n".join(lines)


# --------------------------------------------------------------------------- checkpoint


def _split_labels(source: Any) -> np.ndarray:
    from mak.bench.analysis import labels_from_items

    items = source.items() if hasattr(source, "items") else [source.item(i) for i in range(len(source))]
    try:
        return labels_from_items(items)
    except MakError as exc:  # name the split the line is in
        raise MakError(f"{getattr(source, 'split_file', None) or source.name}: {exc}") from None


def _resolve_splits(
    bench: str | os.PathLike | None,
    train_split: str | os.PathLike | None,
    fewshot_split: str | os.PathLike | None,
    test_split: str | os.PathLike | None,
    seed_split: str | os.PathLike | None,
) -> tuple[dict[str, Any] | None, Any, Any, Any, Any]:
    """The benchmark manifest (or None) and the train, few-shot, test and seed split paths to use."""
    manifest = None
    if bench is not None:
        from mak.bench import openworld

        manifest = openworld.load_manifest(bench)
        train_split = train_split or openworld.split_path(bench, "fullshot")
        fewshot_split = fewshot_split or openworld.split_path(bench, "fewshot")
        test_split = test_split or openworld.split_path(bench, "test")
        seed_split = seed_split or openworld.split_path(bench, "seed")
    if train_split is None or test_split is None:
        raise MakError("give --bench DIR, or --train-split and --test-split")
    return manifest, train_split, fewshot_split, test_split, seed_split


def _embed_split(
    model: Any, path: str | os.PathLike, what: str, image_size: int, channels: int, *,
    root: str | os.PathLike | None, device: str, batch_size: int, num_workers: int, verbose: bool, progress: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """Backbone features (float32) and labels of one split file, reporting the time taken when verbose
    and showing a bar of images when ``progress``."""
    from mak.data.sources import labeled_source
    from mak.train.embed import compute_features

    source = labeled_source(path, root=root)
    labels = _split_labels(source)
    t0 = time.time()
    feats = compute_features(model, source, image_size, channels, batch_size=batch_size,
                             device=device, num_workers=num_workers, progress=f"features: {what}" if progress else None)
    if verbose:
        print(f"features: {what} {np.asarray(feats).shape} in {time.time() - t0:.1f}s", file=sys.stderr)
    return np.asarray(feats, dtype=np.float32), labels


def _embed_splits(
    checkpoint: str | os.PathLike,
    train_split: str | os.PathLike,
    fewshot_split: str | os.PathLike | None,
    test_split: str | os.PathLike,
    **options: Any,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None, np.ndarray, np.ndarray]:
    """Load the checkpoint's model and embed the train, few-shot pool (if any) and test splits."""
    from mak.train.pretrain import load_model

    model, config = load_model(checkpoint, options["device"])
    image_size, channels = int(config["image_size"]), int(config["channels"])
    train_x, train_y = _embed_split(model, train_split, "train", image_size, channels, **options)
    if fewshot_split is not None:
        few_x, few_y = _embed_split(model, fewshot_split, "few-shot pool", image_size, channels, **options)
    else:
        few_x = few_y = None
    test_x, test_y = _embed_split(model, test_split, "test", image_size, channels, **options)
    return train_x, train_y, few_x, few_y, test_x, test_y


def _seed_class_counts(
    seed_split: str | os.PathLike | None, root: str | os.PathLike | None, train_y: np.ndarray, test_y: np.ndarray
) -> dict[int, int] | None:
    """Per-class counts of the seed split, 0 for train/test classes absent from it; None without a seed split."""
    if seed_split is None:
        return None
    from mak.data.sources import labeled_source

    seed_labels = _split_labels(labeled_source(seed_split, root=root))
    seed_labels = seed_labels[seed_labels >= 0]
    counts = {int(c): int(n) for c, n in zip(*np.unique(seed_labels, return_counts=True))}
    for c in np.unique(np.concatenate([train_y[train_y >= 0], test_y[test_y >= 0]])):
        counts.setdefault(int(c), 0)
    return counts


def _group_thresholds(
    manifest: Mapping[str, Any] | None, many: float | None, few: float | None
) -> tuple[dict[str, list[int]] | None, float, float]:
    """The manifest's groups and thresholds when no threshold is given, else no groups and the thresholds."""
    if manifest is not None and many is None and few is None:
        from mak.bench import openworld

        groups = openworld.groups(manifest)
        thr = manifest.get("group_thresholds", {})
        return groups, float(thr.get("many", DEFAULT_MANY)), float(thr.get("few", DEFAULT_FEW))
    many_v = DEFAULT_MANY if many is None else float(many)
    few_v = DEFAULT_FEW if few is None else float(few)
    return None, many_v, few_v


def _report_checkpoint(
    results: dict[str, Any], checkpoint: str | os.PathLike, splits: Mapping[str, Any],
    out: str | os.PathLike | None, verbose: bool,
) -> dict[str, Any]:
    """Add the checkpoint and split paths to the results, write them to ``out`` and print the table."""
    from mak.atomic import write_json

    results["checkpoint"] = str(checkpoint)
    results["splits"] = {name: None if path is None else str(path) for name, path in splits.items()}
    if out is not None:
        write_json(Path(out), results)
    if verbose:
        print(format_table(results, title=f"checkpoint {checkpoint}"))
    return results


_DEFAULT = defaults(EVALUATE_OPTIONS)


def evaluate_checkpoint(
    checkpoint: str | os.PathLike,
    bench: str | os.PathLike | None = None,
    *,
    train_split: str | os.PathLike | None = None,
    fewshot_split: str | os.PathLike | None = None,
    test_split: str | os.PathLike | None = None,
    seed_split: str | os.PathLike | None = None,
    root: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    device: str = "cpu",
    batch_size: int = DEFAULT_BATCH_SIZE,
    num_workers: int = _DEFAULT["num_workers"],
    shots: int | None = DEFAULT_SHOTS,
    draws: int = DEFAULT_DRAWS,
    seed: int = _DEFAULT["seed"],
    many: float | None = None,
    few: float | None = None,
    k: int = DEFAULT_K,
    temperature: float = DEFAULT_TEMPERATURE,
    l2: float = DEFAULT_L2,
    max_iter: int = DEFAULT_MAX_ITER,
    verbose: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate the frozen backbone of ``checkpoint`` on split-file datasets.

    The splits are a benchmark directory's ``fullshot``, ``fewshot``, ``test`` and ``seed`` files
    (``bench``), each replaceable by an explicit split file; without ``bench``, ``train_split`` and
    ``test_split`` are required (the few-shot pool defaults to the train split; without a seed
    split there are no group figures). Groups: the benchmark manifest's when neither ``many`` nor
    ``few`` is given, else from the seed split's class counts and those thresholds (defaults 300
    and 30). Features: backbone outputs without augmentation (:func:`mak.train.embed.compute_features`).
    Writes the results as JSON to ``out`` (atomically) when given, prints the table when
    ``verbose`` (and a bar of images per split when ``progress``), and returns the results.
    """
    if out is not None:
        output_file(out)  # before the features are computed
    manifest, train_split, fewshot_split, test_split, seed_split = _resolve_splits(
        bench, train_split, fewshot_split, test_split, seed_split)
    train_x, train_y, few_x, few_y, test_x, test_y = _embed_splits(
        checkpoint, train_split, fewshot_split, test_split, root=root, device=device, batch_size=batch_size,
        num_workers=num_workers, verbose=verbose, progress=progress)
    counts = _seed_class_counts(seed_split, root, train_y, test_y)
    groups, many_v, few_v = _group_thresholds(manifest, many, few)
    results = evaluate_features(
        train_x, train_y, few_x, few_y, test_x, test_y, counts, groups=groups, many=many_v, few=few_v,
        shots=shots, draws=draws, seed=seed, k=k, temperature=temperature, l2=l2, max_iter=max_iter,
    )
    splits = {"train": train_split, "fewshot": fewshot_split, "test": test_split, "seed": seed_split}
    return _report_checkpoint(results, checkpoint, splits, out, verbose)
