"""mak.atomic: published directories get the usual permissions; entries move whole; failures leave nothing."""
from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

import pytest

from mak.atomic import atomic_dir, move_entries, temp_dir


@contextlib.contextmanager
def umask(mask: int):
    before = os.umask(mask)
    try:
        yield
    finally:
        os.umask(before)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_a_published_directory_has_the_mode_of_any_new_directory(tmp_path, mask):
    with umask(mask):
        plain = tmp_path / "plain"
        plain.mkdir()
        out = tmp_path / "out"
        with atomic_dir(out) as tmp:
            (tmp / "a.txt").write_text("a\n")
        with atomic_dir(out, overwrite=True) as tmp:  # a replacement too
            (tmp / "b.txt").write_text("b\n")
        made = temp_dir(tmp_path / "x")
    assert mode(out) == 0o777 & ~mask == mode(plain)
    assert mode(made) == 0o777 & ~mask
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]
    assert made.is_absolute() and made.parent == tmp_path and made.name.startswith(".x.") and made.name.endswith(".tmp")


def test_a_failed_atomic_dir_leaves_the_old_directory_and_no_temporary(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("a\n")
    with pytest.raises(RuntimeError), atomic_dir(out, overwrite=True) as tmp:
        (tmp / "b.txt").write_text("b\n")
        raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (out / "a.txt").read_text() == "a\n" and not (out / "b.txt").exists()
    with pytest.raises(FileExistsError), atomic_dir(out) as tmp:  # not empty and no overwrite
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_move_entries_renames_files_and_folders_into_place_and_removes_the_source(tmp_path):
    src, dest = tmp_path / "src", tmp_path / "dest"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "x.npy").write_bytes(b"\x93NUMPY")
    (src / "a.txt").write_text("new\n")
    os.chmod(src / "a.txt", 0o640)
    ino = (src / "a.txt").stat().st_ino
    dest.mkdir()
    (dest / "a.txt").write_text("old\n")
    (dest / "keep.json").write_text("{}\n")
    move_entries(src, dest)
    assert not src.exists()
    assert sorted(p.name for p in dest.iterdir()) == ["a.txt", "keep.json", "sub"]
    assert (dest / "a.txt").read_text() == "new\n" and (dest / "a.txt").stat().st_ino == ino  # renamed, not copied
    assert mode(dest / "a.txt") == 0o640 and (dest / "sub" / "x.npy").read_bytes() == b"\x93NUMPY"
    move_entries(tmp_path / "dest", tmp_path / "new" / "dir")  # a missing destination is created
    assert sorted(p.name for p in (tmp_path / "new" / "dir").iterdir()) == ["a.txt", "keep.json", "sub"]


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_written_files_have_the_mode_of_any_new_file(tmp_path, mask):
    from mak.atomic import write_json, write_npy, write_text

    import numpy as np

    with umask(mask):
        (tmp_path / "plain.txt").write_text("x")
        write_json(tmp_path / "a.json", {"a": 1})
        write_text(tmp_path / "b.txt", "b")
        write_npy(tmp_path / "c.npy", np.zeros(3))
    want = 0o666 & ~mask
    assert mode(tmp_path / "plain.txt") == want
    assert [mode(tmp_path / n) for n in ("a.json", "b.txt", "c.npy")] == [want] * 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.txt", "c.npy", "plain.txt"]  # no temporaries
