"""Feature stores: the on-disk format that connects embed, select and evaluate.

A *store* is a directory holding

- ``features.npy``: N x D (float16 or float32) backbone features without augmentation;
- ``views.npy`` (optional): R x N x d projection-head outputs under R random augmentations;
- ``items.txt``: N lines, the item each row came from (a split-file line or a path);
- ``meta.json`` (optional): how the store was made.

A *plain array* is a store too: a ``.npy`` file (N x D) or a ``.npz`` file holding ``features``
(and optionally ``views``, R x N x d), with an optional items file (one line per row; without
one, the row index is the item). Its ``meta`` is :data:`EXTERNAL_META`: features of a model mak
did not train (``mak store import``, :mod:`mak.data.importing`, writes such arrays as a store directory).

A *sharded store* is a directory with ``shards.json`` (``{"shards": ["shard-00000", ...]}``)
listing, in order, sub-directories that are each a plain store; rows are their concatenation.
Every reader goes through :func:`open_store`, which accepts both forms, opens ``.npy`` files
with mmap (a pool larger than RAM is streamed, never loaded) and validates shapes up front.
"""
from __future__ import annotations

import codecs
import itertools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence

import numpy as np

from mak.errors import MakError
from mak.paths import input_file

FEATURES = "features.npy"
VIEWS = "views.npy"
ITEMS = "items.txt"
META = "meta.json"
SHARDS = "shards.json"

_FLOAT_DTYPES = (np.float16, np.float32, np.float64)
ARRAY_SUFFIXES = (".npy", ".npz")
EXTERNAL_META = {"model": "external"}  # a store made from arrays: the model is the user's, not mak's


def model_kind(meta: dict) -> str:
    """Which model embedded a store, from its ``meta.json``: ``pool-aware`` (mak's SimCLR on seed + pool),
    ``seed-only`` (mak's SimCLR on the seed), ``external`` (arrays from the user's encoder) or ``unknown``."""
    trained = meta.get("model_trained_on")
    if isinstance(trained, dict):
        return "pool-aware" if trained.get("pool_rows", 0) else "seed-only"
    return "external" if meta.get("model") == "external" else "unknown"


def open_npy(path: Path) -> np.ndarray:
    if path.is_symlink() and not path.exists():  # `mak store import --link` of files moved since
        raise MakError(f"{path}: broken link to {os.readlink(path)} (the linked file was moved or deleted)")
    if not path.is_file():
        raise MakError(f"{path}: missing store file")
    with open(path, "rb") as fh:
        if fh.read(6) != b"\x93NUMPY":
            raise MakError(f"{path}: unreadable .npy file (no .npy header)")
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as exc:  # corrupt header, truncated file, object array...
        raise MakError(f"{path}: unreadable .npy file ({exc})") from None
    return _float_array(path, arr)


def _float_array(path: Path | str, arr: np.ndarray) -> np.ndarray:
    if arr.dtype.type not in _FLOAT_DTYPES:
        raise MakError(f"{path}: expected float16/float32 data, found {arr.dtype}")
    return arr


@dataclass
class _Shard:
    path: Path
    features: np.ndarray
    views: np.ndarray | None
    items_path: Path | None  # None: the row index is the item
    start: int  # first global row

    def file(self, name: str) -> Path:
        """Where the shard's ``name`` (features.npy, views.npy) lives: in its directory, or its array file."""
        return self.path / name if self.path.is_dir() else self.path

    def item_lines(self) -> Iterator[str]:
        """The shard's item lines in row order, streamed (no items file: the global row index)."""
        if self.items_path is None:
            yield from (str(self.start + i) for i in range(self.features.shape[0]))
            return
        yield from item_file_lines(self.items_path)


def item_file_lines(path: Path) -> Iterator[str]:
    """The lines of an items file (one item per ``\n``, as :func:`count_lines` counts them; a
    ``\r\n`` end counts as one), streamed, without their line ends."""
    with open(path, encoding="utf-8", newline="\n") as fh:
        for line in fh:
            line = line[:-1] if line.endswith("\n") else line
            yield line[:-1] if line.endswith("\r") else line


