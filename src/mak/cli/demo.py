"""``mak demo``: the README's first command — a small open-world run on Fashion-MNIST, with a report."""
from __future__ import annotations

import argparse

from mak.cli._output import add_output_flags, say, show_progress, silent

# A few minutes on 2 CPU cores: a 25% benchmark, the small convnet, the default strategies.
DEMO_SETTINGS = {
    "run.name": "demo",
    "data.benchmark.build": True,
    "data.benchmark.scale": 0.25,
    "pretrain.epochs": 20,
    "pretrain.batch_size": 256,
    "embed.views": 10,
    "select.strategies": ["robust", "mak", "random"],
    "evaluate.draws": 5,
}

HELP = "a small open-world run on Fashion-MNIST with a report (minutes on a CPU)"  # the one line `mak --help` shows


def register(sub: argparse._SubParsersAction) -> None:
    from mak.bench.openworld import BENCH_OPTIONS
    from mak.cli._options import add_option
    from mak.options import by_name
    from mak.train.pretrain import PRETRAIN_OPTIONS

    p = sub.add_parser("demo", help=HELP,
                       description="Gets Fashion-MNIST, builds a small open-world benchmark (long-tailed seed, "
                                   "half-junk pool), runs robust vs mak vs random vs none and writes report.html.")
    p.add_argument("--out", default="runs/demo", metavar="DIR", help="run directory (default runs/demo)")
    p.add_argument("--data-dir", metavar="DIR", help="directory with Fashion-MNIST's IDX files (default: Debian's)")
    add_option(p, by_name(BENCH_OPTIONS)["scale"], default=None,
               help=f"benchmark scale (default {DEMO_SETTINGS['data.benchmark.scale']})")
    add_option(p, by_name(PRETRAIN_OPTIONS)["epochs"], default=None,
               help=f"SimCLR epochs per training run (default {DEMO_SETTINGS['pretrain.epochs']})")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, as in `mak run`")
    p.add_argument("--dry-run", action="store_true", help="print the plan only")
    add_output_flags(p)
    p.set_defaults(func=run)


def ensure_fashion_mnist(data_dir: str | None) -> str | None:
    """Find Fashion-MNIST; on Debian as root, install the package; else a one-line error saying what to do."""
    import os
    import shutil
    import subprocess

    from mak.errors import MakError
    from mak.bench.openworld import find_fashion_mnist

    try:
        return str(find_fashion_mnist(data_dir))
    except MakError:
        if data_dir is not None:
            raise
    if shutil.which("apt-get") and hasattr(os, "geteuid") and os.geteuid() == 0:
        print("[mak demo] installing Fashion-MNIST: apt-get install -y dataset-fashion-mnist fonts-dejavu-core")
        subprocess.run(["apt-get", "update", "-qq"], check=False)
        subprocess.run(["apt-get", "install", "-y", "-qq", "dataset-fashion-mnist", "fonts-dejavu-core"], check=False)
        try:
            return str(find_fashion_mnist(None))
        except MakError:
            pass
    raise MakError("Fashion-MNIST not found: run `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu) or "
                   "download its four IDX files and pass --data-dir DIR")


def run(args: argparse.Namespace) -> int:
    from mak.run.config import load_config
    from mak.run.pipeline import run_pipeline

    data_dir = ensure_fashion_mnist(args.data_dir)
    settings = dict(DEMO_SETTINGS)
    settings["data.benchmark.data_dir"] = data_dir
    if args.scale is not None:
        settings["data.benchmark.scale"] = args.scale
    if args.epochs is not None:
        settings["pretrain.epochs"] = args.epochs
    overrides = [f"{k}={_yaml(v)}" for k, v in settings.items()] + list(args.overrides)
    config = load_config(None, overrides)
    plan = run_pipeline(config, args.out, dry_run=args.dry_run, progress=show_progress(args), verbose=not args.quiet,
                        log=print if args.dry_run or not args.quiet else silent)
    if not args.dry_run:
        say(args, f"\nOpen the report: {plan.run_dir / 'report.html'}")
    return 0


def _yaml(v) -> str:
    import json

    return json.dumps(v)
