"""``mak run``: the whole MAK loop as cached stages in one run directory.

pretrain on the seed -> embed seed and pool -> select (one or several strategies) -> re-train from
scratch on seed + each selection (and on the seed alone: "none") -> evaluate -> results + report.

Every stage writes into its own directory of the run and records a *key*: a hash of its
parameters, of the behaviour version of its code (:data:`STAGE_VERSIONS`, and for a selection the
strategy's :data:`mak.selection.strategies.STRATEGY_VERSIONS`) and of the keys of the stages it reads. A stage
whose recorded key matches is skipped; a changed parameter or version changes the keys of that
stage and of everything downstream only. A stage interrupted half-way resumes (pretrain and embed
pick up their own checkpoints).

Under ``torchrun`` (``torchrun --nproc_per_node G -m mak run ...``; several nodes need a shared run
directory) the stages that split their work across ranks run on every rank: pre-training and
re-training (DDP), embedding (one shard per rank, published as one store), ECLE (each rank scores
a share of the batches; the exact sums add up to one process's values) and selection (the scaled
job of :mod:`mak.run.select_job`). The others (benchmark build, evaluation, results and
report) run on rank 0 while the other ranks wait. Rank 0 alone decides what is cached
and writes the stage records, so the finished stages of a run under torchrun are reused by one
process and vice versa (the stage keys do not depend on the number of processes).

Layout (repeat r uses seed ``run.seed + r``)::

    RUN/config.yaml            resolved config        RUN/results.json   RUN/report.html
    RUN/rR/bench/              built benchmark (if data.benchmark.build)
    RUN/rR/pretrain/           checkpoint.pt, log.csv
    RUN/rR/embed-seed/ embed-pool/     feature stores
    RUN/rR/select/STRATEGY/    selection.txt, scores.csv, summary.json, analysis.json
    RUN/rR/retrain/STRATEGY/   checkpoint.pt, log.csv ("none" = the seed alone)
    RUN/rR/eval/STRATEGY/      eval.json
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mak import distributed as D
from mak.atomic import atomic_path, move_entries, remove_debris, write_json, write_npy, write_text
from mak._tensor import auto_device, is_auto
from mak.data.sources import CombinedSource, pool_mix
from mak.data.store import item_file_lines
from mak.errors import MakError
from mak.lock import job_lock
from mak.paths import output_dir
from mak.run.stats import interval95, paired_gains

STAMP = ".stage.json"
# Stage kinds whose function runs on every rank under torchrun: they split the work themselves.
DISTRIBUTED_KINDS = ("pretrain", "pretrain-mix", "retrain", "embed-seed", "embed-pool", "embed-seed-mix",
                     "embed-pool-mix", "ecle", "ecle-mix", "select")


# ----------------------------------------------------------------------------- sources
def _source_from(spec: dict, what: str):
    from mak.data.sources import open_source

    if spec.get("split"):
        return open_source("split", spec["split"], root=spec.get("root"))
    if spec.get("folder"):
        return open_source("folder", spec["folder"])
    if spec.get("webdataset"):
        return open_source("webdataset", spec["webdataset"])
    raise MakError(f"config: data.{what} needs a split, a folder or (the pool) webdataset shards")


def pool_rows_for_items(pool_source, selected_items: list[str]) -> np.ndarray:
    """Map selection.txt lines back to rows of the pool source (first occurrence of each line)."""
    where: dict[str, int] = {}
    for i in range(len(pool_source)):
        where.setdefault(pool_source.item(i), i)
    try:
        return np.array([where[it] for it in selected_items], dtype=np.int64)
    except KeyError as exc:
        raise MakError(f"selected item {exc.args[0]!r} is not in the pool source") from None


def labels_or_none(items: list[str]) -> np.ndarray | None:
    """Integer labels from split-file lines (last token), or None when the items carry none."""
    from mak.bench.analysis import labels_from_items

    try:
        return labels_from_items(items)
    except MakError:
        return None


# ----------------------------------------------------------------------------- stages
#: Behaviour version of each kind of stage, part of its cache key: a stage whose code gives other
#: outputs for the same parameters has a higher version, so its cached results (and those of the
#: stages that read it) are not reused. Version 1 adds nothing to the key.
STAGE_VERSIONS: dict[str, int] = {"bench": 1, "pretrain": 1, "pretrain-mix": 1, "embed-seed": 1, "embed-pool": 1,
                                  "embed-seed-mix": 1, "embed-pool-mix": 1, "ecle": 2, "ecle-mix": 2, "select": 1,
                                  "retrain": 1, "eval": 1}


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

    def cached(self) -> bool:
        stamp = self.path / STAMP
        if not stamp.is_file():
            return False
        try:
            done = json.loads(stamp.read_text(encoding="utf-8"))
        except ValueError:
            return False
        return done.get("key") == self.key and all((self.path / o).exists() for o in self.outputs)

    def status(self) -> str:
        if self.cached():
            return "cached"
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
        pend = self.path / ".pending.json"
        return pend.is_file() and json.loads(pend.read_text(encoding="utf-8")).get("key") == self.key

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
            if self.path.exists() and not self.resumable():
                shutil.rmtree(self.path)
            self.path.mkdir(parents=True, exist_ok=True)
            write_json(self.path / ".pending.json", {"key": self.key})
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
            (self.path / ".pending.json").unlink(missing_ok=True)
        self.ran = True


@dataclass
class Plan:
    run_dir: Path
    config: dict
    stages: list[Stage] = field(default_factory=list)
    repeats: list[dict] = field(default_factory=list)  # per repeat: stage handles by role
    progress: bool = True  # progress bars in the stages (mak run --quiet: none)

    def add(self, stage: Stage) -> Stage:
        self.stages.append(stage)
        return stage


def build_plan(config: dict, run_dir: str | Path) -> Plan:
    """Lay out every stage of the run (nothing is executed)."""
    run_dir = Path(run_dir)
    plan = Plan(run_dir, config)
    device = str(config["run"]["device"])
    if is_auto(device):  # resolved here, so stage keys name the real device
        device = str(auto_device(device))
    for r in range(int(config["run"]["repeats"])):
        plan.repeats.append(_plan_repeat(plan, config, r, device))
    for st in plan.stages:
        st.plan = plan  # type: ignore[attr-defined]
    return plan


def _plan_repeat(plan: Plan, config: dict, r: int, device: str) -> dict[str, Any]:
    """Add the stages of repeat ``r`` to ``plan``; returns its roles (stage by role, for reports)."""
    seed = int(config["run"]["seed"]) + r
    base = plan.run_dir / f"r{r}"
    roles: dict[str, Any] = {"seed": seed, "select": {}, "retrain": {}, "eval": {}}
    deps, data_params = _plan_data(plan, config, r, base, roles)
    roles["data"] = data_params
    pp = {**_seed_model(config["pretrain"]), "seed": seed, "device": device, "data": data_params}
    pretrain = plan.add(Stage(f"pretrain/r{r}", base / "pretrain", pp, deps, _run_pretrain, ("checkpoint.pt",)))
    sel = config["select"]
    sp = {k: v for k, v in sel.items() if k != "strategies"}
    opts_of = own_options(sel["strategies"], sp.get("options") or {})
    inputs = _plan_scoring(plan, config, r, base, roles, (deps, pp, pretrain), opts_of, device)
    roles["inputs"] = inputs
    for strategy in sel["strategies"]:
        eseed, epool, ecle_stage = inputs[strategy]
        roles["select"][strategy] = plan.add(Stage(
            f"select/r{r}/{strategy}", base / "select" / strategy,
            {**sp, "options": opts_of[strategy], "strategy": strategy, "seed": seed, "device": device},
            [eseed, epool, *([ecle_stage] if ecle_stage is not None else [])], _run_select,
            ("selection.txt", "summary.json")))
    if evaluates(config):  # else a select-only run: no re-training, no evaluation
        _plan_retrain(plan, config, r, base, roles, deps, pp)
    return roles


def _seed_model(pre: dict) -> dict:
    """The pretrain parameters of the seed-only model (without the pool-aware model's)."""
    return {k: v for k, v in pre.items() if k not in ("pool_mix", "pool_mix_epochs")}


def _plan_data(plan: Plan, config: dict, r: int, base: Path, roles: dict) -> tuple[list[Stage], dict]:
    """The benchmark stage of repeat ``r`` (when the run builds one) or the user's data: the stages
    every training depends on and the data's part of their keys."""
    data = config["data"]
    if not data["benchmark"]["build"]:
        data_params = {k: data[k] for k in ("seed", "pool", "eval")}
        data_params["fingerprint"] = _user_data_fingerprint(data)
        return [], data_params
    b = data["benchmark"]
    bseed = (b["seed"] if b["seed"] is not None else int(config["run"]["seed"])) + (r if b["vary_with_repeat"] else 0)
    bp = {"seed": bseed, "scale": b["scale"], "data_dir": b["data_dir"]}
    if float(b["ood_ratio"]) != 1.0:  # keyed only when set, so half-junk runs keep their cache
        bp["ood_ratio"] = float(b["ood_ratio"])
    bp.update(_class_params(b["pool_classes"], b["near_classes"]))
    bench = plan.add(Stage(f"bench/r{r}", base / "bench", bp, [], _run_bench,
                           ("benchmark.json", "seed.txt", "pool.txt")))
    roles["bench"] = bench
    return [bench], {"bench": bench.key}


def _plan_scoring(plan: Plan, config: dict, r: int, base: Path, roles: dict, seed_model: tuple,
                  opts_of: dict, device: str) -> dict[str, tuple]:
    """The embedding (and ECLE) stages each strategy reads: ``{strategy: (seed store, pool store,
    ECLE stage or None)}``. Strategies that declare it are scored with the pool-aware model (SimCLR
    on seed + a pool sample) when ``pretrain.pool_mix != 0``; every other one, mak included, with
    the paper's seed-only model."""
    from mak.selection.strategies import POOL_AWARE, strategy_needs

    deps, pp, pretrain = seed_model
    pre, sel = config["pretrain"], config["select"]
    seed = pp["seed"]
    ep = {**config["embed"], "seed": seed, "device": device}
    mix = pre.get("pool_mix", 0)
    mixed = [s for s in sel["strategies"] if s in POOL_AWARE and mix != 0]
    models = {"seed": [s for s in sel["strategies"] if s not in mixed], "mix": mixed}
    inputs: dict[str, tuple] = {}
    for model, users in models.items():
        if model == "seed":
            tag, trained = "", pretrain
        elif users:
            tag = "-mix"
            mp = {**pp, "pool_mix": mix}
            if pre.get("pool_mix_epochs") is not None:
                mp["epochs"] = int(pre["pool_mix_epochs"])
            trained = plan.add(Stage(f"pretrain-mix/r{r}", base / "pretrain-mix", mp, deps, _run_pretrain,
                                     ("checkpoint.pt",)))
            roles["pretrain_mix"] = trained
        else:
            continue
        needs_views = {s: strategy_needs(s, opts_of[s])[1] for s in users}
        eseed, epool, ecle_stage = _plan_embed(plan, sel, r, base, tag, trained, ep, any(needs_views.values()))
        if model == "seed":
            roles.update(pretrain=pretrain, embed_seed=eseed, embed_pool=epool, ecle=ecle_stage)
        for strategy in users:
            inputs[strategy] = (eseed, epool, ecle_stage if needs_views[strategy] else None)
    return inputs


def _plan_embed(plan: Plan, sel: dict, r: int, base: Path, tag: str, trained: Stage, ep: dict,
                with_views: bool) -> tuple[Stage, Stage, Stage | None]:
    """Seed and pool stores embedded with one model, and ECLE over the pool's views when a strategy
    needs it (the costly score: computed once per model and shared by every strategy)."""
    eseed = plan.add(Stage(f"embed-seed{tag}/r{r}", base / f"embed-seed{tag}", {**ep, "part": "seed", "views": 0},
                           [trained], _run_embed, ("features.npy", "items.txt")))
    epool = plan.add(Stage(f"embed-pool{tag}/r{r}", base / f"embed-pool{tag}",
                           {**ep, "part": "pool", **({} if with_views else {"views": 0})},
                           [trained], _run_embed, ("features.npy", "items.txt")))
    if not with_views:
        return eseed, epool, None
    ecle_params = {k: sel[k] for k in ("temperature", "ecle_batch_size", "partitions")} | {
        "seed": ep["seed"], "device": ep["device"]}
    ecle_stage = plan.add(Stage(f"ecle{tag}/r{r}", base / f"ecle{tag}", ecle_params, [epool], _run_ecle,
                                ("ecle.npy",)))
    return eseed, epool, ecle_stage


def _plan_retrain(plan: Plan, config: dict, r: int, base: Path, roles: dict, deps: list[Stage],
                  pp: dict) -> None:
    """Re-training on seed + each pick (and on the seed alone, ``none``) and its evaluation; ``pp``:
    the seed model's pretrain parameters."""
    pre, ret, sel = config["pretrain"], config["retrain"], config["select"]
    epochs = ret["epochs"] if ret["epochs"] is not None else pre["epochs"]
    for strategy in ["none", *sel["strategies"]]:
        src = [roles["select"][strategy]] if strategy != "none" else []
        rp = {**_seed_model(pre), "epochs": epochs, "match": ret["match"], "seed": pp["seed"],
              "device": pp["device"], "data": pp["data"], "strategy": strategy,
              "budget": sel["budget"] if ret["match"] == "steps" else None}
        t = plan.add(Stage(f"retrain/r{r}/{strategy}", base / "retrain" / strategy, rp, [*deps, *src],
                           _run_retrain, ("checkpoint.pt",)))
        roles["retrain"][strategy] = t
        roles["eval"][strategy] = plan.add(Stage(
            f"eval/r{r}/{strategy}", base / "eval" / strategy,
            {**config["evaluate"], "seed": pp["seed"], "device": pp["device"]}, [t, *deps], _run_eval,
            ("eval.json",)))


def evaluates(config: dict) -> bool:
    """Whether the run re-trains and evaluates: ``retrain.enabled`` and labeled evaluation data (the
    benchmark's, or ``data.eval``'s train and test splits). Otherwise it stops after selection."""
    ev = config["data"]["eval"]
    labeled = bool(config["data"]["benchmark"]["build"] or (ev.get("train") and ev.get("test")))
    return bool(config["retrain"]["enabled"]) and labeled


def _user_data_fingerprint(data: dict) -> str:
    h = hashlib.sha256()
    for part in ("seed", "pool", "eval"):
        for k in ("split", "train", "fewshot", "test"):
            f = data[part].get(k)
            if f and Path(f).is_file():
                h.update(Path(f).read_bytes())
            elif f and Path(f).is_dir():  # an ImageFolder split: its files' names and sizes
                for q in sorted(Path(f).rglob("*")):
                    if q.is_file():
                        h.update(f"{q.relative_to(f).as_posix()} {q.stat().st_size}\n".encode())
    if data["pool"].get("webdataset"):  # shards: their names and sizes
        from mak.data.sources import expand_braces

        for shard in expand_braces(str(data["pool"]["webdataset"])):
            size = Path(shard).stat().st_size if Path(shard).is_file() else -1
            h.update(f"{shard} {size}\n".encode())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- stage bodies
def _progress(stage: Stage) -> bool:
    return bool(getattr(stage, "plan").progress)


def _roles(stage: Stage) -> dict:
    plan: Plan = stage.plan  # type: ignore[attr-defined]
    r = int(stage.name.split("/")[1][1:])
    return plan.repeats[r]


def _sources(stage: Stage) -> dict[str, Any]:
    """Seed, pool and eval sources of the stage's repeat (benchmark or user data)."""
    plan: Plan = stage.plan  # type: ignore[attr-defined]
    roles = _roles(stage)
    data = plan.config["data"]
    from mak.data.sources import labeled_source, open_source

    if "bench" in roles:
        bdir = roles["bench"].path
        split = lambda name: open_source("split", bdir / f"{name}.txt", root=bdir)  # noqa: E731
        return {"seed": split("seed"), "pool": split("pool"), "train": split("fullshot"),
                "fewshot": split("fewshot"), "test": split("test"),
                "manifest": json.loads((bdir / "benchmark.json").read_text(encoding="utf-8"))}
    ev = data["eval"]
    out = {"seed": _source_from(data["seed"], "seed"), "pool": _source_from(data["pool"], "pool"), "manifest": None}
    for k in ("train", "fewshot", "test"):
        out[k] = labeled_source(ev[k], root=ev.get("root")) if ev.get(k) else None
    return out


def _class_params(pool_classes: str, near_classes: int | None) -> dict:
    """The benchmark's class settings as stage parameters, keyed only where they differ from the
    default pool (so existing runs keep their cache, and equal settings share one key)."""
    from mak.bench.openworld import near_class_count

    k = near_class_count(pool_classes, near_classes)
    if pool_classes != "all":
        return {"pool_classes": pool_classes, "near_classes": k}
    return {"near_classes": k} if k else {}


def _run_bench(stage: Stage) -> None:
    from mak.bench.openworld import build_benchmark

    p = stage.params
    build_benchmark(stage.path, seed=p["seed"], scale=p["scale"], data_dir=p["data_dir"], overwrite=True,
                    ood_ratio=p.get("ood_ratio", 1.0), pool_classes=p.get("pool_classes", "all"),
                    near_classes=p.get("near_classes"))


def _pretrain_kwargs(p: dict, n_images: int) -> dict:
    batch = p["batch_size"]
    if batch is not None and batch > n_images:  # tiny (scaled-down) sets: one batch of everything
        batch = n_images - n_images % 2
    return dict(backbone=p["backbone"], epochs=int(p["epochs"]), batch_size=batch, base_lr=p["lr"],
                warmup_epochs=p["warmup_epochs"], seed=p["seed"], image_size=p["image_size"], device=p["device"],
                amp=p["amp"], channels_last=p["channels_last"], num_workers=p["workers"])


def _run_pretrain(stage: Stage) -> None:
    from mak.train.pretrain import pretrain

    srcs = _sources(stage)
    src = srcs["seed"]
    if "pool_mix" in stage.params:  # the pool-aware model: seed + a uniform sample of the pool
        src = pool_mix(src, srcs["pool"], stage.params["pool_mix"], stage.params["seed"])
        if D.rank() == 0:
            write_json(stage.path / "train_set.json", {
                "seed": len(srcs["seed"]), "pool_rows": len(src.rows), "images": len(src),
                "pool_skipped": len(src.skipped), "skipped_items": [r for _, r in src.skipped[:1000]]})
    pretrain(src, stage.path, resume=(stage.path / "checkpoint.pt").exists(), progress=_progress(stage),
             **_pretrain_kwargs(stage.params, len(src)))


def own_options(strategies: list[str], options: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each strategy's effective options (its defaults updated with the ones it declares in ``options``).

    A stage is keyed on these, so a strategy's cache key holds only its own options and a change
    of a default re-runs it. An option that none of ``strategies`` declares is a MakError naming it.
    """
    from mak.options import ParameterError
    from mak.selection.strategies import STRATEGY_OPTIONS, strategy_options

    own = {s: {o.name for o in STRATEGY_OPTIONS.get(s, ())} for s in strategies}
    declared = set().union(*own.values())
    for key in options:
        if key not in declared:
            raise MakError(f"config: select.options.{key} is not an option of {', '.join(strategies)} "
                           f"(valid: {', '.join(sorted(declared)) or 'none'})")
    try:
        return {s: strategy_options(s, {k: v for k, v in options.items() if k in own[s]}) for s in strategies}
    except ParameterError as exc:  # named by its config key, not by the flag of `mak select`
        raise MakError(f"config: select.options.{exc}") from None


def _run_embed(stage: Stage) -> None:
    from mak.train.embed import embed

    p = stage.params
    src = _sources(stage)[p["part"]]
    ckpt = stage.deps[0].path / "checkpoint.pt"  # the seed-only or the pool-aware model
    embed(src, ckpt, stage.path / "store", views=int(p["views"]), seed=p["seed"], dtype=p["dtype"],
          batch_size=p["batch_size"], device=p["device"], overwrite=True, progress=_progress(stage))
    if D.rank() != 0:  # under torchrun rank 0 has published the one store (embed waits for every shard)
        return
    move_entries(stage.path / "store", stage.path)


def _run_ecle(stage: Stage) -> None:
    from mak.selection.scale.context import ecle_batch_owner
    from mak.data.store import open_store
    from mak.selection.tailness import ecle_sum

    p = stage.params
    pool = open_store(stage.deps[0].path, require_views=True)
    views = pool.views() if len(pool.shards) > 1 else pool.shards[0].views
    device = str(D.local_device(p["device"])) if D.active() else p["device"]
    # under torchrun each rank scores its share of the batches; the exact float64 sums add up on rank 0
    acc, terms = ecle_sum(views, temperature=p["temperature"], batch_size=p["ecle_batch_size"],
                          partitions=p["partitions"], seed=p["seed"], device=device,
                          owner=ecle_batch_owner(pool.num_rows, p["ecle_batch_size"]), progress=D.rank() == 0 and _progress(stage))
    acc = D.all_reduce_array(acc, "sum")
    if D.rank() == 0:
        write_npy(stage.path / "ecle.npy", (acc / terms).astype(np.float32))


def _run_select(stage: Stage) -> None:
    from mak.run.select_job import select_stores

    p = dict(stage.params)
    roles = _roles(stage)
    srcs = _sources(stage)
    budget = p.pop("budget")
    if budget is None:
        budget = srcs["manifest"]["budget"] if srcs["manifest"] else None
    strategy = p.pop("strategy")
    options = p.pop("options") or {}
    p["batch_size"] = p.pop("ecle_batch_size")
    eseed, epool, ecle_stage = roles["inputs"][strategy]
    if ecle_stage is not None:
        p["ecle_file"] = ecle_stage.path / "ecle.npy"
    select_stores(eseed.path, epool.path, stage.path, int(budget), strategy=strategy,
                  overwrite=True, progress=_progress(stage), **p, **options)
    if D.rank() != 0:
        return
    analysis = analyse(stage.path, srcs)
    if analysis is not None:
        write_json(stage.path / "analysis.json", analysis)


def analyse(select_dir: Path, srcs: dict) -> dict | None:
    """Selection analysis when the pool's items carry labels (else None)."""
    from mak.bench.analysis import analyse_selection

    sel_items = list(item_file_lines(select_dir / "selection.txt"))
    sel_labels = labels_or_none(sel_items)
    seed_labels = labels_or_none(srcs["seed"].items())
    if sel_labels is None or seed_labels is None:
        return None
    groups = _groups(srcs, seed_labels)
    num_classes = int(max(seed_labels.max(initial=0), sel_labels.max(initial=0))) + 1
    return analyse_selection(sel_labels, seed_labels, groups, num_classes=num_classes)


def _groups(srcs: dict, seed_labels: np.ndarray, many: float = 300, few: float = 30) -> dict:
    if srcs.get("manifest") and "groups" in srcs["manifest"]:
        return srcs["manifest"]["groups"]
    from mak.bench.evaluate import class_groups

    vals, counts = np.unique(seed_labels[seed_labels >= 0], return_counts=True)
    return class_groups({int(v): int(c) for v, c in zip(vals, counts)}, many, few)


def _run_retrain(stage: Stage) -> None:
    from mak.train.pretrain import pretrain

    p = stage.params
    roles = _roles(stage)
    srcs = _sources(stage)
    strategy = p["strategy"]
    if strategy == "none":
        source = srcs["seed"]
    else:
        items = list(item_file_lines(roles["select"][strategy].path / "selection.txt"))
        source = CombinedSource(srcs["seed"], srcs["pool"], pool_rows_for_items(srcs["pool"], items))
    kw = _pretrain_kwargs(p, len(source))
    if p["match"] == "steps":
        # Every run takes the optimizer steps of seed + the largest selection at the same epochs.
        sizes = [sum(1 for _ in item_file_lines(s.path / "selection.txt")) for s in roles["select"].values()]
        budget = max(sizes, default=0)
        target = len(srcs["seed"]) + budget
        kw["epochs"] = max(1, round(kw["epochs"] * target / len(source)))
    main = D.rank() == 0
    if main:
        write_json(stage.path / "train_set.json", {"strategy": strategy, "images": len(source),
                                                   "epochs": kw["epochs"]})
    pre = roles["pretrain"]
    if strategy == "none" and kw == _pretrain_kwargs(pre.params, len(srcs["seed"])):
        # The seed-alone run is the pre-training run itself (same data, seed and schedule): reuse it.
        for name in ("checkpoint.pt", "log.csv") if main else ():
            if (pre.path / name).exists():
                with atomic_path(stage.path / name) as tmp:
                    shutil.copyfile(pre.path / name, tmp)
        return
    pretrain(source, stage.path, resume=(stage.path / "checkpoint.pt").exists(), progress=_progress(stage), **kw)


def _run_eval(stage: Stage) -> None:
    from mak.train.embed import compute_features
    from mak.bench.evaluate import evaluate_features
    from mak.train.pretrain import load_model

    p = stage.params
    roles = _roles(stage)
    srcs = _sources(stage)
    strategy = stage.name.split("/")[-1]
    if srcs["train"] is None or srcs["test"] is None:
        write_json(stage.path / "eval.json", {"skipped": "no labeled evaluation splits (data.eval)"})
        return
    model, cfg = load_model(roles["retrain"][strategy].path / "checkpoint.pt", p["device"])

    def feats(src):
        x = compute_features(model, src, cfg["image_size"], cfg["channels"], batch_size=p["batch_size"],
                             device=p["device"])
        return x, labels_or_none(src.items())

    tx, ty = feats(srcs["train"])
    qx, qy = feats(srcs["test"])
    fx, fy = feats(srcs["fewshot"]) if srcs["fewshot"] is not None else (None, None)
    seed_labels = labels_or_none(srcs["seed"].items())
    groups = _groups(srcs, seed_labels, p["many"], p["few"]) if seed_labels is not None else None
    res = evaluate_features(tx, ty, fx, fy, qx, qy, groups=groups, many=p["many"], few=p["few"], shots=p["shots"],
                            draws=p["draws"], seed=p["seed"], k=p["knn_k"])
    write_json(stage.path / "eval.json", res)


# ----------------------------------------------------------------------------- results


def _gains_entry(plan: Plan, name: str, read_eval: Callable[[int, str], dict]) -> dict[str, Any] | None:
    """``name``'s paired per-class gains over "none": per group, mean and 95% interval over seeds."""
    per_seed: dict[str, list[float]] = {}
    for r, roles in enumerate(plan.repeats):
        if name not in roles["eval"] or "none" not in roles["eval"]:
            return None
        ev, base = read_eval(r, name), read_eval(r, "none")
        pc, pb = ((e.get("per_class") or {}).get("fewshot") or {} for e in (ev, base))
        for g, v in paired_gains(pc, pb, ev.get("groups") or {}).items():
            per_seed.setdefault(g, []).append(v)
    return {g: interval95(v) for g, v in per_seed.items()} or None


FIGURES = ("ood_rate", "near_rate", "few_share", "fullshot_acc", "fewshot_acc", "knn_acc", "group_std", "balance_entropy")


def _read_analysis(roles: dict, name: str) -> dict | None:
    """``name``'s selection analysis.json in one repeat (None for "none" or when it is absent)."""
    if name == "none":
        return None
    f = roles["select"][name].path / "analysis.json"
    return json.loads(f.read_text(encoding="utf-8")) if f.is_file() else None


def _repeat_figures(ev: dict, an: dict | None) -> dict[str, Any]:
    """One repeat's figures from its eval.json ``ev`` and selection analysis ``an`` (None where absent)."""
    g = ev.get("group_acc") or {}
    return {
        "ood_rate": an["ood_rate"] if an else None,
        "near_rate": an.get("near_rate") if an else None,
        "few_share": an["few_share"] if an else None,
        "balance_entropy": an["balance"]["entropy"] if an else None,
        "fullshot_acc": ev.get("fullshot_acc"), "fewshot_acc": ev.get("fewshot_acc"),
        "knn_acc": ev.get("knn_acc"), "group_std": ev.get("group_std"),
        "many": g.get("many"), "medium": g.get("medium"), "few": g.get("few"),
        "per_class": dict((ev.get("per_class") or {}).get("fewshot") or {}),
    }


def _per_repeat_figures(plan: Plan, name: str, read_eval: Callable[[int, str], dict]) -> list[dict]:
    """``name``'s figures in each repeat (none for "none" in a select-only run)."""
    per_rep = []
    for r, roles in enumerate(plan.repeats):
        if name == "none" and name not in roles["eval"]:
            break  # a select-only run: no seed-alone baseline
        ev = read_eval(r, name)
        per_rep.append(_repeat_figures(ev, _read_analysis(roles, name)))
    return per_rep


def _aggregate(per_rep: list[dict], key: str) -> float | dict[str, Any] | None:
    """``key`` over repeats: the value of a single repeat, else mean, std and values (None if never set)."""
    vals = [r[key] for r in per_rep if r[key] is not None]
    if not vals:
        return None
    if len(per_rep) == 1:
        return float(vals[0])
    return {"mean": float(np.mean(vals)), "std": float(np.std(vals)), "values": [float(v) for v in vals]}


def _per_class_acc(per_rep: list[dict]) -> dict[str, Any]:
    """Few-shot accuracy per class aggregated over repeats like the figures (empty without classes)."""
    classes = sorted({c for r in per_rep for c in r["per_class"]}, key=int)
    for r in per_rep:  # one few-shot accuracy per class and repeat
        r.update({f"class {c}": r["per_class"].get(c) for c in classes})
    return {c: _aggregate(per_rep, f"class {c}") for c in classes}


def _strategy_entry(plan: Plan, name: str, per_rep: list[dict],
                    read_eval: Callable[[int, str], dict]) -> dict[str, Any]:
    """``name``'s results entry: figures, group and class accuracies over repeats, then paired gains."""
    entry: dict[str, Any] = {"strategy": name}
    for key in FIGURES:
        entry[key] = _aggregate(per_rep, key)
    entry["group_acc"] = {g: _aggregate(per_rep, g) for g in ("many", "medium", "few")}
    per_class = _per_class_acc(per_rep)
    if per_class:
        entry["per_class_acc"] = per_class
    if name != "none":
        gains = _gains_entry(plan, name, read_eval)
        if gains:
            entry["gain"] = gains
    return entry


def collect_results(plan: Plan, strategies: list[str] | None = None) -> list[dict]:
    """One entry per strategy (and "none"): figures per repeat, then mean and std over repeats.

    ``strategies`` limits the entries (default: "none" and every strategy of the plan)."""
    names = strategies if strategies is not None else ["none", *plan.config["select"]["strategies"]]

    @functools.lru_cache(maxsize=None)
    def read_eval(r: int, name: str) -> dict:  # each eval.json read once (the gains read "none"'s again)
        stage = plan.repeats[r]["eval"].get(name)
        return json.loads((stage.path / "eval.json").read_text(encoding="utf-8")) if stage is not None else {}

    out = []
    for name in names:
        per_rep = _per_repeat_figures(plan, name, read_eval)
        if per_rep:
            out.append(_strategy_entry(plan, name, per_rep, read_eval))
    return out


#: The columns of the table `mak run` prints at the end: (results key, heading), all in percent.
TABLE_COLUMNS = (("ood_rate", "junk"), ("few_share", "Few share"), ("fewshot_acc", "few-shot"),
                 ("fullshot_acc", "full-shot"), ("knn_acc", "kNN"))


def results_table(results: list[dict]) -> str:
    """The headline figures of ``results`` (:func:`collect_results`) as a text table, in percent
    (mean ± std over repeats; "-" where a figure does not apply, e.g. the seed alone's junk)."""
    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, dict):
            return f"{100 * v['mean']:.1f} ± {100 * v['std']:.1f}"
        return f"{100 * v:.1f}"

    names = ["seed alone" if r["strategy"] == "none" else r["strategy"] for r in results]
    width = max(len(n) for n in ["strategy (%)", *names])
    lines = [f"{'strategy (%)':<{width}}" + "".join(f"{h:>14}" for _, h in TABLE_COLUMNS)]
    for name, r in zip(names, results):
        lines.append(f"{name:<{width}}" + "".join(f"{cell(r.get(k)):>14}" for k, _ in TABLE_COLUMNS))
    return "\n".join(lines)


def write_outputs(plan: Plan, results: list[dict] | None = None) -> Path:
    """results.json and report.html in the run directory (``results``: :func:`collect_results`'s)."""
    results = collect_results(plan) if results is None else results
    write_json(plan.run_dir / "results.json", {"config": plan.config, "results": results})
    return _write_report(plan, results)


def _write_report(plan: Plan, results: list[dict]) -> Path:
    from mak.run.report import write_report

    roles = plan.repeats[0]
    srcs = _sources(roles["pretrain"])
    strategies = {}
    for name, st in roles["select"].items():
        an_path = st.path / "analysis.json"
        an = json.loads(an_path.read_text(encoding="utf-8")) if an_path.is_file() else {}
        strategies[name] = {"scores_csv": st.path / "scores.csv",
                            "summary": json.loads((st.path / "summary.json").read_text(encoding="utf-8")),
                            "class_counts_seed": an.get("seed_counts", {}),
                            "class_counts_selected": {**an.get("counts", {}), "-1": an.get("ood_count", 0)} if an else {}}
    logs = {"pretrain (seed)": roles["pretrain"].path / "log.csv"}
    notes = [f"{len(plan.repeats)} repeat(s); figures from repeat 0 in the per-strategy sections"]
    if "pretrain_mix" in roles:
        logs["pretrain (seed + pool sample)"] = roles["pretrain_mix"].path / "log.csv"
        ts = roles["pretrain_mix"].path / "train_set.json"
        mixed = json.loads(ts.read_text(encoding="utf-8")).get("pool_rows") if ts.is_file() else "?"
        users = [s for s, (e, _, _) in roles["inputs"].items() if e is not roles["embed_seed"]]
        notes.append(f"{', '.join(users)} scored with a pool-aware model (SimCLR on the seed + {mixed} pool images); "
                     "the other strategies with the seed-only model")
    logs.update({f"retrain {k}": v.path / "log.csv" for k, v in roles["retrain"].items() if k != "none"})
    pool = srcs["pool"]
    store_items = list(item_file_lines(roles["embed_pool"].path / "items.txt"))
    rows = pool_rows_for_items(pool, store_items)
    bench = roles.get("bench")
    manifest = json.loads((bench.path / "benchmark.json").read_text(encoding="utf-8")) if bench is not None else {}
    return write_report(plan.run_dir / "report.html", title=plan.config["run"]["name"], results=results,
                        class_names=manifest.get("class_names"),
                        strategies=strategies, seed_items=srcs["seed"].items(),
                        pool_images=lambda i: pool.load(int(rows[i])), pool_items=store_items,
                        loss_logs={k: v for k, v in logs.items() if v.is_file()}, notes=notes)


# ----------------------------------------------------------------------------- entry point
def describe_plan(plan: Plan) -> str:
    lines = [f"run directory: {plan.run_dir}"]
    width = max(len(s.name) for s in plan.stages)
    for s in plan.stages:
        lines.append(f"  {s.name:<{width}}  {s.status()}")
    todo = sum(1 for s in plan.stages if not s.cached())
    lines.append(f"{len(plan.stages) - todo} cached, {todo} to run")
    return "\n".join(lines)


def run_pipeline(config: dict, run_dir: str | Path, dry_run: bool = False, log: Callable[[str], None] = print,
                 progress: bool = True) -> Plan:
    """Execute (or with ``dry_run`` only describe) every stage that is not cached; ``progress``: the
    stages' progress bars (the stage lines of ``log`` come either way)."""
    import yaml

    plan = build_plan(config, output_dir(run_dir))
    plan.progress = progress
    if dry_run:
        if int(os.environ.get("RANK", "0")) == 0:  # under torchrun: one plan, not one per rank
            log(describe_plan(plan))
        return plan
    # Under torchrun every rank walks the same plan; see the module docstring for who runs what.
    with D.process_group(str(auto_device(config["run"]["device"]))), job_lock(plan.run_dir):
        main = D.rank() == 0  # one run per directory: a second one stops at the lock, naming this one
        if main:
            plan.run_dir.mkdir(parents=True, exist_ok=True)
            for st in plan.stages:  # what killed runs of this directory left beside its stages
                remove_debris(st.path)
            write_text(plan.run_dir / "config.yaml", yaml.safe_dump(config, sort_keys=False))
        todo = D.broadcast_object([not st.cached() for st in plan.stages] if main else None)
        if main and any(todo):  # the outputs describe the stages as they are: none while they change
            for name in ("report.html", "results.json"):
                (plan.run_dir / name).unlink(missing_ok=True)
        for st, pending in zip(plan.stages, todo):
            if not pending:
                continue
            if main:
                log(f"[mak run] {st.name} ...")
            t = time.perf_counter()
            st.run()
            if main:
                log(f"[mak run] {st.name} done in {time.perf_counter() - t:.1f}s")
        if main:
            results = collect_results(plan)
            out = write_outputs(plan, results)
            if results:
                log(results_table(results))
            log(f"[mak run] results: {plan.run_dir / 'results.json'}")
            log(f"[mak run] report: {out}")
    return plan
