"""Process-group helpers for running under ``torchrun`` (DDP pretrain, sharded embed/select).

Outside torchrun everything degrades to a single process: ``rank() == 0``, ``world_size() == 1``
and the collectives are no-ops.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.distributed as dist

from mak._tensor import auto_device


def launched_by_torchrun() -> bool:
    """True when the environment variables torchrun sets are present with WORLD_SIZE > 1."""
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: str | torch.device = "cpu") -> bool:
    """Initialise the default process group if launched by torchrun; return whether it is active.

    gloo on CPU, NCCL when ``device`` is CUDA; the environment variable ``MAK_DIST_BACKEND``
    (``gloo`` or ``nccl``) overrides the choice. NCCL needs one GPU per process; with more
    processes than GPUs on a node (testing DDP on one GPU, say) use ``MAK_DIST_BACKEND=gloo``,
    which shares the GPUs round-robin. Safe to call more than once.
    """
    if dist.is_available() and dist.is_initialized():
        return True
    if not launched_by_torchrun():
        return False
    dev = auto_device(device)
    backend = backend_for(dev)
    if dev.type == "cuda":
        count = torch.cuda.device_count()
        nlocal = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        if backend == "nccl" and nlocal > count:
            from mak.errors import MakError

            raise MakError(f"NCCL needs one GPU per process: {nlocal} processes on this node but "
                           f"{count} GPU(s); use fewer processes or MAK_DIST_BACKEND=gloo")
        torch.cuda.set_device(local_device(torch.device("cuda")))
    dist.init_process_group(backend=backend)
    return True


def backend_for(device: str | torch.device) -> str:
    """The process-group backend for ``device``: ``MAK_DIST_BACKEND`` if set, else NCCL on CUDA
    and gloo otherwise."""
    forced = os.environ.get("MAK_DIST_BACKEND", "").strip().lower()
    if forced:
        if forced not in ("gloo", "nccl"):
            from mak.errors import MakError

            raise MakError(f"MAK_DIST_BACKEND must be gloo or nccl, not {forced!r}")
        return forced
    return "nccl" if auto_device(device).type == "cuda" else "gloo"


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def local_device(device: str) -> torch.device:
    """The device this rank should use: ``cuda:LOCAL_RANK`` under torchrun with CUDA."""
    dev = auto_device(device)
    if dev.type == "cuda" and dev.index is None:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        return torch.device("cuda", local % max(1, torch.cuda.device_count()))
    return dev


def barrier() -> None:
    if active():
        dist.barrier()


def shard_range(n: int, r: int | None = None, w: int | None = None) -> tuple[int, int]:
    """Contiguous rows ``[start, stop)`` of ``n`` owned by rank ``r`` of ``w`` (balanced)."""
    r = rank() if r is None else r
    w = world_size() if w is None else w
    base, extra = divmod(n, w)
    start = r * base + min(r, extra)
    return start, start + base + (1 if r < extra else 0)


@contextmanager
def process_group(device: str | torch.device = "cpu") -> Iterator[bool]:
    """:func:`init` for the duration of a block; yields whether a process group is active.

    At the end the group is torn down only if this block started it, waiting for the other ranks
    first unless the block raised (see :func:`cleanup`); a group that was already up stays up.
    """
    was = dist.is_available() and dist.is_initialized()
    on = init(device)
    ok = False
    try:
        yield on
        ok = True
    finally:
        if on and not was:
            cleanup(sync=ok)


def cleanup(sync: bool = True) -> None:
    """Tear down the process group. With ``sync`` every rank first waits for the others, so that no
    rank drops its connections while a peer still talks to it (gloo can abort the process then).
    Error paths pass ``sync=False``: a rank that failed alone must not wait for ranks that never come."""
    if dist.is_available() and dist.is_initialized():
        if sync and active():
            dist.barrier()
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------
# Helpers for DDP pre-training (appended for mak.train.pretrain / mak.train.embed).
# --------------------------------------------------------------------------------------------

def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0, keeping the gradient of the local part.

    The other ranks' parts are constants here; each rank back-propagates through its own rows
    only, which (summed over ranks by DDP) is the gradient of the loss over the global batch.
    Equal-sized ``x`` on every rank is required. A no-op on one process.
    """
    if not active():
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    parts[rank()] = x
    return torch.cat(parts, dim=0)


