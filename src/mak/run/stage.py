"""A stage of ``mak run``: one step of the loop in its own directory of the run, its cache key,
its cache check and status, and how it runs (under torchrun too).

Every stage writes into its own directory of the run and records a *key*: a hash of its
parameters, of the behaviour version of its code (:data:`STAGE_VERSIONS`, and for a selection the
strategy's :data:`mak.selection.strategies.STRATEGY_VERSIONS`) and of the keys of the stages it reads. A stage
whose recorded key matches is skipped; a changed parameter or version changes the keys of that
stage and of everything downstream only. A stage interrupted half-way resumes (pretrain and embed
pick up their own checkpoints).

A finished stage that has to re-run under another key is not deleted: it becomes the stage's
*previous* output (``.<name>.previous`` beside it; one per stage, replacing the one before). A run
whose key matches the previous output swaps it back in instead of running, so going back to the
settings before a change costs nothing, and a run that fails after a change has lost nothing.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from mak import distributed as D
from mak.atomic import write_json
from mak.errors import MakError

STAMP = ".stage.json"
PENDING = ".pending.json"
# Stage kinds whose function runs on every rank under torchrun: they split the work themselves.
DISTRIBUTED_KINDS = ("pretrain", "pretrain-mix", "retrain", "embed-seed", "embed-pool", "embed-seed-mix",
                     "embed-pool-mix", "ecle", "ecle-mix", "select")


#: Behaviour version of each kind of stage, part of its cache key: a stage whose code gives other
#: outputs for the same parameters has a higher version, so its cached results (and those of the
#: stages that read it) are not reused. Version 1 adds nothing to the key.
STAGE_VERSIONS: dict[str, int] = {"bench": 1, "pretrain": 1, "pretrain-mix": 1, "embed-seed": 1, "embed-pool": 1,
                                  "embed-seed-mix": 1, "embed-pool-mix": 1, "ecle": 2, "ecle-mix": 2, "select": 1,
                                  "retrain": 1, "eval": 2}


def stage_version(kind: str, strategy: str | None = None) -> dict[str, int]:
    """The versions that go into a stage's key: {} while everything is at version 1."""
    from mak.selection.strategies import STRATEGY_VERSIONS

    out = {}
    if STAGE_VERSIONS.get(kind, 1) != 1:
        out["stage"] = STAGE_VERSIONS[kind]
    if strategy is not None and STRATEGY_VERSIONS.get(strategy, 1) != 1:
        out["strategy"] = STRATEGY_VERSIONS[strategy]
    return out


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Stage:
    name: str
    path: Path
    params: dict
    deps: list["Stage"]
    fn: Callable[["Stage"], None]
    outputs: tuple[str, ...]
    key: str = ""
    ran: bool = False

    def __post_init__(self) -> None:
        parts = self.name.split("/")  # kind/rR[/strategy]
        kind = parts[0]
        key: dict[str, Any] = {"stage": kind, "params": self.params, "deps": [d.key for d in self.deps]}
        version = stage_version(kind, parts[2] if kind == "select" and len(parts) > 2 else None)
        if version:
            key["version"] = version
        self.key = _digest(key)

    @property
    def previous(self) -> Path:
        """Where the stage's last finished output under another key is kept."""
        return self.path.parent / f".{self.path.name}.previous"

    def finished_key(self, where: Path | None = None) -> str | None:
        """The key of the finished output in ``where`` (default: the stage's directory), or None."""
        where = self.path if where is None else where
        try:
            done = json.loads((where / STAMP).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        key = done.get("key") if isinstance(done, dict) else None
        return key if isinstance(key, str) and all((where / o).exists() for o in self.outputs) else None

    def cached(self) -> bool:
        return self.finished_key() == self.key

    def restorable(self) -> bool:
        """Whether the previous output is this key's (:meth:`restore` swaps it back in)."""
        return not self.cached() and self.finished_key(self.previous) == self.key

    def restore(self) -> None:
        """Swap the previous output back in; a finished current output becomes the previous one, an
        unfinished one is removed. Rank 0 only (the caller holds the run's lock)."""
        keep = self.finished_key() is not None
        parked = self.path.parent / f".{self.path.name}.restore.tmp"
        shutil.rmtree(parked, ignore_errors=True)
        if self.path.exists():
            os.replace(self.path, parked)
        os.replace(self.previous, self.path)
        if keep:
            os.replace(parked, self.previous)
        else:
            shutil.rmtree(parked, ignore_errors=True)

    def status(self) -> str:
        if self.cached():
            return "cached"
        if self.restorable():
            return "cached: previous output, swapped back in"
        if self.finished_key() is not None:
            return "changed: will re-run (the current output is kept as the previous one)"
        if (self.path / STAMP).is_file():
            return "changed: will re-run"
        if self.path.exists():
            return "partial: will resume" if self.resumable() else "will run"
        return "will run"

    def _run_on_rank0(self) -> None:
        """Rank 0 runs the function; its error, if any, reaches every rank, so all stop with one line."""
        failure: Exception | None = None
        if D.rank() == 0:
            try:
                self.fn(self)
            except Exception as e:  # noqa: BLE001 -- told to the other ranks, then raised again here
                failure = e
        message = D.broadcast_object(None if failure is None else str(failure) or type(failure).__name__)
        if failure is not None:
            raise failure
        if message is not None:
            raise MakError(f"{self.name} failed on rank 0: {message}")

    def resumable(self) -> bool:
        pend = self.path / PENDING
        try:
            return json.loads(pend.read_text(encoding="utf-8")).get("key") == self.key
        except (OSError, ValueError, AttributeError):
            return False

    def _make_room(self) -> None:
        """Before a run under this key: a finished output under another key becomes the previous
        one (replacing the one before); anything else there that cannot resume is removed."""
        if not self.path.exists() or self.resumable():
            return
        if self.finished_key() is not None:
            shutil.rmtree(self.previous, ignore_errors=True)
            os.replace(self.path, self.previous)
        else:
            shutil.rmtree(self.path)

    @property
    def kind(self) -> str:
        """The stage kind: the first part of its name (``pretrain``, ``embed-pool``, ``select``, ...)."""
        return self.name.split("/")[0]

    def run(self) -> None:
        """Run the stage and record its key. Under torchrun call it on every rank: rank 0 prepares the
        directory and writes the record; the function runs on every rank for :data:`DISTRIBUTED_KINDS`,
        on rank 0 alone otherwise."""
        main = D.rank() == 0
        if main:
            self._make_room()
            self.path.mkdir(parents=True, exist_ok=True)
            write_json(self.path / PENDING, {"key": self.key})
        D.barrier()
        t = time.perf_counter()
        if self.kind in DISTRIBUTED_KINDS or not D.active():
            self.fn(self)
        else:
            self._run_on_rank0()
        D.barrier()
        if main:
            write_json(self.path / STAMP, {"key": self.key, "stage": self.name, "params": self.params,
                                           "seconds": round(time.perf_counter() - t, 2)})
            (self.path / PENDING).unlink(missing_ok=True)
        self.ran = True
