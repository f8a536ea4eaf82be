"""`mak run` / `mak demo`: configs, caching, dry runs and the whole loop at the smallest scale."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import torchrun

from mak.run.config import load_config
from mak.errors import MakError
from mak.bench.openworld import find_fashion_mnist

REPO = Path(__file__).resolve().parents[1]


def have_fashion_mnist() -> bool:
    try:
        find_fashion_mnist(None)
        return True
    except MakError:
        return False


needs_fmnist = pytest.mark.skipif(not have_fashion_mnist(), reason="Fashion-MNIST not installed "
                                  "(apt-get install dataset-fashion-mnist)")

TINY = ["data.benchmark.build=true", "data.benchmark.scale=0.02", "pretrain.epochs=1", "pretrain.batch_size=64",
        "embed.views=2", "embed.batch_size=128", "select.strategies=[mak,random]", "select.partitions=1",
        "select.ecle_batch_size=64", "evaluate.draws=2", "run.name=tiny"]


@pytest.mark.parametrize("value, ok", [("0", True), ("2", True), ("1", False), ("-1", False)])
def test_embed_views_are_none_or_pairs_when_the_config_loads(value, ok):
    if ok:  # no views: only for strategies that read features alone
        assert load_config(None, TINY + [f"embed.views={value}", "select.strategies=[random]"])["embed"]["views"] \
            == int(value)
    else:
        with pytest.raises(MakError, match=rf"^config: embed\.views={value} must be"):
            load_config(None, TINY + [f"embed.views={value}"])


def test_unknown_keys_are_named(tmp_path):
    with pytest.raises(MakError, match="select.budgett"):
        load_config(None, ["select.budgett=3"])
    with pytest.raises(MakError, match="'nosuch'"):
        load_config(None, ["nosuch.key=1"])
    cfg = tmp_path / "c.yaml"
    cfg.write_text("pretrain:\n  epoch: 3\n")
    with pytest.raises(MakError, match="pretrain.epoch"):
        load_config(cfg)


def test_set_parses_yaml_values():
    cfg = load_config(None, TINY + ["select.budget=500", "select.strategies=[random]", "pretrain.amp=false"])
    assert cfg["select"]["budget"] == 500 and cfg["select"]["strategies"] == ["random"]
    assert cfg["pretrain"]["amp"] is False


def test_user_data_requires_sources():
    with pytest.raises(MakError, match="data.seed"):
        load_config(None, ["select.budget=5"])


def test_robust_select_stage_is_keyed_on_its_effective_settings(tmp_path):
    # a new robust default must re-run the stage: the key holds the resolved settings, not just the overrides
    from mak.run.plan import build_plan
    from mak.selection.robust import DEFAULTS

    def key(*extra):
        cfg = load_config(None, TINY + ["select.strategies=[robust,mak]", *extra])
        plan = build_plan(cfg, tmp_path / "run")
        return {n: plan.repeats[0]["select"][n].key for n in ("robust", "mak")}

    base = key()
    same = key(f"select.options={{gate_quantile: {DEFAULTS['gate_quantile']}}}")
    other = key("select.options={gate_quantile: 0.5}")
    assert base["robust"] == same["robust"] != other["robust"]
    assert base["mak"] == other["mak"]  # a strategy's key holds only its own options
    with pytest.raises(MakError, match=r"^config: select\.options\.gate_quantile=2 must be"):
        key("select.options={gate_quantile: 2}")  # validated when the plan is made, before any work
    with pytest.raises(MakError, match="select.options.gate_quantil is not an option of robust, mak"):
        key("select.options={gate_quantil: 0.5}")


def test_a_bumped_behaviour_version_re_runs_that_stage_and_what_reads_it(tmp_path, monkeypatch):
    from mak.run.plan import build_plan
    from mak.run.stage import STAGE_VERSIONS
    from mak.selection.strategies import STRATEGY_VERSIONS

    def keys():
        cfg = load_config(None, TINY + ["select.strategies=[robust,mak]"])
        return {s.name: s.key for s in build_plan(cfg, tmp_path / "run").stages}

    base = keys()
    current = STRATEGY_VERSIONS.get("robust", 1)
    monkeypatch.setitem(STRATEGY_VERSIONS, "robust", current + 1)  # robust picks differently: its chain re-runs
    assert {n for n, k in keys().items() if k != base[n]} == {"select/r0/robust", "retrain/r0/robust",
                                                              "eval/r0/robust"}
    monkeypatch.setitem(STRATEGY_VERSIONS, "robust", current)
    assert keys() == base
    monkeypatch.delitem(STRATEGY_VERSIONS, "robust")
    without = keys()
    monkeypatch.setitem(STRATEGY_VERSIONS, "robust", 1)
    assert keys() == without  # version 1 adds nothing to the key
    monkeypatch.setitem(STRATEGY_VERSIONS, "robust", current)
    monkeypatch.setitem(STAGE_VERSIONS, "embed-pool", 2)  # the seed-only model's pool store
    changed = {n for n, k in keys().items() if k != base[n]}
    assert "embed-pool/r0" in changed and "select/r0/mak" in changed and "eval/r0/none" not in changed
    assert not any(n.endswith("-mix/r0") or n.endswith("/robust") for n in changed)


def test_robust_scores_with_the_pool_aware_model_and_mak_with_the_seed_model(tmp_path):
    from mak.run.plan import build_plan

    def plan_of(*extra):
        return build_plan(load_config(None, TINY + ["select.strategies=[robust,mak,random]", *extra]), tmp_path / "r")

    plan = plan_of()
    names = {s.name for s in plan.stages}
    assert {"pretrain-mix/r0", "embed-seed-mix/r0", "embed-pool-mix/r0"} <= names
    assert "ecle-mix/r0" not in names  # robust's default tail needs no views, so no ECLE on the mixed model
    roles = plan.repeats[0]
    deps = {n: {d.name for d in roles["select"][n].deps} for n in ("robust", "mak", "random")}
    assert deps["robust"] == {"embed-seed-mix/r0", "embed-pool-mix/r0"}
    assert deps["mak"] == {"embed-seed/r0", "embed-pool/r0", "ecle/r0"}  # the paper's model, unchanged
    by = {s.name: s for s in plan.stages}
    assert by["embed-pool-mix/r0"].params["views"] == 0 and by["embed-pool/r0"].params["views"] == 2
    assert by["pretrain-mix/r0"].params["pool_mix"] == "auto" and "pool_mix" not in by["pretrain/r0"].params
    # the seed-only stages do not depend on pool_mix: changing it re-runs only the mixed chain and robust
    other = plan_of("pretrain.pool_mix=100")
    changed = {s.name for s in other.stages if s.key != by[s.name].key}
    assert changed == {"pretrain-mix/r0", "embed-seed-mix/r0", "embed-pool-mix/r0", "select/r0/robust",
                       "retrain/r0/robust", "eval/r0/robust"}
    shorter = plan_of("pretrain.pool_mix_epochs=3")
    changed = {s.name for s in shorter.stages if s.key != by[s.name].key}
    assert "pretrain/r0" not in changed and "pretrain-mix/r0" in changed
    assert {s.name: s for s in shorter.stages}["pretrain-mix/r0"].params["epochs"] == 3
    with pytest.raises(MakError, match="pool_mix_epochs"):
        plan_of("pretrain.pool_mix_epochs=0")
    off = plan_of("pretrain.pool_mix=0")
    assert not any("mix" in s.name for s in off.stages)
    assert {d.name for d in off.repeats[0]["select"]["robust"].deps} == {"embed-seed/r0", "embed-pool/r0"}
    with_ecle = plan_of("select.options={tail: ecle}")
    assert {d.name for d in with_ecle.repeats[0]["select"]["robust"].deps} == {
        "embed-seed-mix/r0", "embed-pool-mix/r0", "ecle-mix/r0"}
    with pytest.raises(MakError, match="pool_mix"):
        plan_of("pretrain.pool_mix=-3")


@pytest.mark.parametrize("extra, evaluates", [([], True), (["retrain.enabled=false"], False),
                                             (["retrain.enabled=no"], False)])
def test_a_run_without_evaluation_stops_after_selection(tmp_path, extra, evaluates):
    from mak.run.plan import build_plan

    kinds = {st.name.split("/")[0] for st in build_plan(load_config(None, TINY + extra), tmp_path).stages}
    assert ({"retrain", "eval"} <= kinds) == evaluates and "select" in kinds
    user = ["data.seed.split=seed.txt", "data.pool.split=pool.txt", "select.budget=5"]
    kinds = {st.name.split("/")[0] for st in build_plan(load_config(None, user), tmp_path).stages}
    assert "retrain" not in kinds and "select" in kinds  # user data without data.eval splits
    with pytest.raises(MakError, match="retrain.enabled"):
        load_config(None, TINY + ["retrain.enabled=maybe"])


@pytest.mark.parametrize("config", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_dry_run_every_config(cli, config, tmp_path, capsys):
    assert cli("run", config, "--dry-run", "--out", tmp_path / "run") == 0
    out = capsys.readouterr().out
    assert "pretrain/r0" in out and "to run" in out
    assert not (tmp_path / "run").exists()


def test_run_names_a_bad_strategy_option_by_its_config_key(cli, tmp_path, capsys):
    config = REPO / "configs" / "openworld.yaml"
    assert cli("run", config, "--dry-run", "--set", "select.options.gate_quantile=2", "--out", tmp_path / "run") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mak run: error: config: select.options.gate_quantile=2 must be") and "--" not in err


@pytest.mark.parametrize("assignment, message", [
    ("evaluate.many=0", "evaluate.many=0 must be an integer >= 1"),
    ("evaluate.few=2.5", "evaluate.few=2.5 must be an integer >= 0"),
    ("embed.views=1", "embed.views=1 must be 0 (no views) or an integer >= 2"),
    ("pretrain.image_size=4", "pretrain.image_size=4 must be an integer >= 8 or null"),
    ("run.device=tpu", "run.device='tpu' must be auto, cpu, cuda or cuda:N"),
    ("pretrain.backbone=resnet99", "pretrain.backbone='resnet99' is not a backbone (choose from smallconv, "
                                   "smallconv-wide, resnet18, resnet18-small, resnet50, torchvision:NAME or timm:NAME) "
                                   "or null"),
    ("embed.views=0", "embed.views=0 but strategy 'mak' needs the pool's augmented views (set embed.views to 2 or "
                      "more, or leave it out of select.strategies)"),
])
def test_run_names_a_bad_declared_key_by_its_config_key(cli, tmp_path, capsys, assignment, message):
    """pretrain, embed and evaluate keys are checked by the flags' declarations, named as config keys."""
    config = REPO / "configs" / "openworld.yaml"
    assert cli("run", config, "--dry-run", "--set", assignment, "--out", tmp_path / "run") == 2
    err = capsys.readouterr().err.strip()
    assert err == f"mak run: error: config: {message}"


