"""One writer per output: a lock file beside it, naming its holder.

``with output_lock(out):`` opens ``.<name>.lock`` beside ``out`` and holds an exclusive
``flock`` on it, which the kernel releases when the holder exits, however it exits; the file holds
the writer's pid, host and start time. A second writer stops at once with a one-line
:class:`~mak.errors.MakError` naming the holder. A lock file nobody holds is taken over when it
names a process of this host (it is dead: a live one would hold the lock) or nothing readable (a
writer killed while it wrote the file). One that names another host is reported as held: a shared
file system may not carry locks between hosts, so remove the file once that writer is gone. On a
file system without ``flock`` the holder's pid alone decides. Under torchrun only rank 0 takes it.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Iterator

from mak.errors import MakError


def lock_path(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out.parent / f".{out.name}.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _holder(path: Path) -> dict | None:
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        return info if isinstance(info, dict) else {}
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}


def _held_by(info: dict, flocked: bool) -> bool:
    """Whether the writer that ``info`` names may still be writing (we hold the flock when ``flocked``)."""
    if info.get("host") != socket.gethostname():
        return bool(info)  # another host's writer cannot be checked from here; nothing readable: a killed write
    pid = info.get("pid")
    return isinstance(pid, int) and not flocked and _alive(pid)


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``fd`` is still the file at ``path`` (a releasing holder unlinks it)."""
    try:
        st, cur = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (st.st_dev, st.st_ino) == (cur.st_dev, cur.st_ino)


def _acquire(out: str | os.PathLike, path: Path, me: dict) -> int:
    """An open descriptor of the lock file, locked and naming ``me``; a MakError naming the holder."""
    for _ in range(5):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            flocked = True
        except BlockingIOError:
            os.close(fd)
            raise _busy(out, path, _holder(path) or {}) from None
        except OSError:  # no flock on this file system
            flocked = False
        if not _same_file(fd, path):  # unlinked by its holder while we opened it: open the new one
            os.close(fd)
            continue
        info = _holder(path) or {}
        if _held_by(info, flocked):
            os.close(fd)
            raise _busy(out, path, info)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        return fd
    raise MakError(f"{out}: could not take {path}")


def _busy(out: str | os.PathLike, path: Path, info: dict) -> MakError:
    who = f"pid {info.get('pid', '?')} on {info.get('host', '?')}, since {info.get('started', '?')}"
    return MakError(f"{out}: another mak process is writing it ({who}); wait for it, or remove {path} "
                    "if that process is gone")


@contextlib.contextmanager
def output_lock(out: str | os.PathLike, enabled: bool = True) -> Iterator[None]:
    """Hold the lock of ``out`` for the block (nothing when not ``enabled``, e.g. on ranks > 0)."""
    if not enabled:
        yield
        return
    path = lock_path(out)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = _acquire(out, path, me)
    except OSError as exc:  # a read-only, missing or special folder: named by the output, not its lock
        raise MakError(f"{out}: cannot write there ({exc.strerror or exc})") from None
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            if _same_file(fd, path):
                path.unlink()  # while still locked: a writer waiting on this file sees it gone and retries
        os.close(fd)


@contextlib.contextmanager
def job_lock(out: str | os.PathLike) -> Iterator[None]:
    """:func:`output_lock` for a job that runs on every rank: rank 0 takes it, and every rank stops
    with the same error when it cannot (the process group must be up, or absent)."""
    from mak import distributed as D

    with contextlib.ExitStack() as stack:
        err = None
        if D.rank() == 0:
            try:
                stack.enter_context(output_lock(out))
            except MakError as exc:
                err = str(exc)
        err = D.broadcast_object(err)
        if err:
            raise MakError(err)
        yield


__all__ = ["job_lock", "lock_path", "output_lock"]
