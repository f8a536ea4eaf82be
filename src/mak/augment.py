"""SimCLR augmentation on batches, with per-image random parameters derived from keys.

:class:`SimCLRAugment` applies SimCLR's recipe (Chen et al. 2020) to a whole batch on the batch's
device:

1. random resized crop, area scale U(0.08, 1), aspect ratio log-uniform in [3/4, 4/3] (ten
   tries as in torchvision, then the whole image), plus a horizontal flip with p 0.5 -- both in
   a single ``grid_sample`` call (bilinear, border padding) straight to ``size x size``;
2. colour jitter with p 0.8: brightness, contrast, saturation 0.4 and hue 0.1, in that fixed
   order, clamped to [0, 1] after each step like torchvision (saturation and hue do nothing to
   one-channel images);
3. grayscale with p 0.2 (nothing to do on one channel);
4. Gaussian blur with p 0.5: kernel ``k`` = 10% of the output side rounded down to odd, at least
   3 (23 at 224 px, 3 at 28-32 px), sigma U(0.1, 2.0) px, reflect padding, as a separable
   depthwise convolution with one kernel per image;
5. conversion to ``channels`` (RGB -> grey with ITU-R 601-2 luma, grey -> RGB by copying) and
   normalisation ``(x - 0.5) / 0.5``: outputs are float32 in [-1, 1].

Why plain torch and not kornia: every random number of image ``b`` must be a pure function of
its key ``keys[b]`` (see :func:`view_key`), so that the ``R`` views ``mak embed`` stores depend only
on ``(seed, r, row)`` -- not on batch size, batch order, worker count or world size -- and a
resumed training run sees the same augmentations. kornia draws its parameters from the global
generator in batch order. Here the parameters come from a counter-based hash (splitmix64 in
int64 torch ops): ``K`` 53-bit uniforms per key, computed on the CPU in float64 and cast once,
so they are also identical on CPU and GPU. Without keys, a random key per image is drawn from
``generator`` (or the global CPU generator).

Inputs are ``(B, C, H, W)`` uint8 (0-255) or float (0-1) tensors, ideally already at about the
working size (``ImageDataset(mode="resize")`` does that): crops are resampled bilinearly without
anti-aliasing, which is right when the crop is no larger than the output.
:func:`center_transform` is the matching no-augmentation path (features for the store).
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "MEAN",
    "STD",
    "SimCLRAugment",
    "blur_kernel_size",
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
    return _mix(index.to(torch.int64) ^ _signed(h))


def key_uniforms(keys: torch.Tensor, n: int = NUM_UNIFORMS) -> torch.Tensor:
    """(B, n) float64 uniforms in [0, 1), a pure function of each key (on the CPU)."""
    keys = torch.as_tensor(keys).to(device="cpu", dtype=torch.int64).reshape(-1)
    state = _mix(keys)[:, None]
    steps = torch.tensor([_signed((k + 1) * _GAMMA) for k in range(n)], dtype=torch.int64)
    z = _mix(state + steps[None, :])  # int64 addition wraps like splitmix64's counter
    return _srl(z, 11).to(torch.float64) * (2.0 ** -53)


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


def _rgb_to_hsv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    maxc = torch.maximum(torch.maximum(r, g), b)
    minc = torch.minimum(torch.minimum(r, g), b)
    eqc = maxc == minc
    cr = maxc - minc
    ones = torch.ones_like(maxc)
    s = cr / torch.where(eqc, ones, maxc)
    crd = torch.where(eqc, ones, cr)
    rc = (maxc - r) / crd
    gc = (maxc - g) / crd
    bc = (maxc - b) / crd
    is_r = maxc == r
    is_g = (maxc == g) & ~is_r
    is_b = ~(is_r | is_g)
    h = torch.where(is_r, bc - gc, torch.zeros_like(maxc))
    h = torch.where(is_g, 2.0 + rc - bc, h)
    h = torch.where(is_b, 4.0 + gc - rc, h)
    h = torch.remainder(h / 6.0 + 1.0, 1.0)
    return h, s, maxc


def _hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    h6 = h * 6.0
    i = torch.floor(h6)
    f = h6 - i
    i = torch.remainder(i, 6.0).to(torch.int64)
    p = (v * (1.0 - s)).clamp(0.0, 1.0)
    q = (v * (1.0 - s * f)).clamp(0.0, 1.0)
    t = (v * (1.0 - s * (1.0 - f))).clamp(0.0, 1.0)
    table = torch.stack([
        torch.stack([v, q, p, p, t, v], dim=1),
        torch.stack([t, v, v, q, p, p], dim=1),
        torch.stack([p, p, t, v, v, q], dim=1),
    ], dim=1)  # (B, 3, 6, H, W)
    idx = i[:, None, None].expand(-1, 3, 1, -1, -1)
    return table.gather(2, idx).squeeze(2)


def _adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate hue by ``shift`` (B,) turns, like torchvision's adjust_hue."""
    h, s, v = _rgb_to_hsv(x)
    h = torch.remainder(h + shift[:, None, None], 1.0)
    return _hsv_to_rgb(h, s, v)


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
        """Per-image parameters (CPU, float64/bool) for inputs of ``height x width``."""
        u = key_uniforms(keys, NUM_UNIFORMS)
        n = u.shape[0]
        area = float(height * width)
        lo, hi = self.scale
        s = lo + (hi - lo) * u[:, _U_SCALE:_U_SCALE + _TRIES]
        lr0, lr1 = math.log(self.ratio[0]), math.log(self.ratio[1])
        r = torch.exp(lr0 + (lr1 - lr0) * u[:, _U_RATIO:_U_RATIO + _TRIES])
        w = torch.sqrt(area * s * r)
        h = torch.sqrt(area * s / r)
        ok = (w <= width) & (h <= height)
        first = ok.to(torch.int64).argmax(dim=1, keepdim=True)
        w = w.gather(1, first).squeeze(1)
        h = h.gather(1, first).squeeze(1)
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            fw, fh = float(width), width / self.ratio[0]
        elif in_ratio > self.ratio[1]:
            fw, fh = height * self.ratio[1], float(height)
        else:
            fw, fh = float(width), float(height)
        found = ok.any(dim=1)
        w = torch.where(found, w, torch.full_like(w, fw))
        h = torch.where(found, h, torch.full_like(h, fh))
        x0 = u[:, _U_X] * (width - w)
        y0 = u[:, _U_Y] * (height - h)

        jb, jc, js, jh = self.jitter
        apply = u[:, _U_JITTER] < self.jitter_p

        def factor(col: int, amount: float) -> torch.Tensor:
            f = max(0.0, 1.0 - amount) + (1.0 + amount - max(0.0, 1.0 - amount)) * u[:, col]
            return torch.where(apply, f, torch.ones_like(f))

        hue = (2.0 * u[:, _U_HUE] - 1.0) * jh
        sig = self.blur_sigma[0] + (self.blur_sigma[1] - self.blur_sigma[0]) * u[:, _U_SIGMA]
        return {
            "crop": torch.stack([x0, y0, w, h], dim=1),     # pixels of the input
            "flip": u[:, _U_FLIP] < self.flip_p,
            "brightness": factor(_U_BRIGHT, jb),
            "contrast": factor(_U_CONTRAST, jc),
            "saturation": factor(_U_SAT, js),
            "hue": torch.where(apply & (jh > 0), hue, torch.zeros_like(hue)),
            "hue_apply": apply & (jh > 0),
            "gray": u[:, _U_GRAY] < self.gray_p,
            "blur": u[:, _U_BLUR] < self.blur_p,
            "sigma": sig,
        }

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
            x = _as_float(images)
            p = self.params(keys, height, width)
            return self._apply(x, p)

    def _apply(self, x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        dev = x.device
        bsz, _, height, width = x.shape
        size = self.size
        f32 = dict(device=dev, dtype=torch.float32)

        # 1. crop + flip: output pixel j of the crop sits at x0 + w * (j + 0.5) / size
        crop = p["crop"]
        ax = (2.0 * crop[:, 2] / width).to(**f32)[:, None]
        cx = (2.0 * crop[:, 0] / width - 1.0).to(**f32)[:, None]
        ay = (2.0 * crop[:, 3] / height).to(**f32)[:, None]
        cy = (2.0 * crop[:, 1] / height - 1.0).to(**f32)[:, None]
        t = (torch.arange(size, **f32) + 0.5) / size
        flip = p["flip"].to(dev)[:, None]
        tx = torch.where(flip, 1.0 - t[None, :], t[None, :])
        gx = cx + ax * tx                                   # (B, size)
        gy = cy + ay * t[None, :]                           # (B, size)
        grid = torch.stack([gx[:, None, :].expand(bsz, size, size),
                            gy[:, :, None].expand(bsz, size, size)], dim=-1)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        x = to_channels(x.contiguous(), self.channels).clamp_(0.0, 1.0)

        def col(name: str) -> torch.Tensor:
            return p[name].to(**f32)[:, None, None, None]

        # 2. colour jitter (identity factors for images not jittered)
        x = (x * col("brightness")).clamp_(0.0, 1.0)
        grey = _luma(x) if self.channels == 3 else x
        mean = grey.double().mean(dim=(1, 2, 3), keepdim=True).float()
        c = col("contrast")
        x = (c * x + (1.0 - c) * mean).clamp_(0.0, 1.0)
        if self.channels == 3:
            s = col("saturation")
            x = (s * x + (1.0 - s) * _luma(x)).clamp_(0.0, 1.0)
            hue_apply = p["hue_apply"]
            if bool(hue_apply.any()):
                shifted = _adjust_hue(x, p["hue"].to(**f32))
                x = torch.where(hue_apply.to(dev)[:, None, None, None], shifted, x)
            # 3. grayscale
            gray = p["gray"].to(dev)[:, None, None, None]
            x = torch.where(gray, _luma(x).expand(-1, 3, -1, -1), x)

        # 4. Gaussian blur, separable, one kernel per image (a delta when not blurred)
        if self.blur and bool(p["blur"].any()):
            x = self._blur(x, p["sigma"], p["blur"])

        # 5. normalise
        return _normalize(x)

    def _blur(self, x: torch.Tensor, sigma: torch.Tensor, apply: torch.Tensor) -> torch.Tensor:
        bsz, c, hh, ww = x.shape
        k = self.kernel_size
        rad = k // 2
        d = torch.arange(k, dtype=torch.float64) - rad
        kern = torch.exp(-(d[None, :] ** 2) / (2.0 * sigma[:, None] ** 2))
        kern = kern / kern.sum(dim=1, keepdim=True)
        delta = torch.zeros(k, dtype=torch.float64)
        delta[rad] = 1.0
        kern = torch.where(apply[:, None], kern, delta[None, :])
        kern = kern.to(device=x.device, dtype=torch.float32)
        kern = kern.repeat_interleave(c, dim=0)  # (B*C, k)
        if rad >= min(hh, ww):
            mode = "replicate"
        else:
            mode = "reflect"
        y = F.pad(x, (rad, rad, rad, rad), mode=mode).reshape(1, bsz * c, hh + 2 * rad, ww + 2 * rad)
        y = F.conv2d(y, kern[:, None, None, :], groups=bsz * c)   # horizontal
        y = F.conv2d(y, kern[:, None, :, None], groups=bsz * c)   # vertical
        return y.reshape(bsz, c, hh, ww)


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
