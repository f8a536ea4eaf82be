"""Tailness: ECLE, the empirical contrastive loss expectation of each pool image.

For every unordered pair of augmented views (a, b) and each of ``partitions`` random orderings
of the N images, the ordering is cut into batches of ``batch_size`` images; each batch's 2B
vectors form one NT-Xent problem and every image takes the mean of its two directional losses.
ECLE is the mean over pairs and orderings. Tail-class images have few similar neighbours in the
model's embedding, hence a high loss.

Implementation: for one batch all R views are gathered once and the (R*B) x (R*B) Gram matrix is
formed in B x B blocks. With ``S[a, b, i] = sum_j exp(cos(a_i, b_j) / t)`` (self excluded when
a == b), the loss of ``a_i`` in pair (a, b) is ``log(S[a,a,i] + S[a,b,i]) - cos(a_i, b_i)/t``, so
every pair of views reuses the same Gram blocks. The matrix is symmetric, so only the blocks
(a, c) with c >= a are formed: their row sums are ``S[a, c]`` and their column sums ``S[c, a]``.
R(R+1)/2 blocks of B x B: 0.31x the FLOPs and exponentials of scoring each pair separately at
R = 10, in O(R * B^2) memory per batch and O(N) overall. On a CPU each block is exponentiated and
summed while it is in cache; on a GPU a block row of several batches is one batched matmul.
"""
from __future__ import annotations

import itertools
from typing import Any, Callable, Iterator

import numpy as np
import torch

from mak._tensor import is_tensor, l2_normalize, resolve_device, to_tensor
from mak.errors import MakError

GROUP_ELEMENTS = 2**26  # logits per grouped block-row product on a GPU: 256 MiB in float32


def partition_order(n: int, seed: int, partition: int) -> torch.Tensor:
    """The ``partition``-th random ordering of ``n`` rows for ``seed`` (identical on every rank)."""
    g = torch.Generator(device="cpu")
    g.manual_seed((int(seed) * 1_000_003 + int(partition)) % (2**63 - 1))
    return torch.randperm(n, generator=g)


def batch_plan(n: int, batch_size: int) -> list[tuple[int, int, int]]:
    """Batches of one ordering as (start, stop, first_scored) positions into the ordering.

    Full batches are consecutive; when ``n`` is not a multiple of ``batch_size`` the last batch
    is the last ``batch_size`` positions and only positions >= ``first_scored`` take its loss.
    With ``n <= batch_size`` there is a single batch of all ``n``.
    """
    if n <= batch_size:
        return [(0, n, 0)]
    plan = [(s, s + batch_size, s) for s in range(0, n - batch_size + 1, batch_size)]
    done = plan[-1][1]
    if done < n:
        plan.append((n - batch_size, n, done))
    return plan