@dataclass
class FeatureStore:
    """A validated, memory-mapped view of a (possibly sharded) feature store."""

    path: Path
    shards: list[_Shard]
    num_rows: int
    feature_dim: int
    num_views: int  # 0 when the store has no views
    view_dim: int
    meta: dict = field(default_factory=dict)
    _items: list[str] | None = None

    @property
    def sharded(self) -> bool:
        return (self.path / SHARDS).is_file()

    @property
    def has_views(self) -> bool:
        return self.num_views > 0

    @property
    def items(self) -> list[str]:
        """All item lines, in row order."""
        if self._items is None:
            out: list[str] = []
            for sh in self.shards:
                out.extend(sh.item_lines())
            self._items = out
        return self._items

    def _spans(self, start: int, stop: int) -> Iterator[tuple[_Shard, int, int]]:
        for sh in self.shards:
            n = sh.features.shape[0]
            lo, hi = max(start, sh.start), min(stop, sh.start + n)
            if lo < hi:
                yield sh, lo - sh.start, hi - sh.start

    def features(self, start: int = 0, stop: int | None = None, dtype=np.float32) -> np.ndarray:
        """Rows ``start:stop`` of the features, copied into memory as ``dtype``."""
        stop = self.num_rows if stop is None else stop
        parts = [np.asarray(sh.features[a:b], dtype=dtype) for sh, a, b in self._spans(start, stop)]
        if not parts:
            return np.zeros((0, self.feature_dim), dtype=dtype)
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)

    def views(self, start: int = 0, stop: int | None = None, dtype=np.float32) -> np.ndarray:
        """Views of rows ``start:stop`` as an (R, n, d) array of ``dtype``."""
        if not self.has_views:
            raise MakError(f"{self.path}: store has no {VIEWS} (run `mak embed --views R` with R >= 2)")
        stop = self.num_rows if stop is None else stop
        parts = [np.asarray(sh.views[:, a:b], dtype=dtype) for sh, a, b in self._spans(start, stop)]
        if not parts:
            return np.zeros((self.num_views, 0, self.view_dim), dtype=dtype)
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)

    def rows(self, indices: Sequence[int] | np.ndarray, dtype=np.float32) -> np.ndarray:
        """Feature rows at arbitrary global ``indices`` (any order), (k, D)."""
        return self._gather(indices, dtype, views=False)

    def view_rows(self, indices: Sequence[int] | np.ndarray, dtype=np.float32) -> np.ndarray:
        """Views of rows at arbitrary global ``indices`` (any order), (R, k, d)."""
        if not self.has_views:
            raise MakError(f"{self.path}: store has no {VIEWS}")
        return self._gather(indices, dtype, views=True)

    def _gather(self, indices: Sequence[int] | np.ndarray, dtype, views: bool) -> np.ndarray:
        idx = np.asarray(indices, dtype=np.int64)
        shape = (self.num_views, idx.size, self.view_dim) if views else (idx.size, self.feature_dim)
        out = np.empty(shape, dtype=dtype)
        for sh in self.shards:
            n = sh.features.shape[0]
            mask = (idx >= sh.start) & (idx < sh.start + n)
            if mask.any():
                local = idx[mask] - sh.start
                order = np.argsort(local, kind="stable")  # read each shard in row order
                pos = np.flatnonzero(mask)[order]
                if views:
                    out[:, pos] = np.asarray(sh.views[:, local[order]], dtype=dtype)
                else:
                    out[pos] = np.asarray(sh.features[local[order]], dtype=dtype)
        return out

    def scan(self, start: int = 0, stop: int | None = None, chunk: int = 65536) -> "ValueScan":
        """One pass over rows ``[start, stop)``: NaN/Inf anywhere, and whether the features are all
        zero or all equal to the store's row 0 (see :func:`value_problem`)."""
        stop = self.num_rows if stop is None else stop
        first = np.asarray(self.shards[0].features[0])
        nonzero = varies = False
        zero_rows = 0
        for sh, a, b in self._spans(start, stop):
            for name, arr in ((FEATURES, sh.features), (VIEWS, sh.views)):
                if arr is None:
                    continue
                for s in range(a, b, chunk):
                    block = arr[..., s: min(b, s + chunk), :]
                    finite = np.isfinite(block)
                    if not finite.all():
                        rows = (~finite).any(axis=-1).reshape(-1, block.shape[-2]).any(axis=0)
                        bad = s + int(np.flatnonzero(rows)[0])
                        return ValueScan(f"{sh.file(name)}: contains NaN or Inf values (first in row {bad})",
                                         nonzero, varies, zero_rows)
                    if name == FEATURES:
                        zeros = int((~block.any(axis=1)).sum())  # rows that are all zero
                        zero_rows += zeros
                        nonzero = nonzero or zeros < block.shape[0]
                        varies = varies or bool((block != first).any())
        return ValueScan(None, nonzero, varies, zero_rows)

    def check_finite(self, chunk: int = 65536) -> None:
        """Raise :class:`MakError` naming the file on NaN/Inf, all-zero or constant features."""
        problem = value_problem(self, [self.scan(chunk=chunk)])
        if problem:
            raise MakError(problem)


