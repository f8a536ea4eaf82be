"""Backbones, the projection head and the SimCLR model.

Backbone names (:data:`BACKBONES`):

- ``smallconv`` / ``smallconv-wide`` -- a small, fast convnet for CPUs and images of 64 px or
  less: four 3x3 conv-BN-ReLU layers, each of stride 2 (28 px -> 14 -> 7 -> 4 -> 2), widths
  16-32-64-128 (32-64-128-256 for ``-wide``), global average pooling; feature dim 128 (256).
  Sized for SimCLR at >= 2,000 images/s of 28 px on two CPU cores (about 1 M multiply-adds per
  28 px image; ``-wide`` about 4 M).
- ``resnet18`` / ``resnet50`` -- the ImageNet ResNets (7x7 stride-2 stem + max-pool); feature dim
  512 / 2048.
- ``resnet18-small`` -- ResNet-18 with the small-image stem (3x3 stride-1 conv, no max-pool),
  for 28-64 px inputs (the CIFAR variant of SimCLR); feature dim 512.
- ``torchvision:NAME`` / ``timm:NAME`` -- any architecture of those packages when installed,
  randomly initialised, classifier removed (one-channel inputs are repeated to three for
  torchvision models; timm models are built with ``in_chans``).

:func:`default_backbone` picks ``smallconv`` for images of 64 px or less and ``resnet18`` above
(ResNet-50 is much slower on CPUs; ask for it with ``--backbone resnet50``).

Every backbone maps ``(B, C, H, W)`` to ``(B, feat_dim)`` and works in ``channels_last`` and
under ``torch.autocast``. Initialisation uses only torch's global generator, so
``torch.manual_seed`` makes the weights reproducible.
"""
from __future__ import annotations

import hashlib
import importlib
import io
import os
from typing import Any, Callable, NamedTuple

import torch
import torch.nn as nn

from mak.errors import MakError, first_line
from mak.options import ParameterError
from mak.paths import input_file

__all__ = [
    "BACKBONES",
    "ProjectionHead",
    "SimCLRModel",
    "SmallConvNet",
    "ResNet",
    "build_backbone",
    "default_backbone",
]

BACKBONES = ["smallconv", "smallconv-wide", "resnet18", "resnet18-small", "resnet50"]
EXTERNAL_PREFIXES = ("torchvision:", "timm:")


def _conv_bn_relu(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class SmallConvNet(nn.Module):
    """conv3x3-BN-ReLU x 4, all stride 2, widths w-2w-4w-8w, then global average pooling."""

    def __init__(self, channels: int, width: int = 16) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            _conv_bn_relu(channels, w, 2),
            _conv_bn_relu(w, 2 * w, 2),
            _conv_bn_relu(2 * w, 4 * w, 2),
            _conv_bn_relu(4 * w, 8 * w, 2),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_dim = 8 * w
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.features(x)), 1)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(cin, planes * self.expansion, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)  # stride on 3x3 (v1.5)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(cin, out, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def _shortcut(cin: int, cout: int, stride: int) -> nn.Module | None:
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))


class ResNet(nn.Module):
    """ResNet v1.5 trunk without the classifier: ``forward`` returns pooled features."""

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: list[int], channels: int,
                 small_stem: bool = False) -> None:
        super().__init__()
        if small_stem:
            self.stem = nn.Sequential(
                nn.Conv2d(channels, 64, 3, stride=1, padding=1, bias=False),
                nn.BatchNorm2d(64),
                nn.ReLU(inplace=True),
            )
        else:
            self.stem = nn.Sequential(
                nn.Conv2d(channels, 64, 7, stride=2, padding=3, bias=False),
                nn.BatchNorm2d(64),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, stride=2, padding=1),
            )
        cin = 64
        stages = []
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), layers)):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(block(cin, planes, stride))
                cin = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_dim = cin
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.pool(x), 1)


