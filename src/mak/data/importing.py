"""Feature stores from arrays the user's own encoder wrote.

One array (``.npy``, ``.npz`` with ``features`` and optional ``views``, or a ``.parquet`` column
of float lists) becomes a plain store;
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
from typing import Any, Iterator, Sequence

import numpy as np

from mak.data.store import (ARRAY_SUFFIXES, EXTERNAL_META, FEATURES, ITEMS, META, VIEWS, check_array_views,
                            count_lines, open_npy, item_file_lines, open_array_store,
                            write_shards_index)
from mak.errors import MakError
from mak.paths import input_file, new_output_dir

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
    seen: dict[Path, Path] = {}
    for f in files:
        if seen.setdefault(f.resolve(), f) is not f:
            raise MakError(f"{f}: given twice as a {what} file (its rows would be imported twice)")
    return files


def _parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        return None
    return pq


def _pq(path: Path):
    """``pyarrow.parquet``, or a MakError naming ``path`` when pyarrow is not installed."""
    pq = _parquet()
    if pq is None:
        raise MakError(f"{path}: reading .parquet needs pyarrow (pip install pyarrow)")
    return pq


def parquet_column(path: Path, column: str | None) -> tuple[str, int]:
    """The item column of a parquet file (``column``, or its only column) and its row count, from
    the file's metadata."""
    pq = _pq(path)
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
    for batch in _pq(path).ParquetFile(path).iter_batches(columns=[column], batch_size=65_536):
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
            input_file(f, "items file")
        self.files, self.column = files, column

    def count(self, f: Path) -> int:
        return parquet_column(f, self.column)[1] if f.suffix == PARQUET else count_lines(f)

    def lines(self, f: Path) -> Iterator[str]:
        """The item lines of ``f``, streamed."""
        return parquet_items(f, self.column) if f.suffix == PARQUET else item_file_lines(f)

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


class ParquetFeatures:
    """An N x D feature array held in a parquet column of float lists (as embedding pipelines and
    dataset hubs write them), read batch by batch: ``shape``, ``dtype`` and :meth:`save`."""

    def __init__(self, path: Path, column: str | None) -> None:
        self.path = input_file(path, "feature array")
        pf = self._open()  # opened again to convert: no file handle kept per array of a large import
        self.column = self._column(pf.schema_arrow, column)
        first = next(pf.iter_batches(columns=[self.column], batch_size=1), None)
        if first is None or first.num_rows == 0:
            raise MakError(f"{path}: feature array is empty (0 rows)")
        if first.column(0).null_count:
            raise MakError(f"{path}: column {self.column!r} has a null row near row 0")
        dim = len(first.column(0)[0].values)
        self.shape = (int(pf.metadata.num_rows), dim)
        self.dtype = np.dtype(first.column(0).type.value_type.to_pandas_dtype())

    def _open(self):
        try:
            return _pq(self.path).ParquetFile(self.path)
        except MakError:
            raise
        except Exception as exc:
            raise MakError(f"{self.path}: unreadable parquet file ({exc})") from None

    def _column(self, schema, column: str | None) -> str:
        import pyarrow as pa

        lists = [f.name for f in schema if (pa.types.is_list(f.type) or pa.types.is_large_list(f.type)
                 or pa.types.is_fixed_size_list(f.type)) and pa.types.is_floating(f.type.value_type)]
        if column is None:
            if len(lists) != 1:
                raise MakError(f"{self.path}: {len(lists)} float-list columns ({', '.join(lists) or 'none'}); name "
                               "the feature column (--features-column)")
            return lists[0]
        if column not in lists:
            raise MakError(f"{self.path}: no float-list column {column!r} (float-list columns: "
                           f"{', '.join(lists) or 'none'})")
        return column

    def batches(self) -> Iterator[np.ndarray]:
        """Row blocks as (rows, D) arrays; a null, a row of another length or NaN/Inf is a MakError."""
        row = 0
        for batch in self._open().iter_batches(columns=[self.column], batch_size=65_536):
            col = batch.column(0)
            if col.null_count:
                raise MakError(f"{self.path}: column {self.column!r} has a null row near row {row}")
            lengths = np.diff(np.asarray(col.offsets)) if hasattr(col, "offsets") else None
            if lengths is not None and (lengths != self.shape[1]).any():
                bad = row + int(np.flatnonzero(lengths != self.shape[1])[0])
                raise MakError(f"{self.path}: row {bad} of column {self.column!r} has "
                               f"{int(lengths[bad - row])} values, not {self.shape[1]}")
            block = np.asarray(col.flatten()).astype(self.dtype, copy=False).reshape(-1, self.shape[1])
            if not np.isfinite(block).all():
                bad = row + int(np.flatnonzero(~np.isfinite(block).all(axis=1))[0])
                raise MakError(f"{self.path}: row {bad} of column {self.column!r} holds NaN or Inf")
            yield block
            row += block.shape[0]

    def save(self, path: Path) -> None:
        """Write the array as ``path`` (.npy), block by block."""
        out = np.lib.format.open_memmap(path, mode="w+", dtype=self.dtype, shape=self.shape)
        row = 0
        for block in self.batches():
            out[row : row + block.shape[0]] = block
            row += block.shape[0]
        out.flush()
        del out


