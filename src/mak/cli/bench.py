"""``mak bench build``: build the open-world benchmark from Fashion-MNIST (see :mod:`mak.bench.openworld`)."""
from __future__ import annotations

import argparse
import sys
import time

from mak.cli._output import add_output_flags, say

HELP = "build the open-world benchmark"  # the one line `mak --help` shows


def register(sub: argparse._SubParsersAction) -> None:
    from mak.options import argparse_type, number

    p = sub.add_parser("bench", help=HELP,
                       description="Open-world benchmark tools.")
    bsub = p.add_subparsers(dest="bench_command", metavar="ACTION")
    bsub.required = True
    b = bsub.add_parser(
        "build", help="build the Fashion-MNIST open-world benchmark (seed, pool, evaluation splits)",
        description="Write a long-tailed seed set, a pool of in-domain plus out-of-domain images and the "
                    "evaluation splits as split-file datasets (PNG files + 'path LABEL' lines) into --out, "
                    "with a manifest benchmark.json.")
    b.add_argument("--out", required=True, metavar="DIR", help="output directory (written atomically)")
    b.add_argument("--seed", type=int, default=0, metavar="S",
                   help="random seed: class order, image picks, generated images (default 0)")
    b.add_argument("--scale", type=argparse_type(number(0.0), "scale"), default=1.0, metavar="F",
                   help="multiply every image count by F (at least 2 per class; default 1.0)")
    b.add_argument("--data-dir", default=None, metavar="D",
                   help="folder with Fashion-MNIST's IDX files (default: $MAK_DATA_DIR or "
                        "/usr/share/datasets/fashion-mnist from the dataset-fashion-mnist package)")
    b.add_argument("--ood-ratio", type=argparse_type(number(0.0, low_open=False), "ood_ratio"), default=1.0, metavar="R",
                   help="out-of-domain pool images per in-domain pool image (default 1: half the pool is "
                        "junk; 4: 80%%)")
    b.add_argument("--pool-classes", default="all", metavar="all|disjoint",
                   help="all: the pool holds the seed's classes (milder tail) and --near-classes others; "
                        "disjoint: it holds only classes the seed lacks, as in the paper (default all)")
    b.add_argument("--near-classes", type=int, default=None, metavar="K",
                   help="K classes appear only in the pool, 2,000 images each; the seed keeps the other "
                        "10 - K (default 0, or 4 with --pool-classes disjoint)")
    b.add_argument("--budget", type=int, default=None, metavar="N",
                   help="selection budget recorded in the manifest (default: 2 x seed size)")
    b.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    add_output_flags(b, progress=False)
    b.set_defaults(func=run_build)


def run_build(args: argparse.Namespace) -> int:
    from mak.bench.openworld import build_benchmark, summary

    t0 = time.time()
    manifest = build_benchmark(args.out, seed=args.seed, scale=args.scale, data_dir=args.data_dir,
                               budget=args.budget, overwrite=args.overwrite, ood_ratio=args.ood_ratio,
                               pool_classes=args.pool_classes, near_classes=args.near_classes)
    say(args, summary(manifest))
    say(args, f"benchmark written to {args.out} in {time.time() - t0:.1f}s", file=sys.stderr)
    return 0
