"""``mak store``: feature stores from your own encoder's arrays (see :mod:`mak.data.importing`)."""
from __future__ import annotations

import argparse


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
    imp.add_argument("--quiet", "-q", action="store_true", help="print nothing but errors")
    imp.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mak.data.importing import import_store

    out = import_store(args.features, args.out, items=args.items, views=args.views, model=args.model,
                       overwrite=args.overwrite, items_column=args.items_column, link=args.link,
                       progress=not args.quiet, features_column=args.features_column)
    if not args.quiet:
        print(f"feature store -> {out}")
    return 0
