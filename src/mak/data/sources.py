"""Image sources and the decoding dataset.

Every command that reads images takes one *source* (``--split``, ``--folder``, ``--array`` or
``--fashion-mnist``, see :func:`add_source_args`). A source is an indexable collection of images
``0 .. N-1``; for each it gives

- :meth:`ImageSource.item` -- the *item line*, exactly as it belongs in ``items.txt`` and
  ``selection.txt`` (a split-file line, a relative path, a row index or ``index label``);
- :meth:`ImageSource.load` -- the pixels, a ``uint8`` array ``H x W x C`` with ``C`` 1 or 3.
  A missing, corrupt or unreadable image raises :class:`ImageError` (a :class:`MakError`)
  naming the path and the reason.

Sources:

- :class:`SplitSource` -- a MAK-style split file, lines ``relative/path [label ...]`` resolved
  against a root directory (default: the split file's directory). Blank lines and lines starting
  with ``#`` are skipped; the path is the first whitespace-separated token (so paths cannot
  contain spaces); the item line is the whole line, stripped.
- :class:`FolderSource` -- a directory searched recursively for ``jpg/jpeg/png/webp/bmp`` files
  (extension case-insensitive), sorted by relative POSIX path; hidden files and directories
  (names starting with ``.``) are skipped; symbolic links are followed, a directory reached
  twice (a link loop) is listed once. Item line: the relative path.
- :class:`ArraySource` -- a ``.npy``/``.npz`` ``uint8`` array ``N x H x W`` or ``N x H x W x C``
  (``.npz``: its single array or the one named ``images``). Item line: the row index.
  ``.npy`` files are memory-mapped.
- :class:`FashionMNISTSource` -- Fashion-MNIST's IDX files, gzipped or not, by default from
  ``/usr/share/datasets/fashion-mnist`` (Debian's ``dataset-fashion-mnist``). Item line:
  ``index label``.

:class:`ImageDataset` wraps a source for a ``torch.utils.data.DataLoader``: decoding, channel
conversion and resizing to the working size happen in the loader's workers (PIL), so the main
process only sees ready ``uint8`` batches. A corrupt image never stops a run: its item comes back
with ``ok == False`` and a zero tensor, and :meth:`ImageDataset.check` gives the reason (it
re-reads that one image in the calling process -- failures are rare, and a per-worker failure
table could not be seen from the main process).
"""
from __future__ import annotations

import gzip
import io
import os
import re
import struct
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

from mak.errors import MakError