def test_no_views_suits_the_strategies_that_read_features_only():
    base = ["data.benchmark.build=true", "embed.views=0"]
    assert load_config(None, [*base, "select.strategies=[robust,random,kcenter,proximity]"])["embed"]["views"] == 0
    with pytest.raises(MakError, match="^config: embed.views=0 but strategy 'robust' needs"):  # its ECLE tail does
        load_config(None, [*base, "select.strategies=[random,robust]", "select.options={tail: ecle}"])


def ran(plan) -> set[str]:
    return {s.name for s in plan.stages if s.ran}


@needs_fmnist
def test_run_caches_and_reruns_only_what_changed(tmp_path, capsys, monkeypatch):
    from mak.run.pipeline import run_pipeline

    run_dir = tmp_path / "run"
    first = run_pipeline(load_config(None, TINY), run_dir)
    assert ran(first) == {s.name for s in first.stages}
    results = json.loads((run_dir / "results.json").read_text())["results"]
    assert [r["strategy"] for r in results] == ["none", "mak", "random"]
    for r in results:
        assert {"ood_rate", "few_share", "fullshot_acc", "fewshot_acc", "knn_acc", "group_acc", "group_std"} <= set(r)
        assert 0.0 <= r["knn_acc"] <= 1.0 and set(r["group_acc"]) == {"many", "medium", "few"}
    assert results[0]["ood_rate"] is None and 0.0 <= results[1]["ood_rate"] <= 1.0
    assert "(retrain.match: epochs), so seed + pick takes more optimizer steps" in \
        (run_dir / "report.html").read_text(encoding="utf-8")  # what the gains over the seed alone compare

    # debris of killed runs beside cached and re-run stages alike: removed by the next run (it holds the lock)
    debris = [run_dir / "r0" / ".bench.1234.tmp", run_dir / "r0" / "select" / ".mak.99.tmp",
              run_dir / "r0" / "retrain" / ".none.7.old"]
    debris[0].mkdir()
    (debris[0] / "seed.txt").write_text("half a benchmark")
    debris[1].write_text("half a selection")
    debris[2].mkdir()
    again = run_pipeline(load_config(None, TINY), run_dir)
    assert ran(again) == set()
    assert not any(d.exists() for d in debris)

    report_before = (run_dir / "report.html").stat().st_mtime_ns
    changed = run_pipeline(load_config(None, TINY + ["select.budget=20"]), run_dir)
    assert ran(changed) == {"select/r0/mak", "select/r0/random", "retrain/r0/mak", "retrain/r0/random",
                            "eval/r0/mak", "eval/r0/random"}
    assert (run_dir / "report.html").stat().st_mtime_ns != report_before
    assert len((run_dir / "r0/select/mak/selection.txt").read_text().splitlines()) == 20

    capsys.readouterr()
    run_pipeline(load_config(None, TINY + ["select.budget=20"]), run_dir, dry_run=True)
    assert "0 to run" in capsys.readouterr().out
    from mak.cli import main

    sets = [a for o in TINY + ["select.budget=20"] for a in ("--set", o)]
    assert main(["run", "--out", str(run_dir), *sets, "-q"]) == 0
    assert capsys.readouterr() == ("", "")  # cached, and quiet: nothing
    assert main(["run", "--out", str(run_dir), *sets, "-q", "--dry-run"]) == 0
    assert "0 to run" in capsys.readouterr().out  # the plan is what --dry-run asks for

    # a run stopped while stages change leaves no report describing the stages before it
    from mak.run import plan as plan_module

    def stopped(stage):
        raise KeyboardInterrupt

    monkeypatch.setattr(plan_module, "run_select", stopped)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(load_config(None, TINY + ["select.budget=15"]), run_dir)
    assert not (run_dir / "report.html").exists() and not (run_dir / "results.json").exists()
    monkeypatch.undo()

    # the stopped change lost nothing: budget 20's selection was kept as the previous output and is
    # swapped back in; going back to the first settings reuses what they made before the changes
    logged: list[str] = []
    back20 = run_pipeline(load_config(None, TINY + ["select.budget=20"]), run_dir, log=logged.append)
    assert ran(back20) == set() and "[mak run] select/r0/mak: cached (its previous output, swapped back in)" in logged
    assert len((run_dir / "r0/select/mak/selection.txt").read_text().splitlines()) == 20
    back = run_pipeline(load_config(None, TINY), run_dir)
    assert ran(back) == {"select/r0/mak"}  # its first output gave way to budget 20's, which gave way to 15's attempt
    assert json.loads((run_dir / "results.json").read_text())["results"] == results


