"""Feature stores from a pre-trained checkpoint (``mak embed``).

:func:`embed` runs every image of a source through the model of a :func:`mak.pretrain.pretrain`
checkpoint and writes a feature store (:mod:`mak.store`):

- ``features.npy`` (N x D): backbone output without augmentation -- the image's shorter side
  resized to the working size and the centre square taken (``ImageDataset(mode="center")``),
  normalised by :func:`mak.augment.center_transform`;
- ``views.npy`` (R x N x d): the projection-head output of R augmented passes
  (:class:`mak.augment.SimCLRAugment` applied to the same centre-cropped image), **L2-normalised**
  (``meta.json: views_normalized = true``); the randomness of view ``r`` of source row ``i`` is
  ``view_key(seed, r, i)``, so the store depends neither on batch size, worker count nor world
  size;
- ``items.txt``: the item line of every row that exists;
- ``meta.json``: checkpoint path and sha256, source description, transform, R, dtype, seed,
  skipped count and the skipped items with their reasons.

A corrupt pool image is reported on stderr (path and reason), skipped and counted: the store's
rows are exactly the readable images, in source order.

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
:func:`mak.store.open_store` reads).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from . import distributed as D
from . import native
from .atomic import write_json
from ._tensor import auto_device
from .errors import MakError
from .store import FEATURES, ITEMS, META, VIEWS, write_shards_index

DTYPES = {"float16": np.float16, "float32": np.float32}
PARAMS = "params.json"
#: Rows between flushes of the memmaps / progress records (resume granularity).
FLUSH_ROWS = 8192
#: Rows copied at a time when compacting or moving arrays.
COPY_ROWS = 65536



def model_trained_on(config: dict) -> dict:
    """What the checkpoint's model was trained on: images, and pool rows mixed in (0: the seed alone)."""
    src = config.get("source") or {}
    return {"images": config.get("num_images"), "pool_rows": int(src.get("pool_rows", 0) or 0)}

def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------
# Plain feature extraction (evaluation).
# ------------------------------------------------------------------------------------------

def compute_features(model, source, image_size: int, channels: int, batch_size: int = 256,
                     device: str | torch.device = "cpu", num_workers: int = 0) -> np.ndarray:
    """Backbone features of every image of ``source`` without augmentation: float32 N x D.

    Centre crop + :func:`mak.augment.center_transform`, ``model.backbone`` in eval mode.
    An unreadable image raises :class:`MakError` naming it.
    """
    from torch.utils.data import DataLoader

    from .augment import center_transform
    from .data import ImageDataset
    from .pretrain import resolve_channels_last

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
    with torch.inference_mode():
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
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=initial, unit="img", desc=desc, disable=not enabled,
                        dynamic_ncols=True, file=sys.stderr, smoothing=0.1)

    def update(self, n: int) -> None:
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


