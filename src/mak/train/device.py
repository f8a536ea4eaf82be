"""Per-device training and embedding settings: mixed precision, memory format and DataLoader workers."""
from __future__ import annotations

import contextlib
import os
import sys

import torch

from mak import distributed as D
from mak._machine import cpu_bf16_supported


def resolve_amp(device: torch.device, amp: bool | None) -> torch.dtype | None:
    """The autocast dtype to train/embed with, or ``None`` for float32.

    ``amp=None`` (auto): bf16 on CUDA when supported, else fp16; on CPU bf16 only where the CPU
    has native bf16 (otherwise it is emulated and slower than fp32). ``amp=True`` on a CPU
    without native bf16 still tries bf16 and falls back to fp32 if autocast fails.
    """
    if amp is False:
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu":
        if amp is None and not cpu_bf16_supported():
            return None
        try:  # quick try: some builds lack CPU autocast for conv
            with torch.autocast("cpu", dtype=torch.bfloat16):
                torch.nn.functional.conv2d(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 3, 3))
            return torch.bfloat16
        except Exception:
            print("mak: bf16 autocast is not available on this CPU; training in float32", file=sys.stderr)
            return None
    return None


def resolve_channels_last(device: torch.device, channels_last: bool | None) -> bool:
    """channels_last memory format: on by default (oneDNN on CPU and tensor cores on CUDA prefer NHWC)."""
    if channels_last is not None:
        return bool(channels_last)
    return device.type in ("cpu", "cuda")


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` for ``dtype`` on ``device``, or a null context for float32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def default_num_workers(device: torch.device | str = "cpu") -> int:
    """DataLoader workers: on CPU leave the cores to the model (half of them), on CUDA up to 8."""
    try:
        ncpu = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        ncpu = os.cpu_count() or 1
    ncpu = max(1, ncpu // max(1, D.world_size()))
    if torch.device(device).type == "cuda":
        return min(8, ncpu)
    return min(4, ncpu // 2)