def broadcast_object(obj, src: int = 0):
    """Broadcast a picklable object from ``src`` to every rank (identity on one process)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj) -> list:
    """Gather a picklable object from every rank, in rank order (``[obj]`` on one process)."""
    if not active():
        return [obj]
    out: list = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def wrap_ddp(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``DistributedDataParallel(module)`` without per-forward buffer broadcasts (BatchNorm is synced)."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel as DDP

    kwargs: dict = {"device_ids": [device.index] if device.type == "cuda" else None}
    if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters:
        kwargs["forward_sync_buffers"] = False
    else:  # pragma: no cover - older torch
        kwargs["broadcast_buffers"] = False
    return DDP(module, **kwargs)


# --------------------------------------------------------------------------------------------
# Collectives for distributed selection (mak.selection.scale: the context, dedup and k-center).
# Each takes and returns numpy arrays / Python numbers, moves data to the
# backend's device (CPU for gloo, the local GPU for NCCL) and is an identity on one process.
# --------------------------------------------------------------------------------------------

def comm_device() -> torch.device:
    """The device collectives run on: the current CUDA device under NCCL, else CPU."""
    if active() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _to_comm(arr) -> torch.Tensor:
    import numpy as np

    return torch.from_numpy(np.ascontiguousarray(arr)).to(comm_device())


def all_reduce_array(arr, op: str = "sum"):
    """Element-wise ``sum``/``min``/``max`` of a numpy array over all ranks (same shape everywhere)."""
    import numpy as np

    arr = np.asarray(arr)
    if not active():
        return arr.copy()
    t = _to_comm(arr.copy())
    dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op])
    return t.cpu().numpy()


def all_reduce_scalar(value, op: str = "sum", dtype=None):
    """``sum``/``min``/``max`` of one number over all ranks (float64 unless ``dtype``)."""
    import numpy as np

    a = np.array([value], dtype=dtype or np.float64)
    return all_reduce_array(a, op)[0].item()


def broadcast_array(arr, shape, dtype, src: int):
    """Send ``arr`` (significant on ``src`` only) of ``shape``/``dtype`` to every rank."""
    import numpy as np

    if not active():
        return np.asarray(arr, dtype=dtype).reshape(shape)
    if rank() == src:
        t = _to_comm(np.asarray(arr, dtype=dtype).reshape(shape))
    else:
        t = torch.empty(tuple(shape), dtype=torch.from_numpy(np.zeros(0, dtype=dtype)).dtype, device=comm_device())
    dist.broadcast(t, src=src)
    return t.cpu().numpy()


def all_gather_varlen(arr) -> list:
    """Gather a 1-D (or N x ...) numpy array of any length from every rank, in rank order."""
    import numpy as np

    arr = np.ascontiguousarray(arr)
    if not active():
        return [arr]
    w = world_size()
    counts = all_gather_counts(arr.shape[0])
    top = max(max(counts), 1)
    pad = np.zeros((top,) + arr.shape[1:], dtype=arr.dtype)
    pad[: arr.shape[0]] = arr
    t = _to_comm(pad)
    parts = [torch.empty_like(t) for _ in range(w)]
    dist.all_gather(parts, t)
    return [p.cpu().numpy()[:c] for p, c in zip(parts, counts)]


def all_gather_counts(n: int) -> list[int]:
    """Every rank's ``n``, in rank order."""
    if not active():
        return [int(n)]
    t = torch.tensor([int(n)], dtype=torch.int64, device=comm_device())
    parts = [torch.empty_like(t) for _ in range(world_size())]
    dist.all_gather(parts, t)
    return [int(p.item()) for p in parts]


def reduce_to_owners(acc, chunk: int = 1 << 20):
    """Sum ``acc`` (length N, same on every rank) over ranks, keeping only this rank's rows.

    Rows are owned as in :func:`shard_range`; the sum is sent to each owner by chunked
    ``reduce`` calls, so no rank holds a second N-long buffer. Returns the owned slice.
    """
    import numpy as np

    acc = np.ascontiguousarray(acc)
    n = acc.shape[0]
    if not active():
        return acc
    me = rank()
    out = None
    for r in range(world_size()):
        lo, hi = shard_range(n, r)
        part = np.empty(hi - lo, dtype=acc.dtype) if r == me else None
        for c in range(lo, hi, chunk):
            t = _to_comm(acc[c: min(c + chunk, hi)])
            dist.reduce(t, dst=r, op=dist.ReduceOp.SUM)
            if r == me:
                part[c - lo: c - lo + t.shape[0]] = t.cpu().numpy()
        if r == me:
            out = part
    return out
