"""Batched SimCLR augmentation: shapes, ranges, per-image randomness, key determinism."""
from __future__ import annotations

import math

import numpy as np

import pytest
import torch

from mak.train.augment import (
    MEAN,
    STD,
    SimCLRAugment,
    blur_kernel_size,
    center_transform,
    colour_matrices,
    key_uniforms,
    to_channels,
    view_key,
)


def _batch(b, c, s, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, c, s, s), dtype=torch.uint8, generator=g)


@pytest.mark.parametrize("size, channels, in_channels", [(28, 1, 1), (32, 3, 3), (32, 1, 3), (28, 3, 1)])
def test_shapes_and_ranges(size, channels, in_channels):
    aug = SimCLRAugment(size, channels)
    x = _batch(16, in_channels, size)
    y = aug(x, generator=torch.Generator().manual_seed(1))
    assert y.shape == (16, channels, size, size) and y.dtype == torch.float32
    assert y.min() >= -1.0 - 1e-6 and y.max() <= 1.0 + 1e-6
    assert torch.isfinite(y).all()
    # float input in [0, 1] is the same as uint8 / 255
    yf = aug(x.float() / 255.0, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(y, yf, atol=1e-5)


def test_different_images_get_different_parameters():
    aug = SimCLRAugment(32, 3)
    x = _batch(1, 3, 32).expand(12, -1, -1, -1).contiguous()  # one image, twelve times
    y = aug(x, generator=torch.Generator().manual_seed(0))
    flat = y.reshape(12, -1)
    for i in range(12):
        for j in range(i + 1, 12):
            assert not torch.allclose(flat[i], flat[j])
    p = aug.params(view_key(0, 0, torch.arange(12)), 32, 32)
    assert len(set(p["crop"][:, 2].tolist())) == 12


def test_keys_make_outputs_independent_of_batch():
    for size, channels in ((28, 1), (32, 3)):
        aug = SimCLRAugment(size, channels)
        x = _batch(24, channels, size, seed=3)
        keys = view_key(7, 1, torch.arange(100, 124))
        full = aug(x, keys=keys)
        perm = torch.randperm(24, generator=torch.Generator().manual_seed(5))
        assert torch.equal(aug(x[perm], keys=keys[perm]), full[perm])
        assert torch.equal(aug(x[5:6], keys=keys[5:6]), full[5:6])
        assert torch.equal(aug(x[10:17], keys=keys[10:17]), full[10:17])
        # and another seed or view changes them
        assert not torch.allclose(aug(x, keys=view_key(7, 2, torch.arange(100, 124))), full)
        assert not torch.allclose(aug(x, keys=view_key(8, 1, torch.arange(100, 124))), full)


def test_generator_reproducible():
    aug = SimCLRAugment(28, 1)
    x = _batch(8, 1, 28)
    a = aug(x, generator=torch.Generator().manual_seed(3))
    b = aug(x, generator=torch.Generator().manual_seed(3))
    c = aug(x, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.allclose(a, c)
    torch.manual_seed(0)
    d = aug(x)
    torch.manual_seed(0)
    assert torch.equal(d, aug(x))


def test_view_key_and_uniforms():
    rows = torch.arange(1000)
    k = view_key(0, 0, rows)
    assert k.dtype == torch.int64 and k.shape == (1000,)
    assert len(set(k.tolist())) == 1000
    assert len(set(k.tolist()) & set(view_key(0, 1, rows).tolist())) == 0
    assert len(set(k.tolist()) & set(view_key(1, 0, rows).tolist())) == 0
    assert torch.equal(view_key(0, 0, rows.flip(0)), k.flip(0))
    assert not torch.equal(view_key(0, 0, rows, epoch=1), k)
    u = key_uniforms(k, 16)
    assert u.shape == (1000, 16) and u.dtype == torch.float64
    assert u.min() >= 0 and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.01
    assert abs(u.std().item() - math.sqrt(1 / 12)) < 0.01
    assert torch.equal(key_uniforms(k[:3], 16), u[:3])


def test_view_key_against_plain_splitmix64():
    """CPU keys (numpy) and the int64-tensor path used on GPUs both equal splitmix64 written out
    on Python integers."""
    from mak.train.augment import _mix, _signed

    mask = (1 << 64) - 1

    def mix(x: int) -> int:
        x &= mask
        x ^= x >> 30
        x = (x * 0xBF58476D1CE4E5B9) & mask
        x ^= x >> 27
        x = (x * 0x94D049BB133111EB) & mask
        return x ^ (x >> 31)

    for seed, view, epoch in [(0, 0, 0), (7, 3, 2), (-5, 11, 1)]:
        h = mix(mix(mix(seed ^ 0x5EED) ^ (view & mask)) ^ (epoch & mask))
        rows = [0, 1, 2, 12345, 2**40 + 17]
        want = [_signed(mix(r ^ h)) for r in rows]
        assert view_key(seed, view, torch.tensor(rows), epoch=epoch).tolist() == want
        assert _mix(torch.tensor(rows) ^ _signed(h)).tolist() == want  # the device path


def test_parameter_distributions():
    aug = SimCLRAugment(32, 3)
    p = aug.params(view_key(1, 0, torch.arange(20000)), 32, 32)
    x0, y0, w, h = p["crop"].unbind(1)
    area = w * h / (32 * 32)
    assert area.min() >= 0.08 - 1e-9 and area.max() <= 1 + 1e-9
    assert 0.45 < area.mean().item() < 0.6  # ~U(0.08, 1), slightly thinned at the top by rejection
    ratio = w / h
    assert ratio.min() >= 3 / 4 - 1e-9 and ratio.max() <= 4 / 3 + 1e-9
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x0 + w <= 32 + 1e-9).all() and (y0 + h <= 32 + 1e-9).all()
    jittered = (p["brightness"] != 1).float().mean().item()
    assert abs(jittered - 0.8) < 0.02
    b = p["brightness"][p["brightness"] != 1]
    assert b.min() >= 0.6 and b.max() <= 1.4
    assert abs(p["flip"].float().mean().item() - 0.5) < 0.02
    assert abs(p["gray"].float().mean().item() - 0.2) < 0.02
    assert abs(p["blur"].float().mean().item() - 0.5) < 0.02
    assert p["sigma"].min() >= 0.1 and p["sigma"].max() <= 2.0
    assert p["hue"].abs().max() <= 0.1


def test_crop_geometry_matches_parameters():
    # an image whose value is its column: the output's column span reveals the crop
    size = 32
    aug = SimCLRAugment(size, 1, blur=False, jitter_p=0.0)
    col = torch.arange(64, dtype=torch.float32) / 63.0
    x = col.expand(1, 1, 64, 64).repeat(50, 1, 1, 1)
    keys = view_key(3, 0, torch.arange(50))
    y = aug(x, keys=keys) * STD + MEAN
    p = aug.params(keys, 64, 64)
    x0, _, w, _ = p["crop"].unbind(1)
    left = (x0 + w / (2 * size) - 0.5) / 63.0
    right = (x0 + w - w / (2 * size) - 0.5) / 63.0
    flipped = p["flip"]
    first, last = y[:, 0, 0, 0].double(), y[:, 0, 0, -1].double()
    exp_first = torch.where(flipped, right, left).clamp(0, 1)
    exp_last = torch.where(flipped, left, right).clamp(0, 1)
    assert torch.allclose(first, exp_first, atol=1e-4)
    assert torch.allclose(last, exp_last, atol=1e-4)


def test_colour_ops_keep_grey_grey_and_blur_kernel():
    m = colour_matrices(torch.tensor([0.6, 1.4]), torch.tensor([0.1, -0.07]))
    grey = torch.full((2, 3, 1), 0.3, dtype=torch.float64)
    assert torch.allclose(m @ grey, grey, atol=1e-6)
    assert torch.allclose(colour_matrices(torch.tensor([1.0]), torch.tensor([0.0]))[0],
                          torch.eye(3, dtype=torch.float64), atol=1e-6)
    assert blur_kernel_size(28) == 3 and blur_kernel_size(32) == 3
    assert blur_kernel_size(64) == 7 and blur_kernel_size(224) == 23
    # a constant image stays constant through every step but jitter's brightness
    aug = SimCLRAugment(16, 3)
    y = aug(torch.full((6, 3, 16, 16), 0.5), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(y.amax(dim=(1, 2, 3)), y.amin(dim=(1, 2, 3)), atol=1e-5)


def test_center_transform_and_autocast():
    x = torch.full((2, 1, 28, 28), 128, dtype=torch.uint8)
    y = center_transform(x, 28, 1)
    assert y.shape == (2, 1, 28, 28)
    assert torch.allclose(y, torch.full_like(y, (128 / 255 - MEAN) / STD), atol=1e-6)
    z = center_transform(_batch(2, 3, 40), 32, 3)
    assert z.shape == (2, 3, 32, 32) and z.min() >= -1 and z.max() <= 1
    wide = torch.zeros(1, 3, 20, 40)
    wide[..., 10:30] = 1.0
    assert torch.allclose(center_transform(wide, 10, 1)[..., 1:-1], torch.ones(1, 1, 10, 8), atol=1e-6)
    assert to_channels(torch.ones(1, 1, 2, 2), 3).shape == (1, 3, 2, 2)
    aug = SimCLRAugment(28, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = aug(_batch(4, 1, 28), keys=view_key(0, 0, torch.arange(4)))
    assert out.dtype == torch.float32
    assert torch.equal(out, aug(_batch(4, 1, 28), keys=view_key(0, 0, torch.arange(4))))


def test_bad_inputs():
    aug = SimCLRAugment(28, 1)
    with pytest.raises(ValueError):
        aug(torch.zeros(2, 2, 28, 28))
    with pytest.raises(ValueError):
        aug(torch.zeros(2, 1, 28, 28), keys=torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError):
        SimCLRAugment(28, 2)


def test_cpu_slicing_and_blur_paths_agree():
    x = _batch(70, 3, 32, seed=9)
    keys = view_key(2, 0, torch.arange(70))
    aug = SimCLRAugment(32, 3)
    whole = aug(x, keys=keys)
    sliced = SimCLRAugment(32, 3)
    sliced.cpu_chunk_elements = 1  # slices of 32 images
    assert torch.equal(sliced(x, keys=keys), whole)
    conv = SimCLRAugment(32, 3)
    conv.cpu_shift_blur_radius = 0  # the depthwise-conv blur used on CPUs for wide kernels
    assert torch.allclose(conv(x, keys=keys), whole, atol=1e-5)


@pytest.mark.parametrize("size,channels,k", [(28, 1, 3), (96, 3, 9), (224, 3, 23), (4, 1, 5), (2, 1, 5)])
def test_gpu_blur_matmul_equals_depthwise_conv(size, channels, k):
    """The GPU blur (banded matrices holding the padding) against the padded depthwise conv,
    reflect padding and, for images smaller than the kernel's radius, replicate."""
    from mak.train.augment import _blur_matmul

    aug = SimCLRAugment(max(size, 3), channels)
    aug.kernel_size, aug.cpu_shift_blur_radius = k, -1  # force the conv path
    g = torch.Generator().manual_seed(size)
    x = torch.rand(6, channels, size, size, generator=g)
    sigma = np.linspace(0.1, 2.0, 6)
    kern = torch.from_numpy(aug._blur_kernels(sigma, np.array([True, False, True, True, True, True]))).float()
    ref = aug._blur(x, kern, 2.0)
    got = _blur_matmul(x, kern, kern * 2.0, k // 2)
    assert got.shape == ref.shape and got.dtype == torch.float32
    assert torch.allclose(got, ref, atol=2e-6), float((got - ref).abs().max())
    half = _blur_matmul(x, kern, kern * 2.0, k // 2, torch.float16)  # the GPU's precision
    assert half.dtype == torch.float32 and torch.allclose(half, ref, atol=4e-3)

