"""Feature stores from a pre-trained checkpoint (``mak embed``).

:func:`embed` runs every image of a source through the model of a :func:`mak.train.pretrain.pretrain`
checkpoint and writes a feature store (:mod:`mak.data.store`):

- ``features.npy`` (N x D): backbone output without augmentation -- the image's shorter side
  resized to the working size and the centre square taken (``ImageDataset(mode="center")``),
  normalised by :func:`mak.train.augment.center_transform`;
- ``views.npy`` (R x N x d): the projection-head output of R augmented passes
  (:class:`mak.train.augment.SimCLRAugment` applied to the same centre-cropped image), **L2-normalised**
  (``meta.json: views_normalized = true``); the randomness of view ``r`` of source row ``i`` is
  ``view_key(seed, r, i)``, so the store depends neither on batch size, worker count nor world
  size;
- ``items.txt``: the item line of every row that exists;
- ``meta.json``: checkpoint path, sha256 (of the bytes loaded), epoch and whether its pre-training
  finished, source description, transform, R, dtype, seed,
  skipped count and the first 1,000 skipped items with their reasons.

A corrupt pool image is skipped and counted, the first :data:`SKIP_LINES` of each process named
on stderr (path and reason): the store's rows are exactly the readable images, in source order.

Storage and resumption. Rows are computed in blocks of ``batch_size`` source rows (a batch
never straddles a block, so each row's batch -- and therefore its arithmetic -- is the same
however the work is split). Results go straight into ``np.lib.format.open_memmap`` files in a
work directory ``.<out>.partial`` beside the output, never all in RAM. Every ``flush_rows`` rows a
rank flushes its memmaps and appends the finished blocks to its ``progress-<rank>.log``; a run
killed and started again with the same checkpoint, source and parameters skips those blocks.
At the end the arrays are compacted (when rows were skipped) and the directory is renamed into
place, so ``out`` appears complete or not at all.

Under ``torchrun`` rank ``r`` embeds the contiguous blocks ``shard_range(num_blocks)`` gives it.
``merge=True``: all ranks write into the same work files (shared storage needed) and rank 0
publishes one store identical to a single-process run. ``merge=False``: each rank writes its own
shard ``shard-0000r`` and rank 0 adds ``shards.json`` (the sharded-store format that
:func:`mak.data.store.open_store` reads).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from mak import distributed as D
from mak.train import native
from mak.atomic import atomic_dir, link_copy, move_entries, remove_debris, reserve, write_json
from mak._tensor import auto_device
from mak.errors import MakError
from mak.options import Option, ParameterError, by_name, choice, defaults, integer
from mak.lock import job_lock
from mak.paths import new_output_dir
from mak.data.store import FEATURES, ITEMS, META, VIEWS, write_shards_index

DTYPES = {"float16": np.float16, "float32": np.float32}
PARAMS = "params.json"
#: Rows between flushes of the memmaps / progress records (resume granularity).
FLUSH_ROWS = 8192
#: Rows copied at a time when compacting or moving arrays.
COPY_ROWS = 65536
DEFAULT_BATCH_SIZE = 256  # images per forward pass of `mak embed`, `mak evaluate` and `mak run`'s embed stage


def view_count(name: str, raw: Any) -> int:
    """Augmented views per image: 0 (none) or an integer >= 2 (ECLE needs pairs); a parser of :mod:`mak.options`."""
    bad = ParameterError(name, f"{name}={raw!r} must be 0 (no views) or an integer >= 2")
    try:
        value = integer(0)(name, raw)
    except ParameterError:
        raise bad from None
    if value == 1:
        raise bad
    return value


# embed's options, declared once: `mak embed`'s flags, `mak run`'s embed.* keys and embed()'s defaults.
EMBED_OPTIONS: tuple[Option, ...] = (
    Option("views", 10, "augmented views per image for views.npy (the paper's R): 0 for none, else at least 2 "
           "(default 10)", view_count, "R"),
    Option("seed", 0, "augmentation seed, an integer >= 0: same seed, same store (default 0)", integer(0), "S"),
    Option("dtype", "float16", "storage precision: float16 or float32 (default float16)", choice(*DTYPES),
           "float16|float32"),
    Option("batch_size", DEFAULT_BATCH_SIZE, f"images per forward pass (default {DEFAULT_BATCH_SIZE})", integer(1), "B"),
    Option("num_workers", None, "DataLoader workers decoding images (default: half the process's cores, at most 4; with "
           "CUDA at most 8; 0 for arrays)",
           integer(0), "N", key="workers"),
)


def model_trained_on(config: dict) -> dict:
    """What the checkpoint's model was trained on: images, and pool rows mixed in (0: the seed alone)."""
    src = config.get("source") or {}
    return {"images": config.get("num_images"), "pool_rows": int(src.get("pool_rows", 0) or 0)}

