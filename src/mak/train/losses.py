"""NT-Xent (the SimCLR contrastive loss), per sample and averaged.

``nt_xent_per_sample(a, b, t)`` treats the 2B L2-normalised vectors of a batch as one problem:
for view ``a_i`` the positive is ``b_i`` and the negatives are the other 2B-2 vectors; the loss of
image ``i`` is the mean of its two directions. This one kernel serves training (``nt_xent``)
and tailness scoring (:func:`mak.selection.tailness.ecle`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def nt_xent_per_sample(a: torch.Tensor, b: torch.Tensor, temperature: float = 0.2,
                       normalized: bool = False) -> torch.Tensor:
    """Per-image NT-Xent loss of a batch of paired views, shape (B,), float32.

    ``a``, ``b``: (B, d) projections of the same B images under two augmentations.
    Memory O(B^2); computed in float32 whatever the input dtype.
    """
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"expected two (B, d) tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    a = a.float()
    b = b.float()
    if not normalized:
        a = F.normalize(a, dim=1)
        b = F.normalize(b, dim=1)
    bsz = a.shape[0]
    z = torch.cat([a, b], dim=0)  # (2B, d)
    logits = (z @ z.T) / temperature  # (2B, 2B)
    logits.fill_diagonal_(float("-inf"))
    pos_idx = torch.arange(2 * bsz, device=z.device)
    pos_idx = torch.where(pos_idx < bsz, pos_idx + bsz, pos_idx - bsz)
    pos = logits.gather(1, pos_idx[:, None]).squeeze(1)
    loss = torch.logsumexp(logits, dim=1) - pos  # (2B,)
    return 0.5 * (loss[:bsz] + loss[bsz:])


def nt_xent(a: torch.Tensor, b: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """Mean NT-Xent loss over the batch (scalar)."""
    return nt_xent_per_sample(a, b, temperature).mean()


def nt_xent_global(a: torch.Tensor, b: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """Mean NT-Xent over the *global* batch when running under DDP (plain ``nt_xent`` otherwise).

    Each rank's projections ``a``, ``b`` (B_local, d) are all-gathered, the local part keeping its
    gradient, so every image's negatives are the other 2·B_global - 2 vectors of all ranks. The
    value equals :func:`nt_xent` on the concatenated batch; note that DDP averages gradients over
    ranks, so multiply the loss by the world size before ``backward`` to get the gradient of the
    global loss.
    """
    from mak.distributed import all_gather_with_grad

    return nt_xent(all_gather_with_grad(a), all_gather_with_grad(b), temperature)
