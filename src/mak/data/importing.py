"""Feature stores from arrays the user's own encoder wrote.

One array (``.npy``, or ``.npz`` with ``features`` and optional ``views``) becomes a plain store;
several (a list, or a glob such as ``img_emb/img_emb_*.npy``, in natural order: ``_2`` before
``_10``) become a sharded store, one shard per array, which is how embedding pipelines write
large pools. Items come from text files (one line per row) or from a column of ``.parquet``
files (read with pyarrow, an optional dependency), one file for all rows or one per array.
Everything is validated before anything is written, and the store is published whole.
"""
from __future__ import annotations

import glob
import itertools
import os
import re
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from mak.data.store import (EXTERNAL_META, FEATURES, ITEMS, META, VIEWS, _check_array_views, _count_lines,
                            _open_npy, open_array_store, write_shards_index)
from mak.errors import MakError

PARQUET = ".parquet"
Spec = str | Path | Sequence[str | Path]


def natural_key(path: str | Path) -> list:
    """Sort key that orders the numbers inside names by value (``emb_2`` before ``emb_10``)."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", str(path))]


def expand(spec: Spec, what: str) -> list[Path]:
    """The files ``spec`` names: a path, a glob pattern, or a list of either (globs in natural
    order, lists as given). A pattern that matches nothing is a MakError naming it."""
    specs = [spec] if isinstance(spec, (str, Path)) else list(spec)
    files: list[Path] = []
    for s in map(str, specs):
        if glob.has_magic(s) and not Path(s).exists():  # a file literally named with * or [ is itself
            hits = sorted(glob.glob(s), key=natural_key)
            if not hits:
                raise MakError(f"{s}: no {what} file matches this pattern")
            files += map(Path, hits)
        else:
            files.append(Path(s))
    if not files:
        raise MakError(f"no {what} files given")
    return files


def _parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        return None
    return pq


def parquet_column(path: Path, column: str | None) -> tuple[str, int]:
    """The item column of a parquet file (``column``, or its only column) and its row count, from
    the file's metadata."""
    pq = _parquet()
    if pq is None:
        raise MakError(f"{path}: reading .parquet needs pyarrow (pip install 'mak[parquet]')")
    try:
        meta = pq.read_metadata(path)
    except Exception as exc:
        raise MakError(f"{path}: unreadable parquet file ({exc})") from None
    names = meta.schema.to_arrow_schema().names
    if column is None:
        if len(names) != 1:
            raise MakError(f"{path}: {len(names)} columns ({', '.join(names)}); name the item column "
                           "(--items-column)")
        column = names[0]
    if column not in names:
        raise MakError(f"{path}: no column {column!r} (columns: {', '.join(names)})")
    return column, int(meta.num_rows)


def parquet_items(path: Path, column: str | None) -> Iterator[str]:
    """The item strings of a parquet file's item column, batch by batch; a null or a line break in
    a value is a MakError naming the row."""
    column, _ = parquet_column(path, column)
    row = 0
    for batch in _parquet().ParquetFile(path).iter_batches(columns=[column], batch_size=65_536):
        for v in batch.column(0).to_pylist():
            if v is None or "\n" in str(v) or "\r" in str(v):
                raise MakError(f"{path}: row {row} of column {column!r} is "
                               f"{'null' if v is None else 'more than one line'}; items are one line each")
            yield str(v)
            row += 1


class _Items:
    """Item lines from text or parquet files, checked against the arrays' row counts up front."""

    def __init__(self, files: list[Path], column: str | None) -> None:
        if column is not None and not any(f.suffix == PARQUET for f in files):
            raise MakError(f"--items-column {column} applies to .parquet items, not to {files[0]}")
        for f in files:
            if not f.is_file():
                raise MakError(f"{f}: items file not found")
        self.files, self.column = files, column

    def count(self, f: Path) -> int:
        return parquet_column(f, self.column)[1] if f.suffix == PARQUET else _count_lines(f)

    def lines(self, f: Path) -> Iterator[str]:
        if f.suffix == PARQUET:
            yield from parquet_items(f, self.column)
            return
        with open(f, encoding="utf-8") as fh:
            for line in fh:
                yield line[:-1] if line.endswith("\n") else line

    def per_array(self, counts: list[int], arrays: list[Path]) -> list[Iterator[str]]:
        """One iterator of item lines per array, in order (consumed one after the other)."""
        total = sum(counts)
        if len(self.files) == 1:
            f = self.files[0]
            n = self.count(f)
            if n != total:
                raise MakError(f"{f}: {n} items but the features have {total} rows")
            stream = self.lines(f)
            return [itertools.islice(stream, c) for c in counts]
        if len(self.files) != len(arrays):
            raise MakError(f"{len(self.files)} items files for {len(arrays)} feature arrays (give one items "
                           "file, or one per array)")
        for f, a, c in zip(self.files, arrays, counts):
            n = self.count(f)
            if n != c:
                raise MakError(f"{f}: {n} items but {a} has {c} rows")
        return [self.lines(f) for f in self.files]


