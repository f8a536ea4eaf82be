"""The results of a ``mak run``: figures per strategy and repeat from the eval and analysis files,
aggregated over repeats (:func:`collect_results`), the table ``mak run`` prints, and
``results.json`` and ``report.html``."""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mak.atomic import write_json
from mak.data.store import item_file_lines
from mak.run.plan import Plan, evaluates
from mak.run.stages import pool_rows_for_items, sources
from mak.run.stats import interval95, paired_gains


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
    """One repeat's figures from its eval.json ``ev`` and selection analysis ``an`` (None where absent).

    The pick's group shares are taken over the groups the evaluation used (``evaluate.many``/``few``
    on data without a benchmark manifest), so Few share and Few accuracy speak of the same classes.
    """
    if an and ev.get("groups"):
        from mak.bench.analysis import regroup

        an = regroup(an, ev["groups"])
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


def _repeat_seed_counts(plan: Plan) -> list[dict[str, int]] | None:
    """Each repeat's seed images per class (from its selections' analysis.json); None where a repeat has none."""
    out = []
    for roles in plan.repeats:
        counts = next((an["seed_counts"] for an in (_read_analysis(roles, n) for n in roles["select"])
                       if an and an.get("seed_counts")), None)
        if counts is None:
            return None
        out.append({str(c): int(n) for c, n in counts.items()})
    return out


def per_rank_acc(per_rep: list[dict], seed_counts: list[dict[str, int]]) -> dict[str, Any]:
    """Few-shot accuracy by seed-count rank over repeats: rank k is, in each repeat, the class with
    the k-th most seed images (ties: lower class id first), so a head or a tail is averaged with
    the heads or tails of the other repeats, whose classes differ; classes without seed images are
    left out. ``seed_images``: per rank, each repeat's count; ``acc``: per rank, the figure over
    repeats (as :func:`_aggregate`)."""
    ranked = [sorted((k for k in c if c[k] > 0), key=lambda k: (-c[k], int(k))) for c in seed_counts]
    ranks = min(len(r) for r in ranked)
    rows = [{f"rank {k}": rep["per_class"].get(order[k]) for k in range(ranks)} for rep, order in zip(per_rep, ranked)]
    return {"seed_images": [[c[order[k]] for c, order in zip(seed_counts, ranked)] for k in range(ranks)],
            "acc": [_aggregate(rows, f"rank {k}") for k in range(ranks)]}


def _strategy_entry(plan: Plan, name: str, per_rep: list[dict], read_eval: Callable[[int, str], dict],
                    seed_counts: list[dict[str, int]] | None) -> dict[str, Any]:
    """``name``'s results entry: figures, group and class accuracies over repeats, then paired
    gains; ``seed_counts``: :func:`_repeat_seed_counts` (None: no table by seed-count rank)."""
    entry: dict[str, Any] = {"strategy": name}
    for key in FIGURES:
        entry[key] = _aggregate(per_rep, key)
    entry["group_acc"] = {g: _aggregate(per_rep, g) for g in ("many", "medium", "few")}
    per_class = _per_class_acc(per_rep)
    if per_class:
        entry["per_class_acc"] = per_class
        if len(per_rep) > 1 and seed_counts is not None and len(seed_counts) == len(per_rep):
            entry["per_rank_acc"] = per_rank_acc(per_rep, seed_counts)
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

    seed_counts = _repeat_seed_counts(plan) if len(plan.repeats) > 1 else None  # the same for every strategy
    out = []
    for name in names:
        per_rep = _per_repeat_figures(plan, name, read_eval)
        if per_rep:
            out.append(_strategy_entry(plan, name, per_rep, read_eval, seed_counts))
    return out


#: The columns of the table `mak run` prints at the end: (results key, heading), all in percent.
TABLE_COLUMNS = (("ood_rate", "OOD rate"), ("few_share", "Few share"), ("fewshot_acc", "few-shot"),
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


def _retrain_note(plan: Plan) -> str:
    """How the seed alone and seed + each pick were re-trained: what the gains over the seed alone compare."""
    if plan.config["retrain"]["match"] == "steps":
        return ("re-trained for about the same optimizer steps on the seed alone and on seed + each pick "
                "(retrain.match: steps): a gain is what the picked images add, not more training")
    return ("re-trained for the same epochs on the seed alone and on seed + each pick (retrain.match: epochs), so "
            "seed + pick takes more optimizer steps: a gain over the seed alone mixes the images with the extra "
            "training (retrain.match: steps separates them)")


def _write_report(plan: Plan, results: list[dict]) -> Path:
    from mak.run.report import write_report

    roles = plan.repeats[0]
    srcs = sources(roles["pretrain"])
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
    if evaluates(plan.config):
        notes.append(_retrain_note(plan))
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
