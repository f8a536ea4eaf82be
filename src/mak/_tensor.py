"""Small helpers shared by the scoring modules: array conversion, device choice, top-k, z-scores."""
from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch


def is_tensor(x: Any) -> bool:
    return isinstance(x, torch.Tensor)


def is_auto(device: Any) -> bool:
    """Whether ``device`` is the name ``"auto"`` (any case, spaces ignored)."""
    return isinstance(device, str) and device.strip().lower() == "auto"


def auto_device(device: str | torch.device | None) -> torch.device:
    """``"auto"`` (or ``None``) -> the first CUDA device when one is available, else CPU; ``cpu``,
    ``cuda`` or ``cuda:N`` as ``torch.device``. Any other name, or a CUDA device this machine does
    not have, is a :class:`MakError` naming ``--device``."""
    from mak.errors import MakError

    if device is None or is_auto(device):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise MakError(f"--device {device}: expected auto, cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MakError("--device cuda requested but no CUDA device is available")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise MakError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def resolve_device(device: str | torch.device | None, like: Any = None) -> torch.device:
    """``device`` if given (``"auto"``: CUDA when available), else the device of ``like`` when it
    is a tensor, else CPU."""
    if device is not None:
        return auto_device(device)
    if is_tensor(like):
        return like.device
    return torch.device("cpu")


def to_tensor(x: Any, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A float tensor on ``device`` from a numpy array, memmap slice or tensor (no copy when possible)."""
    if is_tensor(x):
        return x.to(device=device, dtype=dtype)
    arr = np.asarray(x)
    if arr.dtype != np.float32 and dtype == torch.float32:
        arr = arr.astype(np.float32)
    arr = np.ascontiguousarray(arr)
    if not arr.flags.writeable:  # a read-only memmap: we only ever read it, so share it as is
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(arr).to(device=device, dtype=dtype)
    return torch.from_numpy(arr).to(device=device, dtype=dtype)


def l2_normalize(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Row-wise L2 normalisation in float32 (zero rows stay zero)."""
    x = x.float()
    return x / x.norm(dim=1, keepdim=True).clamp_min(eps)


def zscore(x: np.ndarray) -> np.ndarray:
    """(x - mean) / std over all entries (population std); all-equal input gives zeros."""
    x = np.asarray(x, dtype=np.float64)
    std = x.std()
    if not np.isfinite(std) or std == 0:
        return np.zeros_like(x)
    return (x - x.mean()) / std


def top_k(score: np.ndarray, k: int, largest: bool = True) -> np.ndarray:
    """Indices of the ``k`` largest (or smallest) scores, best first; ties go to the lowest index."""
    score = np.asarray(score)
    key = -score if largest else score
    k = min(int(k), score.shape[0])
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    if k < score.shape[0] // 4:
        # Select a superset with argpartition, then order it exactly (value, then index).
        part = np.argpartition(key, k - 1)[:k]
        kth = key[part].max()
        cand = np.flatnonzero(key <= kth)  # every index that could belong, ties included
        order = np.lexsort((cand, key[cand]))
        return cand[order[:k]].astype(np.int64)
    return np.argsort(key, kind="stable")[:k].astype(np.int64)
