"""``mak evaluate``: linear probes, kNN and group accuracies of a checkpoint (see :mod:`mak.bench.evaluate`)."""
from __future__ import annotations

import argparse
import sys

from mak.cli._output import add_output_flags, say

HELP = "evaluate a checkpoint's frozen features (linear probes, kNN, Many/Medium/Few)"  # the one line `mak --help` shows


def register(sub: argparse._SubParsersAction) -> None:
    from mak.bench.evaluate import DEFAULT_DRAWS, DEFAULT_K, DEFAULT_SHOTS
    from mak.options import argparse_type, integer, number
    from mak.train.embed import DEFAULT_BATCH_SIZE

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
    p.add_argument("--shots", type=argparse_type(integer(1), "shots"), default=DEFAULT_SHOTS, metavar="N",
                   help=f"labeled images per class in a few-shot draw (default {DEFAULT_SHOTS})")
    p.add_argument("--draws", type=argparse_type(integer(1), "draws"), default=DEFAULT_DRAWS, metavar="N",
                   help=f"few-shot draws averaged (default {DEFAULT_DRAWS})")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="seed of the few-shot draws (default 0)")
    p.add_argument("--many", type=argparse_type(number(0.0, low_open=False), "many"), default=None, metavar="N",
                   help="Many group: seed count > N (default: the benchmark's groups, else 300)")
    p.add_argument("--few", type=argparse_type(number(0.0, low_open=False), "few"), default=None, metavar="N",
                   help="Few group: seed count < N (default: the benchmark's groups, else 30)")
    p.add_argument("--k", type=argparse_type(integer(1), "k"), default=DEFAULT_K, metavar="K",
                   help=f"neighbours of the kNN classifier (default {DEFAULT_K})")
    p.add_argument("--knn-temperature", type=argparse_type(number(0.0), "knn_temperature"), default=0.07, metavar="T",
                   help="temperature of the kNN's exp(cos/T) vote weights (default 0.07)")
    p.add_argument("--l2", type=argparse_type(number(0.0, low_open=False), "l2"), default=1e-3, metavar="L", help="L2 penalty of the linear probes (default 1e-3)")
    p.add_argument("--max-iter", type=argparse_type(integer(1), "max_iter"), default=200, metavar="N",
                   help="L-BFGS iterations of the linear probes (default 200)")
    p.add_argument("--device", default="auto", metavar="DEV", help="device for feature extraction (default auto: CUDA when available)")
    p.add_argument("--batch-size", type=argparse_type(integer(1), "batch_size"), default=DEFAULT_BATCH_SIZE, metavar="B",
                   help=f"feature extraction batch size (default {DEFAULT_BATCH_SIZE})")
    p.add_argument("--workers", type=argparse_type(integer(0), "workers"), default=0, metavar="N", help="DataLoader workers decoding images (default 0)")
    add_output_flags(p, progress=False)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mak.errors import MakError
    from mak.bench.evaluate import evaluate_checkpoint

    if args.bench is None and (args.train_split is None or args.test_split is None):
        raise MakError("give --bench DIR, or --train-split and --test-split")
    evaluate_checkpoint(
        args.checkpoint, args.bench, train_split=args.train_split, fewshot_split=args.fewshot_split,
        test_split=args.test_split, seed_split=args.seed_split, root=args.root, out=args.out,
        device=args.device, batch_size=args.batch_size, num_workers=args.workers, shots=args.shots,
        draws=args.draws, seed=args.seed, many=args.many, few=args.few, k=args.k,
        temperature=args.knn_temperature, l2=args.l2, max_iter=args.max_iter, verbose=not args.quiet,
    )
    if args.out:
        say(args, f"results written to {args.out}", file=sys.stderr)
    return 0