__all__ = [
    "IMAGE_EXTENSIONS",
    "ArraySource",
    "FashionMNISTSource",
    "FolderSource",
    "ImageDataset",
    "ImageError",
    "ImageSource",
    "SOURCE_KINDS",
    "SplitSource",
    "infer_geometry",
    "open_source",
    "pool_mix",
    "pool_mix_rows",
    "validate_all",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
SOURCE_KINDS = ("split", "folder", "array", "fashion-mnist", "webdataset")
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


class ImageError(MakError):
    """An image that cannot be read: missing, truncated, corrupt or of an unusable kind."""

    def __init__(self, path: str, reason: str | None = None) -> None:
        self.path = str(path)
        self.reason = " ".join(str(reason).split()) if reason is not None else "unreadable image"
        super().__init__(f"{self.path}: {self.reason}")

    def __reduce__(self):  # picklable across DataLoader workers
        return (type(self), (self.path, self.reason))


# --------------------------------------------------------------------------------------------
# pixel helpers

def _to_mode(img: Image.Image) -> Image.Image:
    """Convert any PIL image to 'L' (grey) or 'RGB'."""
    if img.mode in ("L", "RGB"):
        return img
    if img.mode in ("1", "LA", "La"):
        return img.convert("L")
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        # high bit depth grey: scale to 8 bits by the image's own range
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        if img.mode.startswith("I;16") and hi <= 65535 and lo >= 0:
            lo, hi = 0.0, 65535.0
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        return Image.fromarray(np.clip((arr - lo) * scale, 0, 255).round().astype(np.uint8))
    if img.mode == "P":
        return img.convert("RGBA").convert("RGB") if "transparency" in img.info else img.convert("RGB")
    return img.convert("RGB")  # RGBA, CMYK, YCbCr, LAB, HSV, ...


def _pil_to_array(img: Image.Image) -> np.ndarray:
    arr = np.array(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return arr


def _array_to_pil(arr: np.ndarray) -> Image.Image:
    if arr.shape[2] == 1:
        return Image.fromarray(np.ascontiguousarray(arr[:, :, 0]))
    return Image.fromarray(np.ascontiguousarray(arr))


def _open_file(path: str, draft: tuple[int, int] | None = None, fp: Any = None) -> Image.Image:
    """Open, fully decode and normalise the mode of one image file (or of ``fp``, an open binary file
    named ``path`` in messages); ImageError on any failure."""
    img = None
    try:
        img = Image.open(path if fp is None else fp)
        if draft is not None and img.format == "JPEG":
            # let libjpeg decode at 1/2, 1/4 or 1/8 scale while staying >= draft in both sides
            img.draft(img.mode if img.mode in ("L", "RGB") else None, draft)
        img.load()
        out = img
        if img.getexif().get(0x0112, 1) not in (1, None):  # EXIF orientation
            out = ImageOps.exif_transpose(img)
        out = _to_mode(out)
        if out is img:
            out = img.copy()  # closing ``img`` below destroys its pixels
        if out.width < 1 or out.height < 1:
            raise ImageError(path, "empty image")
        return out
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(path, "file not found") from None
    except IsADirectoryError:
        raise ImageError(path, "is a directory") from None
    except PermissionError:
        raise ImageError(path, "permission denied") from None
    except Image.UnidentifiedImageError:
        raise ImageError(path, "not a recognised image file") from None
    except Image.DecompressionBombError as exc:
        raise ImageError(path, f"image too large ({exc})") from None
    except (OSError, ValueError, SyntaxError, EOFError, struct.error, MemoryError, TypeError,
            IndexError, KeyError, ZeroDivisionError) as exc:
        raise ImageError(path, f"corrupt or unreadable image ({type(exc).__name__}: {exc})") from None
    finally:
        if img is not None:
            img.close()


# --------------------------------------------------------------------------------------------
# sources

class ImageSource:
    """Base class: an indexable collection of images with their item lines.

    Subclasses set ``name`` (a short human-readable label such as ``"folder:photos"``) and
    implement ``__len__``, :meth:`item`, :meth:`load` and :meth:`describe`. File-backed sources
    also override :meth:`open_image` to decode straight to PIL (with JPEG draft scaling).
    """

    name: str = "source"
    kind: str = "source"

    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def item(self, i: int) -> str:  # pragma: no cover - abstract
        """The item line of image ``i`` (no newline), as it belongs in items.txt."""
        raise NotImplementedError

    def load(self, i: int) -> np.ndarray:  # pragma: no cover - abstract
        """Image ``i`` as a uint8 array H x W x C, C in {1, 3}; :class:`ImageError` if unreadable."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """JSON-able description: ``kind``, ``path``, ``count`` and source-specific fields."""
        return {"kind": self.kind, "name": self.name, "count": len(self)}

    # -- conveniences -------------------------------------------------------------------------
    def items(self) -> list[str]:
        """All item lines, in order."""
        return [self.item(i) for i in range(len(self))]

    def in_memory(self) -> bool:
        """True when images come from an array already decoded (fast ``load``)."""
        return False

    def open_image(self, i: int, draft: tuple[int, int] | None = None) -> Image.Image:
        """Image ``i`` as a PIL image in mode 'L' or 'RGB'.

        ``draft`` is a hint: a JPEG may be decoded at a reduced scale that keeps both sides at
        least ``draft``. Raises :class:`ImageError`.
        """
        return _array_to_pil(self.load(i))

    def _check_index(self, i: int) -> int:
        n = len(self)
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"image index {i} out of range for {n} images")
        return i

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {len(self)} images)"


class _FileSource(ImageSource):
    """Shared code of sources whose images are files on disk."""

    _paths: list[str]

    def path(self, i: int) -> str:
        """The absolute file path of image ``i``."""
        return self._paths[self._check_index(i)]

    def open_image(self, i: int, draft: tuple[int, int] | None = None) -> Image.Image:
        return _open_file(self.path(i), draft)

    def load(self, i: int) -> np.ndarray:
        return _pil_to_array(self.open_image(i))

    def __len__(self) -> int:
        return len(self._paths)


class SplitSource(_FileSource):
    """A split file of lines ``relative/path [label ...]`` resolved against ``root``."""

    kind = "split"

    def __init__(self, split_file: str | os.PathLike, root: str | os.PathLike | None = None) -> None:
        split_file = Path(split_file)
        if not split_file.exists():
            raise MakError(f"{split_file}: split file not found")
        if not split_file.is_file():
            raise MakError(f"{split_file}: not a file")
        if root is None:
            root_dir = split_file.resolve().parent
        else:
            root_dir = Path(root)
            if not root_dir.is_dir():
                raise MakError(f"{root}: root directory not found")
            root_dir = root_dir.resolve()
        try:
            text = split_file.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise MakError(f"{split_file}: not a UTF-8 text file ({exc.reason})") from None
        except OSError as exc:
            raise MakError(f"{split_file}: cannot read ({exc.strerror or exc})") from None
        self._lines: list[str] = []
        self._paths = []
        for line in text.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            self._lines.append(line)
            self._paths.append(str(root_dir / line.split(None, 1)[0]))
        if not self._lines:
            raise MakError(f"{split_file}: no image lines in the split file")
        self.split_file = split_file.resolve()
        self.root = root_dir
        self.name = f"split:{split_file.name}"

    def item(self, i: int) -> str:
        return self._lines[self._check_index(i)]

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": str(self.split_file), "root": str(self.root),
                "count": len(self)}


class FolderSource(_FileSource):
    """Every image file under ``directory`` (recursive), sorted by relative POSIX path.

    ``labels_from_dirs``: an ImageFolder layout, ``DIR/CLASS/.../image``; the class folders,
    sorted by name, are labels 0, 1, ... and each item line ends with its label (``classes``
    holds the names). An image outside a class folder is an error.
    """

    kind = "folder"

    def __init__(self, directory: str | os.PathLike, labels_from_dirs: bool = False) -> None:
        directory = Path(directory)
        if not directory.exists():
            raise MakError(f"{directory}: image folder not found")
        if not directory.is_dir():
            raise MakError(f"{directory}: not a directory")
        base = directory.resolve()
        rels: list[str] = []
        seen = {os.path.realpath(base)}
        for dirpath, dirnames, filenames in os.walk(base, followlinks=True, onerror=None):
            keep = []
            for d in sorted(dirnames):
                real = os.path.realpath(os.path.join(dirpath, d))
                if not d.startswith(".") and real not in seen:  # symlink loops are walked once
                    seen.add(real)
                    keep.append(d)
            dirnames[:] = keep
            rel_dir = Path(dirpath).relative_to(base)
            for fname in filenames:
                if fname.startswith(".") or not fname.lower().endswith(IMAGE_EXTENSIONS):
                    continue
                if "\n" in fname or "\r" in fname:
                    continue  # cannot be written as one item line
                rels.append((rel_dir / fname).as_posix())
        rels.sort()
        if not rels:
            raise MakError(f"{directory}: no image files ({'/'.join(e[1:] for e in IMAGE_EXTENSIONS)}) found")
        self._rels = rels
        self._paths = [str(base / r) for r in rels]
        self.directory = base
        self.name = f"folder:{base.name}"
        self.classes: list[str] = []
        self._labels: list[int] | None = None
        if labels_from_dirs:
            loose = next((r for r in rels if "/" not in r), None)
            if loose is not None:
                raise MakError(f"{directory}/{loose}: --labels-from-dirs needs every image inside a class folder")
            self.classes = sorted({r.split("/", 1)[0] for r in rels})
            index = {c: k for k, c in enumerate(self.classes)}
            self._labels = [index[r.split("/", 1)[0]] for r in rels]

    def item(self, i: int) -> str:
        i = self._check_index(i)
        return self._rels[i] if self._labels is None else f"{self._rels[i]} {self._labels[i]}"

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "path": str(self.directory), "count": len(self)}
        if self.classes:
            out["classes"] = list(self.classes)
        return out


def expand_braces(pattern: str) -> list[str]:
    """WebDataset shard names: each ``{A..B}`` (zero padding kept) or ``{x,y}`` expanded, left to right."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    body, head, tail = m.group(1), pattern[:m.start()], pattern[m.end():]
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        a, b = rng.groups()
        if int(b) < int(a):
            raise MakError(f"{pattern}: empty shard range {{{body}}}")
        width = len(a) if a.startswith("0") or len(a) == len(b) else 0
        parts = [str(k).zfill(width) for k in range(int(a), int(b) + 1)]
    else:
        parts = body.split(",")
    return [name for part in parts for name in expand_braces(head + part + tail)]


class WebDatasetSource(ImageSource):
    """Images of WebDataset tar shards (``pool-{000000..000099}.tar``), in shard then member order.

    A sample is the files of one key (``dir/key.jpg``, ``dir/key.json``, ...); its image is the
    first member with an image extension, the rest is ignored. The shards are indexed once (tar
    headers only: each member's offset and size, with the standard library's ``tarfile``), so an
    image is one seek and one read, a DataLoader reads each shard front to back, and torchrun
    ranks, which take contiguous rows, take contiguous shards. Item lines are ``SHARD/KEY``
    (the shard's file name without ``.tar``). A missing or unreadable shard is an error; a
    corrupt image is an :class:`ImageError` like any other (``mak embed`` skips and counts it).
    """

    kind = "webdataset"

    def __init__(self, pattern: str | os.PathLike) -> None:
        self.pattern = str(pattern)
        self.shards = [Path(p) for p in expand_braces(self.pattern)]
        self._index: list[tuple[int, int, int]] = []  # (shard, data offset, size)
        self._items: list[str] = []
        for k, shard in enumerate(self.shards):
            self._index_shard(k, shard)
        if not self._index:
            raise MakError(f"{self.pattern}: no images ({'/'.join(e[1:] for e in IMAGE_EXTENSIONS)}) in "
                           f"{len(self.shards)} shard(s)")
        self.name = f"webdataset:{self.shards[0].name}"

    def _index_shard(self, k: int, shard: Path) -> None:
        if not shard.is_file():
            raise MakError(f"{shard}: shard not found")
        stem = shard.name[:-4] if shard.name.endswith(".tar") else shard.name
        seen: set[str] = set()
        try:
            with tarfile.open(shard, mode="r:") as tar:  # uncompressed tars: offsets are seekable
                for member in tar:
                    base = member.name.rsplit("/", 1)[-1]
                    key, dot, ext = member.name.rpartition(".")
                    if not member.isfile() or not dot or f".{ext.lower()}" not in IMAGE_EXTENSIONS \
                            or base.startswith(".") or key in seen or "\n" in key:
                        continue
                    seen.add(key)
                    self._index.append((k, member.offset_data, member.size))
                    self._items.append(f"{stem}/{key}")
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise MakError(f"{shard}: unreadable tar shard ({exc})") from None

    def __len__(self) -> int:
        return len(self._index)

    def item(self, i: int) -> str:
        return self._items[self._check_index(i)]

    def open_image(self, i: int, draft: tuple[int, int] | None = None) -> Image.Image:
        i = self._check_index(i)
        k, offset, size = self._index[i]
        where = f"{self.shards[k]}:{self._items[i]}"
        with open(self.shards[k], "rb") as fh:
            fh.seek(offset)
            data = fh.read(size)
        if len(data) != size:
            raise ImageError(where, "truncated in its shard")
        return _open_file(where, draft, fp=io.BytesIO(data))

    def load(self, i: int) -> np.ndarray:
        return _pil_to_array(self.open_image(i))

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "pattern": self.pattern, "shards": len(self.shards), "count": len(self)}


def _check_image_array(arr: np.ndarray, what: str) -> np.ndarray:
    if arr.dtype != np.uint8:
        raise MakError(f"{what}: expected uint8 images, found dtype {arr.dtype}")
    if arr.ndim == 3:
        arr = arr[:, :, :, None]
    elif arr.ndim != 4:
        raise MakError(f"{what}: expected an N x H x W or N x H x W x C array, found shape {arr.shape}")
    if arr.shape[3] not in (1, 3):
        raise MakError(f"{what}: expected 1 or 3 channels (last axis), found shape {arr.shape}")
    if arr.shape[0] == 0:
        raise MakError(f"{what}: the array holds no images")
    if arr.shape[1] < 1 or arr.shape[2] < 1:
        raise MakError(f"{what}: empty images of shape {arr.shape[1:]}")
    return arr


class _ArrayBacked(ImageSource):
    _images: np.ndarray  # N x H x W x C uint8

    def __len__(self) -> int:
        return int(self._images.shape[0])

    def in_memory(self) -> bool:
        return True

    def load(self, i: int) -> np.ndarray:
        return np.array(self._images[self._check_index(i)], dtype=np.uint8)  # a private copy

    def load_rows(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` as one (B, H, W, C) uint8 array (one read instead of B)."""
        if not 0 <= start <= stop <= len(self):
            raise MakError(f"{self.name}: rows {start}:{stop} out of range (0..{len(self)})")
        return np.array(self._images[start:stop], dtype=np.uint8)


class ArraySource(_ArrayBacked):
    """A ``.npy`` / ``.npz`` uint8 array of images; item line = row index."""

    kind = "array"

    def __init__(self, file: str | os.PathLike) -> None:
        path = Path(file)
        if not path.exists():
            raise MakError(f"{path}: array file not found")
        if not path.is_file():
            raise MakError(f"{path}: not a file")
        suffix = path.suffix.lower()
        try:
            if suffix == ".npz":
                with np.load(path, allow_pickle=False) as npz:
                    keys = list(npz.files)
                    if "images" in keys:
                        key = "images"
                    elif len(keys) == 1:
                        key = keys[0]
                    else:
                        raise MakError(f"{path}: .npz holds {len(keys)} arrays ({', '.join(keys[:5])}); "
                                       "name the image array 'images'")
                    arr = npz[key]
            elif suffix == ".npy":
                arr = np.load(path, mmap_mode="r", allow_pickle=False)
            else:
                raise MakError(f"{path}: expected a .npy or .npz file")
        except MakError:
            raise
        except Exception as exc:  # bad zip, bad header, object arrays...
            raise MakError(f"{path}: unreadable array file ({exc})") from None
        self._images = _check_image_array(arr, str(path))
        self._mmapped = suffix == ".npy"
        self.path = path.resolve()
        self.name = f"array:{path.name}"

    def item(self, i: int) -> str:
        return str(self._check_index(i))

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": str(self.path), "count": len(self),
                "shape": list(self._images.shape)}

    def __getstate__(self):
        state = self.__dict__.copy()
        if self._mmapped:
            state["_images"] = None  # re-mapped on unpickling instead of copied
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        if self._images is None:
            arr = np.load(self.path, mmap_mode="r", allow_pickle=False)
            self._images = _check_image_array(arr, str(self.path))


def _read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (gzipped when the name ends in .gz) of unsigned bytes."""
    try:
        opener = gzip.open if path.name.endswith(".gz") else open
        with opener(path, "rb") as fh:
            data = fh.read()
    except (OSError, EOFError) as exc:
        raise MakError(f"{path}: cannot read IDX file ({exc})") from None
    if len(data) < 4:
        raise MakError(f"{path}: not an IDX file (too short)")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08 or ndim < 1:
        raise MakError(f"{path}: not an unsigned-byte IDX file (bad magic number)")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise MakError(f"{path}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    count = int(np.prod(dims, dtype=np.int64))
    if len(data) - header != count:
        raise MakError(f"{path}: IDX size mismatch (header says {count} bytes of data, "
                       f"file holds {len(data) - header})")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


class FashionMNISTSource(_ArrayBacked):
    """Fashion-MNIST ``train`` (60,000) or ``test`` (10,000) images; item line = ``index label``."""

    kind = "fashion-mnist"
    _PREFIX = {"train": "train", "test": "t10k"}

    def __init__(self, split: str = "train", data_dir: str | os.PathLike | None = None) -> None:
        if split not in self._PREFIX:
            raise MakError(f"Fashion-MNIST split must be 'train' or 'test', not {split!r}")
        base = Path(data_dir) if data_dir is not None else Path(FASHION_MNIST_DIR)
        prefix = self._PREFIX[split]
        images_path = self._find(base, f"{prefix}-images-idx3-ubyte")
        labels_path = self._find(base, f"{prefix}-labels-idx1-ubyte")
        missing = [n for n, p in ((f"{prefix}-images-idx3-ubyte[.gz]", images_path),
                                  (f"{prefix}-labels-idx1-ubyte[.gz]", labels_path)) if p is None]
        if missing:
            raise MakError(f"Fashion-MNIST {split} files not found in {base} (looked for "
                           f"{' and '.join(missing)}): install them with `apt-get install "
                           "dataset-fashion-mnist` or point --data-dir at a directory holding the "
                           "IDX files")
        images = _read_idx(images_path)
        labels = _read_idx(labels_path)
        if images.ndim != 3:
            raise MakError(f"{images_path}: expected N x H x W images, found shape {images.shape}")
        if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            raise MakError(f"{labels_path}: {labels.shape[0] if labels.ndim else 0} labels for "
                           f"{images.shape[0]} images")
        self._images = _check_image_array(images, str(images_path))
        self._labels = labels
        self.split = split
        self.data_dir = images_path.parent.resolve()
        self.name = f"fashion-mnist:{split}"

    @staticmethod
    def _find(base: Path, stem: str) -> Path | None:
        for d in (base, base / "FashionMNIST" / "raw", base / "fashion-mnist"):
            for name in (stem, stem + ".gz"):
                if (d / name).is_file():
                    return d / name
        return None

    def item(self, i: int) -> str:
        i = self._check_index(i)
        return f"{i} {int(self._labels[i])}"

    def label(self, i: int) -> int:
        return int(self._labels[self._check_index(i)])

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": str(self.data_dir), "split": self.split, "count": len(self)}


# --------------------------------------------------------------------------------------------
# command-line plumbing

class CombinedSource:
    """Seed images followed by chosen pool rows: a re-train set (seed + pick) or a pool-aware pre-train set."""

    kind = "combined"

    def __init__(self, seed_source, pool_source, pool_rows: np.ndarray) -> None:
        self.seed = seed_source
        self.pool = pool_source
        self.rows = np.asarray(pool_rows, dtype=np.int64)
        self.skipped: list[tuple[int, str]] = []  # pool rows left out: (row, reason)
        self.name = f"{seed_source.name}+{len(self.rows)} from {pool_source.name}"

    def __len__(self) -> int:
        return len(self.seed) + len(self.rows)

    def _where(self, i: int):
        i = int(i)
        if i < len(self.seed):
            return self.seed, i
        return self.pool, int(self.rows[i - len(self.seed)])

    def item(self, i: int) -> str:
        src, j = self._where(i)
        return src.item(j)

    def load(self, i: int) -> np.ndarray:
        src, j = self._where(i)
        return src.load(j)

    def open_image(self, i: int, draft=None):
        src, j = self._where(i)
        return src.open_image(j, draft)

    def in_memory(self) -> bool:
        return self.seed.in_memory() and self.pool.in_memory()

    def items(self) -> list[str]:
        return [self.item(i) for i in range(len(self))]

    def describe(self) -> dict:
        return {"kind": self.kind, "name": self.name, "count": len(self), "seed": self.seed.describe(),
                "pool": self.pool.describe(), "pool_rows": int(len(self.rows)),
                **({"pool_skipped": len(self.skipped)} if self.skipped else {})}


def pool_mix(seed_source, pool_source, count: int | str = "auto", seed: int = 0,
             progress: bool = False) -> CombinedSource:
    """The pool-aware pre-training set: the seed, then the :func:`pool_mix_rows` sample of the pool
    less the pool images that cannot be decoded (a web pool has some; ``skipped`` lists them as
    ``(row, reason)``, and ``describe()`` counts them); none readable is an error. Under torchrun
    each rank decodes its share of the sample and all ranks get the same list (call it on every rank)."""
    from mak import distributed as D

    rows = pool_mix_rows(len(pool_source), len(seed_source), count, seed)
    lo, hi = D.shard_range(len(rows))
    mine = validate_all(pool_source, progress=progress and D.rank() == 0, rows=rows[lo:hi])
    bad = [b for part in D.all_gather_object(mine) for b in part]
    if bad and len(bad) == len(rows):
        raise MakError(f"none of the {len(rows)} sampled pool images of {pool_source.name} is readable (first: "
                       f"{bad[0][1]}); are its paths relative to another root?")
    if bad:
        rows = np.setdiff1d(rows, np.array([i for i, _ in bad], dtype=np.int64))
    mix = CombinedSource(seed_source, pool_source, rows)
    mix.skipped = bad
    return mix


def pool_mix_rows(pool_size: int, seed_size: int, count: int | str = "auto", seed: int = 0) -> np.ndarray:
    """Sorted pool rows to mix into a pool-aware pre-training set: a uniform sample without replacement.

    ``count``: how many (capped by the pool); ``auto`` = min(pool, 8 x seed). The same arguments
    give the same rows.
    """
    if count == "auto":
        n = min(int(pool_size), 8 * int(seed_size))
    elif isinstance(count, (int, np.integer)) and not isinstance(count, bool) and count >= 0:
        n = min(int(pool_size), int(count))
    else:
        raise MakError(f"pool mix count must be 'auto' or an integer >= 0, got {count!r}")
    if n >= pool_size:
        return np.arange(pool_size, dtype=np.int64)
    rng = np.random.default_rng([int(seed), 0x6D6978])  # "mix": a stream of its own
    return np.sort(rng.choice(int(pool_size), size=n, replace=False)).astype(np.int64)


def labeled_source(path: str | os.PathLike, root: str | os.PathLike | None = None) -> ImageSource:
    """A labeled evaluation split: a split file (``path label`` lines), or an ImageFolder directory."""
    if Path(path).is_dir():
        return FolderSource(path, labels_from_dirs=True)
    return open_source("split", path, root=root)


def open_source(kind: str, value: str | os.PathLike, root: str | os.PathLike | None = None,
                data_dir: str | os.PathLike | None = None, labels_from_dirs: bool = False) -> ImageSource:
    """Open a source by kind (``split``, ``folder``, ``array``, ``fashion-mnist``) and value."""
    kind = kind.replace("_", "-")
    if labels_from_dirs and kind != "folder":
        raise MakError("--labels-from-dirs only applies to --folder")
    if root is not None and kind != "split":
        raise MakError("--root only applies to --split")
    if data_dir is not None and kind != "fashion-mnist":
        raise MakError("--data-dir only applies to --fashion-mnist")
    if kind == "split":
        return SplitSource(value, root)
    if kind == "folder":
        return FolderSource(value, labels_from_dirs)
    if kind == "array":
        return ArraySource(value)
    if kind == "fashion-mnist":
        return FashionMNISTSource(str(value), data_dir)
    if kind == "webdataset":
        return WebDatasetSource(value)
    raise MakError(f"unknown image source kind {kind!r} (expected one of {', '.join(SOURCE_KINDS)})")


# --------------------------------------------------------------------------------------------
# dataset

class ImageDataset(torch.utils.data.Dataset):
    """Decode, convert and resize the images of a source for a DataLoader.

    ``mode="resize"``: resize to ``size x size`` (aspect not kept; for training, where the
    random-resized-crop augmentation follows). ``mode="center"``: resize the shorter side to
    ``size`` and take the centre square (for embedding/evaluation). ``channels`` 1 converts to
    grey (ITU-R 601-2 luma), 3 to RGB.

    ``dataset[i]`` is ``(image, i, ok)``: ``image`` a ``uint8`` tensor ``channels x size x size``,
    ``i`` the index and ``ok`` whether the image could be read. An unreadable image gives
    ``ok=False`` and a zero tensor; :meth:`check` returns the reason (re-reading the one image).
    """

    def __init__(self, source: ImageSource, size: int, channels: int, mode: str = "resize") -> None:
        if channels not in (1, 3):
            raise MakError(f"channels must be 1 or 3, not {channels}")
        if mode not in ("resize", "center"):
            raise MakError(f"resize mode must be 'resize' or 'center', not {mode!r}")
        size = int(size)
        if size < 1:
            raise MakError(f"image size must be positive, not {size}")
        self.source = source
        self.size = size
        self.channels = channels
        self.mode = mode

    def __len__(self) -> int:
        return len(self.source)

    def describe(self) -> dict[str, Any]:
        return {"size": self.size, "channels": self.channels, "mode": self.mode}

    def fit(self, i: int) -> torch.Tensor:
        """Image ``i`` at the working geometry; raises :class:`ImageError`."""
        size, channels = self.size, self.channels
        if self.source.in_memory():
            arr = self.source.load(i)
            if arr.shape[0] == size and arr.shape[1] == size:
                if arr.shape[2] == channels:
                    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()
                if channels == 3:
                    return torch.from_numpy(arr).permute(2, 0, 1).expand(3, size, size).contiguous()
            img = _array_to_pil(arr)
        else:
            img = self.source.open_image(i, draft=(size, size))
        try:
            target = "L" if channels == 1 else "RGB"
            if img.mode != target:
                img = img.convert(target)
            w, h = img.size
            if self.mode == "resize":
                if (w, h) != (size, size):
                    img = img.resize((size, size), Image.BILINEAR)
            else:
                side = min(w, h)
                left, top = (w - side) / 2.0, (h - side) / 2.0
                if (w, h) != (size, size):
                    img = img.resize((size, size), Image.BILINEAR,
                                     box=(left, top, left + side, top + side))
            arr = np.array(img, dtype=np.uint8)
        except (OSError, ValueError, MemoryError) as exc:
            path = self.source.path(i) if isinstance(self.source, _FileSource) else self.source.item(i)
            raise ImageError(path, f"cannot resize ({type(exc).__name__}: {exc})") from None
        if arr.ndim == 2:
            return torch.from_numpy(arr).unsqueeze(0)
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous()

    def fits_rows(self) -> bool:
        """Whether :meth:`fit_rows` applies: decoded arrays already at the working size."""
        src = self.source
        if not (hasattr(src, "load_rows") and src.in_memory() and len(src)):
            return False
        shape = src.load(0).shape
        return shape[0] == self.size and shape[1] == self.size and shape[2] in (1, self.channels)

    def fit_rows(self, start: int, stop: int) -> torch.Tensor:
        """Images ``start:stop`` as one uint8 (B, C, size, size) tensor, when :meth:`fits_rows`:
        the same pixels as :meth:`fit` image by image, without the per-image Python path."""
        x = torch.from_numpy(self.source.load_rows(start, stop)).permute(0, 3, 1, 2)
        if x.shape[1] != self.channels:
            x = x.expand(-1, self.channels, -1, -1)
        return x.contiguous()

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, bool]:
        try:
            return self.fit(i), int(i), True
        except ImageError:
            return torch.zeros(self.channels, self.size, self.size, dtype=torch.uint8), int(i), False

    def check(self, i: int) -> str | None:
        """The reason image ``i`` cannot be used (``"path: reason"``), or None if it loads."""
        try:
            self.fit(i)
        except ImageError as exc:
            return str(exc)
        return None