def _sources(files: list[Path], views: str | Path | None, link: bool) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """(features, views) of every array, validated: 2-D, non-empty, one dimension, finite, the
    same views shape everywhere."""
    if views is not None and len(files) > 1:
        raise MakError(f"--views {views} goes with one feature array; several arrays carry their views "
                       "in .npz files ('views')")
    out = []
    for f in files:
        if link and f.suffix != ".npy":
            raise MakError(f"{f}: --link needs .npy arrays (an .npz is copied)")
        src = open_array_store(f)
        feats, vw = src.shards[0].features, src.shards[0].views
        if views is not None:
            if vw is not None:
                raise MakError(f"{f} already holds views; drop --views {views}")
            vw = _check_array_views(_open_npy(Path(views)), feats.shape[0], str(views))
        if out and feats.shape[1] != out[0][0].shape[1]:
            raise MakError(f"{f}: feature dimension {feats.shape[1]} differs from {files[0]}'s {out[0][0].shape[1]}")
        if out and (vw is None) != (out[0][1] is None):
            raise MakError(f"{f}: {'has' if vw is not None else 'has no'} views, unlike {files[0]}")
        src.check_finite()
        out.append((feats, vw))
    return out


def import_store(features: Spec, out: str | Path, items: Spec | None = None, views: str | Path | None = None,
                 model: str | None = None, overwrite: bool = False, items_column: str | None = None,
                 link: bool = False, progress: bool = False) -> Path:
    """Write a store at ``out`` from arrays of the user's encoder (see the module's docstring).

    ``features``: an array file, a glob or a list (several: a sharded store, one shard each);
    ``items``: one text or parquet file for all rows, or one per array (default: the row index);
    ``items_column``: the parquet column holding the items; ``views``: an R x N x d ``.npy`` for
    a single array; ``link``: shards point at the ``.npy`` files (symlinks) instead of copies.
    ``meta.json`` says the model is external, naming ``model`` when given.
    """
    from tqdm.auto import tqdm

    from mak.atomic import atomic_dir, write_json

    files = expand(features, "features")
    item_src = None if items is None else _Items(expand(items, "items"), items_column)
    arrays = _sources(files, views, link)
    counts = [a.shape[0] for a, _ in arrays]
    plan = None if item_src is None else item_src.per_array(counts, files)
    meta = {**EXTERNAL_META, "model_name": model, "imported_from": {
        "features": [str(f) for f in files] if len(files) > 1 else str(files[0]),
        "items": None if item_src is None else [str(f) for f in item_src.files] if len(item_src.files) > 1
        else str(item_src.files[0]),
        "views": None if views is None else str(views), "items_column": items_column, "linked": link}}
    sharded = len(files) > 1
    names = [f"shard-{i:05d}" for i in range(len(files))] if sharded else [""]
    with atomic_dir(out, overwrite=overwrite) as tmp:
        start = 0
        for i in tqdm(range(len(files)), desc="import", unit="array", disable=not progress, leave=False):
            feats, vw = arrays[i]
            lines = plan[i] if plan is not None else (str(start + j) for j in range(feats.shape[0]))
            _write_shard(tmp / names[i], files[i], feats, vw, lines, link)
            start += feats.shape[0]
        if sharded:
            write_shards_index(tmp, names)
        write_json(tmp / META, meta)
    return Path(out)


def _write_shard(path: Path, src: Path, feats: np.ndarray, views: np.ndarray | None, lines, link: bool) -> None:
    """One plain store's files: features (a copy, or a symlink to ``src``), views, items."""
    path.mkdir(parents=True, exist_ok=True)
    if link:
        os.symlink(src.resolve(), path / FEATURES)
    else:
        np.save(path / FEATURES, feats)
    if views is not None:
        np.save(path / VIEWS, views)
    with open(path / ITEMS, "w", encoding="utf-8") as fh:
        fh.writelines(f"{line}\n" for line in lines)
