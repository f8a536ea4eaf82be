"""``mak select``: pick N pool images from feature stores (see :mod:`mak.run.select_job`)."""
from __future__ import annotations

import argparse
import os
import sys

from mak.cli._output import add_output_flags, say, show_progress

HELP = "pick N pool images from feature stores"  # the one line `mak --help` shows


def strategy_flags() -> dict[str, tuple[object, list[str]]]:
    """Every strategy option once: name -> (its declaration, the strategies that take it)."""
    from mak.selection.strategies import STRATEGY_OPTIONS

    out: dict[str, tuple[object, list[str]]] = {}
    for strategy, declared in STRATEGY_OPTIONS.items():
        for opt in declared:
            out.setdefault(opt.name, (opt, []))[1].append(strategy)
    return out


def register(sub: argparse._SubParsersAction) -> None:
    from mak.cli._options import add_option
    from mak.options import DEVICE, by_name
    from mak.run.select_job import JOB_OPTIONS
    from mak.selection.strategies import SELECT_OPTIONS

    job = by_name(JOB_OPTIONS)  # declared once, with select_stores (mak.run.select_job)
    p = sub.add_parser("select", help=HELP,
                       description="Score every pool image and pick --budget of them with a strategy.")
    p.add_argument("--seed-store", metavar="STORE", help="the seed's features: a store directory (`mak embed`, "
                   "`mak store import`) or an N x D array (.npy, or .npz with 'features')")
    p.add_argument("--pool-store", metavar="STORE", required=True,
                   help="the pool's features, as --seed-store; mak and tailness also need its augmented views "
                        "(views.npy, which only `mak embed` writes); every other strategy reads features only")
    p.add_argument("--pool-items", metavar="FILE", help="with an array --pool-store: one item line per row, "
                   "written to selection.txt (default: the row index)")
    p.add_argument("--seed-items", metavar="FILE", help="with an array --seed-store: one item line per row")
    add_option(p, job["budget"])
    add_option(p, job["strategy"])
    for opt in SELECT_OPTIONS:  # declared once, with mak.select (mak.selection.strategies)
        add_option(p, opt)
    add_option(p, DEVICE)
    p.add_argument("--out", required=True, metavar="DIR", help="output directory for selection.txt, scores.csv, summary.json")
    p.add_argument("--overwrite", action="store_true", help="replace a selection already in --out")
    add_option(p, job["order"])
    add_output_flags(p)
    for name in ("kcenter", "kcenter_parts", "dedup", "dedup_clusters"):
        add_option(p, job[name])
    for opt, owners in strategy_flags().values():  # declared once, by the strategies (mak.options)
        add_option(p, opt, default=None, help=f"{', '.join(owners)}: {opt.help}")
    p.set_defaults(func=run)


def params_from_args(args: argparse.Namespace) -> dict:
    from mak._tensor import auto_device
    from mak.cli._options import values
    from mak.selection.strategies import SELECT_OPTIONS

    params = values(args, SELECT_OPTIONS)
    params["device"] = str(auto_device(args.device))  # resolved: summary.json names the real device
    for name in strategy_flags():  # only what was given: unset options keep the strategy's defaults
        value = getattr(args, name)
        if value is not None:
            params[name] = value
    return params


def run(args: argparse.Namespace) -> int:
    from mak.cli._options import values
    from mak.run.select_job import JOB_OPTIONS, select_stores

    job = values(args, JOB_OPTIONS)
    sel = select_stores(args.seed_store, args.pool_store, args.out, overwrite=args.overwrite,
                        progress=show_progress(args), pool_items=args.pool_items, seed_items=args.seed_items,
                        **job, **params_from_args(args))
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 reports
        return 0
    short = len(sel) < job["budget"]  # e.g. fewer pool images than the budget pass robust's gate
    if short:  # a warning: printed even with --quiet, before the summary
        from mak.cli import with_flags

        why = with_flags(sel.info.get("note") or f"{len(sel)} images for a budget of {job['budget']}", ["gate_fill"])
        print(f"mak select: warning: {why}", file=sys.stderr)
    say(args, f"selected {len(sel)} images with '{sel.strategy}' in {sel.timings.get('total', 0):.1f}s -> "
              f"{args.out}/selection.txt")
    if sel.info.get("model_note") and not show_progress(args):  # with bars it showed before the work
        say(args, f"mak select: note: {sel.info['model_note']}", file=sys.stderr)
    if sel.info.get("note") and not short:
        say(args, f"mak select: note: {sel.info['note']}", file=sys.stderr)
    return 0
