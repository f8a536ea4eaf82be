"""mak.progress: a live tqdm bar on a terminal, whole lines at a set pace in a log, nothing when disabled."""
from __future__ import annotations

import io
import os

import numpy as np
import pytest
import tqdm.std

from mak import progress


class Clock:
    """tqdm's clock, moved by hand: bars made while it is installed read their time from it."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(tqdm.std, "time", c)  # tqdm.std.tqdm.__init__ stores it as the bar's clock
    return c


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_whole_lines_at_the_interval_and_a_final_line(clock):
    out = io.StringIO()
    b = progress.bar(100, "k-center", unit="pick", file=out, interval=10)
    assert isinstance(b, progress.LineBar)
    for _ in range(40):  # 4 s of work: nothing yet
        clock.t += 0.1
        b.update(1)
    assert out.getvalue() == ""
    for _ in range(60):  # 6 s more: one line, at 10 s
        clock.t += 0.1
        b.update(1)
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("k-center: ") and "/100 [00:10<" in lines[0]
    clock.t += 5
    b.close()
    text = out.getvalue()
    assert "\r" not in text and "\x1b" not in text and text.endswith("\n")
    final = text.splitlines()[-1]
    assert final.startswith("k-center: done, 100/100 pick in 00:15 (") and "pick/s" in final
    b.close()  # a second close writes nothing more
    assert out.getvalue() == text


def test_lines_are_spaced_by_the_interval_and_set_postfix_waits_its_turn(clock):
    out = io.StringIO()
    with progress.bar(None, "pretrain", unit="step", file=out, interval=3) as b:
        for step in range(20):  # one step a second
            clock.t += 1
            b.update(1)
            b.set_postfix(epoch=f"{step // 10 + 1}/2", loss=f"{1 / (step + 1):.3f}")
    lines = out.getvalue().splitlines()
    assert len(lines) == 20 // 3 + 1  # at 3, 6, ..., 18 s, then the final line
    assert lines[0].startswith("pretrain: 3 step [00:03, ") and "epoch=1/2" in lines[0]
    assert lines[-1].startswith("pretrain: done, 20 step in 00:20 (1.00step/s, epoch=2/2")


def test_quick_work_leaves_nothing_in_the_log_and_a_second_leaves_one_line(clock):
    out = io.StringIO()
    with progress.bar(10, "dedup", unit="cluster", file=out, interval=30) as b:
        clock.t += 0.9
        b.update(10)
    assert out.getvalue() == ""
    with progress.bar(10, "dedup", unit="cluster", file=out, interval=30) as b:
        clock.t += progress.FINAL_AFTER
        b.update(10)
    assert out.getvalue() == "dedup: done, 10/10 cluster in 00:01 (10.00cluster/s)\n"


def test_slow_work_gets_a_final_line_even_when_no_update_came_in_time(clock):
    out = io.StringIO()
    b = progress.bar(5, "fits", unit="fit", file=out, interval=30)
    clock.t += 10
    b.update(5)  # too early for a line
    clock.t += 25
    b.close()  # yet the work took 35 s: the log says so
    assert out.getvalue() == "fits: done, 5/5 fit in 00:35 (7.00s/fit)\n"


def test_work_cut_short_ends_with_a_stopped_line(clock):
    out = io.StringIO()
    b = progress.bar(5, "fits", unit="fit", file=out, interval=30)
    clock.t += 45
    b.update(2)  # 45 s: the first line
    clock.t += 1
    b.close()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("fits: 40% 2/5 [00:45<")
    assert lines[1] == "fits: stopped, 2/5 fit in 00:46 (23.00s/fit)"


def test_a_resumed_bar_counts_from_initial_and_tqdm_write_lands_between_lines(clock):
    out = io.StringIO()
    with progress.bar(100, "embed", unit="img", initial=40, file=out, interval=1, smoothing=0.1) as b:
        clock.t += 2
        b.update(30)
        b.write("mak embed: skipping row 7", file=out)  # what embed prints above its bar
        progress.write("and row 9", file=out)
        clock.t += 2
        b.update(30)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("embed: 70% 70/100 [00:02<")
    assert lines[1:3] == ["mak embed: skipping row 7", "and row 9"]
    assert lines[-1] == "embed: done, 100/100 img in 00:04 (15.00img/s)"  # the rate counts this run's 60
    assert "\r" not in out.getvalue()


def test_a_disabled_bar_prints_nothing(clock):
    for stream in (io.StringIO(), Terminal()):
        with progress.bar(3, "x", enabled=False, file=stream, interval=0) as b:
            clock.t += 100
            b.update(3)
            b.set_postfix(a=1)
        assert stream.getvalue() == "" and b.disable


def test_a_terminal_gets_the_usual_redrawn_bar():
    from tqdm.auto import tqdm

    out = Terminal()
    with progress.bar(4, "k-center", unit="pick", file=out, mininterval=0) as b:
        assert isinstance(b, tqdm) and not isinstance(b, progress.LineBar)
        for _ in range(4):
            b.update(1)
    assert "\r" in out.getvalue() and "4/4" in out.getvalue()


def test_the_interval_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv(progress.ENV_INTERVAL, "2.5")
    assert progress.progress_interval() == 2.5
    assert progress.bar(1, "x", file=io.StringIO()).interval == 2.5
    assert progress.bar(1, "x", file=io.StringIO(), interval=7).interval == 7
    for bad in ("soon", "nan", ""):
        monkeypatch.setenv(progress.ENV_INTERVAL, bad)
        assert progress.progress_interval() == progress.DEFAULT_INTERVAL
    monkeypatch.setenv(progress.ENV_INTERVAL, "-3")
    assert progress.progress_interval() == 0.0


def test_a_pipe_gets_a_line_per_update_at_interval_zero(monkeypatch):
    monkeypatch.setenv(progress.ENV_INTERVAL, "0")
    r, w = os.pipe()
    with os.fdopen(w, "w") as wf:
        assert not wf.isatty()
        with progress.bar(3, "import", unit="row", file=wf) as b:
            for _ in range(3):
                b.update(1)
    with os.fdopen(r) as rf:
        lines = rf.read().split("\n")
    assert lines[-1] == "" and not any("\r" in ln for ln in lines)
    assert [ln.split(" [")[0] for ln in lines[:3]] == ["import: 33% 1/3", "import: 67% 2/3", "import: 100% 3/3"]
    assert lines[3].startswith("import: done, 3/3 row in ")


def test_pinned_map_counts_what_size_says():
    from mak._threads import pinned_map

    out = io.StringIO()
    b = progress.bar(10, "rows", unit="img", file=out, interval=0)
    assert pinned_map(lambda lo: lo * 2, [0, 4, 8], progress=b, size=lambda lo: min(10, lo + 4) - lo) == [0, 8, 16]
    assert b.n == 10  # the caller's bar, still open
    b.close()
    assert "done, 10/10 img" in out.getvalue()


def test_the_classifier_logits_bar_counts_images_over_all_bags(monkeypatch, capsys):
    # one bar over bags x rows, even when the pool fits in one scoring chunk
    import torch

    from mak.selection.robust.density_ratio import RatioModels, ratio_logits

    class Linear(torch.nn.Module):  # stands in for a fitted RatioMLP: features -> one logit per row
        def __init__(self, w: float) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.full((4,), float(w)))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x @ self.w

    monkeypatch.setenv(progress.ENV_INTERVAL, "0")
    rng = np.random.default_rng(0)
    seed, pool = rng.normal(size=(12, 4)).astype(np.float32), rng.normal(size=(30, 4)).astype(np.float32)
    models = [RatioModels([Linear(b + f) for f in range(2)], np.arange(30) % 2, np.arange(12) % 2) for b in range(2)]
    capsys.readouterr()
    ratio_logits(pool, seed, pool, models=models, progress="logits")
    err = capsys.readouterr().err
    assert "\r" not in err
    assert err.splitlines()[-1].startswith("logits: done, 60/60 img in ")


def test_the_ecle_bar_counts_images_scored_here_or_elsewhere(monkeypatch, capsys):
    from mak.selection.tailness import ecle_sum

    monkeypatch.setenv(progress.ENV_INTERVAL, "0")
    views = np.random.default_rng(1).normal(size=(2, 6, 3)).astype(np.float32)
    for batch_size, partitions, owner in ((8, 3, None), (4, 2, lambda p, k: k == 0)):  # one batch of all; 2 x 2 batches
        capsys.readouterr()
        ecle_sum(views, batch_size=batch_size, partitions=partitions, owner=owner, progress=True)
        err = capsys.readouterr().err
        assert "\r" not in err
        total = 6 * (1 if batch_size >= 6 else partitions)
        assert err.splitlines()[-1].startswith(f"ECLE: done, {total}/{total} img in ")


def test_bars_open_in_an_interrupted_command_write_their_last_line_before_it_says_interrupted(monkeypatch, capsys):
    import mak.cli.select as select_cli
    from mak.cli import main

    monkeypatch.setenv("MAK_PROGRESS_INTERVAL", "0")

    def run(args):
        shown = progress.bar(10, "work", unit="img")  # not closed by a with: the interrupted frame holds it
        shown.update(3)
        raise KeyboardInterrupt

    monkeypatch.setattr(select_cli, "run", run)
    capsys.readouterr()
    assert main(["select", "--pool-store", "p.npy", "--budget", "5", "--out", "o"]) == 130
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1] == "mak select: interrupted"
    assert lines[-2].startswith("work: stopped, 3/10 img in ")
