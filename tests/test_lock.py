"""One writer per output: a second writer stops with one line naming the holder; stale locks are taken over."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from mak.data.store import write_store
from mak.errors import MakError
from mak.lock import lock_path, output_lock


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_second_writer_stops_naming_the_first(tmp_path):
    out = tmp_path / "out"
    with output_lock(out):
        info = json.loads(lock_path(out).read_text())
        assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
        with pytest.raises(MakError, match=rf"another mak process is writing it \(pid {os.getpid()} on "):
            with output_lock(out):
                pass
    assert not lock_path(out).exists()  # released


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    out = tmp_path / "out"
    lock_path(out).write_text(json.dumps({"pid": dead_pid(), "host": socket.gethostname(), "started": "x"}))
    with output_lock(out):
        assert json.loads(lock_path(out).read_text())["pid"] == os.getpid()
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no lock, no stale copies left


@pytest.mark.parametrize("content", ["", '{"pid": 12'])
def test_a_lock_file_a_killed_writer_left_half_written_is_taken_over(tmp_path, content):
    out = tmp_path / "out"
    lock_path(out).write_text(content)
    with output_lock(out):
        assert json.loads(lock_path(out).read_text())["pid"] == os.getpid()
    assert not lock_path(out).exists()


def test_writers_racing_for_a_stale_lock_never_overlap(tmp_path):
    out = tmp_path / "out"
    lock_path(out).write_text(json.dumps({"pid": dead_pid(), "host": socket.gethostname(), "started": "x"}))
    code = ("import sys, time; from mak.lock import output_lock; from mak.errors import MakError\n"
            "time.sleep(max(0.0, float(sys.argv[2]) - time.time()))\n"
            "try:\n    with output_lock(sys.argv[1]):\n        a = time.time(); time.sleep(0.3)\n"
            "        print(a, time.time())\nexcept MakError:\n    print('busy')")
    start = f"{time.time() + 2.0}"  # every writer starts at the same moment, after its imports
    procs = [subprocess.Popen([sys.executable, "-c", code, str(out), start], stdout=subprocess.PIPE, text=True)
             for _ in range(6)]
    lines = [p.communicate(timeout=60)[0].strip() for p in procs]
    spans = sorted(tuple(map(float, ln.split())) for ln in lines if ln != "busy")
    assert spans and all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), lines  # one writer at a time
    assert not lock_path(out).exists()


def test_a_lock_of_another_host_is_reported_not_taken(tmp_path):
    out = tmp_path / "out"
    lock_path(out).write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "then"}))
    with pytest.raises(MakError, match="pid 1 on elsewhere, since then"):
        with output_lock(out):
            pass
    assert lock_path(out).exists()


def test_select_and_embed_refuse_an_output_another_process_holds(tmp_path, cli, capsys):
    rng = np.random.default_rng(0)
    write_store(tmp_path / "seed", rng.normal(size=(20, 4)).astype(np.float32), [f"s{i}" for i in range(20)])
    write_store(tmp_path / "pool", rng.normal(size=(50, 4)).astype(np.float32), [f"p{i}" for i in range(50)])
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from mak.lock import output_lock\n"
                               "with output_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)",
                               str(tmp_path / "sel")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        capsys.readouterr()
        assert cli("select", "--seed-store", tmp_path / "seed", "--pool-store", tmp_path / "pool", "--budget", "5",
                   "--strategy", "kcenter", "--out", tmp_path / "sel", "--no-progress") == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"pid {holder.pid} on" in err[0], err
        assert not (tmp_path / "sel").exists()
    finally:
        holder.kill()
        holder.wait()
    # the holder died without releasing: its lock is stale, and the next select takes it over
    assert cli("select", "--seed-store", tmp_path / "seed", "--pool-store", tmp_path / "pool", "--budget", "5",
               "--strategy", "kcenter", "--out", tmp_path / "sel", "--no-progress") == 0
    assert not lock_path(tmp_path / "sel").exists()


def test_a_successful_rerun_removes_what_killed_runs_of_its_output_left(tmp_path, cli):
    rng = np.random.default_rng(0)
    write_store(tmp_path / "seed", rng.normal(size=(20, 4)).astype(np.float32), [f"s{i}" for i in range(20)])
    write_store(tmp_path / "pool", rng.normal(size=(50, 4)).astype(np.float32), [f"p{i}" for i in range(50)])
    (tmp_path / ".sel.1a2b.tmp").mkdir()  # a killed select's work directory ...
    (tmp_path / ".sel.1a2b.tmp" / "scores.csv").write_text("half")
    (tmp_path / ".sel.3c4d.old").mkdir()  # ... and a swap it did not finish
    (tmp_path / ".other.5e6f.tmp").mkdir()  # another output's: not this run's to remove
    assert cli("select", "--seed-store", tmp_path / "seed", "--pool-store", tmp_path / "pool", "--budget", "5",
               "--strategy", "kcenter", "--out", tmp_path / "sel", "--no-progress") == 0
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [".other.5e6f.tmp"]


def test_pretrain_removes_temporaries_of_killed_checkpoint_writes(tmp_path):
    from mak.data.sources import ArraySource
    from mak.train.pretrain import pretrain

    np.save(tmp_path / "a.npy", np.random.default_rng(0).integers(0, 255, (32, 28, 28), dtype=np.uint8))
    (tmp_path / "pre").mkdir()
    (tmp_path / "pre" / ".checkpoint.pt.9f8e.pt.tmp").write_bytes(b"half a checkpoint")
    pretrain(ArraySource(tmp_path / "a.npy"), tmp_path / "pre", epochs=1, batch_size=16, num_workers=0,
             progress=False)
    assert sorted(p.name for p in (tmp_path / "pre").iterdir()) == ["checkpoint.pt", "log.csv"]


@pytest.mark.parametrize("command", ["run", "pretrain"])
def test_run_and_pretrain_refuse_a_directory_another_process_holds(tmp_path, cli, capsys, command):
    """A second `mak run` on a run directory (or `mak pretrain` on a checkpoint directory) stops at
    once with one line naming the holder, before writing anything there."""
    np.save(tmp_path / "imgs.npy", (np.random.default_rng(0).random((40, 16, 16)) * 255).astype(np.uint8))
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from mak.lock import output_lock\n"
                               "with output_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)",
                               str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        capsys.readouterr()
        if command == "run":
            (tmp_path / "seed.txt").write_text("a.png\n")
            argv = ["run", "--out", out, "--set", f"data.seed.split={tmp_path / 'seed.txt'}",
                    "--set", f"data.pool.split={tmp_path / 'seed.txt'}", "--set", "select.budget=1"]
        else:
            argv = ["pretrain", "--array", tmp_path / "imgs.npy", "--epochs", "1", "--batch-size", "8",
                    "--out", out, "--no-progress"]
        assert cli(*argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"pid {holder.pid} on" in err[0], err
        assert not out.exists() or not any(out.iterdir())
    finally:
        holder.kill()
        holder.wait()


def test_an_output_that_cannot_be_written_is_named_not_its_lock(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    out = tmp_path / "file" / "out"
    with pytest.raises(MakError) as exc:
        with output_lock(out):
            pass
    assert str(exc.value).startswith(f"{out}: cannot write there (") and "lock" not in str(exc.value)
