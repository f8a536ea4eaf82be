"""``mak evaluate``: linear probes, kNN and group accuracies of a checkpoint (see :mod:`mak.bench.evaluate`)."""
from __future__ import annotations

import argparse
import sys

from mak.cli._output import add_output_flags, say, show_progress

HELP = "evaluate a checkpoint's frozen features (linear probes, kNN, Many/Medium/Few)"  # the one line `mak --help` shows


def register(sub: argparse._SubParsersAction) -> None:
    from mak.bench.evaluate import EVALUATE_OPTIONS
    from mak.cli._options import add_option
    from mak.options import DEVICE, by_name

    opt = by_name(EVALUATE_OPTIONS)  # declared once, with evaluate_checkpoint() (mak.bench.evaluate)
    p = sub.add_parser(
        "evaluate", help=HELP,
        description="Compute the checkpoint's backbone features (no augmentation) on labeled splits and report "
                    "full-shot and few-shot linear-probe accuracy, kNN accuracy, per-class accuracy and the "
                    "Many/Medium/Few group means with their std. Splits come from --bench DIR (fullshot, fewshot, "
                    "test, seed) or explicit split files.")
    p.add_argument("--checkpoint", required=True, metavar="FILE", help="checkpoint written by mak pretrain")
    p.add_argument("--bench", default=None, metavar="DIR", help="benchmark directory from mak bench build")
    p.add_argument("--train-split", default=None, metavar="FILE", help="labeled split for the full-shot probe and kNN")
    p.add_argument("--fewshot-split", default=None, metavar="FILE",
                   help="labeled split the few-shot draws come from (default: the train split)")
    p.add_argument("--test-split", default=None, metavar="FILE", help="labeled test split")
    p.add_argument("--seed-split", default=None, metavar="FILE", help="seed split: its class counts define the groups")
    p.add_argument("--root", default=None, metavar="DIR", help="root of the split files' relative paths (default: each file's folder)")
    p.add_argument("--out", default=None, metavar="FILE.json", help="write the results as JSON")
    for name in ("shots", "draws", "seed", "many", "few", "k", "temperature", "l2", "max_iter"):
        add_option(p, opt[name])
    add_option(p, DEVICE, help=f"device for feature extraction: {DEVICE.help}")
    for name in ("batch_size", "num_workers"):
        add_option(p, opt[name])
    add_output_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mak.errors import MakError
    from mak.bench.evaluate import EVALUATE_OPTIONS, evaluate_checkpoint
    from mak.cli._options import values

    if args.bench is None and (args.train_split is None or args.test_split is None):
        raise MakError("give --bench DIR, or --train-split and --test-split")
    evaluate_checkpoint(
        args.checkpoint, args.bench, train_split=args.train_split, fewshot_split=args.fewshot_split,
        test_split=args.test_split, seed_split=args.seed_split, root=args.root, out=args.out,
        device=args.device, verbose=not args.quiet, progress=show_progress(args),
        **values(args, EVALUATE_OPTIONS),
    )
    if args.out:
        say(args, f"results written to {args.out}", file=sys.stderr)
    return 0