# --------------------------------------------------------------------------------------------
# whole-source helpers

def infer_geometry(source: ImageSource, sample: int = 16) -> tuple[int, int]:
    """(typical side in px, channels) from up to ``sample`` images spread over the source.

    The side is the median shorter side. Channels is 3 when some sampled image has colour (three
    channels that are not all equal), else 1 -- grey images stored as RGB count as grey.
    Unreadable images are skipped; :class:`MakError` if none of the sampled images is readable.
    """
    n = len(source)
    if n == 0:
        raise MakError(f"{source.name}: no images")
    k = max(1, min(int(sample), n))
    idx = sorted({int(round(x)) for x in np.linspace(0, n - 1, k)})
    sides: list[int] = []
    colour = False
    errors: list[str] = []
    for i in idx:
        try:
            if isinstance(source, _FileSource):
                img = source.open_image(i, draft=(64, 64))  # JPEGs decode at reduced scale
                with Image.open(source.path(i)) as header:
                    side = min(header.size)
                arr = _pil_to_array(img)
            else:
                arr = source.load(i)
                side = min(arr.shape[0], arr.shape[1])
        except (ImageError, OSError) as exc:
            errors.append(str(exc))
            continue
        sides.append(side)
        if arr.shape[2] == 3 and not colour:
            colour = bool(np.any(arr[:, :, 0] != arr[:, :, 1]) or np.any(arr[:, :, 0] != arr[:, :, 2]))
    if not sides:
        raise MakError(f"{source.name}: none of {len(idx)} sampled images is readable "
                       f"(first error: {errors[0]})")
    return int(np.median(sides)), (3 if colour else 1)


