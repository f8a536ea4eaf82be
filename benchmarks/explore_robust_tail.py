"""Tail variants for ``robust`` on one open-world benchmark run: where the Few-class share could come from.

Reads a run of ``bench_openworld.py`` (one seed's ``r0`` directory: ``bench/``, the pool-aware
model's ``embed-seed-mix``/``embed-pool-mix`` and the seed-only model's ``embed-seed``/``embed-pool``),
runs ``robust`` at its defaults and re-ranks the *same gated pool* with other tail scores, so every
row differs from the first in its tail alone (top-budget by the tail, as ``robust`` does with
``gate_core_ratio = 1``). Printed per row: out-of-domain, Few- and Many-class share of the pick
and the balance H of seed + pick.

Rows: the default (the cross-fitted seed-vs-pool classifier's logit); that classifier trained
against the *gated* pool only; the default averaged over each image's 10 nearest gated pool
images; the mean percentile of the default and the same classifier on the seed-only model's
features; and, for each ``--extra SEED.npy POOL.npy`` (features of another model of the same
images), the mean percentile with that model's classifier.

Tune only on seeds that are never reported (the reported table uses 100-102)::

    python benchmarks/bench_openworld.py --out runs/tune --seeds 7 --selection-only --strategies robust
    python benchmarks/explore_robust_tail.py runs/tune/seed7-epochs/r0
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from mak.selection.robust import density_ratio as dr
from mak.bench.analysis import analyse_selection, labels_from_items
from mak.selection.robust import DEFAULTS, rank_normalize
from mak.selection.robust.neighbours import knn_chunks
from mak.selection.strategies import select

REPORTED_SEEDS = (100, 101, 102)


def features(path: Path) -> np.ndarray:
    return np.load(path / "features.npy").astype(np.float32) if path.is_dir() else np.load(path).astype(np.float32)


def cross_fitted_logits(seed: np.ndarray, pool: np.ndarray, rows: np.ndarray, rng_seed: int) -> np.ndarray:
    """Each pool image's logit from the classifier of seed vs pool rows ``rows`` (held out where it is one),
    bagged as robust's default is, so every row compares like with like."""
    own = np.full(len(pool), -1, dtype=np.int64)
    own[rows] = np.arange(len(rows))
    return dr.ratio_logits(pool, seed, pool[rows], self_index=own, seed=rng_seed, bags=DEFAULTS["ratio_bags"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="a bench_openworld seed run directory (…/seedS-epochs/r0)")
    ap.add_argument("--extra", nargs=2, action="append", default=[], metavar=("SEED", "POOL"),
                    help="features (.npy or store directory) of another model: its ratio tail joins the default's")
    ap.add_argument("--smooth", type=int, default=10, help="pool neighbours of the smoothed row (default 10)")
    args = ap.parse_args()

    r0 = args.run
    bench = json.loads((r0 / "bench/benchmark.json").read_text())
    seed = int(bench["seed"])
    if seed in REPORTED_SEEDS:
        print(f"warning: benchmark seed {seed} is a reported seed; choose defaults on another one", file=sys.stderr)
    seed_lab = labels_from_items((r0 / "bench/seed.txt").read_text().splitlines())
    pool_lab = labels_from_items((r0 / "bench/pool.txt").read_text().splitlines())
    budget, groups = int(bench["budget"]), bench["groups"]
    s_mix, p_mix = features(r0 / "embed-seed-mix"), features(r0 / "embed-pool-mix")

    t0 = time.perf_counter()
    sel = select(s_mix, p_mix, None, budget, strategy="robust", seed=seed)
    gate = np.isfinite(sel.score)
    gated = np.flatnonzero(gate)
    few = np.isin(pool_lab, groups["few"])
    print(f"seed {seed}: robust at its defaults in {time.perf_counter() - t0:.0f}s; the gate keeps {gated.size} of "
          f"{len(gate)} pool images ({int((gate & few).sum())} of {int(few.sum())} Few-class, "
          f"{int((gate & (pool_lab < 0)).sum())} out-of-domain)")
    print(f"{'tail':<46}{'OOD %':>8}{'Few %':>8}{'Many %':>8}{'H':>8}")

    def row(name: str, tail: np.ndarray) -> None:
        pick = np.argsort(-np.where(gate, tail, -np.inf), kind="stable")[:budget]
        an = analyse_selection(pool_lab[pick], seed_lab, groups)
        print(f"{name:<46}{100 * an['ood_rate']:>8.1f}{100 * an['few_share']:>8.1f}{100 * an['many_share']:>8.1f}"
              f"{an['balance']['entropy']:>8.3f}", flush=True)

    default = rank_normalize(sel.score, gate)  # robust's score is the ratio tail's percentile over the gate
    row("default (ratio vs the whole pool)", default)
    logit = cross_fitted_logits(s_mix, p_mix, gated, seed)
    row("ratio vs the gated pool only", rank_normalize(-logit, gate))
    smooth = np.full(len(gate), np.nan)
    own = np.arange(gated.size, dtype=np.int64)
    for lo, hi, _, idx in knn_chunks(p_mix[gated], p_mix[gated], args.smooth, self_index=own):
        smooth[gated[lo:hi]] = (default[gated[lo:hi]] + default[gated][idx.numpy()].sum(1)) / (args.smooth + 1)
    row(f"default smoothed over {args.smooth} gated neighbours", smooth)
    others = [("the seed-only model", features(r0 / "embed-seed"), features(r0 / "embed-pool"))]
    others += [(f"--extra {i + 1}", features(Path(s)), features(Path(p))) for i, (s, p) in enumerate(args.extra)]
    for name, s, p in others:
        if p.shape[0] != len(gate) or s.shape[0] != len(seed_lab):
            raise SystemExit(f"error: {name}: {s.shape[0]} seed / {p.shape[0]} pool rows, expected "
                             f"{len(seed_lab)} / {len(gate)}")
        other = rank_normalize(-cross_fitted_logits(s, p, np.arange(len(p)), seed), gate)
        row(f"ratio on {name} alone", other)
        row(f"mean percentile: default + {name}", default + other)
    print(f"wall time {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
