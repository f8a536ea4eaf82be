"""Benchmark the selection engine against naive references, in one run, on synthetic data.

1. kcenter_greedy vs a recompute-everything reference (distances to all centers at every step).
2. kcenter_greedy time per pick vs the time to read the N x d matrix once (bandwidth floor).
3. ecle vs bare matmuls of the same FLOPs (the Gram blocks ECLE forms).

Prints ratios; nothing here asserts a time. Usage: python benchmarks/bench_select.py [--quick]
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import torch

import mak
from mak.tailness import batch_plan


def best_of(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def naive_kcenter(x: torch.Tensor, budget: int, init: torch.Tensor) -> list[int]:
    """Recompute the distance of every point to every center at every step."""
    centers = init.clone()
    picks: list[int] = []
    for _ in range(budget):
        d = (1.0 - x @ centers.T).min(dim=1).values
        if picks:
            d[torch.tensor(picks)] = -1.0
        j = int(torch.argmax(d))
        picks.append(j)
        centers = torch.cat([centers, x[j : j + 1]])
    return picks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes (a few seconds)")
    args = ap.parse_args()
    n, m, d, budget = (2000, 400, 128, 100) if args.quick else (10_000, 2_000, 128, 500)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
    init = torch.nn.functional.normalize(torch.randn(m, d, generator=g), dim=1)

    # 1. fast vs naive
    t_fast = best_of(lambda: mak.kcenter_greedy(x, budget, init=init))
    t0 = time.perf_counter()
    ref = naive_kcenter(x, budget, init)
    t_naive = time.perf_counter() - t0
    same = mak.kcenter_greedy(x, budget, init=init).tolist() == ref
    print(f"\n[1] k-center N={n} init={m} d={d} budget={budget}")
    print(f"    mak.kcenter_greedy {t_fast * 1e3:9.1f} ms   recompute-everything {t_naive * 1e3:9.1f} ms   "
          f"speed-up {t_naive / t_fast:7.1f}x   identical picks: {same}")

    # 2. per pick vs bandwidth floor
    big_n = 200_000 if not args.quick else 50_000
    xb = torch.nn.functional.normalize(torch.randn(big_n, d, generator=g), dim=1)
    steps = 200
    t_total = best_of(lambda: mak.kcenter_greedy(xb, steps + 1, seed=0), repeats=2)
    t_prep = best_of(lambda: mak.kcenter_greedy(xb, 1, seed=0), repeats=2)
    per_pick = (t_total - t_prep) / steps
    floor = best_of(lambda: xb.sum(dim=0), repeats=5)
    print(f"\n[2] k-center per pick, N={big_n} d={d} ({xb.numel() * 4 / 2**20:.0f} MiB float32)")
    print(f"    per pick {per_pick * 1e3:7.3f} ms   read-once floor (sum over the matrix) {floor * 1e3:7.3f} ms   "
          f"ratio {per_pick / floor:5.2f}x")

    # 3. ECLE vs matmul floor
    r, nv, dv, bs, parts = (10, 4096, 128, 512, 1) if not args.quick else (4, 2048, 128, 512, 1)
    views = torch.randn(r, nv, dv, generator=g)
    t_ecle = best_of(lambda: mak.ecle(views, batch_size=bs, partitions=parts), repeats=2)
    nb = len(batch_plan(nv, bs)) * parts
    zb = torch.nn.functional.normalize(torch.randn(r * bs, dv, generator=g), dim=1)

    def gram_floor():
        for _ in range(nb):
            for a in range(r):
                zb[a * bs : (a + 1) * bs] @ zb.T

    t_mm = best_of(gram_floor, repeats=2)
    flops = nb * 2 * (r * bs) ** 2 * dv
    pairwise = nb * r * (r - 1) // 2 * 2 * (2 * bs) ** 2 * dv
    print(f"\n[3] ECLE R={r} N={nv} d={dv} batch={bs} partitions={parts}")
    print(f"    ecle {t_ecle * 1e3:8.1f} ms   bare matmuls of the same FLOPs ({flops / 1e9:.1f} GFLOP) {t_mm * 1e3:8.1f} ms   "
          f"ratio {t_ecle / t_mm:5.2f}x")
    print(f"    (scoring each view pair separately would need {pairwise / 1e9:.1f} GFLOP, "
          f"{pairwise / flops:.2f}x the shared-Gram FLOPs)")
    print(f"    {t_ecle / (nv * parts) * 1e6:.1f} us per pool image per ordering")


if __name__ == "__main__":
    main()
