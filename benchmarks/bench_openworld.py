"""The open-world benchmark: every strategy on Fashion-MNIST seed + half-junk pool, several seeds.

Runs `mak run` stages (cached in --out, so an interrupted run continues) and prints two tables:
the selection itself (out-of-domain share, Few/Many share, balance of seed + pick) and, unless
--selection-only, downstream accuracy after re-training from scratch on seed + pick.

    python benchmarks/bench_openworld.py --seeds 100 101 102            # the reported table
    python benchmarks/bench_openworld.py --seeds 7 --selection-only     # a tuning seed, never reported
    python benchmarks/bench_openworld.py --out runs/disjoint --scale 0.5 --pool-classes disjoint  # the paper's setting
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from mak.run.config import load_config
from mak.run.plan import build_plan
from mak.run.results import collect_results, write_outputs
from mak.run.stats import interval95

ALL = ["robust", "mak", "random", "kcenter", "tailness", "proximity", "tailness+proximity"]


def fmt(values: list[float], pct: bool = True) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "-"
    k = 100.0 if pct else 1.0
    m, s = float(np.mean(vals)) * k, float(np.std(vals)) * k
    return f"{m:.1f}±{s:.1f}" if pct else f"{m:.3f}±{s:.3f}"


SHARED = ("bench", "pretrain", "embed-seed", "embed-pool", "ecle", "select")


def run_steps_none(steps, epochs, seed: int):
    """The matched-steps plan of one seed, running only the seed-alone re-train and its evaluation.

    The stages both plans share (benchmark, pretrain, embeddings, ECLE, selections) are hard-linked
    from the matched-epochs run, whose keys they carry. Every pick has the budget's size, so seed +
    pick trains for the same steps under either matching and only 'none' needs a run of its own.
    """
    by_name = {st.name: st for st in epochs.stages}
    for st in steps.stages:
        src = by_name.get(st.name)
        if st.name.split("/")[0] in SHARED and src is not None and src.key == st.key and src.cached() \
                and not st.cached():
            shutil.rmtree(st.path, ignore_errors=True)
            shutil.copytree(src.path, st.path, copy_function=os.link)
    roles = steps.repeats[0]
    sizes = {len((s.path / "selection.txt").read_text().splitlines()) for s in roles["select"].values()}
    if len(sizes) > 1:
        raise SystemExit(f"selections of different sizes {sorted(sizes)}: matched steps differ per strategy")
    for name in ("retrain", "eval"):
        st = roles[name]["none"]
        if not st.cached():
            print(f"[seed {seed}] {st.name} (matched steps) ...", flush=True)
            st.run()
    return steps


def outside_seed_classes(plan, name: str, an: dict) -> str:
    """One line: the pick's count of each class the seed lacks, its junk, and the gate's counts."""
    roles = plan.repeats[0]
    if "bench" not in roles:
        return ""
    manifest = json.loads((roles["bench"].path / "benchmark.json").read_text())
    near = manifest.get("near_classes") or []
    if not near:
        return ""
    names = manifest["class_names"]
    parts = [f"{names[str(c)]} {an['counts'][str(c)]}" for c in near] + [f"out-of-domain {an['ood_count']}"]
    counts = json.loads((roles["select"][name].path / "summary.json").read_text()).get("counts") or {}
    if "gate_kept" in counts:
        parts.append(f"gate kept {counts['gate_kept']}, filled {counts.get('gate_filled', 0)}, "
                     f"short {counts.get('gate_short', 0)}")
    return ", ".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/bench-openworld", help="run directory (cached stages)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[100, 101, 102], help="benchmark + training seeds")
    ap.add_argument("--scale", type=float, default=1.0, help="benchmark scale")
    ap.add_argument("--ood-ratio", type=float, default=1.0,
                    help="out-of-domain pool images per in-domain one (default 1: half junk; 4: 80%%)")
    ap.add_argument("--pool-classes", default="all", metavar="all|disjoint",
                    help="disjoint: the pool holds none of the seed's classes (the paper's setting)")
    ap.add_argument("--near-classes", type=int, default=None, metavar="K",
                    help="K classes only in the pool (default 0, or 4 with --pool-classes disjoint)")
    ap.add_argument("--strategies", nargs="+", default=ALL)
    ap.add_argument("--epochs", type=int, default=30, help="SimCLR epochs (pretrain and re-train)")
    ap.add_argument("--backbone", default="smallconv")
    ap.add_argument("--match", choices=["epochs", "steps", "both"], default="both",
                    help="re-train at matched epochs, matched optimizer steps, or both (default). Every pick has "
                         "the budget's size, so only the seed-alone run ('none') differs between the two")
    ap.add_argument("--selection-only", action="store_true", help="stop after selection (no re-training)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()

    t0 = time.perf_counter()
    rows: dict[str, dict[str, list]] = {}
    plans = []
    steps_plans = []
    first = "steps" if args.match == "steps" else "epochs"

    def make_plan(seed: int, match: str):
        cfg = load_config(None, [
            "data.benchmark.build=true", f"data.benchmark.scale={args.scale}", f"data.benchmark.seed={seed}",
            f"data.benchmark.ood_ratio={args.ood_ratio}", f"data.benchmark.pool_classes={args.pool_classes}",
            f"data.benchmark.near_classes={json.dumps(args.near_classes)}",
            f"run.seed={seed}", f"pretrain.epochs={args.epochs}", f"pretrain.backbone={args.backbone}",
            f"select.strategies={json.dumps(args.strategies)}", f"retrain.match={match}", "run.name=openworld",
            *args.overrides])
        return build_plan(cfg, Path(args.out) / f"seed{seed}-{match}")

    picks: dict[str, list[str]] = {}  # per strategy: a line per seed of what falls outside the seed's classes
    for seed in args.seeds:
        plan = make_plan(seed, first)
        plans.append(plan)
        for st in plan.stages:
            if args.selection_only and st.name.split("/")[0] in ("retrain", "eval"):
                continue
            if not st.cached():
                print(f"[seed {seed}] {st.name} ...", flush=True)
                st.run()
        if args.match == "both" and not args.selection_only:
            steps_plans.append(run_steps_none(make_plan(seed, "steps"), plan, seed))
        for name in args.strategies:
            an = json.loads((plan.repeats[0]["select"][name].path / "analysis.json").read_text())
            r = rows.setdefault(name, {k: [] for k in ("ood", "near", "few", "many", "entropy")})
            r["ood"].append(an["ood_rate"])
            r["near"].append(an.get("near_rate", 0.0))
            r["few"].append(an["few_share"])
            r["many"].append(an["many_share"])
            r["entropy"].append(an["balance"]["entropy"])
            picks.setdefault(name, []).append(outside_seed_classes(plan, name, an))
    setting = f"pool classes {args.pool_classes}" + (f", {args.near_classes} near" if args.near_classes else "")
    print(f"\nSelection on the open-world benchmark (scale {args.scale}, out-of-domain ratio {args.ood_ratio:g}, "
          f"{setting}, seeds {args.seeds}, mean±std, %; 'near' = classes the seed lacks)")
    print(f"{'strategy':<20}{'OOD share':>14}{'near share':>14}{'Few share':>14}{'Many share':>14}"
          f"{'balance H/logC':>18}")
    for name, r in rows.items():
        print(f"{name:<20}{fmt(r['ood']):>14}{fmt(r['near']):>14}{fmt(r['few']):>14}{fmt(r['many']):>14}"
              f"{fmt(r['entropy'], False):>18}")
    if any(an_line for lines in picks.values() for an_line in lines):
        print("\nOutside the seed's classes, per seed: images of each class the seed lacks, out-of-domain images, "
              "and robust's gate (pool images kept; rejected ones filled in; budget left unspent)")
        for name, lines in picks.items():
            for seed, line in zip(args.seeds, lines):
                print(f"{name:<20}seed {seed}: {line}")
    if not args.selection_only:
        per: dict[str, dict[str, list]] = {}
        for plan in plans:
            write_outputs(plan)
            for res in collect_results(plan):
                d = per.setdefault(res["strategy"], {})
                for key in ("fewshot_acc", "fullshot_acc", "knn_acc", "group_std"):
                    d.setdefault(key, []).append(res[key])
                for g in ("many", "medium", "few"):
                    d.setdefault(g, []).append(res["group_acc"][g])
                for g, v in (res.get("gain") or {}).items():  # paired: this seed's own seed-alone run
                    d.setdefault(f"gain {g}", []).append(v["mean"])
        for plan in steps_plans:
            for res in collect_results(plan, strategies=["none"]):
                d = per.setdefault("none (steps)", {})
                for key in ("fewshot_acc", "fullshot_acc", "knn_acc", "group_std"):
                    d.setdefault(key, []).append(res[key])
                for g in ("many", "medium", "few"):
                    d.setdefault(g, []).append(res["group_acc"][g])
        what = "epochs matched" if args.match != "steps" else "steps matched"
        if args.match == "both":
            what += "; 'none (steps)' = the seed alone for as many steps as seed + pick"
        print(f"\nAfter re-training on seed + pick ({what}; few-shot = mean of draws; %)")
        cols = ["fewshot_acc", "many", "medium", "few", "group_std", "fullshot_acc", "knn_acc"]
        print(f"{'strategy':<20}" + "".join(f"{c:>14}" for c in cols))
        for name, d in per.items():
            print(f"{name:<20}" + "".join(f"{fmt(d[c]):>14}" for c in cols))
        print("\nFew-shot gain over the seed alone, class by class on the same seed and draws (points; mean and "
              "95% t-interval over seeds)")
        groups = ["all", "many", "medium", "few"]
        print(f"{'strategy':<20}" + "".join(f"{g:>16}" for g in groups))
        for name, d in per.items():
            if any(f"gain {g}" in d for g in groups):
                cells = []
                for g in groups:
                    iv = interval95(d[f"gain {g}"]) if d.get(f"gain {g}") else None
                    cells.append("-" if iv is None else f"{100 * iv['mean']:+.1f}" +
                                 ("" if iv["ci95"] is None else f"±{100 * iv['ci95']:.1f}"))
                print(f"{name:<20}" + "".join(f"{c:>16}" for c in cells))
        if "random" in per and "none (steps)" in per:
            data_matters(per["random"], per["none (steps)"])
    print(f"\nwall time {time.perf_counter() - t0:.0f}s")


def data_matters(random: dict, alone: dict) -> None:
    """Does seed + random beat the seed alone trained for as many steps? Paired over seeds."""
    print("\nData matters? seed + random minus the seed alone at matched steps, paired by seed (points; mean, "
          "95% t-interval; 'yes' when the interval is above 0)")
    for key in ("fewshot_acc", "fullshot_acc", "knn_acc"):
        diffs = [a - b for a, b in zip(random[key], alone[key])]
        if not diffs:
            continue
        iv = interval95(diffs)
        ci = iv["ci95"]
        verdict = "-" if ci is None else ("yes" if iv["mean"] - ci > 0 else "no")
        print(f"  {key:<14}{100 * iv['mean']:+6.1f}" + ("" if ci is None else f" ±{100 * ci:.1f}") + f"   {verdict}")


if __name__ == "__main__":
    import sys

    from mak.errors import MakError

    try:
        main()
    except MakError as exc:  # a missing dataset, a bad option: one line, as the mak commands do
        print(f"bench_openworld: error: {exc}", file=sys.stderr)
        sys.exit(2)
