"""``mak embed``: write a feature store from a checkpoint (see :func:`mak.train.embed.embed`)."""
from __future__ import annotations

import argparse

from mak.cli._output import add_output_flags, say, show_progress

HELP = "write a feature store (features, augmented views) from a checkpoint"  # the one line `mak --help` shows


def register(sub: argparse._SubParsersAction) -> None:
    from mak.cli._options import add_option
    from mak.cli._sources import add_source_args
    from mak.options import DEVICE, by_name
    from mak.train.embed import EMBED_OPTIONS
    from mak.train.pretrain import PRETRAIN_OPTIONS

    opt = by_name(EMBED_OPTIONS)  # declared once, with embed() (mak.train.embed)
    p = sub.add_parser(
        "embed", help=HELP,
        description="Embed every image with a `mak pretrain` checkpoint: features.npy (no augmentation), "
                    "views.npy (R augmented projections, L2-normalised), items.txt, meta.json. "
                    "Under torchrun each process embeds its share; a killed run resumes.")
    add_source_args(p)
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", metavar="FILE", help="checkpoint.pt written by `mak pretrain`")
    model.add_argument("--weights", metavar="FILE", help="pretrained backbone weights (safetensors or a state "
                       "dict) used as a frozen encoder, no projection head: views are its own outputs")
    pre = by_name(PRETRAIN_OPTIONS)  # the model options pretrain declares
    add_option(p, pre["backbone"], help="with --weights: the architecture (e.g. resnet18, timm:resnet18)")
    add_option(p, by_name(PRETRAIN_OPTIONS)["image_size"],  # the working size pretrain declares
               help="with --weights: input size in pixels, at least 8 (default: the source's)")
    add_option(p, pre["channels"], help="with --weights: input channels, 1 or 3 (default: the source's)")
    p.add_argument("--out", required=True, metavar="STORE", help="output feature-store directory")
    for name in ("views", "seed", "dtype", "batch_size"):
        add_option(p, opt[name])
    add_option(p, DEVICE)
    add_option(p, opt["num_workers"])
    p.add_argument("--merge", action=argparse.BooleanOptionalAction, default=True,
                   help="under torchrun: one merged store (default) or --no-merge: one shard per process + shards.json")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16/fp16 mixed precision (default: where the device has it natively); --no-amp: float32")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store at --out")
    p.add_argument("--strict", action="store_true",
                   help="refuse a checkpoint whose pre-training did not finish (default: warn)")
    add_output_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mak import distributed as D
    from mak.cli._options import values
    from mak.cli._sources import source_from_args
    from mak.errors import MakError
    from mak.train.embed import EMBED_OPTIONS, embed

    source = source_from_args(args)
    encoder = None
    if args.weights is not None:
        encoder = {"backbone": args.backbone, "image_size": args.image_size, "channels": args.channels}
    elif args.backbone or args.image_size or args.channels:
        raise MakError("--backbone, --image-size and --channels go with --weights (a checkpoint names its own)")
    with D.process_group(args.device):  # torn down on every exit, waiting for the other ranks only on success
        out = embed(source, args.checkpoint or args.weights, args.out, encoder=encoder, device=args.device,
                    merge=args.merge, progress=show_progress(args), verbose=not args.quiet, amp=args.amp,
                    overwrite=args.overwrite,
                    strict=args.strict, **values(args, EMBED_OPTIONS))
        if D.rank() == 0:
            say(args, f"feature store -> {out}")
    return 0
