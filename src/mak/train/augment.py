"""SimCLR augmentation on batches, with per-image random parameters derived from keys.

:class:`SimCLRAugment` applies SimCLR's recipe (Chen et al. 2020) to a whole batch on the batch's
device:

1. random resized crop, area scale U(0.08, 1), aspect ratio log-uniform in [3/4, 4/3] (ten
   tries as in torchvision, then the whole image), plus a horizontal flip with p 0.5 -- both in
   a single ``grid_sample`` call (bilinear, border padding) straight to ``size x size``;
2. colour jitter with p 0.8, in a fixed order: brightness (x U(0.6, 1.4)) and contrast (blend
   with the image's mean luma, U(0.6, 1.4)), each clamped to [0, 1] like torchvision; then
   saturation (blend with luma, U(0.6, 1.4)) and hue (a rotation about the grey axis by
   U(-0.1, 0.1) turns -- of YIQ's I-Q plane, where torchvision shifts HSV hue) applied together
   as one per-image 3x3 colour matrix and clamped once. One ``bmm`` instead of an HSV round
   trip of some forty passes over the batch matters at 2,000 images/s on two CPU cores.
   Saturation and hue do nothing to one-channel images;
3. grayscale with p 0.2, folded into the same colour matrix (nothing to do on one channel);
4. Gaussian blur with p 0.5: kernel ``k`` = 10% of the output side rounded down to odd, at least
   3 (23 at 224 px, 3 at 28-32 px), sigma U(0.1, 2.0) px, reflect padding, as a separable
   depthwise convolution with one kernel per image (on CPUs, 3-tap kernels use shifted adds,
   which are faster there, and batches run in cache-sized slices; on GPUs two batched float16
   matmuls with per-image banded matrices that also hold the padding);
5. conversion to ``channels`` (RGB -> grey with ITU-R 601-2 luma, grey -> RGB by copying) and
   normalisation ``(x - 0.5) / 0.5``: outputs are float32 in [-1, 1].

Why plain torch and not kornia: every random number of image ``b`` must be a pure function of
its key ``keys[b]`` (see :func:`view_key`), so that the ``R`` views ``mak embed`` stores depend only
on ``(seed, r, row)`` -- not on batch size, batch order, worker count or world size -- and a
resumed training run sees the same augmentations. kornia draws its parameters from the global
generator in batch order. Here the parameters come from a counter-based hash: keys are mixed
with splitmix64 (int64 torch ops in :func:`view_key`, on any device), and each key seeds a
splitmix64 stream of ``NUM_UNIFORMS`` 53-bit uniforms (:func:`key_uniforms`, uint64 numpy on
the CPU). The parameters are computed from them in float64 on the CPU and sent to the batch's
device in one float32 copy, so they are identical on CPU and GPU. Every image operation after
that is per image (elementwise, per-image reductions, depthwise convolution), so an image's
output is bit-identical whatever else is in its batch (checked by the tests on CPU). Without
keys, a random key per image is drawn from ``generator`` (or the global CPU generator).

Inputs are ``(B, C, H, W)`` uint8 (0-255) or float (0-1) tensors, ideally already at about the
working size (``ImageDataset(mode="resize")`` does that): crops are resampled bilinearly without
anti-aliasing, which is right when the crop is no larger than the output.
:func:`center_transform` is the matching no-augmentation path (features for the store).
"""
from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mak.train import native

__all__ = [
    "MEAN",
    "STD",
    "NUM_UNIFORMS",
    "SimCLRAugment",
    "blur_kernel_size",
    "colour_matrices",
    "center_transform",
    "key_uniforms",
    "to_channels",
    "view_key",
]

MEAN = 0.5  # output normalisation: (x - MEAN) / STD, every channel
STD = 0.5

_MASK = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15
_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB
_LUMA = (0.299, 0.587, 0.114)