def _sets(overrides: list[str]) -> list[str]:
    return [a for kv in overrides for a in ("--set", kv)]


@needs_fmnist
def test_run_under_torchrun_matches_one_process(tmp_path):
    """`mak run` under torchrun (2 CPU ranks): a whole run, stage records that one process takes as
    cached, and ECLE and selections byte-identical to one process's on the same feature stores."""
    from mak.run.pipeline import run_pipeline

    cfg = TINY + ["select.strategies=[robust,mak,random]"]
    run_dir = tmp_path / "run"
    res = torchrun(2, "run", "--out", run_dir, *_sets(cfg))
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((run_dir / "results.json").read_text())["results"][0]["strategy"] == "none"
    assert (run_dir / "report.html").is_file() and not list(run_dir.rglob(".pending.json"))
    assert res.stdout.count("[mak run] select/r0/robust ...") == 1  # rank 0 alone reports progress
    assert ran(run_pipeline(load_config(None, cfg), run_dir)) == set()
    dry = torchrun(2, "run", "--out", run_dir, "--dry-run", *_sets(cfg))
    assert dry.returncode == 0 and dry.stdout.count("0 to run") == 1, dry.stdout + dry.stderr[-2000:]

    one = tmp_path / "one"
    shutil.copytree(run_dir, one)
    shutil.rmtree(one / "r0" / "select")
    shutil.rmtree(one / "r0" / "ecle")
    plan = run_pipeline(load_config(None, cfg), one)
    assert ran(plan) == {"ecle/r0", "select/r0/robust", "select/r0/mak", "select/r0/random"}  # same keys after
    assert (one / "r0/ecle/ecle.npy").read_bytes() == (run_dir / "r0/ecle/ecle.npy").read_bytes()
    for strategy in ("robust", "mak", "random"):
        for name in ("selection.txt", "scores.csv", "analysis.json"):
            assert (one / "r0/select" / strategy / name).read_bytes() == \
                (run_dir / "r0/select" / strategy / name).read_bytes(), (strategy, name)


