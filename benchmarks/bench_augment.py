"""Cost of one batch of SimCLR augmentation against the model forward it feeds, in one run.

For a batch of ``--batch`` uint8 images at ``--size`` px it times (best of ``--reps``):

- **augment**: :class:`mak.train.augment.SimCLRAugment` on the batch (keys given, as ``mak embed`` does);
- **augment, torch ops**: the same in plain torch ops instead of the fused C kernel of
  :mod:`mak.train.native` (CPU only; the naive reference);
- **augment, conv blur**: the same with the depthwise-conv blur instead of the GPU's banded matmuls
  (GPU only);
- **copy floor**: one float32 read + write of the output-sized batch (the memory-traffic unit);
- **forward**: the backbone + head forward the views go through (``--backbone``, bf16 autocast on
  CUDA), i.e. what augmentation must stay well below for ``mak embed`` to run near a bare loop.

``--profile`` adds torch.profiler's table of the augmentation's kernels. Usage::

    python benchmarks/bench_augment.py                               # CPU: 28 px, 1 channel, smallconv
    python benchmarks/bench_augment.py --device cuda --profile       # GPU: 224 px, 3 channels, resnet50
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from mak.train import native
from mak.train.augment import SimCLRAugment, view_key
from mak.train.device import autocast_context, resolve_amp
from mak.train.models import SimCLRModel


def timed(fn, dev: torch.device, reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t = time.perf_counter()
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        best = min(best, time.perf_counter() - t)
    return best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--size", type=int, default=None, help="px (default 28 on CPU, 224 on CUDA)")
    p.add_argument("--channels", type=int, default=None, help="default 1 on CPU, 3 on CUDA")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--backbone", default=None, help="default smallconv on CPU, resnet50 on CUDA")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--profile", action="store_true")
    a = p.parse_args(argv)
    dev = torch.device(a.device)
    gpu = dev.type == "cuda"
    size = a.size or (224 if gpu else 28)
    ch = a.channels or (3 if gpu else 1)
    name = a.backbone or ("resnet50" if gpu else "smallconv")
    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (a.batch, ch, size, size), generator=g, dtype=torch.uint8).to(dev)
    keys = view_key(0, 1, torch.arange(a.batch))
    aug = SimCLRAugment(size, ch)
    t_aug = timed(lambda: aug(imgs, keys=keys), dev, a.reps)
    rows = [("augment" + (" (native C kernel)" if not gpu and native.available() else ""), t_aug)]
    if not gpu:
        ref = SimCLRAugment(size, ch)
        ref.native = False
        rows.append(("augment, torch ops (reference)", timed(lambda: ref(imgs, keys=keys), dev, a.reps)))
    if gpu:
        conv = SimCLRAugment(size, ch)
        conv.gpu_blur_matmul = False
        rows.append(("augment, conv blur", timed(lambda: conv(imgs, keys=keys), dev, a.reps)))
    buf = torch.rand(a.batch, ch, size, size, generator=g).to(dev)
    out = torch.empty_like(buf)
    rows.append(("copy floor", timed(lambda: out.copy_(buf), dev, a.reps)))
    model = SimCLRModel(name, ch).to(dev).eval()
    amp = resolve_amp(dev, None)
    cl = dev.type in ("cpu", "cuda")
    if cl:
        model = model.to(memory_format=torch.channels_last)
        buf = buf.contiguous(memory_format=torch.channels_last)

    def fwd():
        with torch.inference_mode(), autocast_context(dev, amp):
            model(buf)

    t_fwd = timed(fwd, dev, max(3, a.reps // 2))
    rows.append((f"forward ({name}, {str(amp).replace('torch.', '') if amp else 'float32'})", t_fwd))
    print(f"device {dev}{' (' + torch.cuda.get_device_name(dev) + ')' if gpu else ''}, batch {a.batch}, "
          f"{size} px, {ch} channel(s), torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| step | ms per batch | / forward |")
    print("|---|---|---|")
    for label, t in rows:
        print(f"| {label} | {t * 1e3:.2f} | {t / t_fwd:.3f} |")
    if a.profile:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
        with profile(activities=acts) as prof:
            for _ in range(3):
                aug(imgs, keys=keys)
            if gpu:
                torch.cuda.synchronize(dev)
        key = "cuda_time_total" if gpu else "cpu_time_total"
        try:
            print(prof.key_averages().table(sort_by=key, row_limit=18))
        except Exception:  # noqa: BLE001 - column names vary across torch versions
            print(prof.key_averages().table(sort_by="self_" + ("device" if gpu else "cpu") + "_time_total", row_limit=18))
    return 0


if __name__ == "__main__":
    sys.exit(main())
