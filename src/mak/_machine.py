"""What this CPU is and can do, in one line, for benchmark output and run records."""
from __future__ import annotations

import platform
from pathlib import Path

import torch

FEATURES = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")  # what decides BLAS/oneDNN kernels and bf16


def _cpuinfo() -> tuple[str, set[str]]:
    """(model name, flags) from /proc/cpuinfo; ('', {}) where there is none."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return "", set()
    name, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and not name:
            name = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = set(value.split())
    return name, flags


def cpu_bf16_supported() -> bool:
    """Whether this CPU runs bf16 convolutions natively (oneDNN with AVX512-BF16 / AMX)."""
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # pragma: no cover - very old or exotic builds
        return False


def cpu_summary() -> str:
    """e.g. ``AMD EPYC, x86_64, avx2 avx512f avx512_bf16, torch capability AVX512, native bf16 yes``."""
    name, flags = _cpuinfo()
    have = " ".join(f for f in FEATURES if f in flags) or "none of " + "/".join(FEATURES)
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except Exception:  # pragma: no cover - old torch
        capability = "unknown"
    return (f"{name or platform.processor() or 'unknown CPU'}, {platform.machine()}, {have}, "
            f"torch capability {capability}, native bf16 {'yes' if cpu_bf16_supported() else 'no'}")


__all__ = ["cpu_bf16_supported", "cpu_summary"]