class ValueScan(NamedTuple):
    """What :meth:`FeatureStore.scan` found in its rows."""

    nonfinite: str | None  # the file holding a NaN/Inf, with the message
    nonzero: bool          # some feature is not 0
    varies: bool           # some feature row differs from the store's row 0
    zero_rows: int = 0     # feature rows that are all zero


def value_problem(store: FeatureStore, scans: Sequence[ValueScan]) -> str | None:
    """The message for features no strategy can score (NaN/Inf; every row zero; every row the
    same vector), from the scans of all of the store's rows (one per rank); None when fine."""
    for sc in scans:
        if sc.nonfinite:
            return sc.nonfinite
    path = store.shards[0].file(FEATURES) if len(store.shards) == 1 else store.path
    if not any(sc.nonzero for sc in scans):
        return f"{path}: every feature is zero (no image can be told from another)"
    if store.num_rows > 1 and not any(sc.varies for sc in scans):
        return f"{path}: every row is the same vector (constant features)"
    return None


def value_warning(store: FeatureStore, scans: Sequence[ValueScan]) -> str | None:
    """A warning for features a strategy can score but that look broken: rows that are all zero
    (an encoder's failure, not an image; such a row is equally far from everything). None when fine."""
    n = sum(sc.zero_rows for sc in scans)
    if n == 0 or n == store.num_rows:
        return None
    path = store.shards[0].file(FEATURES) if len(store.shards) == 1 else store.path
    return f"{path}: {n:,} of {store.num_rows:,} feature rows are all zero (failed embeddings?)"


def _open_single(path: Path, start: int, require_views: bool) -> tuple[_Shard, int, int, int]:
    feats = open_npy(path / FEATURES)
    if feats.ndim != 2:
        raise MakError(f"{path / FEATURES}: expected a 2-D array (N x D), found shape {feats.shape}")
    n = feats.shape[0]
    items_path = path / ITEMS
    if not items_path.is_file():
        raise MakError(f"{items_path}: missing store file")
    n_items = count_lines(items_path)
    if n_items != n:
        raise MakError(f"{items_path}: {n_items} item lines but {path / FEATURES} has {n} rows")
    views = None
    r = d = 0
    vpath = path / VIEWS
    if vpath.is_file():
        views = open_npy(vpath)
        if views.ndim != 3:
            raise MakError(f"{vpath}: expected a 3-D array (R x N x d), found shape {views.shape}")
        r, nv, d = views.shape
        if r < 2:
            raise MakError(f"{vpath}: needs R >= 2 augmented views, found R = {r}")
        if nv != n:
            raise MakError(f"{vpath}: {nv} rows but {path / FEATURES} has {n} rows")
    elif require_views:
        raise MakError(f"{vpath}: missing store file (this strategy needs augmented views)")
    return _Shard(path, feats, views, items_path, start), feats.shape[1], r, d