def _init_weights(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class _RepeatChannels(nn.Module):
    """Feeds a one-channel batch to a three-channel model."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return self.model(x)


def _import_optional(package: str, name: str):
    try:
        return importlib.import_module(package)
    except ImportError:
        raise MakError(f"backbone {name!r} needs the '{package}' package, which is not installed "
                       f"(pip install {package})") from None


def _strip_classifier(model: nn.Module) -> int | None:
    """Replace the classification layer by Identity; return its input width if known."""
    for attr in ("fc", "classifier", "head", "heads", "last_linear"):
        layer = getattr(model, attr, None)
        if layer is None or isinstance(layer, nn.Identity):
            continue
        if isinstance(layer, nn.Linear):
            setattr(model, attr, nn.Identity())
            return layer.in_features
        if isinstance(layer, nn.Sequential):
            linears = [m for m in layer.modules() if isinstance(m, nn.Linear)]
            if linears:
                setattr(model, attr, nn.Identity())
                return linears[0].in_features
    return None


def _probe_dim(model: nn.Module, channels: int) -> int:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, channels, 224, 224))
    finally:
        model.train(was_training)
    if isinstance(out, (tuple, list)):
        out = out[0]
    if out.ndim > 2:
        out = torch.flatten(out, 1) if out.shape[2:].numel() == 1 else out.mean(dim=tuple(range(2, out.ndim)))
    return int(out.shape[1])


class _Flatten(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        if isinstance(out, (tuple, list)):
            out = out[0]
        if out.ndim > 2:
            out = torch.flatten(out, 1) if out.shape[2:].numel() == 1 else out.mean(dim=tuple(range(2, out.ndim)))
        return out


def _torchvision_backbone(name: str, arch: str, channels: int) -> tuple[nn.Module, int]:
    tv_models = _import_optional("torchvision", name).models
    try:
        model = tv_models.get_model(arch, weights=None)
    except (ValueError, KeyError):
        raise MakError(f"unknown torchvision model {arch!r} (see torchvision.models.list_models())") from None
    dim = _strip_classifier(model)
    if channels == 1:
        model = _RepeatChannels(model)
    model = _Flatten(model)
    if dim is None:
        dim = _probe_dim(model, channels)
    return model, dim


def _timm_backbone(name: str, arch: str, channels: int) -> tuple[nn.Module, int]:
    timm = _import_optional("timm", name)
    try:
        model = timm.create_model(arch, pretrained=False, num_classes=0, in_chans=channels)
    except RuntimeError as exc:  # timm: "Unknown model (...)"
        raise MakError(f"unknown timm model {arch!r} ({exc})") from None
    dim = int(getattr(model, "num_features", 0)) or _probe_dim(model, channels)
    return _Flatten(model), dim


_BUILDERS: dict[str, Callable[[int], nn.Module]] = {
    "smallconv": lambda c: SmallConvNet(c, width=16),
    "smallconv-wide": lambda c: SmallConvNet(c, width=32),
    "resnet18": lambda c: ResNet(BasicBlock, [2, 2, 2, 2], c),
    "resnet18-small": lambda c: ResNet(BasicBlock, [2, 2, 2, 2], c, small_stem=True),
    "resnet50": lambda c: ResNet(Bottleneck, [3, 4, 6, 3], c),
}


def build_backbone(name: str, channels: int) -> tuple[nn.Module, int]:
    """Build backbone ``name`` for ``channels``-channel inputs: ``(module, feat_dim)``.

    Raises :class:`MakError` for an unknown name or a missing optional package.
    """
    if channels not in (1, 3):
        raise MakError(f"channels must be 1 or 3, not {channels}")
    backbone_name("backbone", name)
    if name in _BUILDERS:
        model = _BUILDERS[name](channels)
        return model, int(model.out_dim)
    prefix = next(p for p in EXTERNAL_PREFIXES if name.startswith(p))
    if prefix == "torchvision:":
        return _torchvision_backbone(name, name[len(prefix):], channels)
    return _timm_backbone(name, name[len(prefix):], channels)


def channel_count(name: str, value: Any) -> int:
    """A parser (:mod:`mak.options`): input channels, 1 or 3."""
    if isinstance(value, str) and value.strip() in ("1", "3"):
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value in (1, 3):
        return int(value)
    raise ParameterError(name, f"{name}={value!r} must be 1 or 3")


def backbone_name(name: str, value: Any) -> str:
    """A parser (:mod:`mak.options`): one of :data:`BACKBONES`, or ``torchvision:NAME`` /
    ``timm:NAME`` (whether that package has NAME is known only when it is built)."""
    if isinstance(value, str) and value in _BUILDERS:
        return value
    for prefix in EXTERNAL_PREFIXES:
        if isinstance(value, str) and value.startswith(prefix):
            if not value[len(prefix):]:
                raise ParameterError(name, f"{name}={value!r}: give a model name after '{prefix}'")
            return value
    raise ParameterError(name, f"{name}={value!r} is not a backbone (choose from {', '.join(BACKBONES)}, "
                               "torchvision:NAME or timm:NAME)")


WEIGHT_PREFIXES = ("module.", "backbone.", "model.", "encoder.")  # stripped until a key is the backbone's


class Weights(NamedTuple):
    """A state dict read by :func:`read_weights`, with the sha256 of the bytes it was read from."""

    state: dict[str, torch.Tensor]
    sha256: str
    path: str


def read_weights(path: str | os.PathLike) -> Weights:
    """A state dict from ``path``: safetensors, or a ``torch.save`` file read with ``weights_only``
    (a dict of tensors, or one holding it under ``state_dict`` or ``model``, as mak's checkpoints do).
    The file is read once: the hash is of the bytes the tensors come from."""
    p = input_file(path, "weights file")
    data = p.read_bytes()
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load as load_safetensors

            state = load_safetensors(data)
        else:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except ImportError:
        raise MakError(f"{p}: reading .safetensors needs the safetensors package (pip install safetensors)") from None
    except Exception as exc:
        raise MakError(f"{p}: unreadable weights ({type(exc).__name__}: {first_line(exc)})") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MakError(f"{p}: expected a state dict (names -> tensors)")
    return Weights(state, hashlib.sha256(data).hexdigest(), str(path))


def load_backbone_weights(backbone: nn.Module, weights: Weights) -> dict[str, Any]:
    """Load the tensors of ``weights`` (:func:`read_weights`) that name ``backbone``'s, after
    stripping :data:`WEIGHT_PREFIXES`.

    Tensors the backbone lacks (a classifier, a projection head) are left out and counted; a shape
    mismatch or no match at all is a :class:`MakError`. Returns what was loaded, for the record.
    """
    state, own, path = weights.state, backbone.state_dict(), weights.path
    mapped: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        name = key
        while name not in own and name.startswith(WEIGHT_PREFIXES):
            name = name.split(".", 1)[1]
        if name in own:
            if tuple(value.shape) != tuple(own[name].shape):
                raise MakError(f"{path}: {key} has shape {tuple(value.shape)}, the backbone's {name} "
                               f"{tuple(own[name].shape)} (another architecture or input channels?)")
            mapped[name] = value
    if not mapped:
        raise MakError(f"{path}: none of its {len(state)} tensors is one of the backbone's "
                       f"(its first: {', '.join(list(state)[:3])}; the backbone's: {', '.join(list(own)[:3])})")
    backbone.load_state_dict(mapped, strict=False)
    return {"file": path, "sha256": weights.sha256, "loaded": len(mapped), "missing": len(own) - len(mapped),
            "unused": len(state) - len(mapped)}


def default_backbone(image_size: int) -> str:
    """``smallconv`` for images of 64 px or less, else ``resnet18``."""
    return "smallconv" if int(image_size) <= 64 else "resnet18"


class ProjectionHead(nn.Module):
    """SimCLR's projection MLP: Linear(in, hidden) - BN - ReLU - Linear(hidden, out).

    ``hidden`` defaults to ``in_dim``; ``out`` to 128.
    """

    def __init__(self, in_dim: int, hidden: int | None = None, out: int = 128) -> None:
        super().__init__()
        hidden = int(hidden or in_dim)
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden, bias=False),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, out),
        )
        self.in_dim, self.hidden, self.out_dim = int(in_dim), hidden, int(out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SimCLRModel(nn.Module):
    """Backbone + projection head. ``forward(x)`` returns ``(features, projections)``."""

    def __init__(self, backbone_name: str, channels: int, proj_dim: int = 128) -> None:
        super().__init__()
        self.backbone, self.feat_dim = build_backbone(backbone_name, channels)
        self.head = ProjectionHead(self.feat_dim, out=proj_dim)
        self.backbone_name = backbone_name
        self.channels = channels
        self.proj_dim = proj_dim

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.backbone(x)
        return feats, self.head(feats)


class FrozenEncoder(nn.Module):
    """A pretrained backbone used as it is, no projection head: ``forward(x)`` returns
    ``(features, features)``, so ``mak embed``'s views are the backbone's own outputs."""

    def __init__(self, backbone: nn.Module, feat_dim: int) -> None:
        super().__init__()
        self.backbone, self.feat_dim = backbone, int(feat_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.backbone(x)
        return feats, feats


def frozen_encoder(weights: str | os.PathLike, backbone: str, channels: int) -> tuple[FrozenEncoder, dict[str, Any]]:
    """``backbone`` with ``weights`` loaded (:func:`load_backbone_weights`), in eval mode, and what was loaded."""
    net, dim = build_backbone(backbone, int(channels))
    info = load_backbone_weights(net, read_weights(weights))
    return FrozenEncoder(net, dim).eval(), info