@needs_fmnist
def test_run_under_torchrun_stops_every_rank_on_a_rank0_error(tmp_path):
    res = torchrun(2, "run", "--out", tmp_path / "run", *_sets(TINY + ["data.benchmark.data_dir=/nonexistent"]),
                   timeout=120)
    assert res.returncode != 0
    assert "mak run: error: bench/r0 failed on rank 0: Fashion-MNIST not found in /nonexistent" in res.stderr
    assert "[rank1]: Traceback" not in res.stderr and "[rank0]: Traceback" not in res.stderr
    assert not (tmp_path / "run/r0/bench/.stage.json").exists()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not __import__("torch").cuda.is_available(), reason="needs a CUDA device"))])
def test_run_under_torchrun_on_image_folders(tmp_path, monkeypatch, device):
    """`mak run` on the user's own image folders (no labels, no evaluation splits) with 2 ranks; on
    CUDA the two ranks share one GPU over gloo. The selection equals one process's on the same stores."""
    from PIL import Image

    from mak.run.pipeline import run_pipeline

    rng = np.random.default_rng(3)
    for part, n in (("seed", 40), ("pool", 120)):
        (tmp_path / part).mkdir()
        for i in range(n):
            img = (rng.random((28, 28)) * (60 + 190 * (i % 3 == 0))).astype(np.uint8)
            Image.fromarray(img).save(tmp_path / part / f"{i:03d}.png")
    cfg = [f"data.seed.folder={tmp_path / 'seed'}", f"data.pool.folder={tmp_path / 'pool'}", f"run.device={device}",
           "pretrain.epochs=1", "pretrain.batch_size=32", "pretrain.workers=0", "embed.views=2",
           "embed.batch_size=64", "select.budget=15", "select.strategies=[robust,mak]", "select.partitions=1",
           "select.ecle_batch_size=32", "run.name=folders"]
    monkeypatch.setenv("MAK_DIST_BACKEND", "gloo")
    res = torchrun(2, "run", "--out", tmp_path / "run", *_sets(cfg))
    assert res.returncode == 0, res.stderr[-3000:]
    results = json.loads((tmp_path / "run/results.json").read_text())["results"]
    assert [r["strategy"] for r in results] == ["robust", "mak"]  # no labels: a select-only run
    assert not (tmp_path / "run/r0/retrain").exists() and not (tmp_path / "run/r0/eval").exists()
    assert "Nothing to compare" in (tmp_path / "run/report.html").read_text()
    picked = (tmp_path / "run/r0/select/robust/selection.txt").read_text().splitlines()
    assert len(picked) == 15 == len(set(picked))
    shutil.copytree(tmp_path / "run", tmp_path / "one")
    shutil.rmtree(tmp_path / "one/r0/select")
    assert ran(run_pipeline(load_config(None, cfg), tmp_path / "one")) == {"select/r0/robust", "select/r0/mak"}
    for strategy in ("robust", "mak"):
        assert (tmp_path / "one/r0/select" / strategy / "selection.txt").read_bytes() == \
            (tmp_path / "run/r0/select" / strategy / "selection.txt").read_bytes()


