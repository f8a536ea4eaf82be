"""``mak pretrain``: SimCLR pre-training on the seed set (see :func:`mak.train.pretrain.pretrain`)."""
from __future__ import annotations

import argparse

from mak.cli._output import add_output_flags, say, show_progress

HELP = "SimCLR pre-training on the seed set"  # the one line `mak --help` shows


def register(sub: argparse._SubParsersAction) -> None:
    from mak.cli._options import add_option
    from mak.cli._sources import add_source_args
    from mak.options import DEVICE, by_name
    from mak.train.pretrain import PRETRAIN_OPTIONS

    opt = by_name(PRETRAIN_OPTIONS)  # declared once, with pretrain() (mak.train.pretrain)
    p = sub.add_parser(
        "pretrain", help=HELP,
        description="Pre-train a SimCLR model (NT-Xent, temperature 0.2) on the seed images; writes "
                    "OUT/checkpoint.pt every epoch and OUT/log.csv. Runs DDP under torchrun.")
    add_source_args(p)
    p.add_argument("--out", required=True, metavar="DIR", help="output directory for checkpoint.pt and log.csv")
    add_option(p, opt["backbone"])
    for name in ("epochs", "batch_size", "base_lr", "warmup_epochs", "seed"):
        add_option(p, opt[name])
    p.add_argument("--weights", metavar="FILE", help="start from pretrained backbone weights: .safetensors or a "
                   "torch state dict (read with weights_only; 'module.'/'backbone.' prefixes are stripped)")
    add_option(p, opt["image_size"])
    add_option(p, opt["channels"])
    add_option(p, DEVICE)
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16/fp16 mixed precision (default: where the device has it natively: CUDA, CPUs with "
                        "AVX512-BF16/AMX); --no-amp: float32")
    p.add_argument("--no-channels-last", action="store_true", help="keep NCHW memory format (default: channels_last)")
    add_option(p, opt["num_workers"])
    mix = p.add_argument_group("pool-aware model (what `robust` scores with in `mak run`)")
    mx = mix.add_mutually_exclusive_group()
    mx.add_argument("--mix-split", metavar="FILE", help="also train on a uniform sample of this pool split file")
    mx.add_argument("--mix-folder", metavar="DIR", help="also train on a uniform sample of this pool image folder")
    mix.add_argument("--mix-root", metavar="DIR", help="directory the --mix-split paths are relative to")
    add_option(mix, opt["mix_count"])
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    add_output_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import sys

    from mak import distributed as D
    from mak.cli._sources import source_from_args
    from mak.data.sources import open_source, pool_mix
    from mak.errors import MakError
    from mak.cli._options import values
    from mak.options import by_name
    from mak.train.pretrain import PRETRAIN_OPTIONS, pretrain

    source, pool = source_from_args(args), None
    if args.mix_split or args.mix_folder:
        pool = open_source("split", args.mix_split, root=args.mix_root) if args.mix_split \
            else open_source("folder", args.mix_folder)
    elif args.mix_root or args.mix_count != by_name(PRETRAIN_OPTIONS)["mix_count"].default:
        raise MakError("--mix-root and --mix-count need --mix-split or --mix-folder")
    with D.process_group(args.device):  # torn down on every exit, waiting for the other ranks only on success
        if pool is not None:  # under torchrun each rank checks its share of the pool sample
            source = pool_mix(source, pool, args.mix_count, args.seed, progress=show_progress(args))
            if source.skipped and D.rank() == 0:
                print(f"mak pretrain: left out {len(source.skipped)} unreadable pool images (first: "
                      f"{source.skipped[0][1]})", file=sys.stderr)
        declared = values(args, PRETRAIN_OPTIONS, "mix_count")
        ckpt = pretrain(source, args.out, device=args.device,
                        amp=args.amp, channels_last=False if args.no_channels_last else None,
                        resume=args.resume, progress=show_progress(args), verbose=not args.quiet,
                        weights=args.weights, **declared)
        if D.rank() == 0:
            say(args, f"checkpoint -> {ckpt}")
    return 0
