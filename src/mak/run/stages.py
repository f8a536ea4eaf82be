"""What each kind of ``mak run`` stage does: the stage functions (benchmark, pretrain, embed, ECLE,
select, retrain, eval) and their helpers (the sources of a stage's repeat, its roles, the training
arguments, the selection analysis)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mak import distributed as D
from mak.atomic import atomic_path, move_entries, write_json, write_npy
from mak.data.sources import CombinedSource, pool_mix
from mak.data.store import item_file_lines
from mak.errors import MakError
from mak.run.stage import Stage

if TYPE_CHECKING:
    from mak.run.plan import Plan


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


# ----------------------------------------------------------------------------- stage bodies
def _progress(stage: Stage) -> bool:
    return bool(getattr(stage, "plan").progress)


def _verbose(stage: Stage) -> bool:
    return bool(getattr(stage, "plan").verbose)


def _roles(stage: Stage) -> dict:
    plan: Plan = stage.plan  # type: ignore[attr-defined]
    r = int(stage.name.split("/")[1][1:])
    return plan.repeats[r]


def sources(stage: Stage) -> dict[str, Any]:
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


def run_bench(stage: Stage) -> None:
    from mak.bench.openworld import build_benchmark

    p = stage.params  # the class settings and ood_ratio are keyed only where not the default
    extra = {k: p[k] for k in ("ood_ratio", "pool_classes", "near_classes") if k in p}
    build_benchmark(stage.path, seed=p["seed"], scale=p["scale"], data_dir=p["data_dir"], overwrite=True,
                    progress=_progress(stage), **extra)


def _pretrain_kwargs(p: dict, n_images: int) -> dict:
    batch = p["batch_size"]
    if batch is not None and batch > n_images:  # tiny (scaled-down) sets: one batch of everything
        batch = n_images - n_images % 2
    return dict(backbone=p["backbone"], epochs=int(p["epochs"]), batch_size=batch, base_lr=p["lr"],
                warmup_epochs=p["warmup_epochs"], seed=p["seed"], image_size=p["image_size"], device=p["device"],
                amp=p["amp"], channels_last=p["channels_last"], num_workers=p["workers"])


def run_pretrain(stage: Stage) -> None:
    from mak.train.pretrain import pretrain

    srcs = sources(stage)
    src = srcs["seed"]
    if "pool_mix" in stage.params:  # the pool-aware model: seed + a uniform sample of the pool
        src = pool_mix(src, srcs["pool"], stage.params["pool_mix"], stage.params["seed"])
        if D.rank() == 0:
            write_json(stage.path / "train_set.json", {
                "seed": len(srcs["seed"]), "pool_rows": len(src.rows), "images": len(src),
                "pool_skipped": len(src.skipped), "skipped_items": [r for _, r in src.skipped[:1000]]})
    pretrain(src, stage.path, resume=(stage.path / "checkpoint.pt").exists(), progress=_progress(stage),
             verbose=_verbose(stage), **_pretrain_kwargs(stage.params, len(src)))


def run_embed(stage: Stage) -> None:
    from mak.train.embed import embed

    p = stage.params
    src = sources(stage)[p["part"]]
    ckpt = stage.deps[0].path / "checkpoint.pt"  # the seed-only or the pool-aware model
    embed(src, ckpt, stage.path / "store", views=int(p["views"]), seed=p["seed"], dtype=p["dtype"],
          batch_size=p["batch_size"], device=p["device"], overwrite=True, progress=_progress(stage),
          verbose=_verbose(stage))
    if D.rank() != 0:  # under torchrun rank 0 has published the one store (embed waits for every shard)
        return
    move_entries(stage.path / "store", stage.path)


def run_ecle(stage: Stage) -> None:
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


def run_select(stage: Stage) -> None:
    from mak.run.select_job import select_stores

    p = dict(stage.params)
    roles = _roles(stage)
    srcs = sources(stage)
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


def _groups(srcs: dict, seed_labels: np.ndarray, many: float | None = None, few: float | None = None) -> dict:
    """The benchmark's Many/Medium/Few classes, else the seed's by ``many``/``few`` (default: evaluate's)."""
    if srcs.get("manifest") and "groups" in srcs["manifest"]:
        return srcs["manifest"]["groups"]
    from mak.bench.evaluate import DEFAULT_FEW, DEFAULT_MANY, class_groups

    many = DEFAULT_MANY if many is None else many
    few = DEFAULT_FEW if few is None else few

    vals, counts = np.unique(seed_labels[seed_labels >= 0], return_counts=True)
    return class_groups({int(v): int(c) for v, c in zip(vals, counts)}, many, few)


def run_retrain(stage: Stage) -> None:
    from mak.train.pretrain import pretrain

    p = stage.params
    roles = _roles(stage)
    srcs = sources(stage)
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
    pretrain(source, stage.path, resume=(stage.path / "checkpoint.pt").exists(), progress=_progress(stage),
             verbose=_verbose(stage), **kw)


def run_eval(stage: Stage) -> None:
    from mak.train.embed import compute_features
    from mak.bench.evaluate import evaluate_features
    from mak.train.pretrain import load_model

    p = stage.params
    roles = _roles(stage)
    srcs = sources(stage)
    strategy = stage.name.split("/")[-1]
    if srcs["train"] is None or srcs["test"] is None:
        write_json(stage.path / "eval.json", {"skipped": "no labeled evaluation splits (data.eval)"})
        return
    model, cfg = load_model(roles["retrain"][strategy].path / "checkpoint.pt", p["device"])

    def feats(src, what):
        x = compute_features(model, src, cfg["image_size"], cfg["channels"], batch_size=p["batch_size"],
                             device=p["device"], progress=f"features: {what}" if _progress(stage) else None)
        return x, labels_or_none(src.items())

    tx, ty = feats(srcs["train"], "train")
    qx, qy = feats(srcs["test"], "test")
    fx, fy = feats(srcs["fewshot"], "few-shot pool") if srcs["fewshot"] is not None else (None, None)
    seed_labels = labels_or_none(srcs["seed"].items())
    groups = _groups(srcs, seed_labels, p["many"], p["few"]) if seed_labels is not None else None
    res = evaluate_features(tx, ty, fx, fy, qx, qy, groups=groups, many=p["many"], few=p["few"], shots=p["shots"],
                            draws=p["draws"], seed=p["seed"], k=p["knn_k"])
    write_json(stage.path / "eval.json", res)