def batch_losses(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """Summed NT-Xent losses over all view pairs for one batch, or for G batches at once.

    ``z``: (R, B, d) L2-normalised views of B images, or (G, R, B, d) for G batches. Returns (B,)
    (or (G, B)) float32: for each image the sum, over the R(R-1)/2 unordered pairs (a, b), of the
    mean of its two directional losses. On a CPU the Gram matrix is formed one B x B block at a time
    (the block stays in cache while it is exponentiated and summed); on a GPU one block row of all G
    batches per kernel (few launches per batch).
    """
    grouped = z.ndim == 4
    zg = z if grouped else z[None]
    inv_t = 1.0 / float(temperature)
    # Exponentials relative to the largest possible logit (cos <= 1); exact algebra, and in
    # float32 no underflow while 2/t < ~80 (t > 0.025). Below that, work in float64.
    work = torch.float32 if temperature > 0.025 else torch.float64
    zw = zg.to(work)
    sums = _block_sums if zw.device.type == "cpu" else _block_row_sums
    s, pos = sums(zw, inv_t)
    # loss of a_i in pair (a, c): log(S[a,a,i] + S[a,c,i]) - pos[a,c,i]; image i's sum over the
    # unordered pairs of the mean of both directions is half the sum over ordered pairs a != c
    # (all pairs in a few batched kernels: one launch per op, not per pair, matters on GPUs)
    diag = torch.diagonal(s, dim1=1, dim2=2).transpose(1, 2)  # (G, R, B): S[a, a, i]
    loss = torch.log(s + diag[:, :, None, :]).sub_(pos)  # (G, R, R, B)
    torch.diagonal(loss, dim1=1, dim2=2).zero_()  # a == c is not a pair
    total = loss.sum(dim=(1, 2)).mul_(0.5).float()
    return total if grouped else total[0]


def _block_sums(z: torch.Tensor, inv_t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``S[g, a, c, i]`` and ``pos[g, a, c, i] = (cos(a_i, c_i) - 1) / t`` for (G, R, B, d) views,
    one B x B Gram block (a, c >= a) at a time: its row sums are S[a, c], its column sums S[c, a]."""
    gn, r, b, _ = z.shape
    s = torch.empty((gn, r, r, b), dtype=z.dtype)
    pos = torch.empty_like(s)
    shift = torch.full((1,), -inv_t, dtype=z.dtype)
    block = torch.empty((b, b), dtype=z.dtype)
    for g in range(gn):
        for a in range(r):
            for c in range(a, r):
                torch.addmm(shift, z[g, a], z[g, c].T, alpha=inv_t, out=block)  # (cos - 1) / t
                same = torch.diagonal(block)
                pos[g, a, c] = same
                pos[g, c, a] = same  # cos(c_i, a_i) = cos(a_i, c_i)
                block.exp_()
                if c == a:
                    same.zero_()  # exclude k = a_i itself
                torch.sum(block, 1, out=s[g, a, c])
                if c > a:
                    torch.sum(block, 0, out=s[g, c, a])  # S[c, a, j] = sum_i exp(cos(c_j, a_i) / t)
    return s, pos


def _block_row_sums(z: torch.Tensor, inv_t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_block_sums` by block rows: the blocks (a, c >= a) of all G batches in one batched
    matmul, exponentiated in place, then reduced (a handful of kernels per block row)."""
    gn, r, b, _ = z.shape
    flat = z.reshape(gn, r * b, -1)
    s = torch.empty((gn, r, r, b), dtype=z.dtype, device=z.device)
    pos = torch.empty_like(s)
    shift = torch.full((1,), -inv_t, dtype=z.dtype, device=z.device)
    for a in range(r):
        rows = torch.baddbmm(shift, z[:, a], flat[:, a * b :].transpose(1, 2), alpha=inv_t)  # (G, B, (R-a)*B)
        view = rows.view(gn, b, r - a, b)  # [g, i, c - a, j]
        same = torch.diagonal(view, dim1=1, dim2=3)  # [g, c - a, i]
        pos[:, a, a:] = same
        pos[:, a + 1 :, a] = same[:, 1:]
        rows.exp_()
        torch.diagonal(view[:, :, 0, :], dim1=1, dim2=2).zero_()
        s[:, a, a:] = view.sum(dim=3).transpose(1, 2)
        s[:, a + 1 :, a] = view[:, :, 1:, :].sum(dim=1)
    return s, pos


def _views_getter(views: Any, device: torch.device) -> tuple[Callable[[np.ndarray], torch.Tensor], int, int, int]:
    if is_tensor(views):
        if views.ndim != 3:
            raise MakError(f"views must be (R, N, d), got shape {tuple(views.shape)}")
        r, n, d = views.shape

        def get(idx: np.ndarray) -> torch.Tensor:
            t = torch.as_tensor(idx, device=views.device)
            return views.index_select(1, t).to(device=device, dtype=torch.float32)

        return get, r, n, d
    # numpy arrays, memmaps and lazy row readers (anything indexable as views[:, rows, :]) are read
    # batch by batch; only plain sequences are converted whole.
    arr = views if hasattr(views, "shape") and hasattr(views, "__getitem__") else np.asarray(views)
    if len(arr.shape) != 3:
        raise MakError(f"views must be (R, N, d), got shape {tuple(arr.shape)}")
    r, n, d = arr.shape

    def get_np(idx: np.ndarray) -> torch.Tensor:
        return to_tensor(arr[:, idx, :], device)

    return get_np, r, n, d


def iter_batches(n: int, batch_size: int, partitions: int, seed: int) -> Iterator[tuple[int, int, np.ndarray, int]]:
    """Yield (partition, batch number, rows, skip) for every batch of every ordering.

    ``rows`` are the batch's pool rows in ordering order; ``rows[skip:]`` take their loss from
    this batch (``skip > 0`` only for the overlapping last batch of an ordering).
    """
    plan = batch_plan(n, batch_size)
    for p in range(partitions):
        order = None if n <= batch_size else partition_order(n, seed, p).numpy()
        for k, (lo, hi, first) in enumerate(plan):
            rows = np.arange(n) if order is None else order[lo:hi]
            yield p, k, rows, first - lo


def ecle_sum(views: Any, temperature: float = 0.2, batch_size: int = 512, partitions: int = 10, seed: int = 0,
             device: str | torch.device | None = None, owner: Callable[[int, int], bool] | None = None,
             progress: bool = False) -> tuple[np.ndarray, int]:
    """Sum of per-pair losses for each image over the batches this process owns.

    ``owner(partition, batch)`` selects the batches scored here (default: all). Returns the float64
    sum (exact for float32 terms, so the order in which batches are added does not matter) and
    the number of (pair, partition) terms each image receives overall.
    """
    dev = resolve_device(device, views)
    get, r, n, _ = _views_getter(views, dev)
    if r < 2:
        raise MakError(f"ECLE needs at least 2 augmented views, got R = {r}")
    if n == 0:
        raise MakError("ECLE needs at least one pool image (N = 0)")
    if batch_size < 2 and n > 1:
        raise MakError(f"ECLE batch size must be >= 2, got {batch_size}")
    if temperature <= 0:
        raise MakError(f"temperature must be > 0, got {temperature}")
    partitions = 1 if n <= batch_size else partitions  # one batch of all: orderings are all equal
    acc = np.zeros(n, dtype=np.float64)
    from mak.progress import bar as progress_bar

    # counts images scored: each ordering scores every image once (one batch of all when n <= batch_size)
    bar = progress_bar(n * partitions, "ECLE", unit="img", enabled=progress)
    if dev.type != "cpu" and is_tensor(views) and views.device == dev:
        # views already on the GPU: the sums stay there too (no host round trip per batch)
        acc_dev = torch.zeros(n, dtype=torch.float64, device=dev)
        _ecle_sum_resident(views, acc_dev, temperature, batch_size, partitions, seed, owner, bar)
        bar.close()
        return acc_dev.cpu().numpy(), (r * (r - 1) // 2) * partitions
    with torch.inference_mode():
        for p, k, rows, skip in iter_batches(n, batch_size, partitions, seed):
            if owner is not None and not owner(p, k):
                bar.update(len(rows) - skip)
                continue
            scored = rows[skip:]
            srt = np.sort(rows)  # within a batch, order does not change any loss: read rows in order
            z = l2_normalize(get(srt).reshape(r * len(srt), -1)).view(r, len(srt), -1)
            loss = batch_losses(z, temperature).cpu().numpy().astype(np.float64)
            if skip:
                pos = np.searchsorted(srt, scored)
                acc[scored] += loss[pos]
            else:
                acc[srt] += loss
            bar.update(len(scored))
    bar.close()
    return acc, (r * (r - 1) // 2) * partitions


def _ecle_sum_resident(views: torch.Tensor, acc: torch.Tensor, temperature: float, batch_size: int,
                       partitions: int, seed: int, owner: Callable[[int, int], bool] | None, bar,
                       group: int | None = None) -> None:
    """:func:`ecle_sum`'s loop for views already on the GPU: the same batches as
    :func:`iter_batches`, with orderings, sorting and scatter-adds on the device (no host round
    trip per batch), ``group`` batches (all of one size) scored by one :func:`batch_losses` call."""
    r, n, _ = views.shape
    plan = batch_plan(n, batch_size)
    size = plan[0][1] - plan[0][0]
    group = group or max(1, GROUP_ELEMENTS // (size * size * r))

    def owned() -> Iterator[tuple[int, int, int, int]]:  # (partition, start, stop, first scored), streamed
        for p in range(partitions):
            for k, (lo, hi, first) in enumerate(plan):
                if owner is None or owner(p, k):
                    yield p, lo, hi, first
                else:
                    bar.update(hi - first)  # scored by another rank

    tasks = owned()
    orders: dict[int, torch.Tensor] = {}
    with torch.inference_mode():
        while chunk := list(itertools.islice(tasks, group)):
            needed = {p for p, *_ in chunk}
            orders = {p: o for p, o in orders.items() if p in needed}  # only this group's orderings
            for p in sorted(needed - orders.keys()):
                orders[p] = (torch.arange(n, device=views.device) if n <= batch_size
                             else partition_order(n, seed, p).to(views.device, non_blocking=True))
            rows = torch.stack([orders[p][lo:hi] for p, lo, hi, _ in chunk])  # (G, B)
            _score_group(views, rows, [first - lo for _, lo, _, first in chunk], temperature, acc)
            bar.update(sum(hi - first for _, _, hi, first in chunk))


def _score_group(views: torch.Tensor, rows: torch.Tensor, skips: list[int], temperature: float,
                 acc: torch.Tensor) -> None:
    """Add the losses of G batches (``rows``: (G, B) pool rows in ordering order) to ``acc``; batch
    g's first ``skips[g]`` positions were scored by an earlier batch of its ordering."""
    r = views.shape[0]
    gn, size = rows.shape
    srt = torch.sort(rows, dim=1).values  # within a batch, order does not change any loss
    z = views.index_select(1, srt.flatten()).float()  # (R, G * B, d)
    z = l2_normalize(z.reshape(-1, z.shape[-1])).view(r, gn, size, -1).transpose(0, 1).contiguous()
    loss = batch_losses(z, temperature).double()  # (G, B)
    for j, skip in enumerate(skips):
        if skip:
            scored = rows[j, skip:]
            acc.index_add_(0, scored, loss[j][torch.searchsorted(srt[j], scored)])
        else:
            acc.index_add_(0, srt[j], loss[j])


def ecle(views: Any, temperature: float = 0.2, batch_size: int = 512, partitions: int = 10, seed: int = 0,
         device: str | torch.device | None = None, progress: bool = False) -> np.ndarray:
    """Empirical contrastive loss expectation of each of N images, shape (N,), float32.

    ``views``: (R, N, d) projection-head outputs under R >= 2 random augmentations (numpy array,
    memmap or tensor; runs on the tensor's device, or ``device``). Memory O(R * batch^2 + N).
    With ``batch_size >= N`` the result does not depend on ``seed``.
    """
    acc, terms = ecle_sum(views, temperature, batch_size, partitions, seed, device=device, progress=progress)
    return (acc / terms).astype(np.float32)
