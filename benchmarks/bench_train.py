"""Throughput of ``mak pretrain`` and ``mak embed`` against bare model loops, in one run.

For each backbone it measures, on synthetic uint8 images:

- **bare train**: forward + NT-Xent + backward + SGD step on a pre-augmented float tensor
  (2B views already on the device, the same mixed-precision / channels_last settings);
- **pretrain**: :func:`mak.train.pretrain.pretrain` on an in-memory source of the same images
  (decode/resize, batched augmentation, schedule, logging included; the checkpoint write is
  outside the timed loop), images/s of its second epoch from ``log.csv``;
- **bare embed**: 1 backbone forward + R full forwards per batch on pre-made tensors;
- **embed**: :func:`mak.train.embed.embed` (loading, centre transform, R keyed augmentations,
  memmap writes) over the same images.

Runs alternate (bare, pipeline, bare, pipeline ...) and the best of ``--reps`` is kept for each,
which is robust to other load on the machine. Images/s counts images (each training image is
two views). Usage::

    python benchmarks/bench_train.py                       # CPU: smallconv, resnet18-small at 28 px
    python benchmarks/bench_train.py --device cuda         # GPU: resnet50, 224 px, batch 256, bf16
"""
from __future__ import annotations

import argparse
import csv
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from mak._machine import cpu_summary
from mak.data.sources import ArraySource
from mak.train.device import autocast_context, resolve_amp, resolve_channels_last
from mak.train.embed import embed
from mak.train.losses import nt_xent
from mak.train.models import SimCLRModel
from mak.train.pretrain import pretrain


