"""The native CPU augmentation kernel against the torch implementation it replaces."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from mak.train import native
from mak.train.augment import MEAN, STD, SimCLRAugment, view_key

needs_native = pytest.mark.skipif(not native.available(), reason="no C compiler: the torch path is used")


def _pair(size: int, channels: int):
    fast, ref = SimCLRAugment(size, channels), SimCLRAugment(size, channels)
    ref.native = False
    return fast, ref


@needs_native
@pytest.mark.parametrize("cin,cout,h,w,size", [
    (1, 1, 28, 28, 28),     # Fashion-MNIST: the demo's geometry
    (3, 3, 32, 32, 32),     # colour: saturation, hue, grayscale matrix
    (3, 1, 40, 36, 32),     # RGB in, grey out, non-square input
    (1, 3, 28, 28, 28),     # grey in, RGB out
    (3, 3, 100, 96, 96),    # a 9-tap blur
    (1, 1, 28, 28, 2),      # smaller than the blur radius: replicate padding
])
def test_native_matches_torch(cin, cout, h, w, size):
    g = torch.Generator().manual_seed(size + cin)
    x = torch.randint(0, 256, (96, cin, h, w), generator=g, dtype=torch.uint8)
    keys = view_key(4, 1, torch.arange(96))
    fast, ref = _pair(size, cout)
    a, b = fast(x, keys=keys), ref(x, keys=keys)
    assert a.shape == b.shape == (96, cout, size, size) and a.dtype == torch.float32
    assert torch.allclose(a, b, atol=1e-5), float((a - b).abs().max())
    assert float(a.min()) >= -1.0 - 1e-6 and float(a.max()) <= 1.0 + 1e-6


@needs_native
def test_native_per_image_bit_identical_whatever_the_batch():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (70, 3, 32, 32), generator=g, dtype=torch.uint8)
    keys = view_key(2, 0, torch.arange(70))
    aug = SimCLRAugment(32, 3)
    whole = aug(x, keys=keys)
    assert torch.equal(aug(x[13:41], keys=keys[13:41]), whole[13:41])
    torch.set_num_threads(1)
    try:
        one = aug(x, keys=keys)
    finally:
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    assert torch.equal(one, whole)  # thread count does not change a value


@needs_native
def test_native_bad_inputs():
    aug = SimCLRAugment(28, 1)
    x = torch.zeros(4, 1, 28, 28, dtype=torch.uint8)
    q = aug._pack(aug._params_np(view_key(0, 0, torch.arange(4)), 28, 28), 28, 28, True)
    with pytest.raises(ValueError, match="uint8"):
        native.simclr_augment(x.float(), q, 1, 28, 3, MEAN, STD)
    with pytest.raises(ValueError, match="parameter rows"):
        native.simclr_augment(x, q[:3], 1, 28, 3, MEAN, STD)
    with pytest.raises(ValueError, match="odd"):
        native.simclr_augment(x, q, 1, 28, 4, MEAN, STD)
    # float input takes the torch path, with the same result as uint8 / 255 there
    ref = SimCLRAugment(28, 1)
    ref.native = False
    keys = view_key(0, 0, torch.arange(4))
    assert torch.allclose(aug(x.float() / 255.0, keys=keys), ref(x, keys=keys))


def _probe(env: dict) -> subprocess.CompletedProcess:
    code = ("import torch; from mak.train import native; from mak.train.augment import SimCLRAugment, view_key;"
            "x = torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8);"
            "y = SimCLRAugment(28, 1)(x, keys=view_key(0, 0, torch.arange(8)));"
            "print(native.available(), tuple(y.shape))")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})


def test_fallback_without_compiler_or_when_disabled(tmp_path):
    res = _probe({"MAK_NATIVE": "0", "MAK_CACHE_DIR": str(tmp_path / "a")})
    assert res.returncode == 0, res.stderr
    assert res.stdout.split()[0] == "False" and "(8, 1, 28, 28)" in res.stdout
    assert "unavailable" not in res.stderr  # disabled on purpose: no warning
    res = _probe({"CC": str(tmp_path / "no-such-cc"), "MAK_CACHE_DIR": str(tmp_path / "b")})
    assert res.returncode == 0, res.stderr
    assert res.stdout.split()[0] == "False" and "(8, 1, 28, 28)" in res.stdout
    assert "native CPU augmentation unavailable" in res.stderr and len(res.stderr.strip().splitlines()) == 1


@needs_native
def test_build_is_cached_per_source_and_cpu(tmp_path):
    env = {"MAK_CACHE_DIR": str(tmp_path)}
    assert _probe(env).stdout.split()[0] == "True"
    built = sorted(tmp_path.glob("augment-*.so"))
    assert len(built) == 1 and not list(tmp_path.glob(".augment-*"))  # no temporary left behind
    mtime = built[0].stat().st_mtime_ns
    assert _probe(env).stdout.split()[0] == "True"
    assert sorted(tmp_path.glob("augment-*.so")) == built and built[0].stat().st_mtime_ns == mtime


@needs_native
def test_native_key_uniforms_bit_identical_to_numpy():
    from mak.train.augment import _uniforms_reference

    rng = np.random.default_rng(5)
    keys = np.concatenate([rng.integers(-(2**63), 2**63 - 1, 500, dtype=np.int64),
                           np.array([0, -1, 2**63 - 1, -(2**63)], dtype=np.int64)])
    got = native.key_uniforms(keys, 32)
    assert got.dtype == np.float64 and got.shape == (504, 32)
    assert np.array_equal(got, _uniforms_reference(keys, 32))
    assert np.array_equal(native.key_uniforms(keys, 40), _uniforms_reference(keys, 40))  # longer streams too
