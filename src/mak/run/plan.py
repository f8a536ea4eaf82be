"""Laying out a ``mak run``: the :class:`Plan` of every stage of every repeat, each with its
parameters and the stages it reads (nothing is executed here).

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

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mak._tensor import auto_device, is_auto
from mak.errors import MakError
from mak.run.stage import Stage
from mak.run.stages import run_bench, run_ecle, run_embed, run_eval, run_pretrain, run_retrain, run_select


@dataclass
class Plan:
    run_dir: Path
    config: dict
    stages: list[Stage] = field(default_factory=list)
    repeats: list[dict] = field(default_factory=list)  # per repeat: stage handles by role
    progress: bool = True  # progress bars in the stages (mak run --no-progress, --quiet: none)
    verbose: bool = True  # the stages' summary lines (mak run --quiet: none)

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
    pretrain = plan.add(Stage(f"pretrain/r{r}", base / "pretrain", pp, deps, run_pretrain, ("checkpoint.pt",)))
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
            [eseed, epool, *([ecle_stage] if ecle_stage is not None else [])], run_select,
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
    from mak.bench.openworld import BENCH_OPTIONS
    from mak.options import by_name

    if float(b["ood_ratio"]) != by_name(BENCH_OPTIONS)["ood_ratio"].default:  # keyed only when not the default
        bp["ood_ratio"] = float(b["ood_ratio"])
    bp.update(_class_params(b["pool_classes"], b["near_classes"]))
    bench = plan.add(Stage(f"bench/r{r}", base / "bench", bp, [], run_bench,
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
            trained = plan.add(Stage(f"pretrain-mix/r{r}", base / "pretrain-mix", mp, deps, run_pretrain,
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
                           [trained], run_embed, ("features.npy", "items.txt")))
    epool = plan.add(Stage(f"embed-pool{tag}/r{r}", base / f"embed-pool{tag}",
                           {**ep, "part": "pool", **({} if with_views else {"views": 0})},
                           [trained], run_embed, ("features.npy", "items.txt")))
    if not with_views:
        return eseed, epool, None
    ecle_params = {k: sel[k] for k in ("temperature", "ecle_batch_size", "partitions")} | {
        "seed": ep["seed"], "device": ep["device"]}
    ecle_stage = plan.add(Stage(f"ecle{tag}/r{r}", base / f"ecle{tag}", ecle_params, [epool], run_ecle,
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
                           run_retrain, ("checkpoint.pt",)))
        roles["retrain"][strategy] = t
        roles["eval"][strategy] = plan.add(Stage(
            f"eval/r{r}/{strategy}", base / "eval" / strategy,
            {**config["evaluate"], "seed": pp["seed"], "device": pp["device"]}, [t, *deps], run_eval,
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


def _class_params(pool_classes: str, near_classes: int | None) -> dict:
    """The benchmark's class settings as stage parameters, keyed only where they differ from the
    default pool (equal settings share one key)."""
    from mak.bench.openworld import near_class_count

    k = near_class_count(pool_classes, near_classes)
    if pool_classes != "all":
        return {"pool_classes": pool_classes, "near_classes": k}
    return {"near_classes": k} if k else {}


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
