"""BatchNorm whose training statistics span every rank under DDP."""
from __future__ import annotations

import torch
import torch.distributed as dist

from mak.distributed import active


class _AllReduceSum(torch.autograd.Function):
    """Differentiable all-reduce (sum): the gradient of every rank's input is the summed gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        y = x.clone()
        dist.all_reduce(y)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        g = grad.clone()
        dist.all_reduce(g)
        return g


def _diff_all_reduce(x: torch.Tensor) -> torch.Tensor:
    return _AllReduceSum.apply(x)


class _SyncBatchNormCPU(torch.nn.modules.batchnorm._BatchNorm):
    """BatchNorm (1d/2d/3d) whose training statistics span every rank, for the CPU/gloo backend.

    ``torch.nn.SyncBatchNorm`` refuses CPU tensors, so DDP on CPU uses this one: the per-channel
    sum, sum of squares and count are all-reduced with a differentiable all-reduce, so the
    gradient also flows through the global statistics. Its state dict is a plain BatchNorm's.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {input.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if not (self.training and active()):
            return super().forward(x)
        c = x.shape[1]
        xf = x.float()
        dims = [0] + list(range(2, x.ndim))
        count = torch.full((1,), float(xf.numel() // c), dtype=torch.float32, device=x.device)
        stats = torch.cat([xf.sum(dims), (xf * xf).sum(dims), count])
        stats = _diff_all_reduce(stats)
        n = stats[2 * c]
        mean = stats[:c] / n
        var = (stats[c: 2 * c] / n - mean * mean).clamp_min(0.0)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var.detach() * (n.detach() / (n.detach() - 1).clamp_min(1.0))
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased, alpha=m)
        shape = [1, c] + [1] * (x.ndim - 2)
        scale = torch.rsqrt(var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight.float()
        shift = -mean * scale
        if self.bias is not None:
            shift = shift + self.bias.float()
        return (xf * scale.view(shape) + shift.view(shape)).to(x.dtype)


def convert_sync_batchnorm(module: torch.nn.Module, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Make every BatchNorm of ``module`` synchronise its statistics across ranks.

    NCCL: ``torch.nn.SyncBatchNorm``; gloo (CPU, or CUDA with ``MAK_DIST_BACKEND=gloo``): a
    BatchNorm subclass with an all-reduce. Parameters and buffers are kept (same state-dict
    keys), so checkpoints stay plain.
    """
    nccl = (dist.is_initialized() and dist.get_backend() == "nccl") if dist.is_available() else False
    if torch.device(device).type == "cuda" and (nccl or not dist.is_initialized()):
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _convert_bn_cpu(module)


def _convert_bn_cpu(module: torch.nn.Module) -> torch.nn.Module:
    out = module
    if (isinstance(module, torch.nn.modules.batchnorm._BatchNorm)
            and not isinstance(module, (_SyncBatchNormCPU, torch.nn.SyncBatchNorm))):
        out = _SyncBatchNormCPU(module.num_features, module.eps, module.momentum, module.affine,
                                module.track_running_stats)
        if module.affine:
            with torch.no_grad():
                out.weight = module.weight
                out.bias = module.bias
        out.running_mean = module.running_mean
        out.running_var = module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, _convert_bn_cpu(child))
    return out