# layout of the per-image uniforms
_TRIES = 10
_U_SCALE = 0                    # _TRIES numbers
_U_RATIO = _U_SCALE + _TRIES    # _TRIES numbers
_U_X = _U_RATIO + _TRIES
_U_Y = _U_X + 1
_U_FLIP = _U_Y + 1
_U_JITTER = _U_FLIP + 1
_U_BRIGHT = _U_JITTER + 1
_U_CONTRAST = _U_BRIGHT + 1
_U_SAT = _U_CONTRAST + 1
_U_HUE = _U_SAT + 1
_U_GRAY = _U_HUE + 1
_U_BLUR = _U_GRAY + 1
_U_SIGMA = _U_BLUR + 1
NUM_UNIFORMS = 32  # a few spare
_RING = 8  # pinned upload buffers per SimCLRAugment (GPU)


def _signed(v: int) -> int:
    v &= _MASK
    return v - (1 << 64) if v >= (1 << 63) else v


def _mix_int(x: int) -> int:
    """splitmix64's finaliser on a Python int (mod 2^64)."""
    x &= _MASK
    x ^= x >> 30
    x = (x * _M1) & _MASK
    x ^= x >> 27
    x = (x * _M2) & _MASK
    x ^= x >> 31
    return x


def _srl(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's ``>>`` is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser, elementwise on an int64 tensor (multiplication wraps mod 2^64)."""
    x = x ^ _srl(x, 30)
    x = x * _signed(_M1)
    x = x ^ _srl(x, 27)
    x = x * _signed(_M2)
    return x ^ _srl(x, 31)


def view_key(seed: int, view: int, index: torch.Tensor, epoch: int = 0) -> torch.Tensor:
    """int64 keys for view ``view`` of rows ``index`` under ``seed`` (and training ``epoch``).

    Distinct rows give distinct keys for one ``(seed, view, epoch)``; the result lives on
    ``index``'s device. ``mak embed`` uses ``view_key(seed, r, rows)``; training can pass its
    epoch so every epoch sees fresh augmentations that a resumed run reproduces.
    """
    h = _mix_int(_mix_int(_mix_int(int(seed) ^ 0x5EED) ^ (int(view) & _MASK)) ^ (int(epoch) & _MASK))
    index = torch.as_tensor(index)
    if index.device.type == "cpu":  # the same bits through numpy: a few times faster on small arrays
        with np.errstate(over="ignore"):
            k = _mix_np(index.to(torch.int64).numpy().astype(np.uint64) ^ _U64(h))
        return torch.from_numpy(k.view(np.int64))
    return _mix(index.to(torch.int64) ^ _signed(h))


_U64 = np.uint64


def _mix_np(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on a uint64 array (numpy wraps mod 2^64)."""
    x = x ^ (x >> _U64(30))
    x = x * _U64(_M1)
    x = x ^ (x >> _U64(27))
    x = x * _U64(_M2)
    return x ^ (x >> _U64(31))


def _counter_steps(n: int) -> np.ndarray:
    """splitmix64's counter increments (j + 1) * gamma mod 2^64, j < n, as uint64."""
    return np.array([((j + 1) * _GAMMA) & _MASK for j in range(n)], dtype=np.uint64)


_STEPS = _counter_steps(NUM_UNIFORMS)


def _uniforms_np(keys: torch.Tensor, n: int) -> np.ndarray:
    k = torch.as_tensor(keys).detach().to(device="cpu", dtype=torch.int64).reshape(-1).numpy()
    if native.available():  # the same integer arithmetic in C (numpy has no vector 64-bit multiply)
        return native.key_uniforms(k, n)
    return _uniforms_reference(k, n)


def _uniforms_reference(k: np.ndarray, n: int) -> np.ndarray:
    """splitmix64 in numpy (the fallback, and the tests' reference for the C version)."""
    state = _mix_np(k.astype(np.uint64))  # two's complement reinterpretation
    steps = _STEPS[:n] if n <= len(_STEPS) else _counter_steps(n)
    with np.errstate(over="ignore"):
        z = _mix_np(state[:, None] + steps[None, :])  # splitmix64's counter, wrapping
    return (z >> _U64(11)).astype(np.float64) * (2.0 ** -53)


def key_uniforms(keys: torch.Tensor, n: int = NUM_UNIFORMS) -> torch.Tensor:
    """(B, n) float64 uniforms in [0, 1) on the CPU; row ``b`` is a pure function of ``keys[b]``
    (the splitmix64 stream seeded with the mixed key, 53 bits per number)."""
    return torch.from_numpy(_uniforms_np(keys, n))


def blur_kernel_size(size: int) -> int:
    """Odd Gaussian-blur kernel of about 10% of the side, at least 3."""
    k = int(0.1 * size)
    if k % 2 == 0:
        k += 1
    return max(3, k)


def _luma(x: torch.Tensor) -> torch.Tensor:
    return x[:, 0:1] * _LUMA[0] + x[:, 1:2] * _LUMA[1] + x[:, 2:3] * _LUMA[2]


def to_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Convert a float (B, C, H, W) batch to ``channels`` (1: luma, 3: repeat grey)."""
    c = x.shape[1]
    if c == channels:
        return x
    if channels == 1 and c == 3:
        return _luma(x)
    if channels == 3 and c == 1:
        return x.expand(-1, 3, -1, -1).contiguous()
    raise ValueError(f"cannot convert {c} channels to {channels}")


def _as_float(images: torch.Tensor) -> torch.Tensor:
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected a (B, C, H, W) batch with C 1 or 3, got shape {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    if not images.is_floating_point():
        raise ValueError(f"expected uint8 or float images, got {images.dtype}")
    return images.float()


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return (x - MEAN) / STD


_YIQ = np.array([[0.299, 0.587, 0.114],
                 [0.596, -0.274, -0.322],
                 [0.211, -0.523, 0.312]], dtype=np.float64)
_YIQ_INV = np.linalg.inv(_YIQ)


def _colour_basis() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Constant 3x3 pieces of ``YIQ^-1 @ rot(hue) @ YIQ @ sat(s)``, which is
    ``s * (A + cos(h) Bc + sin(h) Bs) + (1 - s) * G``: A keeps luma, Bc/Bs rotate the I-Q plane
    and G maps a colour to its grey (grey stays grey, so the rotation does not act on it)."""
    a = _YIQ_INV[:, :1] @ _YIQ[:1, :]
    bc = _YIQ_INV[:, 1:] @ _YIQ[1:, :]
    bs = _YIQ_INV[:, 1:] @ np.array([[0.0, -1.0], [1.0, 0.0]]) @ _YIQ[1:, :]
    g = np.outer((a + bc) @ np.ones(3), np.asarray(_LUMA, dtype=np.float64))
    return a, bc, bs, g


_COLOUR_BASIS = _colour_basis()


def _colour_matrices_np(saturation: np.ndarray, hue: np.ndarray) -> np.ndarray:
    a, bc, bs, g = _COLOUR_BASIS
    ang = 2.0 * math.pi * hue
    sat = saturation[:, None, None]
    return sat * (a + np.cos(ang)[:, None, None] * bc + np.sin(ang)[:, None, None] * bs) + (1.0 - sat) * g


def colour_matrices(saturation: torch.Tensor, hue: torch.Tensor) -> torch.Tensor:
    """(B, 3, 3) float64: saturation (blend with luma) followed by a hue rotation of ``hue``
    turns about the grey axis (a rotation of the I-Q plane of YIQ). Grey stays grey."""
    return torch.from_numpy(_colour_matrices_np(np.asarray(saturation, dtype=np.float64),
                                                np.asarray(hue, dtype=np.float64)))


def _jitter_factor(u: np.ndarray, apply: np.ndarray, amount: float) -> np.ndarray:
    """Jitter factors U(max(0, 1 - amount), 1 + amount) from uniforms ``u`` where ``apply``, else 1."""
    f_lo = max(0.0, 1.0 - amount)
    return np.where(apply, f_lo + (1.0 + amount - f_lo) * u, 1.0)


class SimCLRAugment:
    """SimCLR's augmentation for a batch; see the module docstring for the recipe.

    ``aug(images, keys=None, generator=None)`` returns float32 ``(B, channels, size, size)``
    normalised to [-1, 1]. With ``keys`` (int64, shape (B,)) every random choice of image ``b``
    depends only on ``keys[b]``; otherwise a random key per image is drawn from ``generator``
    (any device) or the global CPU generator.
    """

    def __init__(self, size: int, channels: int, blur: bool = True,
                 scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
                 flip_p: float = 0.5,
                 jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1),
                 jitter_p: float = 0.8, gray_p: float = 0.2, blur_p: float = 0.5,
                 blur_sigma: tuple[float, float] = (0.1, 2.0)) -> None:
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, not {channels}")
        if size < 2:
            raise ValueError(f"size must be at least 2, not {size}")
        if not (0 < scale[0] <= scale[1] <= 1):
            raise ValueError(f"bad crop scale range {scale}")
        if not (0 < ratio[0] <= ratio[1]):
            raise ValueError(f"bad crop ratio range {ratio}")
        self.size = int(size)
        self.channels = int(channels)
        self.blur = bool(blur)
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.flip_p = float(flip_p)
        self.jitter = tuple(float(j) for j in jitter)
        self.jitter_p = float(jitter_p)
        self.gray_p = float(gray_p)
        self.blur_p = float(blur_p) if blur else 0.0
        self.blur_sigma = (float(blur_sigma[0]), float(blur_sigma[1]))
        self.kernel_size = blur_kernel_size(self.size)

    cpu_shift_blur_radius = 1     # on CPUs, kernels up to this radius use shifted adds, not conv
    native = True                 # uint8 CPU batches: the fused C kernel of mak.train.native when it builds
    gpu_blur_matmul = True        # on GPUs, blur with banded matmuls (False: depthwise conv)
    cpu_chunk_elements = 1 << 21  # pixel values per slice of a CPU batch (8 MB of float32; a 256-batch at 28 px is one slice)

    def describe(self) -> dict[str, Any]:
        """JSON-able description for meta.json."""
        return {
            "name": "simclr", "size": self.size, "channels": self.channels,
            "crop_scale": list(self.scale), "crop_ratio": list(self.ratio), "flip_p": self.flip_p,
            "jitter": list(self.jitter), "jitter_p": self.jitter_p, "gray_p": self.gray_p,
            "blur": self.blur, "blur_p": self.blur_p, "blur_sigma": list(self.blur_sigma),
            "blur_kernel": self.kernel_size, "normalize": {"mean": MEAN, "std": STD},
            "keys": "splitmix64",
        }

    def __repr__(self) -> str:
        return f"SimCLRAugment(size={self.size}, channels={self.channels}, blur={self.blur})"

    # -- parameters -----------------------------------------------------------------------------
    def params(self, keys: torch.Tensor, height: int, width: int) -> dict[str, torch.Tensor]:
        """Per-image parameters (CPU tensors) for inputs of ``height x width``:
        ``crop`` (x0, y0, w, h in input pixels), ``flip``, ``brightness``, ``contrast``,
        ``saturation``, ``hue`` (identity values where not jittered), ``gray``, ``colour``
        (the (3, 3) saturation-hue-grey matrix), ``blur`` and ``sigma``."""
        return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in self._params_np(keys, height, width).items()}

    def _params_np(self, keys: torch.Tensor, height: int, width: int) -> dict[str, np.ndarray]:
        u = _uniforms_np(keys, NUM_UNIFORMS)
        jb, jc, js, jh = self.jitter
        apply = u[:, _U_JITTER] < self.jitter_p
        sat = _jitter_factor(u[:, _U_SAT], apply, js)
        hue = np.where(apply, (2.0 * u[:, _U_HUE] - 1.0) * jh, 0.0)
        gray = u[:, _U_GRAY] < self.gray_p
        return {
            "crop": self._crop_np(u, height, width),
            "flip": u[:, _U_FLIP] < self.flip_p,
            "brightness": _jitter_factor(u[:, _U_BRIGHT], apply, jb),
            "contrast": _jitter_factor(u[:, _U_CONTRAST], apply, jc),
            "saturation": sat,
            "hue": hue,
            "gray": gray,
            "colour": self._colour_np(apply, sat, hue, gray),
            "blur": u[:, _U_BLUR] < self.blur_p,
            "sigma": self.blur_sigma[0] + (self.blur_sigma[1] - self.blur_sigma[0]) * u[:, _U_SIGMA],
        }

    def _crop_np(self, u: np.ndarray, height: int, width: int) -> np.ndarray:
        """(n, 4) crop boxes x0, y0, w, h: the first of ``_TRIES`` tries that fits, else the fallback size."""
        n = u.shape[0]
        area = float(height * width)
        lo, hi = self.scale
        s = lo + (hi - lo) * u[:, _U_SCALE:_U_SCALE + _TRIES]
        lr0, lr1 = math.log(self.ratio[0]), math.log(self.ratio[1])
        r = np.exp(lr0 + (lr1 - lr0) * u[:, _U_RATIO:_U_RATIO + _TRIES])
        w = np.sqrt(area * s * r)
        h = np.sqrt(area * s / r)
        ok = (w <= width) & (h <= height)
        first = np.argmax(ok, axis=1)  # the first try that fits, as torchvision
        rows = np.arange(n)
        w, h = w[rows, first], h[rows, first]
        fw, fh = self._fallback_crop(height, width)
        found = ok.any(axis=1)
        w = np.where(found, w, fw)
        h = np.where(found, h, fh)
        x0 = u[:, _U_X] * (width - w)
        y0 = u[:, _U_Y] * (height - h)
        return np.stack([x0, y0, w, h], axis=1)

    def _fallback_crop(self, height: int, width: int) -> tuple[float, float]:
        """Crop width and height when no try fits: the whole image, cut to the nearest allowed ratio."""
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            return float(width), width / self.ratio[0]
        if in_ratio > self.ratio[1]:
            return height * self.ratio[1], float(height)
        return float(width), float(height)

    def _colour_np(self, apply: np.ndarray, sat: np.ndarray, hue: np.ndarray, gray: np.ndarray) -> np.ndarray:
        """(n, 3, 3) colour matrices: saturation and hue where jittered, then grayscale where ``gray``."""
        if self.channels != 3:  # saturation, hue and grayscale do nothing to one channel
            return np.broadcast_to(np.eye(3), (apply.shape[0], 3, 3))
        colour = np.where(apply[:, None, None], _colour_matrices_np(sat, hue), np.eye(3)[None])
        # grayscale: every output channel becomes the luma of the jittered colour
        luma = np.einsum("j,njk->nk", np.asarray(_LUMA, dtype=np.float64), colour)
        return np.where(gray[:, None, None], np.repeat(luma[:, None, :], 3, axis=1), colour)

    # -- the transform --------------------------------------------------------------------------
    def __call__(self, images: torch.Tensor, keys: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        bsz, _, height, width = images.shape if images.ndim == 4 else (0, 0, 0, 0)
        if keys is None:
            gdev = generator.device if generator is not None else torch.device("cpu")
            keys = torch.randint(-(2 ** 63), 2 ** 63 - 1, (bsz,), dtype=torch.int64,
                                 generator=generator, device=gdev)
        else:
            keys = torch.as_tensor(keys)
            if keys.ndim != 1 or keys.shape[0] != bsz:
                raise ValueError(f"expected keys of shape ({bsz},), got {tuple(keys.shape)}")
        with torch.autocast(images.device.type, enabled=False):
            p = self._params_np(keys, height, width)
            if (self.native and bsz and images.device.type == "cpu" and images.dtype == torch.uint8
                    and self.kernel_size <= native.MAX_TAPS and native.available()):
                blur = self.blur and bool(p["blur"].any())
                return native.simclr_augment(images, self._pack(p, height, width, blur), self.channels, self.size,
                                             self.kernel_size if blur else 0, MEAN, STD)
            if images.device.type != "cpu" or bsz == 0:
                return self._apply(_as_float(images), p)
            # on CPUs the pipeline is memory-bound: run it on cache-sized slices of the batch
            # (every operation is per image, so the result is the same bit for bit)
            per_image = images.shape[1] * height * width + 3 * self.size * self.size
            step = max(32, self.cpu_chunk_elements // max(1, per_image))
            if step >= bsz:
                return self._apply(_as_float(images), p)
            out = torch.empty(bsz, self.channels, self.size, self.size)
            for start in range(0, bsz, step):
                stop = min(bsz, start + step)
                part = {k: v[start:stop] for k, v in p.items()}
                out[start:stop] = self._apply(_as_float(images[start:stop]), part)
            return out

    def _upload(self, arr: np.ndarray, dev: torch.device) -> torch.Tensor:
        """Copy ``arr`` to the GPU through a ring of pinned buffers, asynchronously.

        A fresh ``pin_memory()`` per call can allocate page-locked memory (slow, and it may wait
        for the device), and a copy from pageable memory may wait for the stream: either stalls
        the host while the GPU still has the previous views' forward passes queued. A slot is
        reused only after the copy that last used it has finished (``_RING`` calls ago).
        """
        ring = self.__dict__.setdefault("_ring", [[None, None] for _ in range(_RING)])
        pos = self.__dict__["_ring_pos"] = (self.__dict__.get("_ring_pos", -1) + 1) % _RING
        buf, done = ring[pos]
        if done is not None:
            done.synchronize()
        flat = arr.reshape(-1)
        if buf is None or buf.numel() < flat.size:
            buf = torch.empty(max(flat.size, 4096), dtype=torch.float32, pin_memory=True)
        buf[:flat.size].copy_(torch.from_numpy(flat))
        out = buf[:flat.size].view(arr.shape).to(dev, non_blocking=True)
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(dev))
        ring[pos] = [buf, done]
        return out

    def __getstate__(self) -> dict:  # pinned buffers and CUDA events stay with their process
        return {k: v for k, v in self.__dict__.items() if k not in ("_ring", "_ring_pos")}

    def _blur_kernels(self, sigma: np.ndarray, apply: np.ndarray) -> np.ndarray:
        """(B, k) float64 normalised Gaussian kernels; a delta where ``apply`` is False."""
        k = self.kernel_size
        rad = k // 2
        d = np.arange(k, dtype=np.float64) - rad
        kern = np.exp(-(d[None, :] ** 2) / (2.0 * sigma[:, None] ** 2))
        kern = kern / kern.sum(axis=1, keepdims=True)
        delta = np.zeros(k, dtype=np.float64)
        delta[rad] = 1.0
        return np.where(apply[:, None], kern, delta[None, :])

    def _pack(self, p: dict[str, np.ndarray], height: int, width: int, blur: bool) -> np.ndarray:
        """Every per-image number as one float32 (B, P) array (one copy to the device; also the
        native kernel's layout): crop/flip in grid units, brightness, contrast, the colour matrix
        (3 channels), the blur taps (when ``blur``)."""
        bsz = p["crop"].shape[0]
        crop = p["crop"]
        ncol = 7 + (9 if self.channels == 3 else 0) + (self.kernel_size if blur else 0)
        q = np.empty((bsz, ncol), dtype=np.float32)
        q[:, 0] = 2.0 * crop[:, 2] / width            # ax: crop width in grid units
        q[:, 1] = 2.0 * crop[:, 0] / width - 1.0      # cx: crop left in grid units
        q[:, 2] = 2.0 * crop[:, 3] / height           # ay
        q[:, 3] = 2.0 * crop[:, 1] / height - 1.0     # cy
        q[:, 4] = p["flip"]
        q[:, 5] = p["brightness"]
        q[:, 6] = p["contrast"]
        col = 7
        if self.channels == 3:
            q[:, 7:16] = p["colour"].reshape(bsz, 9)  # 7 .. 15
            col = 16
        if blur:
            q[:, col:] = self._blur_kernels(p["sigma"], p["blur"])  # last k columns
        return q

    def _apply(self, x: torch.Tensor, p: dict[str, np.ndarray]) -> torch.Tensor:
        dev = x.device
        bsz, _, height, width = x.shape
        size = self.size
        blur = self.blur and bool(p["blur"].any())
        q_np = self._pack(p, height, width, blur)
        if dev.type == "cuda":
            q = self._upload(q_np, dev)
        else:
            q = torch.from_numpy(q_np).to(dev)

        # 1. crop + flip in one grid_sample: output pixel j samples x0 + w * (j + 0.5) / size
        t = (torch.arange(size, device=dev, dtype=torch.float32) + 0.5) / size
        tx = torch.where(q[:, 4:5] > 0.5, 1.0 - t[None, :], t[None, :])
        gx = q[:, 1:2] + q[:, 0:1] * tx                      # (B, size)
        gy = q[:, 3:4] + q[:, 2:3] * t[None, :]              # (B, size)
        grid = torch.stack([gx[:, None, :].expand(bsz, size, size),
                            gy[:, :, None].expand(bsz, size, size)], dim=-1)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        x = to_channels(x.contiguous(), self.channels)  # convex weights: in [0, 1] up to rounding (clamped next)

        # 2. colour jitter (identity for images not jittered): brightness, contrast, then
        #    saturation + hue (+ grayscale) as one per-image 3x3 matrix; clamps after each step
        x = x.mul_(q[:, 5, None, None, None]).clamp_(0.0, 1.0)
        cmean = x.mean(dim=(2, 3))                                   # (B, C)
        if self.channels == 3:
            cmean = cmean[:, 0:1] * _LUMA[0] + cmean[:, 1:2] * _LUMA[1] + cmean[:, 2:3] * _LUMA[2]
        c = q[:, 6, None, None, None]
        x = torch.addcmul((1.0 - c) * cmean[:, :, None, None], x, c, out=x).clamp_(0.0, 1.0)
        if self.channels == 3:
            x = torch.bmm(q[:, 7:16].reshape(bsz, 3, 3), x.reshape(bsz, 3, size * size))
            x = x.clamp_(0.0, 1.0).reshape(bsz, 3, size, size)

        # 4. Gaussian blur, separable depthwise conv, one kernel per image (a delta if not blurred),
        # 5. and the normalisation (x - MEAN) / STD, whose 1 / STD rides on the vertical pass's
        #    kernel (in place where possible: ``x`` is ours since grid_sample)
        if blur:
            return self._blur(x, q[:, -self.kernel_size:], 1.0 / STD).sub_(MEAN / STD)
        return x.sub_(MEAN).div_(STD)

    def _blur(self, x: torch.Tensor, kern: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
        """Separable blur with per-image ``kern`` (B, k); the result is multiplied by ``gain``."""
        bsz, c, hh, ww = x.shape
        rad = self.kernel_size // 2
        kern_v = kern * gain if gain != 1.0 else kern  # the gain is applied once, on the second pass
        if x.device.type == "cpu" and rad <= self.cpu_shift_blur_radius and rad < min(hh, ww):
            return self._blur_shift(x, kern, kern_v)
        if x.device.type != "cpu" and self.gpu_blur_matmul:
            return _blur_matmul(x, kern, kern_v, rad, torch.float16 if x.device.type == "cuda" else None)
        kern = kern.repeat_interleave(c, dim=0)  # (B*C, k)
        kern_v = kern_v.repeat_interleave(c, dim=0)
        mode = "reflect" if rad < min(hh, ww) else "replicate"
        y = F.pad(x, (rad, rad, rad, rad), mode=mode).reshape(1, bsz * c, hh + 2 * rad, ww + 2 * rad)
        groups = bsz * c
        if groups == 1:
            # a one-group conv takes another code path than the depthwise one (different
            # rounding); keep results independent of the batch by always running depthwise
            y, kern, groups = y.expand(1, 2, -1, -1), kern.expand(2, -1), 2
            kern_v = kern_v.expand(2, -1)
        y = F.conv2d(y, kern[:, None, None, :], groups=groups)   # horizontal
        y = F.conv2d(y, kern_v[:, None, :, None], groups=groups)  # vertical
        return y[:, : bsz * c].reshape(bsz, c, hh, ww)

    def _blur_shift(self, x: torch.Tensor, kern: torch.Tensor, kern_v: torch.Tensor) -> torch.Tensor:
        """The same blur as shifted, weighted adds (faster than a depthwise conv on CPUs for
        3-tap kernels); elementwise, so per image and independent of the batch."""
        rad = self.kernel_size // 2
        y = F.pad(x, (rad, rad, rad, rad), mode="reflect")
        return _shift_pass(_shift_pass(y, kern, 3, rad), kern_v, 2, rad)


@functools.lru_cache(maxsize=16)
def _tap_matrices(size: int, rad: int, device: torch.device) -> torch.Tensor:
    """(k, size, size) 0/1: ``T[j, o, i] = 1`` where output ``o``'s tap ``j`` reads input ``i``
    (reflect padding, or replicate when the image is smaller than the kernel's radius)."""
    o = torch.arange(size, device=device)[:, None]
    j = torch.arange(2 * rad + 1, device=device)[None, :]
    i = o + j - rad  # (size, k)
    if rad < size:
        i = torch.where(i < 0, -i, i)
        i = torch.where(i > size - 1, 2 * (size - 1) - i, i)
    else:
        i = i.clamp(0, size - 1)
    t = torch.zeros(2 * rad + 1, size, size, device=device)
    t.index_put_((j.expand(size, -1), o.expand(-1, 2 * rad + 1), i), torch.ones((), device=device), accumulate=True)
    return t


def _blur_matmul(x: torch.Tensor, kern: torch.Tensor, kern_v: torch.Tensor, rad: int,
                 dtype: torch.dtype | None = None) -> torch.Tensor:
    """The separable blur as two batched matmuls with per-image banded matrices that hold the
    padding: no padded copy, no depthwise conv with long kernels. ``dtype`` (GPUs: float16, on
    tensor cores; images in [0, 1] and convex weights cannot overflow it) is the matmuls' type."""
    bsz, c, hh, ww = x.shape
    k = 2 * rad + 1
    dt = dtype or x.dtype
    th, tw = _tap_matrices(hh, rad, x.device), _tap_matrices(ww, rad, x.device)
    mh = (kern @ tw.reshape(k, -1)).reshape(bsz, ww, ww).to(dt)  # [b, o, i], horizontal
    kv = kern_v.repeat_interleave(c, dim=0) if c > 1 else kern_v
    mv = (kv @ th.reshape(k, -1)).reshape(bsz * c, hh, hh).to(dt)  # [b*c, o, i], vertical (with the gain)
    y = torch.bmm(x.to(dt).reshape(bsz, c * hh, ww), mh.transpose(1, 2))  # rows of every channel
    y = torch.bmm(mv, y.view(bsz * c, hh, ww))  # columns
    return y.view(bsz, c, hh, ww).to(x.dtype)


def _shift_pass(z: torch.Tensor, kern: torch.Tensor, dim: int, rad: int) -> torch.Tensor:
    """One 1-D pass of a symmetric per-image kernel over ``z`` (padded by ``rad`` along ``dim``)."""
    n = z.shape[dim] - 2 * rad
    out = z.narrow(dim, rad, n) * kern[:, rad, None, None, None]
    for j in range(1, rad + 1):
        out = torch.addcmul(out, z.narrow(dim, rad - j, n) + z.narrow(dim, rad + j, n),
                            kern[:, rad + j, None, None, None], out=out)
    return out


def center_transform(images: torch.Tensor, size: int, channels: int) -> torch.Tensor:
    """No-augmentation path: resize the shorter side to ``size``, centre-crop, convert channels
    and normalise exactly like :class:`SimCLRAugment` (float32, [-1, 1]).

    Inputs already at ``size x size`` (``ImageDataset(mode="center")``) are only converted.
    """
    with torch.autocast(images.device.type, enabled=False):
        x = _as_float(images)
        _, _, h, w = x.shape
        if (h, w) != (size, size):
            short = min(h, w)
            nh, nw = max(size, round(h * size / short)), max(size, round(w * size / short))
            if (nh, nw) != (h, w):
                x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False,
                                  antialias=nh < h or nw < w)
            top, left = (nh - size) // 2, (nw - size) // 2
            x = x[:, :, top:top + size, left:left + size]
        x = to_channels(x.contiguous(), channels).clamp(0.0, 1.0)
        return _normalize(x)
