"""`mak select` under torchrun (2 and 3 gloo processes on CPU) equals the single-process selection.

One torchrun launch per world size runs every job (each strategy, two-round k-center, --dedup, a
sharded pool and the Python API) in the same process group, to keep start-up costs down; one more
launch goes through the real entry point ``torchrun -m mak select``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from mak.data.store import write_shards_index, write_store

STRATEGIES = ["mak", "random", "kcenter", "tailness", "proximity", "tailness+proximity"]
try:
    import mak.selection.robust  # noqa: F401

    STRATEGIES.append("robust")
except ImportError:  # pragma: no cover
    pass

COMMON = ["--budget", "24", "--ecle-batch-size", "32", "--partitions", "3", "--clusters", "4", "--no-progress"]

WORKER = textwrap.dedent('''
    import json, sys
    import numpy as np
    from mak import distributed as D
    D.init("cpu")
    from mak.cli import main
    jobs = json.load(open(sys.argv[1]))
    for args in jobs["cli"]:
        rc = main(args)
        assert rc == 0, (args, rc)
    if jobs.get("api"):
        from mak.selection.scale.context import gather_scores, select_distributed
        api = jobs["api"]
        d = np.load(api["data"])
        sel = select_distributed(d["seed"], d["pool"], d["views"], 24, strategy="mak", clusters=4, batch_size=32,
                                 partitions=3, seed=5)
        n = d["pool"].shape[0]
        full = {k: gather_scores(getattr(sel, k), n) for k in ("ecle", "distance", "score")}
        if D.rank() == 0:
            np.savez(api["out"], indices=sel.indices, candidates=sel.candidates, **full)
    D.cleanup()
''')


def torchrun(nproc: int, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    # --standalone: the rendezvous binds its own free port (no race with a port probed beforehand)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    rng = np.random.default_rng(42)
    n = 301
    seed = rng.normal(size=(50, 16)).astype(np.float32)
    pool = rng.normal(size=(n, 16)).astype(np.float16)
    views = rng.normal(size=(3, n, 8)).astype(np.float16)
    items = [f"pool/{i}.png {i % 5}" for i in range(n)]
    write_store(root / "seed", seed, [f"seed/{i}.png 0" for i in range(50)])
    write_store(root / "pool", pool, items, views=views)
    cuts = [0, 90, 91, 200, n]  # uneven shards, one of a single row
    (root / "sharded").mkdir()
    for k in range(4):
        write_store(root / "sharded" / f"part{k}", pool[cuts[k]: cuts[k + 1]], items[cuts[k]: cuts[k + 1]],
                    views=views[:, cuts[k]: cuts[k + 1]])
    write_shards_index(root / "sharded", [f"part{k}" for k in range(4)])
    # a pool with planted near-duplicates for --dedup
    base = rng.normal(size=(120, 16))
    grp = np.repeat(np.arange(120), rng.integers(1, 4, size=120))
    dup = (base[grp] + 0.005 * rng.normal(size=(grp.size, 16))).astype(np.float32)[rng.permutation(grp.size)]
    write_store(root / "dups", dup, [f"dup/{i}.png 0" for i in range(dup.shape[0])],
                views=rng.normal(size=(2, dup.shape[0], 8)).astype(np.float32))
    np.savez(root / "api.npz", seed=seed, pool=pool.astype(np.float32), views=views.astype(np.float32))
    return root


def jobs_for(world: int) -> list[tuple[str, list[str]]]:
    """(name, extra args) of every job run both on one process and under torchrun with ``world`` ranks."""
    out = [(s, ["--pool-store", "pool", "--strategy", s]) for s in STRATEGIES]
    out.append(("robust-z", ["--pool-store", "pool", "--strategy", "robust", "--fusion", "z"]) if "robust" in
               STRATEGIES else ("mak-a", ["--pool-store", "pool", "--strategy", "mak", "--alpha", "0.2"]))
    if "robust" in STRATEGIES:  # the seed share and the classifier against a uniform sample of the pool
        out.append(("robust-sub", ["--pool-store", "pool", "--strategy", "robust", "--share-reference", "150",
                                   "--share-k", "10"]))
    parts = world if world == 2 else 4  # 3 ranks: a part count that is not the world size
    out.append(("tworound", ["--pool-store", "pool", "--strategy", "kcenter", "--kcenter", "two-round",
                             "--kcenter-parts", str(parts)]))
    out.append(("sharded", ["--pool-store", "sharded", "--strategy", "mak"]))
    out.append(("dedup", ["--pool-store", "dups", "--strategy", "mak", "--dedup", "0.95"]))
    return out


def cli_args(name: str, extra: list[str], out: str) -> list[str]:
    return ["select", "--seed-store", "seed", *extra, *COMMON, "--out", out]


def reference(root: Path, name: str, extra: list[str], cli) -> Path:
    out = root / f"ref-{name}"
    if not out.exists():
        cwd = os.getcwd()
        os.chdir(root)
        try:
            assert cli(*cli_args(name, extra, str(out))) == 0
        finally:
            os.chdir(cwd)
    return out


def same_outputs(a: Path, b: Path, dedup: bool = False) -> None:
    assert (a / "selection.txt").read_text() == (b / "selection.txt").read_text()
    assert (a / "scores.csv").read_bytes() == (b / "scores.csv").read_bytes()
    if dedup:
        assert (a / "dedup.csv").read_bytes() == (b / "dedup.csv").read_bytes()


@pytest.mark.parametrize("world", [2, 3])
def test_torchrun_equals_single_process(data, cli, world):
    jobs = jobs_for(world)
    # two-round on one process with the same parts simulates the ranks exactly
    refs = {name: reference(data, name, extra, cli) for name, extra in jobs}
    spec = {"cli": [cli_args(name, extra, f"w{world}-{name}") for name, extra in jobs]}
    if world == 3:
        spec["api"] = {"data": str(data / "api.npz"), "out": str(data / "api-out.npz")}
    (data / f"jobs{world}.json").write_text(json.dumps(spec))
    (data / "worker.py").write_text(WORKER)
    res = torchrun(world, "worker.py", f"jobs{world}.json", cwd=data)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for name, _ in jobs:
        same_outputs(refs[name], data / f"w{world}-{name}", dedup=name == "dedup")
        summary = json.loads((data / f"w{world}-{name}" / "summary.json").read_text())
        assert summary["info"]["distributed"]["world_size"] == world
    if world == 3:
        import mak

        d = np.load(data / "api.npz")
        ref = mak.select(d["seed"], d["pool"], d["views"], 24, strategy="mak", clusters=4, batch_size=32,
                         partitions=3, seed=5)
        got = np.load(data / "api-out.npz")
        assert got["indices"].tolist() == ref.indices.tolist()
        assert got["candidates"].tolist() == ref.candidates.tolist()
        np.testing.assert_array_equal(got["ecle"], ref.ecle.astype(np.float64))
        np.testing.assert_array_equal(got["distance"], ref.distance.astype(np.float64))
        np.testing.assert_allclose(got["score"], ref.score, rtol=0, atol=1e-12)
    summary = json.loads((data / f"w{world}-tworound" / "summary.json").read_text())
    kc = summary["info"]["kcenter"]
    assert kc["mode"] == "two-round" and kc["exact_radius"] is not None
    from mak.selection.scale.kcenter import angle

    assert angle(kc["radius"]) <= 4 * angle(kc["exact_radius"]) + 1e-6


def test_torchrun_module_entry_point(data, cli):
    """The real `torchrun -m mak select` entry; only rank 0 reports."""
    ref = reference(data, "mak", ["--pool-store", "pool", "--strategy", "mak"], cli)
    res = torchrun(2, "-m", "mak", *cli_args("mak", ["--pool-store", "sharded", "--strategy", "mak"], "entry"),
                   cwd=data)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert res.stdout.count("selected 24 images") == 1
    same_outputs(ref, data / "entry")
    assert not [p for p in data.iterdir() if p.name.startswith(".entry")]  # no temporaries left