def compute_features(model, source, image_size: int, channels: int, batch_size: int = DEFAULT_BATCH_SIZE,
                     device: str | torch.device = "cpu", num_workers: int = 0, progress: str | None = None
                     ) -> np.ndarray:
    """Backbone features of every image of ``source`` without augmentation: float32 N x D.

    Centre crop + :func:`mak.train.augment.center_transform`, ``model.backbone`` in eval mode.
    An unreadable image raises :class:`MakError` naming it. ``progress``: a bar of images with
    that label (None: no bar).
    """
    from torch.utils.data import DataLoader

    from mak.data.sources import ImageDataset
    from mak.progress import bar
    from mak.train.augment import center_transform
    from mak.train.device import resolve_channels_last

    dev = auto_device(device or "cpu")
    core = getattr(model, "module", model)
    core.eval().to(dev)
    use_cl = resolve_channels_last(dev, None)
    if use_cl:
        core.to(memory_format=torch.channels_last)
    ds = ImageDataset(source, image_size, channels, mode="center")
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=dev.type == "cuda")
    out = np.empty((len(ds), int(core.feat_dim)), dtype=np.float32)
    with torch.inference_mode(), bar(len(ds), progress, unit="img", enabled=progress is not None) as shown:
        for imgs, idx, ok in loader:
            ok = torch.as_tensor(ok, dtype=torch.bool)
            if not bool(ok.all()):
                i = int(torch.as_tensor(idx)[~ok][0])
                raise MakError(f"unreadable image {ds.check(i) or source.item(i)}")
            x = center_transform(imgs.to(dev, non_blocking=True), image_size, channels)
            if use_cl:
                x = x.contiguous(memory_format=torch.channels_last)
            f = core.backbone(x).float()
            out[np.asarray(idx)] = f.cpu().numpy()
            shown.update(len(f))
    return out


# ------------------------------------------------------------------------------------------
# The embed job.
# ------------------------------------------------------------------------------------------

def _work_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.partial"