def _sources(files: list[Path], views: str | Path | None, link: bool,
             column: str | None) -> list[tuple[Any, np.ndarray | None]]:
    """(features, views) of every array, validated: 2-D, non-empty, one dimension, finite, the
    same views shape everywhere (a parquet column's values are checked as they are converted)."""
    if views is not None and len(files) > 1:
        raise MakError(f"--views {views} goes with one feature array; several arrays carry their views "
                       "in .npz files ('views')")
    out: list[tuple[Any, np.ndarray | None]] = []
    for f in files:
        if f.suffix not in (*ARRAY_SUFFIXES, PARQUET):
            raise MakError(f"{f}: not a feature array (.npy, .npz or .parquet)")
        if link and f.suffix != ".npy":
            raise MakError(f"{f}: --link needs .npy arrays ({f.suffix or 'this file'} is converted or copied)")
        if f.suffix == PARQUET:
            if views is not None:
                raise MakError(f"--views {views} goes with a .npy/.npz feature array, not {f}")
            if out and out[0][1] is not None:
                raise MakError(f"{f}: has no views, unlike {files[0]}")
            feats = ParquetFeatures(f, column)
            if out and feats.shape[1] != out[0][0].shape[1]:
                raise MakError(f"{f}: feature dimension {feats.shape[1]} differs from {files[0]}'s "
                               f"{out[0][0].shape[1]}")
            out.append((feats, None))  # values checked while they are converted
            continue
        if column is not None:
            raise MakError(f"--features-column {column} applies to .parquet features, not to {f}")
        src = open_array_store(f)
        feats, vw = src.shards[0].features, src.shards[0].views
        if views is not None:
            if vw is not None:
                raise MakError(f"{f} already holds views; drop --views {views}")
            vw = check_array_views(open_npy(input_file(views, "views file")), feats.shape[0], str(views))
        if out and feats.shape[1] != out[0][0].shape[1]:
            raise MakError(f"{f}: feature dimension {feats.shape[1]} differs from {files[0]}'s {out[0][0].shape[1]}")
        if out and (vw is None) != (out[0][1] is None):
            raise MakError(f"{f}: {'has' if vw is not None else 'has no'} views, unlike {files[0]}")
        src.check_finite()
        out.append((feats, vw))
    return out


def import_store(features: Spec, out: str | Path, items: Spec | None = None, views: str | Path | None = None,
                 model: str | None = None, overwrite: bool = False, items_column: str | None = None,
                 link: bool = False, progress: bool = False, features_column: str | None = None) -> Path:
    """Write a store at ``out`` from arrays of the user's encoder (see the module's docstring).

    ``features``: an array file, a glob or a list (several: a sharded store, one shard each);
    ``items``: one text or parquet file for all rows, or one per array (default: the row index);
    ``items_column``: the parquet column holding the items; ``features_column``: the parquet
    column of float lists holding the features (default: the only such column); ``views``: an R x N x d ``.npy`` for
    a single array; ``link``: shards point at the ``.npy`` files (symlinks) instead of copies.
    ``meta.json`` says the model is external, naming ``model`` when given.
    """
    from mak.atomic import atomic_dir, write_json
    from mak.progress import bar

    new_output_dir(out, overwrite)
    files = expand(features, "features")
    if items is None and items_column is not None:
        raise MakError(f"--items-column {items_column} goes with --items (a .parquet file)")
    item_src = None if items is None else _Items(expand(items, "items"), items_column)
    arrays = _sources(files, views, link, features_column)
    counts = [a.shape[0] for a, _ in arrays]
    plan = None if item_src is None else item_src.per_array(counts, files)
    meta = {**EXTERNAL_META, "model_name": model, "imported_from": {
        "features": [str(f) for f in files] if len(files) > 1 else str(files[0]),
        "items": None if item_src is None else [str(f) for f in item_src.files] if len(item_src.files) > 1
        else str(item_src.files[0]),
        "views": None if views is None else str(views), "items_column": items_column,
        "features_column": features_column, "linked": link}}
    sharded = len(files) > 1
    names = [f"shard-{i:05d}" for i in range(len(files))] if sharded else [""]
    with atomic_dir(out, overwrite=overwrite) as tmp:
        start = 0
        with bar(sum(counts), "import", unit="row", enabled=progress) as shown:
            for i in range(len(files)):
                feats, vw = arrays[i]
                lines = plan[i] if plan is not None else (str(start + j) for j in range(feats.shape[0]))
                _write_shard(tmp / names[i], files[i], feats, vw, lines, link)
                start += feats.shape[0]
                shown.update(feats.shape[0])
        if sharded:
            write_shards_index(tmp, names)
        write_json(tmp / META, meta)
    return Path(out)


def _write_shard(path: Path, src: Path, feats: Any, views: np.ndarray | None, lines, link: bool) -> None:
    """One plain store's files: features (a copy, or a symlink to ``src``), views, items."""
    path.mkdir(parents=True, exist_ok=True)
    if link:
        os.symlink(src.resolve(), path / FEATURES)
    elif isinstance(feats, ParquetFeatures):
        feats.save(path / FEATURES)
    else:
        np.save(path / FEATURES, feats)
    if views is not None:
        np.save(path / VIEWS, views)
    with open(path / ITEMS, "w", encoding="utf-8") as fh:
        fh.writelines(f"{line}\n" for line in lines)
