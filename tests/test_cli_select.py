"""`mak select` end to end: outputs, determinism and every bad-input error."""
from __future__ import annotations

import csv
import re
import json

import numpy as np
import pytest

from mak.data.store import write_store
from mak.errors import MakError


@pytest.fixture
def stores(tmp_path, rng):
    seed = rng.normal(size=(40, 8)).astype(np.float32)
    pool = rng.normal(size=(120, 8)).astype(np.float16)
    views = rng.normal(size=(3, 120, 4)).astype(np.float16)
    s = write_store(tmp_path / "seed", seed, [f"seed/{i}.png 0" for i in range(40)])
    p = write_store(tmp_path / "pool", pool, [f"pool/{i}.png {i % 3}" for i in range(120)], views=views)
    return s, p


def select_args(stores, out, *extra):
    s, p = stores
    return ["select", "--seed-store", s, "--pool-store", p, "--budget", "10", "--out", out,
            "--ecle-batch-size", "32", "--partitions", "2", "--no-progress", "--strategy", "mak", *extra]


def test_outputs(cli, stores, tmp_path):
    out = tmp_path / "sel"
    assert cli(*select_args(stores, out)) == 0
    lines = (out / "selection.txt").read_text().splitlines()
    assert len(lines) == 10 and all(line.startswith("pool/") for line in lines)
    rows = list(csv.DictReader(open(out / "scores.csv")))
    assert len(rows) == 120
    picked = sorted((int(r["pick_rank"]), r["item"]) for r in rows if r["selected"] == "1")
    assert [it for _, it in picked] == lines
    assert all(r["ecle"] and r["distance"] and r["score"] for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["selected"] == 10 and summary["counts"]["pool"] == 120
    assert {"ecle", "proximity", "kcenter", "total"} <= set(summary["timings_s"])
    assert "torch" in summary["versions"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_random_without_seed_store_has_empty_score_columns(cli, stores, tmp_path):
    _, p = stores
    out = tmp_path / "r"
    assert cli("select", "--pool-store", p, "--budget", "5", "--strategy", "random", "--out", out, "--no-progress") == 0
    rows = list(csv.DictReader(open(out / "scores.csv")))
    assert all(r["ecle"] == "" for r in rows)
    assert sum(r["selected"] == "1" for r in rows) == 5


def test_same_seed_identical_selection(cli, stores, tmp_path):
    for name in ("a", "b"):
        assert cli(*select_args(stores, tmp_path / name, "--seed", "7")) == 0
    assert (tmp_path / "a/selection.txt").read_bytes() == (tmp_path / "b/selection.txt").read_bytes()
    assert (tmp_path / "a/scores.csv").read_bytes() == (tmp_path / "b/scores.csv").read_bytes()


def _break(tmp_path, stores, what):
    s, p = stores
    if what == "missing-file":
        (p / "features.npy").unlink()
        return "features.npy", "missing"
    if what == "items-mismatch":
        (p / "items.txt").write_text("only-one-line\n")
        return "items.txt", "1 item lines"
    if what == "dim-mismatch":
        np.save(s / "features.npy", np.random.default_rng(0).normal(size=(40, 5)).astype(np.float32))
        return "features.npy", "dimension"
    if what == "views-r1":
        np.save(p / "views.npy", np.zeros((1, 120, 4), dtype=np.float32))
        return "views.npy", "R >= 2"
    if what == "views-rows":
        np.save(p / "views.npy", np.zeros((3, 119, 4), dtype=np.float32))
        return "views.npy", "119 rows"
    if what == "nan":
        f = np.load(p / "features.npy")
        f[5, 2] = np.nan
        np.save(p / "features.npy", f)
        return "features.npy", "contains NaN or Inf values (first in row 5)"
    if what == "inf-views":
        v = np.load(p / "views.npy")
        v[1, 3, 0] = np.inf
        np.save(p / "views.npy", v)
        return "views.npy", "contains NaN or Inf values (first in row 3)"
    if what == "corrupt-npy":
        (p / "features.npy").write_bytes(b"not a numpy file")
        return "features.npy", "unreadable"
    raise AssertionError(what)


@pytest.mark.parametrize("what", ["missing-file", "items-mismatch", "dim-mismatch", "views-r1", "views-rows",
                                  "nan", "inf-views", "corrupt-npy"])
def test_bad_store_errors(cli, stores, tmp_path, capsys, what):
    fname, msg = _break(tmp_path, stores, what)
    out = tmp_path / "sel"
    assert cli(*select_args(stores, out)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and fname in err and msg in err, err
    assert not out.exists()


@pytest.mark.parametrize("extra,msg", [
    (["--budget", "121"], "larger than the pool"),
    (["--clusters", "41"], "larger than the seed"),
])
def test_bad_parameter_errors(cli, stores, tmp_path, capsys, extra, msg):
    out = tmp_path / "sel"
    assert cli(*select_args(stores, out, *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and msg in err, err
    assert not out.exists()


@pytest.mark.parametrize("extra,msg", [
    (["--budget", "0"], "argument --budget: '0' must be an integer >= 1"),
    (["--strategy", "magic"], "argument --strategy: unknown strategy 'magic' (choose from: mak,"),
    (["--order", "best"], "argument --order: 'best' must be one of: pick, score"),
    (["--kcenter", "fast"], "argument --kcenter: 'fast' must be one of: exact, two-round"),
    (["--kcenter-parts", "0"], "argument --kcenter-parts: '0' must be an integer >= 1"),
    (["--dedup", "1.5"], "argument --dedup: '1.5' must be a number in (0, 1]"),
    (["--dedup-clusters", "x"], "argument --dedup-clusters: 'x' must be an integer >= 1"),
])
def test_job_flags_are_checked_by_their_declarations(cli, stores, tmp_path, capsys, extra, msg):
    """The job's flags are parsed by JOB_OPTIONS' parsers, before any work: one line, exit 2."""
    out = tmp_path / "sel"
    with pytest.raises(SystemExit, match="2"):
        cli(*select_args(stores, out, *extra))
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("mak select: error: ") and msg in err, err
    assert not out.exists()


def test_job_defaults_are_declared_once():
    """mak select's flags, select_stores and mak.select take the defaults JOB_OPTIONS declares;
    the default strategy is the product's (robust)."""
    import inspect

    from mak.cli import build_parser
    from mak.options import by_name
    from mak.run.select_job import JOB_OPTIONS, select_stores
    from mak.selection.strategies import DEFAULT_STRATEGY, select

    args = build_parser("select").parse_args(["select", "--pool-store", "p", "--budget", "3", "--out", "o"])
    for opt in JOB_OPTIONS:
        assert getattr(args, opt.name) == (3 if opt.name == "budget" else opt.default)
    assert by_name(JOB_OPTIONS)["strategy"].default == DEFAULT_STRATEGY == "robust"
    assert inspect.signature(select).parameters["strategy"].default == DEFAULT_STRATEGY
    assert inspect.signature(select_stores).parameters["strategy"].default == DEFAULT_STRATEGY
    with pytest.raises(MakError, match="'budget' is required"):
        select_stores(None, "p", "o", None)


def test_existing_selection_needs_overwrite(cli, stores, tmp_path, capsys):
    out = tmp_path / "sel"
    assert cli(*select_args(stores, out)) == 0
    before = (out / "selection.txt").read_bytes()
    assert cli(*select_args(stores, out, "--seed", "3")) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "selection.txt").read_bytes() == before
    assert cli(*select_args(stores, out, "--seed", "3", "--overwrite")) == 0


def test_subprocess_exit_code_and_help(tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "mak", "select", "--pool-store", str(tmp_path / "nope"), "--budget", "3",
                        "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert r.returncode == 2 and "nope" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    h = subprocess.run([sys.executable, "-m", "mak", "select", "--help"], capture_output=True, text=True)
    assert h.returncode == 0 and "--core-ratio" in h.stdout


def test_duplicate_pair_never_both_selected(cli, tmp_path, rng):
    seed = rng.normal(size=(30, 6)).astype(np.float32)
    pool = rng.normal(size=(80, 6)).astype(np.float32)
    pool[50] = pool[20]
    s = write_store(tmp_path / "s", seed, [str(i) for i in range(30)])
    p = write_store(tmp_path / "p", pool, [str(i) for i in range(80)])
    for budget in (10, 40, 79):
        out = tmp_path / f"o{budget}"
        assert cli("select", "--seed-store", s, "--pool-store", p, "--budget", budget, "--strategy", "kcenter",
                   "--out", out, "--no-progress") == 0
        picked = set((out / "selection.txt").read_text().split())
        assert not {"20", "50"} <= picked


def _selection_files(out):
    sel = (out / "selection.txt").read_text().splitlines()
    rows = list(csv.DictReader(open(out / "scores.csv")))
    summary = json.loads((out / "summary.json").read_text())
    return sel, rows, summary


def test_an_overwritten_selection_is_replaced_whole_and_other_files_stay(cli, stores, tmp_path):
    out = tmp_path / "sel"
    assert cli(*select_args(stores, out, "--budget", "10")) == 0
    (out / "notes.txt").write_text("mine\n")
    assert cli(*select_args(stores, out, "--budget", "7", "--overwrite")) == 0
    sel, rows, summary = _selection_files(out)
    assert len(sel) == 7 == sum(r["selected"] == "1" for r in rows) == summary["parameters"]["budget"]
    assert (out / "notes.txt").read_text() == "mine\n"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_failed_publication_leaves_the_old_selection_whole(cli, stores, tmp_path, monkeypatch, capsys):
    import os

    out = tmp_path / "sel"
    assert cli(*select_args(stores, out, "--budget", "10")) == 0
    before = {n: (out / n).read_bytes() for n in ("selection.txt", "scores.csv", "summary.json")}
    real = os.replace

    def failing(src, dst):  # the rename that would put the new selection in place
        if str(dst) == str(out) and ".tmp" in str(src):
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    capsys.readouterr()
    assert cli(*select_args(stores, out, "--budget", "7", "--overwrite")) == 2
    assert capsys.readouterr().err.strip().splitlines() == ["mak select: error: No space left on device"]
    monkeypatch.setattr(os, "replace", real)
    assert {n: (out / n).read_bytes() for n in before} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("where", ["name_too_long", "under_a_file"])
def test_an_unwritable_out_is_one_line_before_any_work(cli, stores, tmp_path, capsys, monkeypatch, where):
    import mak.run.select_job as job

    (tmp_path / "file").write_text("x")
    out = tmp_path / ("x" * 300) if where == "name_too_long" else tmp_path / "file" / "sel"
    ran = []
    monkeypatch.setattr(job, "load_inputs", lambda *a, **k: ran.append(1))  # any work would call this
    capsys.readouterr()
    assert cli(*select_args(stores, out)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mak select: error: ") and not ran, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "pool", "seed"]


@pytest.mark.parametrize("case, message", [
    ("zeros", "every feature is zero"),
    ("constant", "every row is the same vector"),
    ("latin1", r"items.txt: not UTF-8 text \(byte 5\)"),
    ("meta_list", "meta.json: expected a JSON object, found list"),
])
def test_stores_no_strategy_can_use_are_one_line_before_any_work(cli, stores, tmp_path, capsys, case, message):
    s, _ = stores
    feats = np.zeros((30, 8), np.float32) if case == "zeros" else \
        np.tile(np.arange(8, dtype=np.float32), (30, 1)) if case == "constant" else \
        np.random.default_rng(0).normal(size=(30, 8)).astype(np.float32)
    bad = write_store(tmp_path / "bad", feats, [f"p{i}" for i in range(30)])
    if case == "latin1":
        (bad / "items.txt").write_bytes(b"p0\np1\xe9\n" + b"".join(f"p{i}\n".encode() for i in range(2, 30)))
    if case == "meta_list":
        (bad / "meta.json").write_text("[1, 2]")
    capsys.readouterr()
    for strategy in ("kcenter", "random"):
        assert cli("select", "--seed-store", s, "--pool-store", bad, "--budget", "5", "--strategy", strategy,
                   "--out", tmp_path / "o", "--no-progress") == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and re.search(message, err[0]), err
    assert not (tmp_path / "o").exists()


def test_order_score_sorts_the_same_picks_by_score(cli, stores, tmp_path, capsys):
    assert cli(*select_args(stores, tmp_path / "pick")) == 0
    assert cli(*select_args(stores, tmp_path / "score", "--order", "score")) == 0
    picked = (tmp_path / "pick" / "selection.txt").read_text().splitlines()
    by_score = (tmp_path / "score" / "selection.txt").read_text().splitlines()
    assert sorted(picked) == sorted(by_score) and len(by_score) == 10
    with open(tmp_path / "score" / "scores.csv", newline="") as fh:
        score = {r["item"]: float(r["score"]) for r in csv.DictReader(fh) if r["selected"] == "1"}
    assert [score[it] for it in by_score] == sorted(score.values(), reverse=True)
    assert (tmp_path / "pick" / "scores.csv").read_bytes() == (tmp_path / "score" / "scores.csv").read_bytes()
    capsys.readouterr()
    assert cli(*select_args(stores, tmp_path / "r", "--order", "score", "--strategy", "random")) == 2
    err = capsys.readouterr().err
    assert "--order 'score': strategy 'random' picks without a score; use --order 'pick'" in err
    assert not (tmp_path / "r").exists()
    from mak.run.select_job import select_stores  # the API names its keywords, the CLI its flags

    s, p = stores
    with pytest.raises(MakError, match=r"^kcenter='fast' must be one of: exact, two-round$"):
        select_stores(s, p, tmp_path / "k", 5, strategy="kcenter", kcenter="fast", progress=False)


def test_robust_scores_csv_says_why_an_image_was_rejected(cli, stores, tmp_path):
    out = tmp_path / "r"
    assert cli(*select_args(stores, out, "--strategy", "robust", "--ratio-bags", "1", "--ratio-epochs", "2",
                            "--ratio-hidden", "8", "--gate-quantile", "0.8")) == 0
    summary = json.loads((out / "summary.json").read_text())
    thresholds = summary["info"]["gate"]["thresholds"]
    assert set(thresholds) == {"centroid", "share", "ratio"}
    with open(out / "scores.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    kept = 0
    for r in rows:
        passes = {t: r[f"gate_{t}_pass"] == "1" for t in thresholds}
        assert passes["centroid"] == (float(r["gate_centroid"]) <= thresholds["centroid"])
        assert passes["share"] == (float(r["gate_share"]) >= thresholds["share"])
        assert passes["ratio"] == (float(r["gate_ratio"]) >= thresholds["ratio"])
        kept += all(passes.values())
        if not all(passes.values()):
            assert float(r["score"]) == float("-inf")  # rejected: never ranked
    assert kept == summary["counts"]["gate_kept"] and summary["counts"]["gate_rejected"] == len(rows) - kept > 0


@pytest.mark.parametrize("argv", [["bench", "build"], ["demo"], ["embed"], ["evaluate"], ["pretrain"], ["run"],
                                  ["select"], ["store", "import"], ["store", "info"]])
def test_every_command_takes_quiet(argv, capsys):
    from mak.cli import commands, main

    assert argv[0] in commands()
    with pytest.raises(SystemExit):
        main([*argv, "--help"])
    text = capsys.readouterr().out
    assert "--quiet, -q" in text and "print nothing but errors and warnings" in text
    with_bars = argv[0] in ("bench", "demo", "embed", "evaluate", "pretrain", "run", "select") or argv == ["store", "import"]
    assert ("--no-progress" in text) == with_bars


def test_quiet_prints_nothing_and_no_progress_keeps_the_summary(cli, stores, tmp_path, capsys):
    _, p = stores
    capsys.readouterr()
    assert cli("select", "--pool-store", p, "--budget", "5", "--strategy", "kcenter", "--out", tmp_path / "a", "-q") == 0
    assert capsys.readouterr() == ("", "")
    assert cli("select", "--pool-store", p, "--budget", "5", "--strategy", "kcenter", "--out", tmp_path / "b",
               "--no-progress") == 0
    out, err = capsys.readouterr()
    assert out.startswith("selected 5 images with 'kcenter'") and err == ""


@pytest.mark.parametrize("case", ["missing seed", "seed of another dimension", "seed items without a seed"])
def test_a_seed_given_is_checked_even_when_the_strategy_does_not_read_it(cli, stores, tmp_path, capsys, case):
    s, p = stores
    np.save(tmp_path / "wide.npy", np.ones((5, 9), np.float32))
    seed = {"missing seed": ["--seed-store", tmp_path / "nope.npy"],
            "seed of another dimension": ["--seed-store", tmp_path / "wide.npy"],
            "seed items without a seed": ["--seed-items", tmp_path / "items.txt"]}[case]
    (tmp_path / "items.txt").write_text("a\n")
    assert cli("select", *seed, "--pool-store", p, "--budget", "5", "--strategy", "random", "--out",
               tmp_path / "o", "-q") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and ("nope.npy" in err or "wide.npy" in err or "--seed-items" in err)
    assert not (tmp_path / "o").exists()


def test_the_output_cannot_be_an_input_store(cli, stores, capsys):
    s, p = stores
    assert cli("select", "--seed-store", s, "--pool-store", p, "--budget", "5", "--strategy", "random",
               "--out", p, "-q") == 2
    assert f"{p}: is the input store {p}; choose another --out" in capsys.readouterr().err
    assert not (p / "selection.txt").exists()


def test_more_two_round_parts_than_candidates_is_an_error(cli, stores, tmp_path, capsys):
    s, p = stores
    out = tmp_path / "k"
    assert cli("select", "--seed-store", s, "--pool-store", p, "--budget", "5", "--strategy", "kcenter",
               "--kcenter", "two-round", "--kcenter-parts", "121", "--out", out, "--no-progress") == 2
    assert capsys.readouterr().err.strip() == "mak select: error: --kcenter-parts 121 is more than the 120 candidates"
    assert not out.exists()


def test_a_budget_larger_than_the_pool_is_one_line_even_where_robust_has_a_note(cli, tmp_path, capsys):
    """Own embeddings (no meta.json) give robust a note on its gate quantile; the budget is checked first."""
    rng = np.random.default_rng(0)
    np.save(tmp_path / "seed.npy", rng.standard_normal((30, 8)).astype(np.float32))
    np.save(tmp_path / "pool.npy", rng.standard_normal((50, 8)).astype(np.float32))
    capsys.readouterr()
    assert cli("select", "--seed-store", tmp_path / "seed.npy", "--pool-store", tmp_path / "pool.npy",
               "--budget", 51, "--out", tmp_path / "o") == 2
    err = capsys.readouterr().err.strip()
    assert err == f"mak select: error: budget (51) is larger than the pool (50 images in {tmp_path / 'pool.npy'})"
    assert not (tmp_path / "o").exists()
