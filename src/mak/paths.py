"""Paths the user names: a file to read, a directory or a file to write, checked with one line."""
from __future__ import annotations

import os
from pathlib import Path

from mak.errors import MakError


def input_file(path: str | os.PathLike, what: str) -> Path:
    """``path`` when it is a file; else a :class:`MakError` saying it is missing or a directory."""
    path = Path(path)
    if path.is_dir():
        raise MakError(f"{path}: is a directory, not {'an' if what[:1] in 'aeiou' else 'a'} {what}")
    if not path.is_file():
        raise MakError(f"{path}: {what} not found")
    return path


def output_dir(path: str | os.PathLike) -> Path:
    """``path`` when it is a directory or absent; else a :class:`MakError` (a file is in the way)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise MakError(f"{path}: output path exists and is not a directory")
    return path


def output_file(path: str | os.PathLike) -> Path:
    """``path`` when it is a file or absent; else a :class:`MakError` (a directory is in the way)."""
    path = Path(path)
    if path.is_dir():
        raise MakError(f"{path}: output path is a directory; name a file")
    return path


def new_output_dir(path: str | os.PathLike, overwrite: bool) -> Path:
    """``path`` when it is absent, an empty directory, or may be replaced (``overwrite``); else a
    :class:`MakError` saying how to go on."""
    path = output_dir(path)
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise MakError(f"{path}: already exists (choose another --out, or pass --overwrite)")
    return path


__all__ = ["input_file", "new_output_dir", "output_dir", "output_file"]