def count_lines(path: Path) -> int:
    """Lines of an items file, checking on the way that it is UTF-8 text and that no line is empty
    (an item names its row; a MakError naming the file otherwise)."""
    n = 0
    last = b"\n"
    decoder = codecs.getincrementaldecoder("utf-8")()
    with open(path, "rb") as fh:
        offset = 0
        while True:
            buf = fh.read(1 << 20)
            try:
                decoder.decode(buf, final=not buf)
            except UnicodeDecodeError as exc:
                raise MakError(f"{path}: not UTF-8 text (byte {offset + exc.start})") from None
            if not buf:
                break
            _check_no_empty_line(path, last + buf, n)
            n += buf.count(b"\n")
            offset += len(buf)
            last = buf[-1:]
    if last != b"\n":
        n += 1
    return n


def _check_no_empty_line(path: Path, seg: bytes, lines_before: int) -> None:
    """A MakError naming the first empty line in ``seg`` (the previous chunk's last byte, then a chunk)."""
    hits = [i for i in (seg.find(b"\n\n"), seg.find(b"\n\r\n")) if i >= 0]
    if hits:
        line = lines_before + seg[1 : min(hits) + 1].count(b"\n") + 1
        raise MakError(f"{path}: line {line} is empty (one item per line)")


def open_store(path: str | Path, require_views: bool = False, check_finite: bool = True,
               items: str | Path | None = None) -> FeatureStore:
    """Open and validate a store, a sharded store or a plain array (with its ``items`` file) at ``path``.

    Raises :class:`MakError` (one line naming the file) on a missing file, a row-count mismatch
    between features, views and items, a shard of the wrong dimension, or NaN/Inf values.
    """
    path = Path(path)
    if path.suffix in ARRAY_SUFFIXES and not path.is_dir():
        store = open_array_store(path, items, require_views)
    else:
        if items is not None:
            raise MakError(f"{items}: an items file goes with a plain array (.npy/.npz), not with the store {path}")
        store = _open_directory_store(path, require_views)
    if check_finite:
        store.check_finite()
    return store