def _probe(source: ImageSource, i: int) -> str | None:
    try:
        if source.in_memory():
            source.load(i)
        else:
            source.open_image(i, draft=(64, 64))
    except ImageError as exc:
        return str(exc)
    return None


def validate_all(source: ImageSource, progress: bool = True, workers: int | None = None,
                 rows: Sequence[int] | None = None) -> list[tuple[int, str]]:
    """Try to read every image (or those of ``rows``); return ``(row, reason)`` for each that
    fails, in order.

    JPEGs are decoded at reduced scale (the whole stream is still read, so truncation shows).
    File sources are checked by ``workers`` threads (default: up to 4; PIL decodes without the GIL).
    """
    from mak.progress import bar as progress_bar

    rows = range(len(source)) if rows is None else [int(r) for r in rows]
    failures: list[tuple[int, str]] = []
    bar = progress_bar(len(rows), f"checking {source.name}", unit="img", enabled=progress, dynamic_ncols=True)
    try:
        if source.in_memory():
            for i in rows:
                reason = _probe(source, i)
                if reason is not None:
                    failures.append((i, reason))
            bar.update(len(rows))
        else:
            nw = workers if workers is not None else min(4, os.cpu_count() or 1)
            with ThreadPoolExecutor(max_workers=max(1, nw)) as pool:
                for start in range(0, len(rows), 512):
                    block = rows[start : start + 512]
                    for i, reason in zip(block, pool.map(lambda j: _probe(source, j), block)):
                        if reason is not None:
                            failures.append((i, reason))
                    bar.update(len(block))
    finally:
        bar.close()
    return failures