def _segments(n: int, batch_size: int, world: int, merge: bool) -> list[tuple[str, int, int]]:
    """Row ranges with their own arrays: one ``("all", 0, n)`` when merging, else one per rank."""
    if merge:
        return [("all", 0, n)]
    nblocks = -(-n // batch_size)
    segs = []
    for r in range(world):
        b0, b1 = D.shard_range(nblocks, r, world)
        segs.append((f"shard-{r:05d}", min(n, b0 * batch_size), min(n, b1 * batch_size)))
    return segs


def _open_arrays(seg_dir: Path, rows: int, feat_dim: int, views: int, view_dim: int, dtype, create: bool):
    mode = "w+" if create else "r+"
    if create:
        seg_dir.mkdir(parents=True, exist_ok=True)
    feats = np.lib.format.open_memmap(seg_dir / FEATURES, mode=mode, dtype=dtype, shape=(rows, feat_dim))
    vws = None
    if views:
        vws = np.lib.format.open_memmap(seg_dir / VIEWS, mode=mode, dtype=dtype, shape=(views, rows, view_dim))
    if create:  # a full disk fails here, in one line, not as a SIGBUS in the middle of the writes
        reserve(seg_dir / FEATURES)
        if views:
            reserve(seg_dir / VIEWS)
    return feats, vws


def _read_progress(work: Path) -> tuple[set[int], dict[int, str]]:
    """Finished blocks and skipped rows (row -> reason) recorded by every rank's progress log."""
    done: set[int] = set()
    skipped: dict[int, str] = {}
    for log in sorted(work.glob("progress-*.log")):
        with open(log, encoding="utf-8") as fh:
            for line in fh:
                if not line.endswith("\n"):
                    break  # torn last line of a killed run
                try:
                    rec = json.loads(line)
                except ValueError:
                    break
                done.update(int(b) for b in rec["blocks"])
                for row, reason in rec.get("skipped", []):
                    skipped[int(row)] = str(reason)
    return done, skipped


class _BlockSampler(torch.utils.data.Sampler):
    """Batches = the listed blocks of ``batch_size`` source rows, generated lazily, in order."""

    def __init__(self, blocks: list[int], batch_size: int, n: int):
        self.blocks, self.batch_size, self.n = blocks, batch_size, n

    def __len__(self) -> int:
        return len(self.blocks)

    def __iter__(self):
        for b in self.blocks:
            yield list(range(b * self.batch_size, min(self.n, (b + 1) * self.batch_size)))

    def rows(self) -> int:
        return sum(min(self.n, (b + 1) * self.batch_size) - b * self.batch_size for b in self.blocks)


def _commit_blocks(files: list[str], log_path: Path, record: str) -> None:
    """fsync the store's memmapped files (their dirty pages), then append ``record`` to the log."""
    for name in files:
        fd = os.open(name, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    with open(log_path, "a", encoding="utf-8") as fh:
        fh.write(record)
        fh.flush()
        os.fsync(fh.fileno())


def _row_blocks(ds: Any, blocks: list[int], batch_size: int, n: int
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """What the DataLoader yields for each block, read as one slice of an in-memory array."""
    for b in blocks:
        lo, hi = b * batch_size, min(n, (b + 1) * batch_size)
        yield ds.fit_rows(lo, hi), torch.arange(lo, hi), torch.ones(hi - lo, dtype=torch.bool)


class _Progress:
    """Live throughput on rank 0 (tqdm), counting this rank's rows."""

    def __init__(self, total: int, initial: int, enabled: bool, desc: str):
        from mak.progress import bar

        self.bar = bar(total, desc, unit="img", enabled=enabled, initial=initial, dynamic_ncols=True,
                       file=sys.stderr, smoothing=0.1)

    def update(self, n: int) -> None:
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


_DEFAULT = defaults(EMBED_OPTIONS)


def embed(source, checkpoint: str | os.PathLike, out: str | os.PathLike, views: int = _DEFAULT["views"],
          seed: int = _DEFAULT["seed"], dtype: str = _DEFAULT["dtype"], batch_size: int = _DEFAULT["batch_size"], device: str | torch.device = "cpu",
          num_workers: int | None = None, merge: bool = True, progress: bool = True, *,
          amp: bool | None = None, channels_last: bool | None = None, overwrite: bool = False,
          flush_rows: int = FLUSH_ROWS, stats: dict | None = None, strict: bool = False,
          encoder: dict | None = None, verbose: bool | None = None) -> Path:
    """Embed every image of ``source`` with ``checkpoint``'s model; write a feature store at ``out``.

    ``encoder`` (``{"backbone": NAME, "image_size": PX, "channels": C}``, size and channels
    optional): ``checkpoint`` is then a file of pretrained backbone weights, used as a frozen
    encoder with no projection head; views are its own outputs, and ``meta.json`` names the
    model external.

    Parameters
    ----------
    views: R augmented views per image for ``views.npy`` (0: no views; otherwise >= 2).
    seed: augmentation seed (view ``r`` of row ``i`` uses ``view_key(seed, r, i)``).
    dtype: ``"float16"`` or ``"float32"`` storage.
    batch_size: images per forward pass (also the block unit of the resume bookkeeping).
    num_workers: DataLoader decoding workers (default :func:`mak.train.device.default_num_workers`).
    merge: under torchrun, publish one store (``True``) or one shard per rank plus ``shards.json``.
    amp, channels_last: as for :func:`mak.train.pretrain.pretrain` (auto by default).
    overwrite: replace an existing store at ``out``.
    flush_rows: rows between checkpoints of the progress (resume granularity).
    progress: the progress bar; verbose: the summary lines on stderr (default: as ``progress``).
    stats: if a dict is given, it receives this process's ``images``, ``seconds`` and
        ``images_per_s`` of the embedding loop (for benchmarks).
    strict: a checkpoint whose pre-training did not finish (epoch < epochs) is an error; without
        it, a warning (``meta.json`` records the epoch either way).

    Returns ``out``. Raises :class:`MakError` for a bad checkpoint, bad parameters, an existing
    ``out`` (without ``overwrite``) or a source whose every image is unreadable.
    """
    out = Path(out)
    _check_options(out, views, dtype, batch_size, overwrite)
    job = _setup(source, checkpoint, out, views, seed, dtype, batch_size, device, merge, amp, channels_last, encoder)
    _check_finished(job.cfg["checkpoint"], checkpoint, strict)
    with job_lock(out):  # one writer per store: a second one stops here, naming this one
        verbose = progress if verbose is None else verbose
        plan = _plan(job, verbose)
        loader = _loader(job, plan.todo, num_workers)
        writer = _Writer(job, plan, flush_rows, progress)
        elapsed = _embed_blocks(job, plan.todo, loader, _BatchEmbedder(job), writer)
        if stats is not None:
            stats.update(images=plan.todo_rows, seconds=elapsed, images_per_s=plan.todo_rows / max(elapsed, 1e-9))
        D.barrier()
        n_ok, n_skipped = _publish_store(job, overwrite)
        if job.main_proc:
            remove_debris(out)  # publications of killed runs of this store (its resumable work stays)
        D.barrier()
    if job.main_proc and verbose:
        rate = plan.todo_rows / max(elapsed, 1e-9)
        print(f"mak embed: {n_ok} rows -> {out} ({n_skipped} skipped), {rate:.0f} images/s"
              f"{' per process' if job.world > 1 else ''}", file=sys.stderr)
    return out


# ---- setup: options, model, run parameters ---------------------------------------------------

@dataclass
class _Job:
    """One ``embed`` call: its options, the loaded model and the geometry it works at."""

    source: Any
    checkpoint: str | os.PathLike
    out: Path
    views: int
    seed: int
    dtype: str
    batch_size: int
    merge: bool
    dev: torch.device
    world: int
    rank: int
    model: Any
    cfg: dict
    size: int
    channels: int
    amp_dtype: torch.dtype | None
    use_cl: bool
    feat_dim: int
    view_dim: int
    n: int
    ds: Any  # ImageDataset(source, size, channels, mode="center")
    #: What a resumable work directory must match (also the store's meta): see :func:`_run_params`.
    params: dict = field(default_factory=dict)

    @property
    def main_proc(self) -> bool:
        return self.rank == 0

    @property
    def np_dtype(self):
        return DTYPES[self.dtype]

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch.float16 if self.np_dtype == np.float16 else torch.float32

    @property
    def nblocks(self) -> int:
        return -(-self.n // self.batch_size)

    @property
    def work(self) -> Path:
        return _work_dir(self.out)

    @property
    def segs(self) -> list[tuple[str, int, int]]:
        return _segments(self.n, self.batch_size, self.world, self.merge)


def _check_options(out: Path, views: int, dtype: str, batch_size: int, overwrite: bool) -> None:
    """The declared options' checks (:data:`EMBED_OPTIONS`, as the flags and config keys), then ``out``."""
    declared = by_name(EMBED_OPTIONS)
    for name, value in (("views", views), ("dtype", dtype), ("batch_size", batch_size)):
        declared[name].parse(name, value)
    new_output_dir(out, overwrite)


def _check_finished(info: dict, checkpoint, strict: bool) -> None:
    """A checkpoint of an unfinished pre-training: an error with ``strict``, else a warning on rank 0."""
    if info["finished"]:
        return
    what = (f"{checkpoint}: checkpoint of epoch {info['epoch']} of {info['epochs']}: its pre-training did not "
            "finish (resume it with `mak pretrain --resume`)")
    if strict:
        raise MakError(what)
    if D.rank() == 0:
        print(f"mak embed: warning: {what}; the store records the epoch", file=sys.stderr)


def _frozen(source, weights, encoder: dict, dev: torch.device) -> tuple[torch.nn.Module, dict]:
    """A pretrained backbone as a frozen encoder (``encoder``: ``backbone``, optional ``image_size``
    and ``channels``, else the source's), with a config like :func:`mak.train.pretrain.load_model`'s."""
    from mak.data.sources import infer_geometry
    from mak.train.models import frozen_encoder

    if not encoder.get("backbone"):
        raise MakError("--weights needs --backbone NAME: the architecture the weights belong to")
    size, channels = encoder.get("image_size"), encoder.get("channels")
    if size is None or channels is None:
        guess = infer_geometry(source)
        size, channels = size or guess[0], channels or guess[1]
    model, info = frozen_encoder(weights, encoder["backbone"], int(channels))
    cfg = {"backbone": encoder["backbone"], "image_size": int(size), "channels": int(channels),
           "feat_dim": int(model.feat_dim), "frozen_encoder": True, "weights_loaded": info,
           "checkpoint": {"sha256": info["sha256"], "epoch": None, "epochs": None, "finished": True}}
    return model.to(dev), cfg


def _setup(source, checkpoint, out: Path, views: int, seed: int, dtype: str, batch_size: int, device,
           merge: bool, amp: bool | None, channels_last: bool | None, encoder: dict | None = None) -> _Job:
    """Join the process group, load the checkpoint's model and measure its output sizes."""
    from mak.data.sources import ImageDataset
    from mak.train.device import autocast_context, resolve_amp, resolve_channels_last
    from mak.train.pretrain import load_model

    dev = auto_device(device or "cpu")
    D.init(dev)
    world, rank = D.world_size(), D.rank()
    dev = D.local_device(str(dev))
    model, cfg = load_model(checkpoint, dev) if encoder is None else _frozen(source, checkpoint, encoder, dev)
    size, channels = int(cfg["image_size"]), int(cfg["channels"])
    amp_dtype = resolve_amp(dev, amp)
    use_cl = resolve_channels_last(dev, channels_last)
    if use_cl:
        model = model.to(memory_format=torch.channels_last)
    n = len(source)
    if n == 0:
        raise MakError(f"{getattr(source, 'name', 'source')}: no images")
    ds = ImageDataset(source, size, channels, mode="center")
    with torch.inference_mode(), autocast_context(dev, amp_dtype):
        probe = torch.zeros((2, channels, size, size), device=dev)
        if use_cl:
            probe = probe.contiguous(memory_format=torch.channels_last)
        view_dim = int(model(probe)[1].shape[1])
    job = _Job(source=source, checkpoint=checkpoint, out=out, views=views, seed=seed, dtype=dtype,
               batch_size=batch_size, merge=merge, dev=dev, world=world, rank=rank, model=model, cfg=cfg,
               size=size, channels=channels, amp_dtype=amp_dtype, use_cl=use_cl,
               feat_dim=int(model.feat_dim), view_dim=view_dim, n=n, ds=ds)
    job.params = _run_params(job)
    return job


def _run_params(job: _Job) -> dict:
    """Checkpoint, source, transform and layout of the run (``params.json`` of the work directory)."""
    transform = {
        "features": f"resize shorter side to {job.size}, centre crop {job.size}x{job.size}, "
                    f"{job.channels} channel(s), center_transform",
        "views": f"SimCLRAugment({job.size}, {job.channels}) of the centre crop, keys view_key(seed, r, row)",
        "views_normalized": True,
        "amp": str(job.amp_dtype).replace("torch.", "") if job.amp_dtype is not None else "float32",
        # the fused C kernel (CPU) and the torch code agree to ~1e-6, not bit for bit
        "augment_impl": "native" if (job.views and job.dev.type == "cpu" and native.available()) else "torch",
    }
    return {
        "checkpoint_sha256": job.cfg["checkpoint"]["sha256"],  # of the bytes the weights came from
        "source": json.loads(json.dumps(job.source.describe(), default=str)), "num_images": job.n,
        "views": int(job.views), "seed": int(job.seed), "dtype": job.dtype, "batch_size": int(job.batch_size),
        "image_size": job.size, "channels": job.channels, "feat_dim": job.feat_dim, "view_dim": job.view_dim,
        "transform": transform, "merge": bool(job.merge), "world_size": None if job.merge else job.world,
    }


# ---- plan: what is done, what this rank still has to do ---------------------------------------

@dataclass
class _Plan:
    """This rank's rows ``[lo, hi)`` and the blocks of them not yet embedded."""

    lo: int
    hi: int
    todo: list[int]
    todo_rows: int


def _plan(job: _Job, verbose: bool) -> _Plan:
    _prepare_work_dir(job)
    done, _ = _read_progress(job.work)
    b0, b1 = D.shard_range(job.nblocks, job.rank, job.world)
    todo = [b for b in range(b0, b1) if b not in done]
    if job.main_proc and verbose and done:
        print(f"mak embed: resuming {job.work}: {len(done)} of {job.nblocks} blocks already done", file=sys.stderr)
    return _Plan(lo=min(job.n, b0 * job.batch_size), hi=min(job.n, b1 * job.batch_size), todo=todo,
                 todo_rows=_BlockSampler(todo, job.batch_size, job.n).rows())


def _prepare_work_dir(job: _Job) -> None:
    """Rank 0 keeps a work directory of a run with the same parameters, or creates it afresh."""
    work = job.work
    if job.main_proc:
        fresh = True
        if (work / PARAMS).is_file():
            try:
                old = json.loads((work / PARAMS).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                old = None
            complete = all((work / name / FEATURES).is_file() for name, _, _ in job.segs)
            fresh = old != job.params or not complete
            if fresh:
                why = "a run with other parameters" if old != job.params else "a run whose arrays are missing"
                print(f"mak embed: {work} holds {why}; starting afresh", file=sys.stderr)
        if fresh:
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            for name, a, b in job.segs:
                f, v = _open_arrays(work / name, b - a, job.feat_dim, job.views, job.view_dim, job.np_dtype,
                                    create=True)
                del f, v
            write_json(work / PARAMS, job.params)
    D.barrier()


# ---- batch production: loading, the centre transform and the R keyed augmentations -----------

def _loader(job: _Job, todo: list[int], num_workers: int | None):
    """``(uint8 images, rows, readable)`` for each block of ``todo``, in order."""
    from torch.utils.data import DataLoader

    from mak.train.device import default_num_workers
    from mak.train.pretrain import in_memory

    workers = default_num_workers(job.dev) if num_workers is None else int(num_workers)
    if in_memory(job.source) and num_workers is None:
        workers = 0  # decoded arrays: worker IPC costs more than it saves
    if workers == 0 and todo and job.ds.fits_rows():  # decoded arrays at the working size: whole blocks at once
        return _row_blocks(job.ds, todo, job.batch_size, job.n)
    if not todo:
        return []
    return DataLoader(job.ds, batch_sampler=_BlockSampler(todo, job.batch_size, job.n), num_workers=workers,
                      pin_memory=job.dev.type == "cuda", prefetch_factor=4 if workers > 0 else None)


SKIP_LINES = 10  # unreadable images named on stderr, per process; the rest are counted


def _readable_batches(job: _Job, todo: list[int], loader
                      ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, list[tuple[int, str]]]]:
    """``(block, images, rows, skipped)`` per block: unreadable rows left out, the first
    :data:`SKIP_LINES` of them reported on stderr (all of them in the store's meta.json)."""
    from mak.progress import write

    shown = 0
    for block, (imgs, idx, ok) in zip(todo, loader):
        idx = torch.as_tensor(idx, dtype=torch.int64)
        ok = torch.as_tensor(ok, dtype=torch.bool)
        skipped: list[tuple[int, str]] = []
        if not bool(ok.all()):
            for i in idx[~ok].tolist():
                reason = job.ds.check(i) or f"{job.source.item(i)}: unreadable image"
                if shown < SKIP_LINES:  # above the progress bar, not on it
                    write(f"mak embed: skipping {reason}")
                elif shown == SKIP_LINES:
                    write("mak embed: skipping more unreadable images (meta.json counts them and lists the first 1,000)")
                shown += 1
                skipped.append((i, reason))
            imgs, idx = imgs[ok], idx[ok]
        yield block, imgs, idx, skipped


class _BatchEmbedder:
    """Features of a batch's centre crops and the projections of its R keyed augmented views."""

    def __init__(self, job: _Job):
        from mak.train.augment import SimCLRAugment

        self.job = job
        self.aug = SimCLRAugment(job.size, job.channels) if job.views else None
        # views per augmentation call: on CPUs up to ~32 MB of output (one parameter pass, one
        # kernel call); on GPUs one view at a time (memory; launches are asynchronous anyway)
        self.view_group = 1
        if job.dev.type == "cpu" and job.views:
            per_view = max(1, 4 * job.batch_size * job.channels * job.size * job.size)
            self.view_group = max(1, min(job.views, (32 << 20) // per_view))

    def __call__(self, imgs: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(features B x D, L2-normalised views R x B x d or None)`` on the device, in the store dtype."""
        from mak.train.augment import center_transform, view_key
        from mak.train.device import autocast_context

        job = self.job
        imgs = imgs.to(job.dev, non_blocking=True)
        with autocast_context(job.dev, job.amp_dtype):
            x = center_transform(imgs, job.size, job.channels)
            if job.use_cl:
                x = x.contiguous(memory_format=torch.channels_last)
            feats = job.model.backbone(x).to(job.torch_dtype)
            zs = []
            for r0 in range(0, job.views, self.view_group):
                rs = range(r0, min(job.views, r0 + self.view_group))
                keys = torch.cat([view_key(job.seed, r, idx) for r in rs])
                xa = self.aug(imgs.repeat(len(rs), 1, 1, 1) if len(rs) > 1 else imgs, keys=keys)
                for j in range(len(rs)):
                    xv = xa[j * len(idx):(j + 1) * len(idx)]
                    if job.use_cl:
                        xv = xv.contiguous(memory_format=torch.channels_last)
                    zs.append(F.normalize(job.model(xv)[1].float(), dim=1).to(job.torch_dtype))
        return feats, (torch.stack(zs) if zs else None)


# ---- the embedding loop and the writer -------------------------------------------------------

def _embed_blocks(job: _Job, todo: list[int], loader, embed_batch: _BatchEmbedder, writer: _Writer) -> float:
    """Embed and write every block of ``todo``, then commit; return the loop's seconds."""
    t0 = time.perf_counter()
    try:
        with torch.inference_mode():
            for block, imgs, idx, skipped in _readable_batches(job, todo, loader):
                writer.skip(skipped)
                if idx.numel():
                    writer.write(idx, *embed_batch(imgs, idx))
                writer.block_done(block)
            writer.drain()
    except BaseException:
        writer.abort()
        raise
    elapsed = time.perf_counter() - t0  # the loop; the last commit is part of publishing
    writer.close()
    return elapsed


class _Writer:
    """Writes results into this rank's memmaps and records finished blocks for resumption.

    A batch's results are copied to the host asynchronously (CUDA) and written into the memmaps
    once the next batch is queued. Every ``flush_rows`` rows the finished blocks are committed:
    made durable, then logged in ``progress-<rank>.log`` (the resume record), in a background
    thread -- ``os.fsync`` releases the GIL where ``mmap.flush`` does not, so the disk writes
    overlap the next batches. Commits run in order, at most one in flight.
    """

    def __init__(self, job: _Job, plan: _Plan, flush_rows: int, progress: bool):
        self.job, self.flush_rows = job, flush_rows
        #: (features, views, first row, end row) of every segment overlapping this rank's rows
        self.arrays: list[tuple[np.ndarray, np.ndarray | None, int, int]] = []
        for name, a, b in job.segs:
            if b > a and a < plan.hi and b > plan.lo:
                f, v = _open_arrays(job.work / name, b - a, job.feat_dim, job.views, job.view_dim, job.np_dtype,
                                    create=False)
                self.arrays.append((f, v, a, b))
        self.files = [str(x.filename) for f, v, _, _ in self.arrays for x in (f, v) if x is not None]
        self.log_path = job.work / f"progress-{job.rank}.log"
        my_rows = plan.hi - plan.lo
        self.bar = _Progress(my_rows, my_rows - plan.todo_rows, progress and job.main_proc,
                             desc=f"embedding {getattr(job.source, 'name', '')}".strip())
        self.pending_blocks: list[int] = []
        self.pending_skips: list[tuple[int, str]] = []
        self.pending_rows = 0
        self.writes: list[tuple] = []  # results whose device->host copy may still be in flight
        self.committer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mak-embed-commit")
        self.last_commit: Future | None = None

    def _segment(self, row: int) -> tuple[np.ndarray, np.ndarray | None, int]:
        for f, v, a, b in self.arrays:
            if a <= row < b:
                return f, v, a
        raise AssertionError(row)  # pragma: no cover

    def skip(self, skipped: list[tuple[int, str]]) -> None:
        self.pending_skips.extend(skipped)

    def write(self, idx: torch.Tensor, feats: torch.Tensor, vz: torch.Tensor | None) -> None:
        """Queue the results of source rows ``idx``; write the previous batch's."""
        rows = idx.numpy()
        f_arr, v_arr, start = self._segment(int(rows[0]))
        local = rows - start
        event = None
        if self.job.dev.type == "cuda":  # copy back asynchronously; written once the next batch is queued
            feats_h = torch.empty(feats.shape, dtype=self.job.torch_dtype, pin_memory=True)
            feats_h.copy_(feats, non_blocking=True)
            views_h = None
            if vz is not None:
                views_h = torch.empty(vz.shape, dtype=self.job.torch_dtype, pin_memory=True)
                views_h.copy_(vz, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            feats_h, views_h = feats.cpu(), (vz.cpu() if vz is not None else None)
        self.drain()
        self.writes.append((event, feats_h, views_h, f_arr, v_arr, local, int(local[0]), int(local[-1]) + 1))

    def drain(self) -> None:
        """Write finished results into the memmaps (after their asynchronous copies complete)."""
        while self.writes:
            event, feats_h, views_h, f_arr, v_arr, local, lo, hi = self.writes.pop(0)
            if event is not None:
                event.synchronize()
            fa, va = feats_h.numpy(), views_h.numpy() if views_h is not None else None
            if hi - lo == len(local):
                f_arr[lo:hi] = fa
                if va is not None:
                    v_arr[:, lo:hi] = va
            else:
                f_arr[local] = fa
                if va is not None:
                    v_arr[:, local] = va

    def block_done(self, block: int) -> None:
        rows = min(self.job.n, (block + 1) * self.job.batch_size) - block * self.job.batch_size
        self.pending_blocks.append(block)
        self.pending_rows += rows
        self.bar.update(rows)
        if self.pending_rows >= self.flush_rows:
            self.drain()
            self.commit()

    def commit(self, wait: bool = False) -> None:
        """Commit the finished blocks in the background; ``wait``: wait for every commit."""
        if self.pending_blocks:
            record = json.dumps({"blocks": self.pending_blocks, "skipped": self.pending_skips}) + "\n"
            if self.last_commit is not None:
                self._wait()  # at most one in flight; raises its error here
            self.last_commit = self.committer.submit(_commit_blocks, self.files, self.log_path, record)
            self.pending_blocks, self.pending_skips, self.pending_rows = [], [], 0
        if wait and self.last_commit is not None:
            self._wait()

    def _wait(self) -> None:
        fut, self.last_commit = self.last_commit, None
        fut.result()

    def abort(self) -> None:
        self.committer.shutdown(wait=True)  # an in-flight commit lands before anyone resumes

    def close(self) -> None:
        """Commit what is left, stop the commit thread and release the memmaps."""
        try:
            self.commit(wait=True)
        finally:
            self.committer.shutdown(wait=True)
        self.bar.close()
        self.arrays.clear()


# ---- publish: compact, describe and move the store into place --------------------------------

def _publish_store(job: _Job, overwrite: bool) -> tuple[int, int]:
    """Check that every block is done, assemble the store and publish it; ``(rows, skipped rows)``."""
    done, skipped = _read_progress(job.work)
    D.barrier()  # every rank has read the logs before rank 0 publishes and removes the work dir
    missing = [b for b in range(job.nblocks) if b not in done]
    if missing:
        raise MakError(f"{job.work}: blocks {missing[:3]} were not embedded (under torchrun with merge, "
                       "all ranks must share the output's file system)")
    n_ok = job.n - len(skipped)
    if n_ok == 0:
        raise MakError(f"{getattr(job.source, 'name', 'source')}: none of the {job.n} images is readable "
                       f"(first: {next(iter(skipped.values()))})")
    meta = _meta(job, skipped, n_ok)
    if job.merge:
        if job.main_proc:
            _assemble_merged(job, skipped, meta)
            _publish(job.work / "final", job.out, overwrite)
            shutil.rmtree(job.work, ignore_errors=True)
    else:
        _assemble_shards(job, skipped, meta)
        if job.main_proc:
            _publish(job.work / "final", job.out, overwrite)
            shutil.rmtree(job.work, ignore_errors=True)
    return n_ok, len(skipped)


def _meta(job: _Job, skipped: dict[int, str], n_ok: int) -> dict:
    skipped_items = [{"item": job.source.item(i), "reason": skipped[i]} for i in sorted(skipped)]
    p = job.params
    return {
        "format": "mak-feature-store", "checkpoint": str(Path(job.checkpoint).resolve()),
        "checkpoint_sha256": p["checkpoint_sha256"], "checkpoint_epoch": job.cfg["checkpoint"]["epoch"],
        "checkpoint_epochs": job.cfg["checkpoint"]["epochs"],
        "pretraining_finished": job.cfg["checkpoint"]["finished"], "backbone": job.cfg.get("backbone"),
        "image_size": job.size, "channels": job.channels, "source": p["source"], "transform": p["transform"],
        "views": int(job.views), "views_normalized": True, "dtype": job.dtype, "seed": int(job.seed),
        "num_images": job.n, "num_rows": n_ok, "feature_dim": job.feat_dim,
        "view_dim": job.view_dim if job.views else 0, "skipped": len(skipped),
        "skipped_items": skipped_items[:1000],
        **({"model": "external", "weights_loaded": job.cfg["weights_loaded"]} if job.cfg.get("frozen_encoder")
           else {"model_trained_on": model_trained_on(job.cfg)}),
    }


def _assemble_merged(job: _Job, skipped: dict[int, str], meta: dict) -> None:
    """Rank 0: the one segment's arrays, items and meta in ``work/final``."""
    final = job.work / "final"
    shutil.rmtree(final, ignore_errors=True)
    _finalize_segment(job.work / "all", final, job.source, 0, job.n, skipped, job.views)
    write_json(final / META, meta)


def _assemble_shards(job: _Job, skipped: dict[int, str], meta: dict) -> None:
    """Every rank finalizes its shard in ``work/final``; rank 0 adds ``shards.json`` and meta."""
    final = job.work / "final"
    if job.main_proc:
        shutil.rmtree(final, ignore_errors=True)
        final.mkdir()
    D.barrier()
    name, a, b = job.segs[job.rank]
    kept = 0
    if b > a:
        kept = _finalize_segment(job.work / name, final / name, job.source, a, b, skipped, job.views)
    counts = D.all_gather_object((name, kept))
    if job.main_proc:
        names = [nm for nm, k in counts if k > 0]
        for nm, k in counts:
            if k == 0:
                shutil.rmtree(final / nm, ignore_errors=True)
        write_shards_index(final, names)
        meta["shards"] = {nm: k for nm, k in counts if k > 0}
        write_json(final / META, meta)


def _finalize_segment(seg: Path, dest: Path, source, a: int, b: int, skipped: dict[int, str], views: int) -> int:
    """Link (or compact, dropping skipped rows) one segment's arrays into ``dest``; write items.txt.

    The segment keeps its arrays until the work directory is removed, so a finish that is
    interrupted is redone by the next run from the embedded blocks."""
    dest.mkdir(parents=True, exist_ok=True)
    drop = np.array(sorted(i - a for i in skipped if a <= i < b), dtype=np.int64)
    names = [FEATURES] + ([VIEWS] if views else [])
    if drop.size == 0:
        for nm in names:
            link_copy(seg / nm, dest / nm)
    else:
        keep = np.ones(b - a, dtype=bool)
        keep[drop] = False
        for nm in names:
            _compact(seg / nm, dest / nm, keep)
    _write_items(dest / ITEMS, source, a, b, skipped)
    return (b - a) - int(drop.size)


def _compact(src_path: Path, dst_path: Path, keep: np.ndarray) -> None:
    """Copy the rows where ``keep`` holds (axis 0 of features, axis 1 of views), in slices."""
    src = np.load(src_path, mmap_mode="r")
    rows_axis = src.ndim - 2
    shape = list(src.shape)
    shape[rows_axis] = int(keep.sum())
    dst = np.lib.format.open_memmap(dst_path, mode="w+", dtype=src.dtype, shape=tuple(shape))
    reserve(dst_path)
    pos = 0
    for s in range(0, len(keep), COPY_ROWS):
        k = keep[s:s + COPY_ROWS]
        m = int(k.sum())
        if m:
            if rows_axis == 0:
                dst[pos:pos + m] = src[s:s + COPY_ROWS][k]
            else:
                dst[:, pos:pos + m] = src[:, s:s + COPY_ROWS][:, k]
        pos += m
    dst.flush()
    del dst, src


def _write_items(path: Path, source, a: int, b: int, skipped: dict[int, str]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        buf: list[str] = []
        for i in range(a, b):
            if i in skipped:
                continue
            buf.append(source.item(i))
            if len(buf) >= 65536:
                fh.write("\n".join(buf) + "\n")
                buf = []
        if buf:
            fh.write("\n".join(buf) + "\n")


def _publish(final: Path, out: Path, overwrite: bool) -> None:
    """Move the finished store in ``final`` to ``out`` all at once (replacing an existing store when allowed)."""
    new_output_dir(out, overwrite)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        move_entries(final, tmp)
