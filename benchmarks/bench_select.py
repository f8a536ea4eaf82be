"""Benchmark the selection engine against naive references, in one run, on synthetic data.

1. kcenter_greedy vs a recompute-everything reference (distances to all centers at every step).
2. kcenter_greedy time per pick vs the time to read the N x d matrix once (bandwidth floor).
3. ecle vs bare matmuls of the same FLOPs (the Gram blocks ECLE forms).
4. robust's seed share (k nearest in seed + pool reference) vs the bare similarity matmuls it needs.
5. robust (defaults) vs mak (10-view ECLE) on the same synthetic half-junk stores: the time ratio.
6. one training step of robust's classifier (gradients by hand, fused Adam) vs autograd and
   torch's per-parameter Adam, and vs the step's two matrix products alone; one thread, as a fit
   runs; and 25 fits one at a time vs as one batched model (what robust does on a GPU).

Prints ratios; nothing here asserts a time. Usage::

    python benchmarks/bench_select.py [--quick]          # CPU sizes
    python benchmarks/bench_select.py --strategies-at-scale   # section 5 at 16k and 100k pools too
    python benchmarks/bench_select.py --device cuda      # GPU: pools 10-20x larger
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import torch

import mak
from mak._machine import cpu_summary
from mak.selection.tailness import batch_plan


DEVICE = torch.device("cpu")


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def best_of(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        _sync()
        t = time.perf_counter()
        fn()
        _sync()
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
    ap.add_argument("--device", default="cpu", help="cpu or cuda (tensors live there; GPU sizes are larger)")
    ap.add_argument("--strategies-at-scale", action="store_true",
                    help="section 5 also at the open-world benchmark's full scale (pool 16,350, seed 2,480, d 128) "
                         "and at pool 100,000 x seed 10,000 x d 128 (about 10 minutes on 2 CPU cores)")
    args = ap.parse_args()
    global DEVICE
    DEVICE = dev = torch.device(args.device)
    gpu = dev.type == "cuda"
    n, m, d, budget = (2000, 400, 128, 100) if args.quick else ((100_000, 20_000, 128, 500) if gpu else (10_000, 2_000, 128, 500))
    name = torch.cuda.get_device_name(dev) if gpu else (platform.processor() or platform.machine())
    print(f"machine: {name}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"device {dev}, float32")
    print(f"cpu: {cpu_summary()}")
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1).to(dev)
    init = torch.nn.functional.normalize(torch.randn(m, d, generator=g), dim=1).to(dev)

    # 1. fast vs naive
    t_fast = best_of(lambda: mak.kcenter_greedy(x, budget, init=init))
    t0 = time.perf_counter()
    ref = naive_kcenter(x, budget, init)
    t_naive = time.perf_counter() - t0
    fast = mak.kcenter_greedy(x, budget, init=init)
    same = fast.tolist() == ref
    first_diff = next((i for i, (a, b) in enumerate(zip(fast.tolist(), ref)) if a != b), None)
    from mak.selection.kcenter import covering_radius

    r_fast = covering_radius(x, fast, init=init)
    r_ref = covering_radius(x, np.asarray(ref), init=init)
    print(f"\n[1] k-center N={n} init={m} d={d} budget={budget}")
    print(f"    mak.kcenter_greedy {t_fast * 1e3:9.1f} ms   recompute-everything {t_naive * 1e3:9.1f} ms   "
          f"speed-up {t_naive / t_fast:7.1f}x   identical picks: {same}"
          + ("" if same else f" (first difference at pick {first_diff}: float rounding of near-ties)"))
    print(f"    covering radius: mak {r_fast:.6f}, reference {r_ref:.6f}")

    # 2. per pick vs bandwidth floor
    big_n = 50_000 if args.quick else (4_000_000 if gpu else 200_000)
    xb = torch.nn.functional.normalize(torch.randn(big_n, d, generator=g), dim=1).to(dev)
    steps = 200
    t_total = best_of(lambda: mak.kcenter_greedy(xb, steps + 1, seed=0), repeats=2)
    t_prep = best_of(lambda: mak.kcenter_greedy(xb, 1, seed=0), repeats=2)
    per_pick = (t_total - t_prep) / steps
    floor = best_of(lambda: xb.sum(dim=0), repeats=5)
    v = xb[1].clone()
    rowmajor = best_of(lambda: xb @ v, repeats=5)  # the same product over the row-major matrix
    print(f"\n[2] k-center per pick, N={big_n} d={d} ({xb.numel() * 4 / 2**20:.0f} MiB float32)")
    print(f"    per pick {per_pick * 1e3:7.3f} ms   read-once floor (sum over the matrix) {floor * 1e3:7.3f} ms   "
          f"ratio {per_pick / floor:5.2f}x")
    print(f"    (the product alone over the row-major N x d matrix: {rowmajor * 1e3:.3f} ms, "
          f"{rowmajor / floor:.2f}x the floor)")

    # 3. ECLE vs matmul floor
    r, nv, dv, bs, parts = (4, 2048, 128, 512, 1) if args.quick else ((10, 200_000, 128, 512, 1) if gpu else (10, 4096, 128, 512, 1))
    views = torch.randn(r, nv, dv, generator=g).to(dev)
    t_ecle = best_of(lambda: mak.ecle(views, batch_size=bs, partitions=parts), repeats=2)
    nb = len(batch_plan(nv, bs)) * parts
    zb = torch.nn.functional.normalize(torch.randn(r * bs, dv, generator=g), dim=1).to(dev)

    def gram_floor():  # the Gram blocks ECLE forms: (a, c) for c >= a
        for _ in range(nb):
            for a in range(r):
                zb[a * bs : (a + 1) * bs] @ zb[a * bs :].T

    t_mm = best_of(gram_floor, repeats=2)
    flops = nb * 2 * bs * bs * dv * r * (r + 1) // 2
    pairwise = nb * r * (r - 1) // 2 * 2 * (2 * bs) ** 2 * dv
    print(f"\n[3] ECLE R={r} N={nv} d={dv} batch={bs} partitions={parts}")
    print(f"    ecle {t_ecle * 1e3:8.1f} ms   bare matmuls of the same FLOPs ({flops / 1e9:.1f} GFLOP) {t_mm * 1e3:8.1f} ms   "
          f"ratio {t_ecle / t_mm:5.2f}x")
    print(f"    (scoring each view pair separately would need {pairwise / 1e9:.1f} GFLOP, "
          f"{pairwise / flops:.2f}x the shared-Gram FLOPs)")
    print(f"    {t_ecle / (nv * parts) * 1e6:.1f} us per pool image per ordering")
    from mak.selection.tailness import _block_row_sums, _block_sums

    group = 1 if dev.type == "cpu" else 8
    zg = zb.view(1, r, bs, dv).expand(group, r, bs, dv).contiguous()
    t_blocks = best_of(lambda: _block_sums(zg, 5.0), repeats=3) if dev.type == "cpu" else float("nan")
    t_rows = best_of(lambda: _block_row_sums(zg, 5.0), repeats=3)
    print(f"    Gram sums per batch: B x B blocks (the CPU path) {t_blocks / group * 1e3:.2f} ms, "
          f"block rows of {group} batch(es) (the GPU path) {t_rows / group * 1e3:.2f} ms")

    # 4. seed share (robust's gate and tail): k nearest among seed + reference for every query
    from mak.selection.robust import seed_share, share_bank

    nq, ms, nref, k = (5_000, 1_000, 10_000, 50) if args.quick else ((1_000_000, 20_000, 200_000, 50) if gpu
                                                                  else (50_000, 2_000, 20_000, 50))
    q = torch.nn.functional.normalize(torch.randn(nq, d, generator=g), dim=1).numpy()
    sd = torch.nn.functional.normalize(torch.randn(ms, d, generator=g), dim=1).numpy()
    ref = q[:nref]
    bank = share_bank(sd, ref)
    t_share = best_of(lambda: seed_share(q, sd, ref, k=k, device=dev, bank=bank), repeats=1)
    bank_t = torch.from_numpy(bank).to(dev)
    qt = torch.from_numpy(q).to(dev)
    step = 8192

    def sim_floor():
        for lo in range(0, nq, step):
            qt[lo:lo + step] @ bank_t.T

    t_sim = best_of(sim_floor, repeats=1)
    import mak._neighbours as neighbours

    keep, neighbours.FILTER_SHARE = neighbours.FILTER_SHARE, 2**62  # every bank chunk merged through its own top k
    try:
        t_topk = best_of(lambda: seed_share(q, sd, ref, k=k, device=dev, bank=bank), repeats=1)
    finally:
        neighbours.FILTER_SHARE = keep
    print(f"\n[4] seed share N={nq} seed={ms} reference={nref} d={d} k={k}")
    print(f"    seed_share {t_share:8.2f} s   bare similarity matmuls {t_sim:8.2f} s   ratio {t_share / t_sim:5.2f}x   "
          f"{t_share / nq * 1e6:.2f} us per pool image")
    print(f"    (each bank chunk's own top k merged instead of the filtered merge: {t_topk:.2f} s, "
          f"{t_topk / t_sim:.2f}x the matmuls)")

    # 5. the default strategy at the cost of the paper's: robust vs mak on the same stores
    sizes = [(2_000, 200, 64)] if args.quick else [(10_000, 1_000, 64)]
    if args.strategies_at_scale:  # the benchmark's full scale, then a pool of 100k with a 10k seed
        sizes += [(16_350, 2_480, 128), (100_000, 10_000, 128)]
    for n5, m5, d5 in sizes:
        strategies_ratio(g, n5, m5, d5, r5=10, b5=m5, dev=dev)

    # 6. the classifier's training step, as each of robust's fits runs it
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        classifier_step(dev, steps=20 if args.quick else 200)
    finally:
        torch.set_num_threads(before)


def strategies_ratio(g: torch.Generator, n5: int, m5: int, d5: int, r5: int, b5: int, dev: torch.device) -> None:
    """Section 5: ``mak`` (R-view ECLE) and ``robust`` (defaults) on one synthetic half-junk pool."""
    centers = torch.randn(10, d5, generator=g)
    seed5 = (centers[torch.randint(10, (m5,), generator=g)] + 0.5 * torch.randn(m5, d5, generator=g)).numpy()
    half = n5 // 2  # half in-domain, half junk
    pool5 = torch.cat([centers[torch.randint(10, (half,), generator=g)] + 0.5 * torch.randn(half, d5, generator=g),
                       2.0 * torch.randn(n5 - half, d5, generator=g)]).numpy()
    views5 = torch.nn.functional.normalize(torch.randn(r5, n5, d5, generator=g), dim=2).numpy()
    t_mak = best_of(lambda: mak.select(seed5, pool5, views5, b5, strategy="mak", device=dev), repeats=1)
    timings: dict[str, float] = {}

    def robust() -> None:
        timings.update(mak.select(seed5, pool5, views5, b5, strategy="robust", device=dev).timings)

    t_rob = best_of(robust, repeats=1)
    parts = ", ".join(f"{k} {timings[k]:.1f} s" for k in ("ratio", "share") if k in timings)
    print(f"\n[5] strategies, pool {n5} (half junk) seed {m5} d {d5}, mak with R={r5} views, budget {b5}")
    print(f"    mak {t_mak:8.2f} s   robust (defaults) {t_rob:8.2f} s ({parts})   robust / mak {t_rob / t_mak:5.2f}x")

def classifier_step(dev: torch.device, steps: int, n: int = 16_384, d: int = 128) -> None:
    """Section 6: ms per step of the default classifier, by hand vs autograd, and its two products."""
    from torch.nn.functional import binary_cross_entropy_with_logits, normalize

    from mak.selection.robust.density_ratio import (BATCH, DEFAULT_HIDDEN, LR, WEIGHT_DECAY, RatioMLP, _set_gradients,
                                                    fit_models)

    g = torch.Generator().manual_seed(1)
    x = normalize(torch.randn(n, d, generator=g), dim=1).to(dev)
    y = (torch.rand(n, generator=g) < 0.15).float().to(dev)
    w = torch.where(y > 0, 3.0, 0.6)
    batches = [torch.randperm(n, generator=g)[:BATCH].to(dev) for _ in range(8)]

    def train(by_hand: bool) -> float:
        model = RatioMLP(d, DEFAULT_HIDDEN, torch.Generator().manual_seed(0)).to(dev).requires_grad_(not by_hand)
        opt = torch.optim.Adam(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, fused=by_hand or None)

        def run() -> None:
            for k in range(steps):
                j = batches[k % len(batches)]
                if by_hand:
                    with torch.no_grad():
                        _set_gradients(model, x.index_select(0, j), y.index_select(0, j), w.index_select(0, j))
                        opt.step()
                else:
                    loss = (binary_cross_entropy_with_logits(model(x[j]), y[j], reduction="none") * w[j]).mean()
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()

        return best_of(run, repeats=3) / steps

    xb, w1 = x[:BATCH], torch.randn(DEFAULT_HIDDEN, d, generator=g).to(dev)

    def products() -> None:
        for _ in range(steps):
            h = xb @ w1.T  # the forward product; the first layer's weight gradient has the same FLOPs
            h.T @ xb

    t_hand, t_auto, t_mm = train(True), train(False), best_of(products, repeats=3) / steps
    print(f"\n[6] robust's classifier step, batch {BATCH}, d {d} -> {DEFAULT_HIDDEN} -> 1, one thread")
    print(f"    by hand + fused Adam {t_hand * 1e3:6.3f} ms   autograd + Adam {t_auto * 1e3:6.3f} ms "
          f"({t_auto / t_hand:4.2f}x)   its two products {t_mm * 1e3:6.3f} ms (by hand {t_hand / t_mm:4.2f}x)")
    fits = [(x[:1024].cpu().numpy(), x[1024:4096].cpu().numpy(), i) for i in range(25)]  # 25 fits of 3 steps
    t_one = best_of(lambda: fit_models(fits, DEFAULT_HIDDEN, 1, dev, batched=False), repeats=2)
    t_all = best_of(lambda: fit_models(fits, DEFAULT_HIDDEN, 1, dev, batched=True), repeats=2)
    print(f"    25 fits x 3 steps: one at a time {t_one * 1e3:7.1f} ms   as one batched model {t_all * 1e3:7.1f} ms "
          f"({t_one / t_all:4.2f}x; robust batches on a GPU)")


if __name__ == "__main__":
    main()