def _open_directory_store(path: Path, require_views: bool) -> FeatureStore:
    if not path.is_dir():
        raise MakError(f"{path}: feature store not found (a store directory, or a .npy/.npz array)")
    meta: dict = {}
    if (path / META).is_file():
        try:
            meta = json.loads((path / META).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise MakError(f"{path / META}: unreadable ({exc})") from None
        if not isinstance(meta, dict):
            raise MakError(f"{path / META}: expected a JSON object, found {type(meta).__name__}")
    if (path / SHARDS).is_file():
        try:
            names = json.loads((path / SHARDS).read_text(encoding="utf-8"))["shards"]
        except (OSError, ValueError, KeyError, TypeError):
            names = None
        if not isinstance(names, list) or not names:
            raise MakError(f"{path / SHARDS}: malformed (expected {{\"shards\": [dir, ...]}})")
        dirs = [path / str(n) for n in names]
    else:
        dirs = [path]
    shards: list[_Shard] = []
    start = 0
    dim = r = d = None
    for sd in dirs:
        if not sd.is_dir():
            raise MakError(f"{sd}: shard listed in {path / SHARDS} is missing")
        sh, sdim, sr, sdd = _open_single(sd, start, require_views)
        if dim is None:
            dim, r, d = sdim, sr, sdd
        else:
            if sdim != dim:
                raise MakError(f"{sd / FEATURES}: feature dimension {sdim} differs from the first shard's {dim}")
            if (sr, sdd) != (r, d):
                raise MakError(f"{sd / VIEWS}: views shape (R={sr}, d={sdd}) differs from the first shard's (R={r}, d={d})")
        shards.append(sh)
        start += sh.features.shape[0]
    if start == 0:
        raise MakError(f"{path}: feature store is empty (0 rows)")
    return FeatureStore(path, shards, start, int(dim), int(r), int(d), meta)


def _npz_arrays(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """(features, views or None) of a ``.npz``: ``features`` (or its only array) and ``views``."""
    try:
        with np.load(path, allow_pickle=False) as z:
            names = list(z.files)
            key = "features" if "features" in names else (names[0] if len(names) == 1 else None)
            if key is None:
                raise MakError(f"{path}: holds {', '.join(names) or 'no arrays'}; name the feature array "
                               "'features' (and the views 'views')")
            feats, views = z[key], (z["views"] if "views" in names else None)
    except MakError:
        raise
    except Exception as exc:
        raise MakError(f"{path}: unreadable .npz file ({exc})") from None
    return _float_array(f"{path}:{key}", feats), None if views is None else _float_array(f"{path}:views", views)


def check_array_views(views: np.ndarray, n: int, what: str) -> np.ndarray:
    """``views`` when they are R x ``n`` x d with R >= 2; else a MakError naming ``what``."""
    if views.ndim != 3 or views.shape[0] < 2 or views.shape[1] != n:
        raise MakError(f"{what}: expected R x {n} x d views with R >= 2, found shape {views.shape}")
    return views


def open_array_store(path: str | Path, items: str | Path | None = None, require_views: bool = False) -> FeatureStore:
    """A plain array (``.npy``, or ``.npz`` with ``features`` and optional ``views``) as a store.

    ``items``: a text file with one item line per row; without it the row index is the item.
    """
    path = input_file(path, "feature array")
    feats, views = (open_npy(path), None) if path.suffix == ".npy" else _npz_arrays(path)
    if feats.ndim != 2:
        raise MakError(f"{path}: expected a 2-D feature array (N x D), found shape {feats.shape}")
    n = feats.shape[0]
    if n == 0:
        raise MakError(f"{path}: feature array is empty (0 rows)")
    if items is not None:
        items = input_file(items, "items file")
        if items.suffix == ".parquet":
            raise MakError(f"{items}: items here are text, one line per row; make a store from a parquet "
                           "column with `mak store import --items-column`")
        n_items = count_lines(items)
        if n_items != n:
            raise MakError(f"{items}: {n_items} item lines but {path} has {n} rows")
    r = d = 0
    if views is not None:
        check_array_views(views, n, f"{path}:views")
        r, d = views.shape[0], views.shape[2]
    elif require_views:
        raise MakError(f"{path}: has no augmented views (this strategy needs them: `mak embed` makes them)")
    shard = _Shard(path, feats, views, items, 0)
    return FeatureStore(path, [shard], n, int(feats.shape[1]), int(r), int(d), dict(EXTERNAL_META))


def describe(store: FeatureStore, items: int = 3) -> dict:
    """What a store holds, for people and scripts: rows, feature and view shapes, dtypes, bytes
    on disk, shards, the model that made it (:func:`model_kind`) and its first ``items`` items."""
    feats = [sh.features for sh in store.shards]
    views = [sh.views for sh in store.shards if sh.views is not None]
    first = list(itertools.islice(itertools.chain.from_iterable(sh.item_lines() for sh in store.shards), items))
    return {
        "path": str(store.path), "rows": store.num_rows, "shards": len(store.shards),
        "features": {"dim": store.feature_dim, "dtype": str(feats[0].dtype),
                     "bytes": int(sum(f.nbytes for f in feats))},
        "views": None if not views else {"count": store.num_views, "dim": store.view_dim, "dtype": str(views[0].dtype),
                                         "bytes": int(sum(v.nbytes for v in views))},
        "model": model_kind(store.meta), "model_name": store.meta.get("model_name"), "first_items": first,
    }


def write_store(path: str | Path, features: np.ndarray, items: Sequence[str], views: np.ndarray | None = None,
                meta: dict | None = None, overwrite: bool = False) -> Path:
    """Write a plain (unsharded) store atomically. For tests, tools and small pools."""
    from mak.atomic import atomic_dir, write_json

    features = np.asarray(features)
    if len(items) != features.shape[0]:
        raise MakError(f"{path}: {len(items)} items for {features.shape[0]} feature rows")
    with atomic_dir(path, overwrite=overwrite) as tmp:
        np.save(tmp / FEATURES, features)
        if views is not None:
            np.save(tmp / VIEWS, np.asarray(views))
        (tmp / ITEMS).write_text("".join(f"{it}\n" for it in items), encoding="utf-8")
        if meta is not None:
            write_json(tmp / META, meta)
    return Path(path)


def write_shards_index(path: str | Path, shard_names: Sequence[str]) -> None:
    """Write ``shards.json`` listing ``shard_names`` (sub-directories of ``path``) in row order."""
    from mak.atomic import write_json

    write_json(Path(path) / SHARDS, {"shards": list(shard_names)})