@needs_fmnist
def test_selection_never_reads_labels(tmp_path):
    """Stripping the labels from the pool's split file must not change the selection."""
    from mak.data.sources import open_source
    from mak.train.embed import embed
    from mak.bench.openworld import build_benchmark
    from mak.train.pretrain import pretrain
    from mak.run.select_job import select_stores

    bench = tmp_path / "b"
    build_benchmark(bench, seed=1, scale=0.02)
    unlabeled = tmp_path / "b" / "pool_nolabels.txt"
    unlabeled.write_text("".join(line.split()[0] + "\n" for line in (bench / "pool.txt").read_text().splitlines()))
    ckpt = pretrain(open_source("split", bench / "seed.txt", root=bench), tmp_path / "pre", epochs=1, batch_size=32,
                    progress=False)
    seed_store = embed(open_source("split", bench / "seed.txt", root=bench), ckpt, tmp_path / "es", views=0,
                       progress=False)
    picks = []
    for name, split in (("lab", bench / "pool.txt"), ("nolab", unlabeled)):
        store = embed(open_source("split", split, root=bench), ckpt, tmp_path / f"ep-{name}", views=2, progress=False)
        sel = select_stores(seed_store, store, tmp_path / f"sel-{name}", 10, strategy="mak", batch_size=64,
                            partitions=1, progress=False)
        picks.append(sel.indices.tolist())
    assert picks[0] == picks[1]