def _images_per_s(step, steps: int, batch: int, dev: torch.device) -> float:
    """images/s of ``steps`` calls of ``step`` (each ``batch`` images), timed between device syncs."""
    _sync(dev)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(dev)
    return steps * batch / (time.perf_counter() - t0)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def bare_train(name: str, size: int, channels: int, batch: int, steps: int, dev: torch.device,
               amp_dtype, cl: bool) -> float:
    """images/s of forward+backward+step on pre-augmented tensors."""
    torch.manual_seed(0)
    model = SimCLRModel(name, channels).to(dev)
    if cl:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(2 * batch, channels, size, size, device=dev).clamp_(-1, 1)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)

    def step():
        with autocast_context(dev, amp_dtype):
            _, z = model(x)
        loss = nt_xent(z[:batch].float(), z[batch:].float(), 0.2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    step()
    return _images_per_s(step, steps, batch, dev)


def bare_embed(model, size: int, channels: int, batch: int, steps: int, views: int, dev: torch.device,
               amp_dtype, cl: bool) -> float:
    """images/s of 1 backbone forward + ``views`` full forwards per batch on pre-made tensors."""
    x = torch.randn(batch, channels, size, size, device=dev).clamp_(-1, 1)
    xv = [torch.randn(batch, channels, size, size, device=dev).clamp_(-1, 1) for _ in range(min(views, 2))]
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
        xv = [v.contiguous(memory_format=torch.channels_last) for v in xv]

    def step():
        with torch.inference_mode(), autocast_context(dev, amp_dtype):
            model.backbone(x)
            for r in range(views):
                model(xv[r % len(xv)])

    step()
    return _images_per_s(step, steps, batch, dev)


def run_backbone(name: str, args, dev: torch.device, work: Path) -> dict:
    size, channels, batch, steps = args.image_size, args.channels, args.batch_size, args.steps
    amp_dtype = resolve_amp(dev, args.amp)
    cl = resolve_channels_last(dev, False if args.no_channels_last else None)
    rng = np.random.default_rng(0)
    n = batch * steps
    shape = (n, size, size) if channels == 1 else (n, size, size, 3)
    arr_path = work / f"images-{size}-{channels}.npy"
    if not arr_path.exists():
        np.save(arr_path, rng.integers(0, 256, size=shape, dtype=np.uint8))
    source = ArraySource(arr_path)
    res = {"backbone": name, "bare_train": 0.0, "pretrain": 0.0, "bare_embed": 0.0, "embed": 0.0}
    ckpt = None
    for rep in range(args.reps):
        res["bare_train"] = max(res["bare_train"], bare_train(name, size, channels, batch, steps, dev, amp_dtype, cl))
        out = work / f"pt-{name}-{rep}"
        shutil.rmtree(out, ignore_errors=True)
        ckpt = pretrain(source, out, backbone=name, epochs=2, batch_size=batch, seed=rep, image_size=size,
                        channels=channels, device=str(dev), amp=args.amp,
                        channels_last=False if args.no_channels_last else None, num_workers=args.workers,
                        progress=False)
        with open(out / "log.csv") as fh:
            rows = list(csv.DictReader(fh))
        res["pretrain"] = max(res["pretrain"], float(rows[-1]["images_per_s"]))
        print(f"  {name} rep {rep}: bare train {res['bare_train']:.1f}, pretrain {float(rows[-1]['images_per_s']):.1f} img/s",
              file=sys.stderr)
    from mak.train.pretrain import load_model

    model, _ = load_model(ckpt, dev)
    if cl:
        model = model.to(memory_format=torch.channels_last)
    for rep in range(args.reps):
        res["bare_embed"] = max(res["bare_embed"], bare_embed(model, size, channels, batch, steps, args.views, dev,
                                                              amp_dtype, cl))
        out = work / f"store-{name}-{rep}"
        shutil.rmtree(out, ignore_errors=True)
        stats: dict = {}
        embed(source, ckpt, out, views=args.views, batch_size=batch, device=str(dev), num_workers=args.workers,
              progress=False, amp=args.amp,
              channels_last=False if args.no_channels_last else None, stats=stats)
        res["embed"] = max(res["embed"], stats["images_per_s"])
        print(f"  {name} rep {rep}: bare embed {res['bare_embed']:.1f}, embed {stats['images_per_s']:.1f} img/s",
              file=sys.stderr)
    res["train_ratio"] = res["pretrain"] / res["bare_train"]
    res["embed_ratio"] = res["embed"] / res["bare_embed"]
    res["amp"] = str(amp_dtype).replace("torch.", "") if amp_dtype is not None else "float32"
    res["channels_last"] = cl
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--backbones", default=None, help="comma-separated (default: smallconv,resnet18-small on CPU; resnet50 on CUDA)")
    p.add_argument("--image-size", type=int, default=None, help="px (default 28 on CPU, 224 on CUDA)")
    p.add_argument("--channels", type=int, default=None, help="1 or 3 (default 1 on CPU, 3 on CUDA)")
    p.add_argument("--batch-size", type=int, default=None, help="default: 256 (CUDA, smallconv), 32 for ResNets on CPU")
    p.add_argument("--steps", type=int, default=None, help="timed steps per measurement (default 8; 3 for ResNets on CPU)")
    p.add_argument("--views", type=int, default=None, help="embed views R (default 4 CPU, 10 CUDA)")
    p.add_argument("--reps", type=int, default=2, help="alternating repetitions, best kept (default 2)")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: mak's default)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's, = cores)")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: where the device has it natively); --no-amp: float32")
    p.add_argument("--no-channels-last", action="store_true")
    args = p.parse_args(argv)
    warnings.simplefilter("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    if cuda and not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    names = (args.backbones or ("resnet50" if cuda else "smallconv,resnet18-small")).split(",")
    args.image_size = args.image_size or (224 if cuda else 28)
    args.channels = args.channels or (3 if cuda else 1)
    args.views = args.views if args.views is not None else (10 if cuda else 4)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {dev}"
          f"{' (' + torch.cuda.get_device_name(dev) + ')' if cuda else ''}", file=sys.stderr)
    print(f"cpu: {cpu_summary()}; precision: {resolve_amp(dev, args.amp) or 'float32'}")
    results = []
    with tempfile.TemporaryDirectory(prefix="mak-bench-") as tmp:
        for name in names:
            a = argparse.Namespace(**vars(args))
            small_cpu = cuda or name.startswith("smallconv")
            if a.batch_size is None:
                a.batch_size = 256 if small_cpu else 32
            if a.steps is None:
                a.steps = 8 if small_cpu else 3
            results.append((a.batch_size, run_backbone(name, a, dev, Path(tmp))))
    print()
    print(f"| backbone | px | batch | precision | threads | bare train img/s | pretrain img/s | ratio | "
          f"bare embed img/s (1+{args.views} fwd) | embed img/s | ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for bs, r in results:
        prec = r["amp"] + (", channels_last" if r["channels_last"] else "")
        print(f"| {r['backbone']} | {args.image_size} | {bs} | {prec} | {torch.get_num_threads()} | {r['bare_train']:.1f} | {r['pretrain']:.1f} | "
              f"{r['train_ratio']:.2f} | {r['bare_embed']:.1f} | {r['embed']:.1f} | {r['embed_ratio']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