def embed(source, checkpoint: str | os.PathLike, out: str | os.PathLike, views: int = 10, seed: int = 0,
          dtype: str = "float16", batch_size: int = 256, device: str | torch.device = "cpu",
          num_workers: int | None = None, merge: bool = True, progress: bool = True, *,
          amp: bool | None = None, channels_last: bool | None = None, overwrite: bool = False,
          flush_rows: int = FLUSH_ROWS, stats: dict | None = None) -> Path:
    """Embed every image of ``source`` with ``checkpoint``'s model; write a feature store at ``out``.

    Parameters
    ----------
    views: R augmented views per image for ``views.npy`` (0: no views; otherwise >= 2).
    seed: augmentation seed (view ``r`` of row ``i`` uses ``view_key(seed, r, i)``).
    dtype: ``"float16"`` or ``"float32"`` storage.
    batch_size: images per forward pass (also the block unit of the resume bookkeeping).
    num_workers: DataLoader decoding workers (default :func:`mak.pretrain.default_num_workers`).
    merge: under torchrun, publish one store (``True``) or one shard per rank plus ``shards.json``.
    amp, channels_last: as for :func:`mak.pretrain.pretrain` (auto by default).
    overwrite: replace an existing store at ``out``.
    flush_rows: rows between checkpoints of the progress (resume granularity).
    stats: if a dict is given, it receives this process's ``images``, ``seconds`` and
        ``images_per_s`` of the embedding loop (for benchmarks).

    Returns ``out``. Raises :class:`MakError` for a bad checkpoint, bad parameters, an existing
    ``out`` (without ``overwrite``) or a source whose every image is unreadable.
    """
    from torch.utils.data import DataLoader

    from .augment import SimCLRAugment, center_transform, view_key
    from .data import ImageDataset
    from .pretrain import autocast_context, default_num_workers, load_model, resolve_amp, resolve_channels_last

    out = Path(out)
    if dtype not in DTYPES:
        raise MakError(f"--dtype must be float16 or float32, not {dtype!r}")
    if views < 0 or views == 1:
        raise MakError(f"--views must be 0 (no views) or at least 2, got {views}")
    if batch_size < 1:
        raise MakError(f"--batch-size must be positive, got {batch_size}")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not overwrite)):
        raise MakError(f"{out}: already exists (choose another --out, or overwrite)")
    dev = auto_device(device or "cpu")
    D.init(dev)
    world, rank = D.world_size(), D.rank()
    dev = D.local_device(str(dev))
    main_proc = rank == 0
    np_dtype = DTYPES[dtype]

    model, cfg = load_model(checkpoint, dev)
    size, channels = int(cfg["image_size"]), int(cfg["channels"])
    amp_dtype = resolve_amp(dev, amp)
    use_cl = resolve_channels_last(dev, channels_last)
    if use_cl:
        model = model.to(memory_format=torch.channels_last)
    feat_dim = int(model.feat_dim)
    n = len(source)
    if n == 0:
        raise MakError(f"{getattr(source, 'name', 'source')}: no images")
    ds = ImageDataset(source, size, channels, mode="center")
    with torch.inference_mode(), autocast_context(dev, amp_dtype):
        probe = torch.zeros((2, channels, size, size), device=dev)
        if use_cl:
            probe = probe.contiguous(memory_format=torch.channels_last)
        view_dim = int(model(probe)[1].shape[1])

    ckpt_sha = file_sha256(checkpoint)
    describe = json.loads(json.dumps(source.describe(), default=str))
    transform = {
        "features": f"resize shorter side to {size}, centre crop {size}x{size}, {channels} channel(s), center_transform",
        "views": f"SimCLRAugment({size}, {channels}) of the centre crop, keys view_key(seed, r, row)",
        "views_normalized": True,
        "amp": str(amp_dtype).replace("torch.", "") if amp_dtype is not None else "float32",
        # the fused C kernel (CPU) and the torch code agree to ~1e-6, not bit for bit
        "augment_impl": "native" if (views and dev.type == "cpu" and native.available()) else "torch",
    }
    params = {
        "checkpoint_sha256": ckpt_sha, "source": describe, "num_images": n, "views": int(views),
        "seed": int(seed), "dtype": dtype, "batch_size": int(batch_size), "image_size": size,
        "channels": channels, "feat_dim": feat_dim, "view_dim": view_dim, "transform": transform,
        "merge": bool(merge), "world_size": None if merge else world,
    }
    segs = _segments(n, batch_size, world, merge)
    work = _work_dir(out)

    # ---- create or resume the work directory (rank 0 decides) -----------------------------
    if main_proc:
        fresh = True
        if (work / PARAMS).is_file():
            try:
                old = json.loads((work / PARAMS).read_text())
            except (OSError, ValueError):
                old = None
            if old == params and all((work / name / FEATURES).is_file() for name, _, _ in segs):
                fresh = False
            else:
                print(f"mak embed: {work} holds a run with other parameters; starting afresh", file=sys.stderr)
        if fresh:
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            for name, a, b in segs:
                f, v = _open_arrays(work / name, b - a, feat_dim, views, view_dim, np_dtype, create=True)
                del f, v
            write_json(work / PARAMS, params)
    D.barrier()

    done, _ = _read_progress(work)
    nblocks = -(-n // batch_size)
    b0, b1 = D.shard_range(nblocks, rank, world)
    todo = [b for b in range(b0, b1) if b not in done]
    if main_proc and progress and done:
        print(f"mak embed: resuming {work}: {len(done)} of {nblocks} blocks already done", file=sys.stderr)

    # ---- embed this rank's blocks --------------------------------------------------------------
    arrays: dict[str, tuple[np.ndarray, np.ndarray | None, int, int]] = {}
    for name, a, b in segs:
        if b > a and a < min(n, b1 * batch_size) and b > b0 * batch_size:
            f, v = _open_arrays(work / name, b - a, feat_dim, views, view_dim, np_dtype, create=False)
            arrays[name] = (f, v, a, b)

    def seg_of(row: int):
        for f, v, a, b in arrays.values():
            if a <= row < b:
                return f, v, a
        raise AssertionError(row)  # pragma: no cover

    aug = SimCLRAugment(size, channels) if views else None
    view_group = 1
    if dev.type == "cpu" and views:  # views per augmentation call: up to ~32 MB of output
        view_group = max(1, min(views, (32 << 20) // max(1, 4 * batch_size * channels * size * size)))
    workers = default_num_workers(dev) if num_workers is None else int(num_workers)
    if _in_memory(source) and num_workers is None:
        workers = 0  # decoded arrays: worker IPC costs more than it saves
    batches = _BlockSampler(todo, batch_size, n)
    if workers == 0 and todo and ds.fits_rows():  # decoded arrays at the working size: whole blocks at once
        loader: Any = _row_blocks(ds, todo, batch_size, n)
    else:
        loader = DataLoader(ds, batch_sampler=batches, num_workers=workers, pin_memory=dev.type == "cuda",
                            prefetch_factor=4 if workers > 0 else None) if todo else []
    my_rows = min(n, b1 * batch_size) - min(n, b0 * batch_size)
    bar = _Progress(my_rows, my_rows - batches.rows(), progress and main_proc,
                    desc=f"embedding {getattr(source, 'name', '')}".strip())
    log_path = work / f"progress-{rank}.log"
    pending_blocks: list[int] = []
    pending_skips: list[tuple[int, str]] = []
    pending_rows = 0

    array_files = [str(a.filename) for f, v, _, _ in arrays.values() for a in (f, v) if a is not None]
    committer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mak-embed-commit")
    last_commit: list[Future] = []

    def commit(wait: bool = False) -> None:
        """Make the finished blocks durable, then log them (the resume record), in a background
        thread: ``os.fsync`` releases the GIL where ``mmap.flush`` does not, so the disk writes
        overlap the next batches. Commits run in order; ``wait`` waits for all of them."""
        nonlocal pending_blocks, pending_skips, pending_rows
        if pending_blocks:
            record = json.dumps({"blocks": pending_blocks, "skipped": pending_skips}) + "\n"
            if last_commit:
                last_commit.pop().result()  # at most one in flight; raises its error here
            last_commit.append(committer.submit(_commit_blocks, array_files, log_path, record))
            pending_blocks, pending_skips, pending_rows = [], [], 0
        if wait and last_commit:
            last_commit.pop().result()

    torch_dtype = torch.float16 if np_dtype == np.float16 else torch.float32
    writes: list[tuple] = []  # results whose device->host copy may still be in flight

    def drain() -> None:
        """Write finished results into the memmaps (after their asynchronous copies complete)."""
        while writes:
            event, feats_h, views_h, f_arr, v_arr, local, lo, hi = writes.pop(0)
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

    def embed_batch(imgs: torch.Tensor, idx: torch.Tensor) -> None:
        rows = idx.numpy()
        f_arr, v_arr, start = seg_of(int(rows[0]))
        local = rows - start
        imgs = imgs.to(dev, non_blocking=True)
        with autocast_context(dev, amp_dtype):
            x = center_transform(imgs, size, channels)
            if use_cl:
                x = x.contiguous(memory_format=torch.channels_last)
            feats = model.backbone(x).to(torch_dtype)
            zs = []
            for r0 in range(0, views, view_group):
                # on CPUs several views in one augmentation call (one parameter pass, one kernel
                # call); on GPUs one view at a time (memory; launches are asynchronous anyway)
                rs = range(r0, min(views, r0 + view_group))
                keys = torch.cat([view_key(seed, r, idx) for r in rs])
                xa = aug(imgs.repeat(len(rs), 1, 1, 1) if len(rs) > 1 else imgs, keys=keys)
                for j in range(len(rs)):
                    xv = xa[j * len(idx):(j + 1) * len(idx)]
                    if use_cl:
                        xv = xv.contiguous(memory_format=torch.channels_last)
                    zs.append(F.normalize(model(xv)[1].float(), dim=1).to(torch_dtype))
        vz = torch.stack(zs) if zs else None
        event = None
        if dev.type == "cuda":  # copy back asynchronously; written once the next batch is queued
            feats_h = torch.empty(feats.shape, dtype=torch_dtype, pin_memory=True)
            feats_h.copy_(feats, non_blocking=True)
            views_h = None
            if vz is not None:
                views_h = torch.empty(vz.shape, dtype=torch_dtype, pin_memory=True)
                views_h.copy_(vz, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            feats_h, views_h = feats.cpu(), (vz.cpu() if vz is not None else None)
        drain()
        writes.append((event, feats_h, views_h, f_arr, v_arr, local, int(local[0]), int(local[-1]) + 1))

    def _embed_loop() -> None:
        nonlocal pending_rows
        with torch.inference_mode():
            for block, (imgs, idx, ok) in zip(todo, loader):
                idx = torch.as_tensor(idx, dtype=torch.int64)
                ok = torch.as_tensor(ok, dtype=torch.bool)
                if not bool(ok.all()):
                    for i in idx[~ok].tolist():
                        reason = ds.check(i) or f"{source.item(i)}: unreadable image"
                        print(f"mak embed: skipping {reason}", file=sys.stderr)
                        pending_skips.append((i, reason))
                    imgs, idx = imgs[ok], idx[ok]
                if idx.numel():
                    embed_batch(imgs, idx)
                rows = min(n, (block + 1) * batch_size) - block * batch_size
                pending_blocks.append(block)
                pending_rows += rows
                bar.update(rows)
                if pending_rows >= flush_rows:
                    drain()
                    commit()
            drain()

    t0 = time.perf_counter()
    try:
        _embed_loop()
    except BaseException:
        committer.shutdown(wait=True)  # an in-flight commit lands before anyone resumes
        raise
    elapsed = time.perf_counter() - t0  # the loop; the last commit is part of publishing
    try:
        commit(wait=True)
    finally:
        committer.shutdown(wait=True)
    bar.close()
    if stats is not None:
        done_rows = batches.rows()
        stats.update(images=done_rows, seconds=elapsed, images_per_s=done_rows / max(elapsed, 1e-9))
    for f, v, _, _ in arrays.values():
        del f, v
    arrays.clear()
    D.barrier()

    # ---- publish -------------------------------------------------------------------------------
    done, skipped = _read_progress(work)
    D.barrier()  # every rank has read the logs before rank 0 publishes and removes the work dir
    missing = [b for b in range(nblocks) if b not in done]
    if missing:
        raise MakError(f"{work}: blocks {missing[:3]} were not embedded (under torchrun with merge, "
                       "all ranks must share the output's file system)")
    n_ok = n - len(skipped)
    if n_ok == 0:
        raise MakError(f"{getattr(source, 'name', 'source')}: none of the {n} images is readable "
                       f"(first: {next(iter(skipped.values()))})")
    final = work / "final"
    skipped_items = [{"item": source.item(i), "reason": skipped[i]} for i in sorted(skipped)]
    meta = {
        "format": "mak-feature-store", "checkpoint": str(Path(checkpoint).resolve()),
        "checkpoint_sha256": ckpt_sha, "backbone": cfg.get("backbone"), "image_size": size,
        "channels": channels, "source": describe, "transform": transform, "views": int(views),
        "views_normalized": True, "dtype": dtype, "seed": int(seed), "num_images": n,
        "num_rows": n_ok, "feature_dim": feat_dim, "view_dim": view_dim if views else 0,
        "skipped": len(skipped), "skipped_items": skipped_items[:1000],
        "model_trained_on": model_trained_on(cfg),
    }
    if merge:
        if main_proc:
            shutil.rmtree(final, ignore_errors=True)
            _finalize_segment(work / "all", final, source, 0, n, skipped, views)
            write_json(final / META, meta)
            _publish(final, out, overwrite)
            shutil.rmtree(work, ignore_errors=True)
    else:
        if main_proc:
            shutil.rmtree(final, ignore_errors=True)
            final.mkdir()
        D.barrier()
        name, a, b = segs[rank]
        kept = 0
        if b > a:
            kept = _finalize_segment(work / name, final / name, source, a, b, skipped, views)
        counts = D.all_gather_object((name, kept))
        if main_proc:
            names = [nm for nm, k in counts if k > 0]
            for nm, k in counts:
                if k == 0:
                    shutil.rmtree(final / nm, ignore_errors=True)
            write_shards_index(final, names)
            meta["shards"] = {nm: k for nm, k in counts if k > 0}
            write_json(final / META, meta)
            _publish(final, out, overwrite)
            shutil.rmtree(work, ignore_errors=True)
    D.barrier()
    if main_proc and progress:
        rate = batches.rows() / max(elapsed, 1e-9)
        print(f"mak embed: {n_ok} rows -> {out} ({len(skipped)} skipped), {rate:.0f} images/s"
              f"{' per process' if world > 1 else ''}", file=sys.stderr)
    return out


def _in_memory(source) -> bool:
    try:
        return bool(source.in_memory())
    except Exception:
        return False


def _finalize_segment(seg: Path, dest: Path, source, a: int, b: int, skipped: dict[int, str], views: int) -> int:
    """Move (or compact, dropping skipped rows) one segment's arrays into ``dest``; write items.txt."""
    dest.mkdir(parents=True, exist_ok=True)
    drop = np.array(sorted(i - a for i in skipped if a <= i < b), dtype=np.int64)
    names = [FEATURES] + ([VIEWS] if views else [])
    if drop.size == 0:
        for nm in names:
            os.replace(seg / nm, dest / nm)
    else:
        keep = np.ones(b - a, dtype=bool)
        keep[drop] = False
        for nm in names:
            src = np.load(seg / nm, mmap_mode="r")
            rows_axis = src.ndim - 2
            shape = list(src.shape)
            shape[rows_axis] = int(keep.sum())
            dst = np.lib.format.open_memmap(dest / nm, mode="w+", dtype=src.dtype, shape=tuple(shape))
            pos = 0
            for s in range(0, b - a, COPY_ROWS):
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
            (seg / nm).unlink()
    with open(dest / ITEMS, "w", encoding="utf-8") as fh:
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
    return (b - a) - int(drop.size)


def _publish(final: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished directory onto ``out`` (replacing an old store when allowed)."""
    if out.exists():
        if any(out.iterdir()) and not overwrite:
            raise MakError(f"{out}: already exists (choose another --out, or overwrite)")
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(final, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(final, out)