@needs_fmnist
def test_demo_smallest_scale(cli, tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli("demo", "--out", out, "--scale", "0.02", "--epochs", "1", "--set", "embed.views=2",
               "--set", "select.partitions=1", "--set", "evaluate.draws=2") == 0
    printed = capsys.readouterr().out
    assert str(out / "report.html") in printed
    html = (out / "report.html").read_text()
    assert "robust" in html and "random" in html and "http://" not in html
    results = json.loads((out / "results.json").read_text())["results"]
    assert {r["strategy"] for r in results} == {"none", "robust", "mak", "random"}
    assert "pool-aware model" in html and "pretrain (seed + pool sample)" in html
    mixed = json.loads((out / "r0" / "pretrain-mix" / "train_set.json").read_text())
    n_seed = len((out / "r0" / "bench" / "seed.txt").read_text().splitlines())
    n_pool = len((out / "r0" / "bench" / "pool.txt").read_text().splitlines())
    assert mixed == {"seed": n_seed, "pool_rows": min(n_pool, 8 * n_seed), "images": n_seed + min(n_pool, 8 * n_seed),
                     "pool_skipped": 0, "skipped_items": []}
    assert not (out / "r0" / "embed-pool-mix" / "views.npy").exists()  # robust's default needs no views


BENCH_BASE = ["data.benchmark.build=true", "data.benchmark.scale=0.02"]


def bench_stage(run_dir, *extra):
    """The benchmark stage of a plan for the benchmark at scale 0.02 with ``extra`` settings."""
    from mak.run.plan import build_plan

    plan = build_plan(load_config(None, [*BENCH_BASE, *extra]), run_dir)
    return next(st for st in plan.stages if st.name.startswith("bench/"))


def test_benchmark_ood_ratio_is_keyed_only_when_set(tmp_path):
    """A half-junk run keeps its cached stages; another junk ratio is a new benchmark, passed to the builder."""
    from mak.run.plan import build_plan

    base = BENCH_BASE
    default = bench_stage(tmp_path)
    assert "ood_ratio" not in default.params
    assert bench_stage(tmp_path, "data.benchmark.ood_ratio=1").key == default.key
    four = bench_stage(tmp_path, "data.benchmark.ood_ratio=4")
    assert four.params["ood_ratio"] == 4.0 and four.key != default.key
    # every stage downstream of the benchmark moves with it
    plan1 = build_plan(load_config(None, base), tmp_path)
    plan4 = build_plan(load_config(None, [*base, "data.benchmark.ood_ratio=4"]), tmp_path)
    assert all(a.key != b.key for a, b in zip(plan1.stages, plan4.stages))
    for bad in ("-2", "x", "true"):
        with pytest.raises(MakError, match=r"data.benchmark.ood_ratio=.* must be a number >= 0"):
            load_config(None, [*base, f"data.benchmark.ood_ratio={bad}"])


def test_one_set_of_training_defaults():
    """mak run's config, the flags of mak pretrain, embed and evaluate and the API share their defaults."""
    import inspect

    from mak.cli import build_parser
    from mak.train.embed import embed
    from mak.train.pretrain import pretrain

    cfg = load_config(None, ["data.benchmark.build=true"])
    sig = inspect.signature(pretrain).parameters
    assert cfg["pretrain"]["epochs"] == sig["epochs"].default == 100
    assert cfg["pretrain"]["lr"] == sig["base_lr"].default == 0.5
    pre = build_parser("pretrain").parse_args(["pretrain", "--split", "s.txt", "--out", "o"])
    assert (pre.epochs, pre.lr) == (100, 0.5)
    emb = build_parser("embed").parse_args(["embed", "--split", "s.txt", "--checkpoint", "c", "--out", "o"])
    assert emb.batch_size == cfg["embed"]["batch_size"] == cfg["evaluate"]["batch_size"] == \
        inspect.signature(embed).parameters["batch_size"].default
    emb_sig = inspect.signature(embed).parameters
    assert (emb.views, emb.dtype) == (cfg["embed"]["views"], cfg["embed"]["dtype"]) == \
        (emb_sig["views"].default, emb_sig["dtype"].default) == (10, "float16")
    from mak.bench.evaluate import evaluate_checkpoint

    ev = build_parser("evaluate").parse_args(["evaluate", "--checkpoint", "c", "--bench", "b"])
    ev_sig = inspect.signature(evaluate_checkpoint).parameters
    assert (ev.shots, ev.draws, ev.k) == (cfg["evaluate"]["shots"], cfg["evaluate"]["draws"],
                                          cfg["evaluate"]["knn_k"]) == \
        (ev_sig["shots"].default, ev_sig["draws"].default, ev_sig["k"].default) == (10, 5, 20)


def test_every_declared_option_is_one_flag_one_config_key_one_api_default():
    """Each option of PRETRAIN_OPTIONS, EMBED_OPTIONS and EVALUATE_OPTIONS: its flag is built from the
    declaration (its parser, its default), the config key declared with it takes its default (unless the
    config has its own on purpose) and its parser, and the API function's default is the declared one."""
    import inspect

    from mak.bench.evaluate import EVALUATE_OPTIONS, evaluate_checkpoint
    from mak.cli import build_parser
    from mak.data.sources import pool_mix
    from mak.run.config import DECLARED, DEFAULTS
    from mak.train.embed import EMBED_OPTIONS, embed
    from mak.train.pretrain import PRETRAIN_OPTIONS, pretrain

    def api(function):
        return {k: p.default for k, p in inspect.signature(function).parameters.items()}

    image_size = next(o for o in PRETRAIN_OPTIONS if o.name == "image_size")  # embed's --image-size too
    commands = [  # command, its minimal arguments, its declared flags, the API defaults they must equal
        ("pretrain", ["--split", "s.txt", "--out", "o"], PRETRAIN_OPTIONS,
         {**api(pretrain), "mix_count": api(pool_mix)["count"]}),
        ("embed", ["--split", "s.txt", "--checkpoint", "c", "--out", "o"], (*EMBED_OPTIONS, image_size),
         {**api(embed), "image_size": None}),
        ("evaluate", ["--checkpoint", "c", "--bench", "b"], EVALUATE_OPTIONS, api(evaluate_checkpoint)),
    ]
    for command, argv, declared, defaults in commands:
        parser = build_parser(command)
        sub = next(a for a in parser._actions if a.dest == "command").choices[command]
        args = parser.parse_args([command, *argv])
        for o in declared:
            action = next(a for a in sub._actions if o.flag in a.option_strings)
            assert action.type.__name__ == o.name, f"mak {command} {o.flag} is not built from its declaration"
            assert action.default == getattr(args, o.key or o.name) == o.default == defaults[o.name], (command, o.name)
            if o.default is not None:  # the parser takes its own default, as a value and as text
                assert o.parse(o.name, o.default) == o.default == o.parse(o.name, str(o.default))
    own = {"pretrain.batch_size": 256, "evaluate.many": 300, "evaluate.few": 30}  # the config's own, on purpose
    cfg = load_config(None, ["data.benchmark.build=true"])
    for key, o in DECLARED.items():
        section, leaf = key.split(".")
        assert any(o in declared for _, _, declared, _ in commands), key
        assert DEFAULTS[section][leaf] == cfg[section][leaf] == own.get(key, o.default), key


@pytest.mark.parametrize("key, value, message", [
    ("evaluate.many", "0", "evaluate.many=0 must be an integer >= 1"),
    ("evaluate.many", "2.5", "evaluate.many=2.5 must be an integer >= 1"),
    ("evaluate.few", "2.5", "evaluate.few=2.5 must be an integer >= 0"),
    ("evaluate.knn_k", "0", "evaluate.knn_k=0 must be an integer >= 1"),
    ("embed.views", "1", "embed.views=1 must be 0 (no views) or an integer >= 2"),
    ("embed.dtype", "float64", "embed.dtype='float64' must be one of: float16, float32"),
    ("pretrain.image_size", "4", "pretrain.image_size=4 must be an integer >= 8 or null"),
    ("pretrain.lr", "0", "pretrain.lr=0 must be a number > 0"),
    ("pretrain.workers", "-1", "pretrain.workers=-1 must be an integer >= 0 or null"),
])
def test_a_declared_config_key_is_checked_by_its_declaration(key, value, message):
    with pytest.raises(MakError) as exc:
        load_config(None, TINY + [f"{key}={value}"])
    assert str(exc.value) == f"config: {message}"


@pytest.mark.parametrize("key, value, expected", [
    ("evaluate.shots", "null", None), ("evaluate.few", "0", 0), ("pretrain.image_size", "8", 8),
    ("pretrain.pool_mix", "auto", "auto"), ("pretrain.warmup_epochs", "null", None), ("embed.views", "0", 0),
])
def test_a_declared_config_key_takes_what_its_declaration_takes(key, value, expected):
    section, leaf = key.split(".")
    assert load_config(None, TINY + [f"{key}={value}", "select.strategies=[random]"])[section][leaf] == expected


def test_benchmark_classes_are_keyed_only_when_they_change_the_pool(tmp_path):
    """The default pool keeps its key; equal class settings share one; others reach the builder."""
    default = bench_stage(tmp_path)
    assert "pool_classes" not in default.params and "near_classes" not in default.params
    assert bench_stage(tmp_path, "data.benchmark.near_classes=0").key == default.key
    near = bench_stage(tmp_path, "data.benchmark.near_classes=2")
    assert near.params["near_classes"] == 2 and near.key != default.key
    disjoint = bench_stage(tmp_path, "data.benchmark.pool_classes=disjoint")
    assert disjoint.params == {**default.params, "pool_classes": "disjoint", "near_classes": 4}
    assert bench_stage(tmp_path, "data.benchmark.pool_classes=disjoint", "data.benchmark.near_classes=4").key == disjoint.key
    for extra, named in ((["data.benchmark.pool_classes=other"], "data.benchmark.pool_classes"),
                         (["data.benchmark.near_classes=9"], "data.benchmark.near_classes"),
                         (["data.benchmark.pool_classes=disjoint", "data.benchmark.near_classes=0"],
                          "data.benchmark.near_classes")):
        with pytest.raises(MakError, match=named):
            load_config(None, [*BENCH_BASE, *extra])
