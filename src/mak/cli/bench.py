"""``mak bench build``: build the open-world benchmark from Fashion-MNIST (see :mod:`mak.bench.openworld`)."""
from __future__ import annotations

import argparse
import sys
import time

from mak.cli._output import add_output_flags, say, show_progress

HELP = "build the open-world benchmark"  # the one line `mak --help` shows


def register(sub: argparse._SubParsersAction) -> None:
    from mak.bench.openworld import BENCH_OPTIONS
    from mak.cli._options import add_option
    from mak.options import by_name

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
    declared = by_name(BENCH_OPTIONS)  # declared once, with build_benchmark (mak.bench.openworld)
    for name in ("seed", "scale"):
        add_option(b, declared[name])
    b.add_argument("--data-dir", default=None, metavar="D",
                   help="folder with Fashion-MNIST's IDX files (default: $MAK_DATA_DIR or "
                        "/usr/share/datasets/fashion-mnist from the dataset-fashion-mnist package)")
    for name in ("ood_ratio", "pool_classes", "near_classes", "budget"):
        add_option(b, declared[name])
    b.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    add_output_flags(b)
    b.set_defaults(func=run_build)


def run_build(args: argparse.Namespace) -> int:
    from mak.bench.openworld import build_benchmark, summary

    t0 = time.time()
    manifest = build_benchmark(args.out, seed=args.seed, scale=args.scale, data_dir=args.data_dir,
                               budget=args.budget, overwrite=args.overwrite, ood_ratio=args.ood_ratio,
                               pool_classes=args.pool_classes, near_classes=args.near_classes,
                               progress=show_progress(args))
    say(args, summary(manifest))
    say(args, f"benchmark written to {args.out} in {time.time() - t0:.1f}s", file=sys.stderr)
    return 0
