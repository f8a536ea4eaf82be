"""One writer per output: a lock file beside it, naming its holder.

``with output_lock(out):`` creates ``.<name>.lock`` beside ``out`` with ``O_CREAT | O_EXCL`` (atomic
on local file systems and on NFSv3 and later, which multi-node users share run directories on),
holding the writer's pid, host and start time. A second writer stops at once with a one-line
:class:`~mak.errors.MakError` naming the holder. A lock left by a dead process of this host is
stale: it is renamed away (one taker wins the rename) and taken over. A lock of another host can
not be checked from here and is reported as held; remove the file once that writer is gone.
Under torchrun only rank 0 takes the lock.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
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
        info = json.loads(path.read_text())
        return info if isinstance(info, dict) else {}
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}


def _try_create(path: Path, info: dict) -> bool:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as fh:
        json.dump(info, fh)
    return True


def _stale(info: dict) -> bool:
    return info.get("host") == socket.gethostname() and isinstance(info.get("pid"), int) \
        and not _alive(info["pid"])


@contextlib.contextmanager
def output_lock(out: str | os.PathLike, enabled: bool = True) -> Iterator[None]:
    """Hold the lock of ``out`` for the block (nothing when not ``enabled``, e.g. on ranks > 0)."""
    if not enabled:
        yield
        return
    path = lock_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    me = {"pid": os.getpid(), "host": socket.gethostname(),
          "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    for _ in range(3):
        if _try_create(path, me):
            break
        info = _holder(path)
        if info is None:  # released between the two calls
            continue
        if not _stale(info):
            who = f"pid {info.get('pid', '?')} on {info.get('host', '?')}, since {info.get('started', '?')}"
            raise MakError(f"{out}: another mak process is writing it ({who}); wait for it, or remove "
                           f"{path} if that process is gone")
        with contextlib.suppress(FileNotFoundError):  # stale: one taker wins this rename
            os.replace(path, path.with_name(f"{path.name}.{secrets.token_hex(4)}.stale"))
            for old in path.parent.glob(f"{path.name}.*.stale"):
                old.unlink(missing_ok=True)
    else:
        raise MakError(f"{out}: could not take {path}")
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            if _holder(path) == me:
                path.unlink()


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
