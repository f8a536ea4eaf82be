"""``mak run``: the whole MAK loop as cached stages in one run directory.

pretrain on the seed -> embed seed and pool -> select (one or several strategies) -> re-train from
scratch on seed + each selection (and on the seed alone: "none") -> evaluate -> results + report.

The stages (:mod:`mak.run.stage`) are laid out by :mod:`mak.run.plan`, do what :mod:`mak.run.stages`
says for their kind, and end in the results and report of :mod:`mak.run.results`; this module
executes a plan.

Under ``torchrun`` (``torchrun --nproc_per_node G -m mak run ...``; several nodes need a shared run
directory) the stages that split their work across ranks run on every rank: pre-training and
re-training (DDP), embedding (one shard per rank, published as one store), ECLE (each rank scores
a share of the batches; the exact sums add up to one process's values) and selection (the scaled
job of :mod:`mak.run.select_job`). The others (benchmark build, evaluation, results and
report) run on rank 0 while the other ranks wait. Rank 0 alone decides what is cached
and writes the stage records, so the finished stages of a run under torchrun are reused by one
process and vice versa (the stage keys do not depend on the number of processes).

See :mod:`mak.run.plan` for the layout of the run directory.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

from mak import distributed as D
from mak.atomic import remove_debris, write_text
from mak._tensor import auto_device
from mak.lock import job_lock
from mak.paths import output_dir
from mak.run.plan import Plan, build_plan
from mak.run.results import collect_results, results_table, write_outputs


def describe_plan(plan: Plan) -> str:
    lines = [f"run directory: {plan.run_dir}"]
    width = max(len(s.name) for s in plan.stages)
    for s in plan.stages:
        lines.append(f"  {s.name:<{width}}  {s.status()}")
    todo = sum(1 for s in plan.stages if not (s.cached() or s.restorable()))
    lines.append(f"{len(plan.stages) - todo} cached, {todo} to run")
    return "\n".join(lines)


def _restore_previous(plan: Plan, log: Callable[[str], None]) -> list[str]:
    """Swap back in every stage's previous output that matches its key (rank 0); their names."""
    names = []
    for st in plan.stages:
        if st.restorable():
            st.restore()
            names.append(st.name)
            log(f"[mak run] {st.name}: cached (its previous output, swapped back in)")
    return names


def run_pipeline(config: dict, run_dir: str | Path, dry_run: bool = False, log: Callable[[str], None] = print,
                 progress: bool = True, verbose: bool | None = None) -> Plan:
    """Execute (or with ``dry_run`` only describe) every stage that is not cached; ``progress``: the
    stages' progress bars, ``verbose``: their summary lines (default: as ``progress``; the stage
    lines of ``log`` come either way)."""
    import yaml

    plan = build_plan(config, output_dir(run_dir))
    plan.progress = progress
    plan.verbose = progress if verbose is None else verbose
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
        restored = _restore_previous(plan, log) if main else []
        todo = D.broadcast_object([not st.cached() for st in plan.stages] if main else None)
        if main and (any(todo) or restored):  # the outputs describe the stages as they are: none while they change
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
