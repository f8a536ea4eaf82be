"""``mak pretrain``: SimCLR pre-training on the seed set (see :func:`mak.train.pretrain.pretrain`)."""
from __future__ import annotations

import argparse

from mak.cli._output import add_output_flags, say, show_progress

HELP = "SimCLR pre-training on the seed set"  # the one line `mak --help` shows


def register(sub: argparse._SubParsersAction) -> None:
    from mak.cli._sources import add_source_args
    from mak.options import argparse_type, integer, number, or_auto
    from mak.train.pretrain import DEFAULT_BASE_LR, DEFAULT_EPOCHS

    p = sub.add_parser(
        "pretrain", help=HELP,
        description="Pre-train a SimCLR model (NT-Xent, temperature 0.2) on the seed images; writes "
                    "OUT/checkpoint.pt every epoch and OUT/log.csv. Runs DDP under torchrun.")
    add_source_args(p)
    p.add_argument("--out", required=True, metavar="DIR", help="output directory for checkpoint.pt and log.csv")
    p.add_argument("--backbone", metavar="NAME", default=None,
                   help="smallconv[-wide], resnet18[-small], resnet50, torchvision:NAME or timm:NAME (default: smallconv <= 64 px, else resnet18)")
    p.add_argument("--epochs", type=argparse_type(integer(1), "epochs"), default=DEFAULT_EPOCHS, metavar="E",
                   help=f"training epochs (default {DEFAULT_EPOCHS})")
    p.add_argument("--batch-size", type=argparse_type(integer(2), "batch_size"), default=None, metavar="B",
                   help="global batch size over all processes (default: min(256, number of images))")
    p.add_argument("--lr", type=argparse_type(number(0.0), "lr"), default=DEFAULT_BASE_LR, metavar="LR",
                   help=f"base learning rate; actual lr = LR x batch/256 (default {DEFAULT_BASE_LR})")
    p.add_argument("--warmup-epochs", type=argparse_type(integer(0), "warmup_epochs"), default=None, metavar="W",
                   help="epochs of linear lr warm-up before the cosine decay (default: min(10, epochs/10))")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="random seed: same seed, same weights (default 0)")
    p.add_argument("--weights", metavar="FILE", help="start from pretrained backbone weights: .safetensors or a "
                   "torch state dict (read with weights_only; 'module.'/'backbone.' prefixes are stripped)")
    p.add_argument("--image-size", type=argparse_type(integer(1), "image_size"), default=None, metavar="PX",
                   help="working image size in pixels (default: the images' typical size)")
    p.add_argument("--channels", type=int, choices=(1, 3), default=None,
                   help="working channels, 1 or 3 (default: 3 if the images have colour)")
    p.add_argument("--device", default="auto", metavar="DEV", help="auto, cpu, cuda or cuda:N (default auto: CUDA when available)")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16/fp16 mixed precision (default: where the device has it natively: CUDA, CPUs with "
                        "AVX512-BF16/AMX); --no-amp: float32")
    p.add_argument("--no-channels-last", action="store_true", help="keep NCHW memory format (default: channels_last)")
    p.add_argument("--workers", type=argparse_type(integer(0), "workers"), default=None, metavar="N",
                   help="DataLoader workers decoding images (default: half the CPU cores, 8 with CUDA)")
    mix = p.add_argument_group("pool-aware model (what `robust` scores with in `mak run`)")
    mx = mix.add_mutually_exclusive_group()
    mx.add_argument("--mix-split", metavar="FILE", help="also train on a uniform sample of this pool split file")
    mx.add_argument("--mix-folder", metavar="DIR", help="also train on a uniform sample of this pool image folder")
    mix.add_argument("--mix-root", metavar="DIR", help="directory the --mix-split paths are relative to")
    mix.add_argument("--mix-count", default="auto", metavar="N", type=argparse_type(or_auto(integer(0)), "mix_count"),
                     help="pool images in the sample (default auto: min(pool, 8 x seed images))")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    add_output_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import sys

    from mak import distributed as D
    from mak.cli._sources import source_from_args
    from mak.data.sources import open_source, pool_mix
    from mak.errors import MakError
    from mak.train.pretrain import pretrain

    source = source_from_args(args)
    if args.mix_split or args.mix_folder:
        pool = open_source("split", args.mix_split, root=args.mix_root) if args.mix_split \
            else open_source("folder", args.mix_folder)
        source = pool_mix(source, pool, args.mix_count, args.seed, progress=show_progress(args))
        if source.skipped:
            print(f"mak pretrain: left out {len(source.skipped)} unreadable pool images (first: "
                  f"{source.skipped[0][1]})", file=sys.stderr)
    elif args.mix_root or args.mix_count != "auto":
        raise MakError("--mix-root and --mix-count need --mix-split or --mix-folder")
    with D.process_group(args.device):  # torn down on every exit, waiting for the other ranks only on success
        ckpt = pretrain(source, args.out, backbone=args.backbone, epochs=args.epochs, batch_size=args.batch_size,
                        base_lr=args.lr, warmup_epochs=args.warmup_epochs, seed=args.seed,
                        image_size=args.image_size, channels=args.channels, device=args.device,
                        amp=args.amp, channels_last=False if args.no_channels_last else None,
                        resume=args.resume, num_workers=args.workers, progress=show_progress(args),
                        weights=args.weights)
        if D.rank() == 0:
            say(args, f"checkpoint -> {ckpt}")
    return 0
