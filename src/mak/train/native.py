"""Optional native CPU kernels, compiled on first use with the system's C compiler.

On CPUs the batched SimCLR augmentation in plain torch costs about 20 memory passes per view,
as much as a quarter of a small convnet's forward; :func:`simclr_augment` does every step per
image in cache-resident buffers (``_native/augment.c``, OpenMP over images). The library is
built once per source, compiler and CPU into ``$MAK_CACHE_DIR`` (default ``~/.cache/mak``),
atomically, and loaded with ctypes (the call releases the GIL). Without a compiler, or with
``MAK_NATIVE=0``, :func:`available` is False and :mod:`mak.train.augment` uses its torch code, which
is also the reference the tests hold this kernel to.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
import torch

__all__ = ["MAX_TAPS", "available", "cache_dir", "key_uniforms", "simclr_augment"]

MAX_TAPS = 63  # longest blur kernel the C code takes (10% of a 639 px side)

_SOURCE = Path(__file__).with_name("_native") / "augment.c"
_FLAGS = ["-O3", "-march=native", "-std=c99", "-shared", "-fPIC", "-fopenmp-simd"]
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
_error: str | None = None


def cache_dir() -> Path:
    """Where built kernels are kept: ``$MAK_CACHE_DIR``, else ``$XDG_CACHE_HOME/mak``, else ``~/.cache/mak``."""
    if os.environ.get("MAK_CACHE_DIR"):
        return Path(os.environ["MAK_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mak"


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor()


def _compiler_id(cc: str) -> str:
    try:
        return subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _build() -> ctypes.CDLL:
    cc = os.environ.get("CC", "cc")
    version = _compiler_id(cc)
    if not version:
        raise OSError(f"no C compiler ({cc})")
    src = _SOURCE.read_bytes()
    attempts = [_FLAGS + ["-fopenmp"], _FLAGS]  # without OpenMP the kernel runs on one thread
    last = ""
    for flags in attempts:
        key = hashlib.sha256(b"\0".join([src, " ".join(flags).encode(), version.encode(),
                                         platform.machine().encode(), _cpu_flags().encode()])).hexdigest()[:20]
        target = cache_dir() / f"augment-{key}.so"
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".augment-", suffix=".so", dir=target.parent)
            os.close(fd)
            try:
                res = subprocess.run([cc, *flags, str(_SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True,
                                     timeout=120)
                if res.returncode != 0:
                    last = res.stderr.strip().splitlines()[-1] if res.stderr.strip() else f"exit {res.returncode}"
                    continue
                os.replace(tmp, target)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        lib = ctypes.CDLL(str(target))
        fn = lib.mak_simclr_augment
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                       ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_float, ctypes.c_float,
                       ctypes.c_void_p, ctypes.c_int]
        uni = lib.mak_key_uniforms
        uni.restype = None
        uni.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
        return lib
    raise OSError(f"compiling {_SOURCE.name} failed: {last}")


def _load() -> ctypes.CDLL | None:
    global _lib, _tried, _error
    if _tried:
        return _lib
    with _lock:
        if not _tried:
            if os.environ.get("MAK_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
                _error = "disabled by MAK_NATIVE=0"
            else:
                try:
                    _lib = _build()
                except (OSError, subprocess.SubprocessError) as exc:
                    _error = str(exc)
                    print(f"mak: native CPU augmentation unavailable ({_error}); using the torch implementation",
                          file=sys.stderr)
            _tried = True
    return _lib


def available() -> bool:
    """Whether the native kernel is built and loaded (builds it on the first call)."""
    return _load() is not None


def simclr_augment(images: torch.Tensor, params: np.ndarray, channels: int, size: int, blur_taps: int,
                   mean: float, std: float) -> torch.Tensor:
    """Run the fused kernel: ``images`` uint8 (B, C, H, W) on the CPU, ``params`` the float32
    (B, P) rows of ``SimCLRAugment._pack``; returns float32 (B, channels, size, size)."""
    lib = _load()
    if lib is None:
        raise RuntimeError(f"native augmentation unavailable: {_error}")
    if images.dtype != torch.uint8 or images.device.type != "cpu" or images.ndim != 4:
        raise ValueError("native augmentation takes a uint8 (B, C, H, W) CPU tensor")
    x = images.contiguous()
    q = np.ascontiguousarray(params, dtype=np.float32)
    bsz, cin, h, w = x.shape
    if q.shape[0] != bsz:
        raise ValueError(f"{q.shape[0]} parameter rows for {bsz} images")
    if blur_taps > MAX_TAPS or (blur_taps and blur_taps % 2 == 0):
        raise ValueError(f"blur kernel of {blur_taps} taps: odd and at most {MAX_TAPS} required")
    out = torch.empty(bsz, channels, size, size, dtype=torch.float32)
    rc = lib.mak_simclr_augment(x.data_ptr(), bsz, cin, h, w, q.ctypes.data, q.shape[1], channels, size,
                                blur_taps, mean, 1.0 / std, out.data_ptr(), torch.get_num_threads())
    if rc != 0:
        raise MemoryError("native augmentation could not allocate its scratch buffers")
    return out


def key_uniforms(keys: np.ndarray, m: int) -> np.ndarray:
    """(n, m) float64: the splitmix64 uniforms of :func:`mak.train.augment.key_uniforms` (same bits),
    computed in C. ``keys``: int64 array."""
    lib = _load()
    if lib is None:
        raise RuntimeError(f"native kernels unavailable: {_error}")
    k = np.ascontiguousarray(keys, dtype=np.int64).reshape(-1)
    out = np.empty((k.size, int(m)), dtype=np.float64)
    lib.mak_key_uniforms(k.ctypes.data, k.size, int(m), out.ctypes.data)
    return out
