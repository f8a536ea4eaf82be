"""``mak run CONFIG.yaml``: the whole loop (see :mod:`mak.run.pipeline`)."""
from __future__ import annotations

import argparse

from mak.cli._output import add_output_flags, show_progress, silent

HELP = "the whole MAK loop from a config, with cached stages"  # the one line `mak --help` shows


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help=HELP,
                       description="pretrain -> embed -> select -> re-train -> evaluate -> report, "
                                   "skipping stages whose inputs and parameters did not change. Under "
                                   "torchrun (torchrun --nproc_per_node G -m mak run ...) pre-training, "
                                   "embedding and selection use every process; the rest runs on rank 0.")
    p.add_argument("config", nargs="?", help="YAML config (see configs/); defaults apply to keys it omits")
    p.add_argument("--out", metavar="DIR", help="run directory (default: runs/<run.name>)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set select.budget=500 (repeatable)")
    p.add_argument("--repeats", type=int, metavar="N", help="run everything with N seeds and report mean +- std")
    p.add_argument("--dry-run", action="store_true", help="print the stages, what is cached and what would run")
    add_output_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mak.run.config import load_config
    from mak.run.pipeline import run_pipeline

    overrides = list(args.overrides)
    if args.repeats is not None:
        overrides.append(f"run.repeats={args.repeats}")
    config = load_config(args.config, overrides)
    out = Path(args.out) if args.out else Path("runs") / str(config["run"]["name"])
    run_pipeline(config, out, dry_run=args.dry_run, progress=show_progress(args), verbose=not args.quiet,
                 log=print if args.dry_run or not args.quiet else silent)
    return 0
