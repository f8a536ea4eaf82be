"""Backbones, projection head and SimCLRModel."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from mak.errors import MakError
from mak.train.losses import nt_xent
from mak.train.models import BACKBONES, ProjectionHead, SimCLRModel, build_backbone, default_backbone

FEAT_DIMS = {"smallconv": 128, "smallconv-wide": 256, "resnet18": 512, "resnet18-small": 512,
             "resnet50": 2048}


@pytest.mark.parametrize("name", BACKBONES)
def test_backbone_shapes(name):
    size = 28 if name.startswith("smallconv") or name.endswith("-small") else 32
    for channels in ((1, 3) if name.startswith("smallconv") else (3,) if name == "resnet50" else (1,)):
        torch.manual_seed(0)
        net, dim = build_backbone(name, channels)
        assert dim == FEAT_DIMS[name]
        with torch.no_grad():
            out = net(torch.randn(2, channels, size, size))
        assert out.shape == (2, dim)


def test_simclr_model_forward_backward():
    torch.manual_seed(0)
    model = SimCLRModel("smallconv", 1)
    assert model.feat_dim == 128 and isinstance(model.head, ProjectionHead)
    assert model.head.hidden == model.feat_dim and model.head.out_dim == 128
    x = torch.randn(8, 1, 28, 28)
    feats, proj = model(x)
    assert feats.shape == (8, 128) and proj.shape == (8, 128)
    loss = nt_xent(proj[:4], proj[4:])
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_channels_last_and_autocast():
    torch.manual_seed(0)
    model = SimCLRModel("smallconv", 3).to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feats, proj = model(x)
    assert feats.shape == (4, 128) and proj.shape == (4, 128)
    assert torch.isfinite(proj.float()).all()


def test_initialisation_is_seeded():
    torch.manual_seed(123)
    a = SimCLRModel("smallconv-wide", 3).state_dict()
    torch.manual_seed(123)
    b = SimCLRModel("smallconv-wide", 3).state_dict()
    torch.manual_seed(124)
    c = SimCLRModel("smallconv-wide", 3).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_projection_head_options():
    head = ProjectionHead(64, hidden=32, out=16)
    assert head(torch.randn(3, 64)).shape == (3, 16)
    assert ProjectionHead(64).hidden == 64


def test_unknown_backbones():
    with pytest.raises(MakError, match="^backbone='resnet7' is not a backbone \\(choose from smallconv, "):
        build_backbone("resnet7", 3)
    with pytest.raises(MakError, match="model name"):
        build_backbone("timm:", 3)
    with pytest.raises(MakError):
        build_backbone("smallconv", 2)
    with pytest.raises(MakError, match="is not a backbone"):
        SimCLRModel("vgg", 1)


@pytest.mark.parametrize("package", ["timm", "torchvision"])
def test_optional_packages(package):
    if importlib.util.find_spec(package) is None:
        with pytest.raises(MakError, match=f"pip install {package}"):
            build_backbone(f"{package}:resnet18", 3)
    else:
        net, dim = build_backbone(f"{package}:resnet18", 1)
        assert dim == 512
        with torch.no_grad():
            assert net(torch.randn(2, 1, 32, 32)).shape == (2, 512)


def test_default_backbone():
    assert default_backbone(28) == "smallconv"
    assert default_backbone(64) == "smallconv"
    assert default_backbone(96) == "resnet18"
    assert default_backbone(224) == "resnet18"
    assert set(BACKBONES) >= {"smallconv", "resnet18", "resnet18-small", "resnet50"}
