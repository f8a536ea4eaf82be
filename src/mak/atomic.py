"""Atomic output: write under a temporary name in the same directory, then rename into place.

A crash or a bad-input error therefore never leaves a half-written file or directory behind.
Temporary directories (:func:`temp_dir`) are made like any new directory, mode ``0o777`` less
the umask, so a directory published from one has the usual permissions (not owner-only).
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any, Iterator

import numpy as np


def _fresh(parent: Path, prefix: str, suffix: str, make) -> Path:
    """``parent/prefix<random>suffix`` made by ``make(path)``, which raises FileExistsError when taken."""
    for _ in range(100):
        candidate = parent / f"{prefix}{secrets.token_hex(6)}{suffix}"
        try:
            make(candidate)
        except FileExistsError:
            continue
        return candidate
    raise FileExistsError(f"{parent}: no free temporary name for {prefix}*{suffix}")


def _new_file(parent: Path, prefix: str, suffix: str) -> Path:
    """An empty new file ``parent/prefix<random>suffix``, created with mode 0666 less the umask (as
    any new file; ``tempfile.mkstemp`` would make it 0600)."""
    return _fresh(parent, prefix, suffix,
                  lambda f: os.close(os.open(f, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)))


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it onto ``path``.

    On an exception the temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = _new_file(path.parent, f".{path.name}.", suffix + ".tmp")
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    """Atomically write a text file."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def write_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    """Atomically write a ``.npy`` file."""
    with atomic_path(path, suffix=".npy") as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, np.asarray(array))


def temp_dir(path: str | os.PathLike) -> Path:
    """A new empty directory beside ``path``, named ``.<name>.<random>.tmp``; its absolute path.

    Made by ``mkdir`` with mode ``0o777``: the umask (and a parent's default ACL or set-group-ID
    bit) apply as to any new directory, so it can be published as it is.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return Path(os.path.abspath(_fresh(path.parent, f".{path.name}.", ".tmp", lambda d: d.mkdir(mode=0o777))))


def move_entries(src: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Rename every entry of directory ``src`` into ``dest`` (created if needed), then remove ``src``.

    Each entry appears at ``dest`` whole, replacing one of the same name; other entries of
    ``dest`` stay. ``src`` and ``dest`` must be on one file system.
    """
    src, dest = Path(src), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for entry in sorted(src.iterdir()):
        os.replace(entry, dest / entry.name)
    shutil.rmtree(src, ignore_errors=True)


def reserve(path: str | os.PathLike) -> None:
    """Allocate the disk blocks of file ``path`` at its current size now, so that a full disk is an
    ``OSError`` here rather than a SIGBUS when a memmap of it is written later. File systems that
    cannot allocate ahead (``EOPNOTSUPP``, ``EINVAL``) are left as they are."""
    with open(path, "r+b") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size == 0 or not hasattr(os, "posix_fallocate"):
            return
        try:
            os.posix_fallocate(fh.fileno(), 0, size)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise OSError(exc.errno, exc.strerror, str(path)) from None


def remove_debris(path: str | os.PathLike) -> int:
    """Remove what killed writers of ``path`` left beside it (``.<name>.*.tmp``, ``.<name>.*.old``,
    files or directories); the count. Only for a caller that holds ``path``'s lock (:mod:`mak.lock`)."""
    path = Path(path)
    n = 0
    for pattern in (f".{path.name}.*.tmp", f".{path.name}.*.old"):
        for entry in path.parent.glob(pattern):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            n += 1
    return n


def replace_dir(tmp: str | os.PathLike, path: str | os.PathLike, carry: bool = False,
                owned: tuple[str, ...] = ()) -> None:
    """Put directory ``tmp`` at ``path`` as a whole: a reader sees the old ``path``, then none, then
    the new one, never a mix of the two. With ``carry``, entries of the old ``path`` that ``tmp``
    lacks are carried into the new one (hard links where the file system allows, else copies),
    except the ``owned`` names: the writer's own outputs, which ``tmp`` holds or which are gone.
    If the swap fails, the old ``path`` is put back. One file system; ``tmp`` is consumed.
    """
    tmp, path = Path(tmp), Path(path)
    if not path.exists():
        os.replace(tmp, path)
        return
    if carry:
        for entry in path.iterdir():
            if entry.name not in owned and not os.path.lexists(tmp / entry.name):
                link_copy(entry, tmp / entry.name)
    old = path.with_name(f".{path.name}.{secrets.token_hex(4)}.old")
    os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.replace(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)


def link_copy(src: Path, dest: Path) -> None:
    """``dest`` as a hard link of file ``src`` (a copy across devices); directories entry by entry."""
    if src.is_symlink():
        os.symlink(os.readlink(src), dest)
    elif src.is_dir():
        shutil.copytree(src, dest, symlinks=True, copy_function=lambda a, b: link_copy(Path(a), Path(b)))
    else:
        try:
            os.link(src, dest)
        except OSError:
            shutil.copy2(src, dest)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``path``; on success it replaces ``path``.

    Files the caller writes inside appear at ``path`` all at once. On an exception the
    temporary directory is deleted and any existing ``path`` is left as it was. The directory is
    made by :func:`temp_dir`: mode ``0o777`` less the umask.
    """
    path = Path(path)
    tmp = temp_dir(path)
    try:
        yield tmp
        if path.exists() and not overwrite and any(path.iterdir()):
            raise FileExistsError(f"{path} already exists")
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
