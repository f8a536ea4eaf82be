"""Selection at scale on one machine: wall time and resident memory of each step of `mak select`.

A synthetic pool (default 2,000,000 x 128 float16 features and 10 x 2,000,000 x 128 float16 views,
~5.6 GB) is written to a temporary store on disk in chunks with ``np.lib.format.open_memmap``,
with a seed of 20,000 and a budget of 20,000 (candidates = 1.5 x budget). Steps, each timed with
the peak resident memory seen while it ran (a sampler thread reads /proc/self/status):

1. ``--dedup`` near-duplicate search over the pool features (1% of rows are planted copies);
2. proximity: k-means of the seed and the distance of every pool image;
3. ECLE, *measured on the first* ``--ecle-batches`` *batches of one ordering and extrapolated*
   to all batches of ``--partitions`` orderings (the full run is hours on 2 cores), compared
   with bare matmuls of the same FLOPs (the Gram blocks ECLE forms: the floor);
4. MAK score (z-scores) and the top ceil(1.5 x budget) candidates;
5. exact greedy k-center over the candidates with the seed as initial centers;
6. two-round k-center (``--parts`` parts) vs exact greedy and both covering radii, on the top
   ``--tr-candidates`` by score with budget ``--tr-budget`` (with 1.5 x budget candidates every
   part is no larger than the budget and two-round would simply be exact greedy);
7. the sharded k-center's time per step with 2 processes (gloo) vs 1 process;
8. end-to-end ``mak select`` subprocesses (every output written): ``--strategy proximity --dedup``,
   and ``--strategy robust`` (the default strategy, on the features alone).

Memory: ``anon`` is the process's anonymous resident memory (heap, tensors): the part that must
stay within 1 GiB plus the candidates' features. ``rss`` also counts pages of the memory-mapped
store files that the kernel keeps mapped after a read; they are page cache, dropped under
pressure, and grow with how much of the store a step touched.

Usage: python benchmarks/bench_scale.py [--n 200000] [--dir /tmp] [--keep] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

GiB = 1 << 30


# --------------------------------------------------------------------------------------------
# Memory sampling
# --------------------------------------------------------------------------------------------

def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                out[k] = int(v.split()[0]) * 1024
    return out


class Sampler:
    """Peak anonymous and total resident memory over a block, sampled every 20 ms."""

    def __init__(self) -> None:
        self.peak_anon = self.peak_rss = 0
        self._stop = threading.Event()

    def _run(self) -> None:
        while not self._stop.is_set():
            s = _status()
            self.peak_anon = max(self.peak_anon, s.get("RssAnon", 0))
            self.peak_rss = max(self.peak_rss, s.get("VmRSS", 0))
            self._stop.wait(0.02)

    def __enter__(self) -> "Sampler":
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.t0
        self._stop.set()
        self._t.join()
        s = _status()
        self.peak_anon = max(self.peak_anon, s.get("RssAnon", 0))
        self.peak_rss = max(self.peak_rss, s.get("VmRSS", 0))


ROWS: list[dict] = []


def record(step: str, s: Sampler, note: str = "", **extra) -> None:
    ROWS.append({"step": step, "seconds": s.seconds, "peak_anon_gib": s.peak_anon / GiB,
                 "peak_rss_gib": s.peak_rss / GiB, "note": note, **extra})
    print(f"  {step:<34s} {s.seconds:9.2f} s   anon {s.peak_anon / GiB:5.2f} GiB   rss {s.peak_rss / GiB:5.2f} GiB"
          f"   {note}", flush=True)


# --------------------------------------------------------------------------------------------
# Synthetic store
# --------------------------------------------------------------------------------------------

def write_pool(root: Path, n: int, d: int, views: int, seed_n: int, dup_frac: float, chunk: int = 100_000) -> None:
    """Clustered float16 features, views = features + augmentation noise, 1% planted copies."""
    rng = np.random.default_rng(0)
    k = 100
    centers = rng.normal(size=(k, d)).astype(np.float32)
    pool = root / "pool"
    pool.mkdir(parents=True)
    f = np.lib.format.open_memmap(pool / "features.npy", mode="w+", dtype=np.float16, shape=(n, d))
    v = np.lib.format.open_memmap(pool / "views.npy", mode="w+", dtype=np.float16, shape=(views, n, d))
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        lab = rng.integers(k, size=hi - lo)
        x = centers[lab] + rng.normal(size=(hi - lo, d)).astype(np.float32)
        f[lo:hi] = x
        for r in range(views):
            v[r, lo:hi] = x + 0.5 * rng.normal(size=(hi - lo, d)).astype(np.float32)
    ndup = int(dup_frac * n)
    src = np.sort(rng.choice(n // 2, ndup, replace=False))
    dst = np.sort(rng.choice(np.arange(n // 2, n), ndup, replace=False))
    f[dst] = f[src]
    f.flush()
    v.flush()
    del f, v
    with open(pool / "items.txt", "w") as fh:
        for lo in range(0, n, chunk):
            fh.write("".join(f"web/{i:09d}.jpg\n" for i in range(lo, min(n, lo + chunk))))
    sd = root / "seed"
    sd.mkdir()
    lab = rng.integers(k // 2, size=seed_n)  # the seed covers half of the clusters
    np.save(sd / "features.npy", (centers[lab] + rng.normal(size=(seed_n, d))).astype(np.float16))
    (sd / "items.txt").write_text("".join(f"seed/{i}.jpg 0\n" for i in range(seed_n)))


# --------------------------------------------------------------------------------------------
# Distributed k-center worker (run under torchrun by this script)
# --------------------------------------------------------------------------------------------

def kcenter_worker(cand_path: str, seed_path: str, steps: int, out: str) -> None:
    from mak import distributed as D
    from mak._tensor import l2_normalize
    from mak.selection.scale.kcenter import greedy_sharded

    D.init("cpu")
    cand = np.load(cand_path, mmap_mode="r")
    lo, hi = D.shard_range(cand.shape[0])
    x = l2_normalize(torch.from_numpy(np.asarray(cand[lo:hi], dtype=np.float32)))
    init = np.load(seed_path)
    res = greedy_sharded(x, steps, init=init, seed=0, sharded=True)
    if D.rank() == 0:
        Path(out).write_text(json.dumps({"step_seconds": res.step_seconds, "world": D.world_size(),
                                         "threads": torch.get_num_threads(), "picks": res.picks[:20].tolist()}))
    D.cleanup()


def run_kcenter_procs(nproc: int, threads: int, cand: Path, seed: Path, steps: int, tmp: Path) -> dict:
    out = tmp / f"kc-{nproc}-{threads}.json"
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(port), __file__, "--kcenter-worker", str(cand), str(seed), str(steps),
           str(out)]
    if nproc == 1:
        cmd = [sys.executable, __file__, "--kcenter-worker", str(cand), str(seed), str(steps), str(out)]
    subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    return json.loads(out.read_text())


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------

def run_e2e(label: str, cmd: list[str], out: Path) -> dict:
    """Run one `mak select` job as a subprocess; its wall time, peak anonymous and resident memory
    (sampled from /proc every 50 ms) and the step timings of its summary.json."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak_anon = peak_rss = 0
    while proc.poll() is None:
        try:
            with open(f"/proc/{proc.pid}/status") as fh:
                for line in fh:
                    if line.startswith("RssAnon:"):
                        peak_anon = max(peak_anon, int(line.split()[1]) * 1024)
                    elif line.startswith("VmRSS:"):
                        peak_rss = max(peak_rss, int(line.split()[1]) * 1024)
        except OSError:
            pass
        time.sleep(0.05)
    _, err_s = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"{label} failed: {err_s[-2000:]}")
    wall = time.perf_counter() - t
    summ = json.loads((out / "summary.json").read_text())
    print(f"  {label:<34s} {wall:9.2f} s   anon {peak_anon / GiB:5.2f} GiB   rss {peak_rss / GiB:5.2f} GiB   "
          f"subprocess, all outputs written; steps {summ['timings_s']}")
    return {"seconds": wall, "peak_anon_gib": peak_anon / GiB, "peak_rss_gib": peak_rss / GiB,
            "timings_s": summ["timings_s"], "counts": summ["counts"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2_000_000, help="pool images (default 2,000,000)")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--views", type=int, default=10)
    ap.add_argument("--seed-size", type=int, default=20_000)
    ap.add_argument("--budget", type=int, default=20_000)
    ap.add_argument("--core-ratio", type=float, default=1.5)
    ap.add_argument("--partitions", type=int, default=10, help="ECLE orderings to extrapolate to (default 10)")
    ap.add_argument("--ecle-batch-size", type=int, default=512)
    ap.add_argument("--ecle-batches", type=int, default=60, help="ECLE batches actually run (default 60)")
    ap.add_argument("--parts", type=int, default=4, help="parts of the two-round k-center (default 4)")
    ap.add_argument("--tr-candidates", type=int, default=100_000,
                    help="candidates of the two-round vs exact comparison (default 100,000)")
    ap.add_argument("--tr-budget", type=int, default=5_000, help="budget of that comparison (default 5,000)")
    ap.add_argument("--dist-steps", type=int, default=1500, help="k-center steps timed with 1 vs 2 processes")
    ap.add_argument("--dedup", type=float, default=0.95, help="dedup threshold (0 skips the step)")
    ap.add_argument("--skip-two-round", action="store_true")
    ap.add_argument("--skip-e2e", action="store_true", help="skip the end-to-end `mak select` subprocesses")
    ap.add_argument("--skip-robust", action="store_true", help="skip the end-to-end `mak select --strategy robust`")
    ap.add_argument("--dir", default=None, help="where to write the temporary store (default: $TMPDIR)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary store")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    ap.add_argument("--kcenter-worker", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.kcenter_worker:
        c, s, steps, out = args.kcenter_worker
        kcenter_worker(c, s, int(steps), out)
        return

    import mak
    from mak.selection.scale import kcenter as kcenter_scale
    from mak._tensor import l2_normalize
    from mak.selection.strategies import Context, mak_score
    from mak.data.store import open_store
    from mak.selection.tailness import batch_losses, batch_plan, ecle_sum

    n, d, r = args.n, args.dim, args.views
    need = n * d * 2 * (1 + r) + args.seed_size * d * 2
    base = Path(args.dir or tempfile.gettempdir())
    free = shutil.disk_usage(base).free
    print(f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPU cores, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), numpy {np.__version__}, "
          f"mak {mak.__version__}")
    print(f"pool {n:,} x {d} float16 + {r} views: {need / 1e9:.2f} GB on {base} ({free / 1e9:.0f} GB free); "
          f"load average {os.getloadavg()[0]:.2f}")
    if need * 1.05 > free:
        raise SystemExit(f"not enough free disk under {base} for the synthetic store; use --n or --dir")
    tmp = Path(tempfile.mkdtemp(prefix="mak-bench-scale-", dir=base))
    results: dict = {"n": n, "dim": d, "views": r, "seed": args.seed_size, "budget": args.budget,
                     "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    try:
        t = time.perf_counter()
        write_pool(tmp, n, d, r, args.seed_size, 0.01)
        print(f"wrote the store in {time.perf_counter() - t:.1f} s -> {tmp}")
        print(f"\n  {'step':<34s} {'wall':>11s}   peak memory")
        with Sampler() as s:
            pool = open_store(tmp / "pool", check_finite=False)
            seed = open_store(tmp / "seed").features()
            feats, views = pool.shards[0].features, pool.shards[0].views
        record("open stores + read seed", s)

        if args.dedup > 0:
            from mak.selection.scale.dedup import find_duplicates

            with Sampler() as s:
                dd = find_duplicates(feats, args.dedup, seed=0)
            record("dedup (near-duplicates)", s, f"{dd.dropped:,} dropped ({int(0.01 * n):,} planted), "
                   f"K={dd.clusters}", dropped=dd.dropped, timings=dd.timings)

        ctx = Context(seed, feats, views, args.budget, "mak", core_ratio=args.core_ratio,
                      batch_size=args.ecle_batch_size, partitions=args.partitions, seed=0)
        with Sampler() as s:
            dist = ctx.distance()
        record("proximity (k-means + distances)", s, f"{n / s.seconds / 1e6:.2f} M images/s")

        # ECLE: a measured subset, extrapolated
        bs = args.ecle_batch_size
        nb = len(batch_plan(n, bs))
        run = min(args.ecle_batches, nb)
        with Sampler() as s:
            acc, _ = ecle_sum(views, batch_size=bs, partitions=1, seed=0, owner=lambda p, k: k < run)
        per_batch = s.seconds / run
        total_batches = nb * args.partitions
        full = per_batch * total_batches
        record(f"ECLE ({run} batches of {total_batches:,})", s,
               f"extrapolated full ECLE: {full / 3600:.2f} h", ecle_full_hours=full / 3600)
        # matmul floor: the Gram blocks ECLE forms for one batch, (a, c >= a) of the (R*B)^2 matrix
        z = torch.nn.functional.normalize(torch.randn(r * bs, d), dim=1)

        def gram_blocks() -> None:
            for a in range(r):
                z[a * bs : (a + 1) * bs] @ z[a * bs :].T

        gram_blocks()
        t = time.perf_counter()
        for _ in range(run):
            gram_blocks()
        floor = (time.perf_counter() - t) / run
        zb = torch.nn.functional.normalize(torch.randn(r, bs, d), dim=2)
        t = time.perf_counter()
        for _ in range(min(run, 10)):
            batch_losses(zb, 0.2)
        compute_only = (time.perf_counter() - t) / min(run, 10)
        results["ecle"] = {"seconds_per_batch": per_batch, "seconds_per_image_per_ordering": per_batch / bs,
                           "matmul_floor_seconds_per_batch": floor, "ratio_to_floor": per_batch / floor,
                           "batch_losses_only_seconds": compute_only,
                           "extrapolated_full_seconds": full, "batches_measured": run,
                           "batches_total": total_batches}
        print(f"  {'':<34s} ECLE {per_batch / bs * 1e6:.1f} us/image/ordering, matmul floor "
              f"{floor / bs * 1e6:.1f} us -> {per_batch / floor:.2f}x (compute alone {compute_only / floor:.2f}x)")
        # the remaining steps need an ECLE for every image: the measured rows, the rest a proxy
        proxy = np.random.default_rng(1).normal(acc[acc > 0].mean() if (acc > 0).any() else 1.0, 0.1, n)
        e = np.where(acc > 0, acc / 45.0, proxy).astype(np.float32)
        ctx.set_ecle(e)

        with Sampler() as s:
            score = mak_score(ctx, e, dist, 0.5)
            k = min(n, math.ceil(args.core_ratio * args.budget))
            cand = ctx.top_k(score, k)
        record("z-scores + top-k candidates", s, f"{k:,} candidates")

        cf = pool.rows(np.sort(cand))  # the candidates' features (float32)
        xs = l2_normalize(torch.from_numpy(cf))
        with Sampler() as s:
            picks = ctx.kcenter(cand, args.budget, init=seed)
        steps = args.budget
        record("k-center exact: kcenter_greedy", s, f"{s.seconds / steps * 1e3:.2f} ms/step (the single-process "
               f"job's engine)", engine="mak.kcenter_greedy")
        with Sampler() as s:
            g = kcenter_scale.greedy_sharded(xs, args.budget, init=seed, sharded=False)
        record("k-center exact: sharded engine", s, f"{g.step_seconds * 1e3:.2f} ms/step (1 process; the torchrun "
               f"engine), cand feats {k * d * 4 / 2**20:.0f} MiB", engine="mak.selection.scale.kcenter.greedy_sharded")
        same = bool((np.sort(cand)[g.picks] == picks).all())
        r_exact = kcenter_scale.covering_radius_sharded(xs, xs[torch.as_tensor(g.picks)], init=seed)
        results["kcenter_exact"] = {"seconds_kcenter_greedy": ROWS[-2]["seconds"], "seconds_sharded": s.seconds,
                                    "ms_per_step_sharded": g.step_seconds * 1e3, "radius": r_exact,
                                    "same_picks_as_kcenter_greedy": same,
                                    "candidate_features_mib": k * d * 4 / 2**20}
        print(f"  {'':<34s} sharded engine picks == kcenter_greedy picks: {same}")

        if not args.skip_two_round:
            # At core ratio 1.5 every part of the 1.5 x budget candidates is no larger than the budget, so
            # two-round would equal exact greedy: compare them where round 1 has work to do instead.
            tk = min(n, args.tr_candidates)
            tb = min(args.tr_budget, tk)
            trc = np.sort(ctx.top_k(score, tk))
            tf = pool.rows(trc)
            tx = l2_normalize(torch.from_numpy(tf))
            with Sampler() as s:
                ge = kcenter_scale.greedy_sharded(tx, tb, init=seed, sharded=False)
            r_ex = kcenter_scale.covering_radius_sharded(tx, tx[torch.as_tensor(ge.picks)], init=seed)
            record(f"k-center exact ({tk:,} cand, budget {tb:,})", s, f"radius {r_ex:.4f}")
            with Sampler() as s:
                tr = kcenter_scale.kcenter_two_round(tf, tb, parts=args.parts, init=seed, return_result=True)
            r_two = kcenter_scale.covering_radius_sharded(tx, tx[torch.as_tensor(tr.picks)], init=seed)
            ratio = kcenter_scale.angle(r_two) / max(kcenter_scale.angle(r_ex), 1e-12)
            record(f"k-center two-round ({args.parts} parts)", s,
                   f"radius {r_two:.4f} vs exact {r_ex:.4f}: angle ratio {ratio:.3f} (guarantee <= 4), "
                   f"per-run bound {tr.radius_bound:.4f}")
            results["kcenter_two_round"] = {"candidates": tk, "budget": tb, "parts": args.parts,
                                            "seconds": s.seconds, "exact_seconds": ROWS[-2]["seconds"],
                                            "radius": r_two, "exact_radius": r_ex, "angle_ratio": ratio,
                                            "round1_radius": tr.round1_radius, "round2_radius": tr.round2_radius,
                                            "radius_bound": tr.radius_bound, "union": tr.union}
            del tf, tx

        # distributed k-center: per-step time, 2 processes vs 1
        cpath, spath = tmp / "cand.npy", tmp / "seedf.npy"
        np.save(cpath, cf)
        np.save(spath, seed)
        steps = min(args.dist_steps, args.budget)
        dist_rows = {}
        for nproc, threads in ((1, 1), (1, 2), (2, 1)):
            res = run_kcenter_procs(nproc, threads, cpath, spath, steps, tmp)
            dist_rows[f"{nproc}p x {threads}t"] = res["step_seconds"]
        results["kcenter_sharded_ms_per_step"] = {k: v * 1e3 for k, v in dist_rows.items()}
        print(f"  {'k-center per step (' + str(steps) + ' steps)':<34s} "
              + ", ".join(f"{k}: {v * 1e3:.2f} ms" for k, v in dist_rows.items()))
        results["steps"] = ROWS
        if not args.skip_e2e:
            # whole jobs in a subprocess, every output written: proximity with --dedup (no ECLE: hours),
            # and robust, the default strategy (features only)
            common = [sys.executable, "-m", "mak", "select", "--seed-store", str(tmp / "seed"), "--pool-store",
                      str(tmp / "pool"), "--budget", str(args.budget), "--no-progress"]
            dedup = str(args.dedup if args.dedup > 0 else 0.95)
            jobs = {"mak select proximity --dedup": ("end_to_end", ["--strategy", "proximity", "--dedup", dedup]),
                    "mak select robust": ("end_to_end_robust", ["--strategy", "robust"])}
            for label, (key, extra) in jobs.items():
                if key == "end_to_end_robust" and args.skip_robust:
                    continue
                results[key] = run_e2e(label, [*common, *extra, "--out", str(tmp / key)], tmp / key)
        scaled = [x for x in ROWS if x.get("engine") != "mak.kcenter_greedy"]
        results["peak_anon_gib"] = max(x["peak_anon_gib"] for x in scaled)
        results["peak_rss_gib"] = max(x["peak_rss_gib"] for x in scaled)
        cand_gib = k * d * 4 / GiB
        print(f"\npeak anonymous memory {results['peak_anon_gib']:.2f} GiB (target <= 1 GiB + candidates' "
              f"features {cand_gib:.3f} GiB); peak RSS incl. mapped store pages {results['peak_rss_gib']:.2f} GiB "
              f"(all steps but the kcenter_greedy row)")
        kg = [x for x in ROWS if x.get("engine") == "mak.kcenter_greedy"][0]
        print(f"kcenter_greedy (single-process job) peaked at {kg['peak_anon_gib']:.2f} GiB anonymous: its "
              f"init-similarity blocks are 16384 x 16384 float32 (1 GiB); the sharded engine uses 4096-row blocks")
        print("ECLE was measured on a subset of batches and extrapolated (see the ECLE row).")
        print(f"load average at the end {os.getloadavg()[0]:.2f} (other processes on these cores slow every row)")
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2, default=float))
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
