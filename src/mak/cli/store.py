"""``mak store``: feature stores from your own encoder's arrays (see :mod:`mak.data.importing`)."""
from __future__ import annotations

import argparse

from mak.cli._output import add_output_flags, say, show_progress

HELP = "make a feature store from your own embeddings (.npy/.npz)"  # the one line `mak --help` shows


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("store", help=HELP, description="Feature-store tools.")
    ssub = p.add_subparsers(dest="store_command", metavar="ACTION")
    ssub.required = True
    imp = ssub.add_parser(
        "import", help="write a store from arrays of your own encoder",
        description="Write a feature store (features.npy, items.txt, meta.json naming the model external) from "
                    "an N x D array of your encoder's embeddings, or a sharded store (one shard per array) from "
                    "several, as embedding pipelines write them ('emb/img_emb_*.npy', in natural order). `mak "
                    "select` also reads a single array directly; a store keeps features, items and where they "
                    "came from together.")
    imp.add_argument("--features", required=True, nargs="+", metavar="FILE",
                     help="N x D embeddings: .npy, .npz holding 'features' (and optionally 'views'), or .parquet "
                          "(--features-column); several files or a quoted glob make a sharded store")
    imp.add_argument("--features-column", metavar="NAME",
                     help="with .parquet features: the column of float lists (default: the only one)")
    imp.add_argument("--items", nargs="+", metavar="FILE",
                     help="the rows' items: text (one line per row) or .parquet (--items-column), one file for all "
                          "rows or one per features file (default: the row index)")
    imp.add_argument("--items-column", metavar="NAME",
                     help="the .parquet column holding the items, e.g. url (default: the file's only column)")
    imp.add_argument("--views", metavar="FILE", help="R x N x d augmented views (.npy) for mak/tailness (optional)")
    imp.add_argument("--model", metavar="NAME", help="the encoder's name, recorded in meta.json")
    imp.add_argument("--link", action="store_true",
                     help="point at the .npy files (symlinks) instead of copying them")
    imp.add_argument("--out", required=True, metavar="STORE", help="the store directory to write")
    imp.add_argument("--overwrite", action="store_true", help="replace a store already at --out")
    add_output_flags(imp)
    imp.set_defaults(func=run)
    info = ssub.add_parser(
        "info", help="what a store holds: rows, shapes, dtypes, size, model, first items",
        description="Print what a feature store (a directory, a sharded store, or a .npy/.npz array) holds: rows, "
                    "feature and view shapes, dtypes, bytes on disk, shards, the model that made it, its first "
                    "items. --check also scans every value (NaN/Inf, all-zero rows, every row the same).")
    info.add_argument("store", metavar="STORE", help="a store directory or a .npy/.npz array")
    info.add_argument("--items", metavar="FILE", help="with an array: one item line per row")
    info.add_argument("--check", action="store_true", help="scan every value for NaN/Inf, all-zero rows and every row the same")
    info.add_argument("--json", action="store_true", help="print one JSON object instead of lines")
    add_output_flags(info, progress=False)  # --check -q: the exit code alone says whether the store is sound
    info.set_defaults(func=run_info)


def run(args: argparse.Namespace) -> int:
    from mak.data.importing import import_store

    out = import_store(args.features, args.out, items=args.items, views=args.views, model=args.model,
                       overwrite=args.overwrite, items_column=args.items_column, link=args.link,
                       progress=show_progress(args), features_column=args.features_column)
    say(args, f"feature store -> {out}")
    return 0


def run_info(args: argparse.Namespace) -> int:
    from mak.data.store import describe, open_store, value_problem
    from mak.errors import MakError

    store = open_store(args.store, check_finite=False, items=args.items)
    d = describe(store)
    scans = [store.scan()] if args.check else []
    problem = value_problem(store, scans) if args.check else None
    if args.check:
        d["values"] = problem or "ok"
        d["zero_rows"] = scans[0].zero_rows
    if not args.quiet:
        _print_info(d, args.json, args.check)
    if problem:  # after the report, which shows what the store holds
        raise MakError(problem)
    return 0


def _print_info(d: dict, as_json: bool, checked: bool) -> None:
    import json

    if as_json:
        print(json.dumps(d))
        return
    f, v = d["features"], d["views"]
    print(f"store     {d['path']}" + (f" ({d['shards']} shards)" if d["shards"] > 1 else ""))
    print(f"rows      {d['rows']:,}")
    print(f"features  {d['rows']:,} x {f['dim']} {f['dtype']} ({_size(f['bytes'])})")
    print("views     " + ("none" if v is None else f"{v['count']} x {d['rows']:,} x {v['dim']} {v['dtype']} "
                                                    f"({_size(v['bytes'])})"))
    print(f"model     {d['model']}" + (f" ({d['model_name']})" if d["model_name"] else ""))
    print(f"items     {', '.join(d['first_items'])}{', ...' if d['rows'] > len(d['first_items']) else ''}")
    if checked:
        zero = f"; {d['zero_rows']:,} rows all zero (failed embeddings?)" if d["values"] == "ok" and d["zero_rows"] else ""
        print("values    " + ("finite, rows not all the same" + zero if d["values"] == "ok" else
                              "not usable (the error below says why)"))


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
