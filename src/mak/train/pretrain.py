"""SimCLR pre-training on the seed set (``mak pretrain``).

:func:`pretrain` trains a :class:`mak.train.models.SimCLRModel` with the NT-Xent loss (temperature 0.2)
on an image source and writes ``DIR/checkpoint.pt`` after every epoch; :func:`load_model`
rebuilds the model from that file for ``mak embed`` and the evaluation code.

Recipe: SGD (momentum 0.9, weight decay 1e-4), ``lr = base_lr * batch_size / 256`` with a
per-step linear warm-up then cosine decay; two augmented views of every image
(:class:`mak.train.augment.SimCLRAugment`) go through the model as one batch of 2B.

Data path: the seed images are decoded and resized to the working size once, in DataLoader
workers. When the decoded set is small (<= ``CACHE_BYTES``, e.g. any 28-64 px seed set) it is
kept in memory as one uint8 tensor and batches are sliced from it; otherwise every epoch streams
through a DataLoader. Augmentation runs on whole batches on the training device. The random
parameters of view ``v`` of image ``i`` in epoch ``e`` are a pure function of
``(seed, e, v, i)`` (:func:`mak.train.augment.view_key`), and the image order of epoch ``e`` a pure
function of ``(seed, e)`` (:func:`epoch_permutation`), so neither needs generator state: with
the model, optimizer, scheduler (and grad-scaler) states and the global torch/CUDA RNG states
saved each epoch, a run resumed from a checkpoint gives bit-identical weights to an
uninterrupted one, and a DDP run sees the same global batches (and augmentations) as a single
process.

Checkpoint (``torch.save`` of plain types and tensors only, read back with
``torch.load(weights_only=True)``)::

    {"format": "mak-simclr", "version": 1,
     "config": {...},          # backbone, image_size, channels, feat_dim, epochs, batch_size, lr, ...
     "epoch": int,             # completed epochs
     "model": state_dict,      # SimCLRModel (backbone.* and head.*), plain BatchNorm keys
     "optimizer": state_dict, "scheduler": state_dict, "scaler": state_dict | None,
     "rng": {"torch": ByteTensor, "cuda": [ByteTensor] | None},
     "log": [{"epoch", "loss", "lr", "images_per_s"}, ...]}

Under ``torchrun --nproc_per_node N`` the model is wrapped in DDP (gloo on CPU, NCCL on CUDA),
BatchNorm synchronised across ranks (``nn.SyncBatchNorm`` on CUDA; on CPU, where that class
refuses to run, :func:`mak.train.syncbn.convert_sync_batchnorm`'s all-reduce BatchNorm), each rank
takes its DistributedSampler-style share (``perm[rank::world]``) of the same per-epoch
permutation, and the projections are all-gathered (gradient kept for the local part,
:func:`mak.train.losses.nt_xent_global`) so the NT-Xent negatives span the global batch; the loss is
scaled by the world size so DDP's gradient average is the global-batch gradient. ``batch_size``
is the global batch. Rank 0 writes the checkpoint and the log.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch

from mak import distributed as D
from mak.atomic import atomic_path, remove_debris, write_text
from mak._tensor import auto_device
from mak.errors import MakError, first_line
from mak.options import Option, ParameterError, by_name, defaults, integer, number, or_auto
from mak.train.models import backbone_name, channel_count
from mak.paths import input_file, output_dir
from mak.lock import job_lock
from mak.train.device import autocast_context, default_num_workers, resolve_amp, resolve_channels_last
from mak.train.losses import nt_xent_global
from mak.train.syncbn import convert_sync_batchnorm

CHECKPOINT_NAME = "checkpoint.pt"
LOG_NAME = "log.csv"
FORMAT = "mak-simclr"
FORMAT_VERSION = 1
TEMPERATURE = 0.2
MOMENTUM = 0.9
WEIGHT_DECAY = 1e-4
#: Decoded seed sets up to this size (bytes, uint8) are kept in memory for the whole run.
CACHE_BYTES = 1 << 30

DEFAULT_BATCH_SIZE = 256  # the global batch when none is given: min(256, number of images)

# pretrain's options, declared once: `mak pretrain`'s flags, `mak run`'s pretrain.* keys and the
# defaults of pretrain() (and of pool_mix's count). Base lr 0.5 (lr = 0.5 x batch / 256, the rate of
# MAK's reference SimCLR runs and of every figure in docs/results.md); 100 epochs, enough for a seed
# of a few thousand images on a CPU (the paper's ImageNet-100-LT runs use 1,000:
# configs/imagenet100lt-*.yaml; the benchmark 30: configs/openworld.yaml).
PRETRAIN_OPTIONS: tuple[Option, ...] = (
    Option("backbone", None, "smallconv[-wide], resnet18[-small], resnet50, torchvision:NAME or timm:NAME "
           "(default: smallconv <= 64 px, else resnet18)", backbone_name, "NAME"),
    Option("channels", None, "working channels, 1 or 3 (default: 3 if the images have colour)", channel_count, "1|3"),
    Option("epochs", 100, "training epochs (default 100)", integer(1), "E"),
    Option("batch_size", None, f"global batch size over all processes, at least 2 (default: min({DEFAULT_BATCH_SIZE}, "
           "number of images), rounded down to even and to a multiple of the processes)", integer(2), "B"),
    Option("base_lr", 0.5, "base learning rate; actual lr = LR x batch/256 (default 0.5)", number(0.0), "LR",
           key="lr"),
    Option("warmup_epochs", None, "epochs of linear lr warm-up before the cosine decay (default: min(10, epochs/10))",
           integer(0), "W"),
    Option("seed", 0, "random seed, an integer >= 0: same seed, same weights (default 0)", integer(0), "S"),
    Option("image_size", None, "working image size in pixels, at least 8 (default: the images' typical size)",
           integer(8), "PX"),
    Option("num_workers", None, "DataLoader workers decoding images (default: half the process's cores, at most "
           "4; with CUDA at most 8)",
           integer(0), "N", key="workers"),
    Option("mix_count", "auto", "pool images mixed into the seed set (default auto: min(pool, 8 x seed images))",
           or_auto(integer(0)), "N"),
)


def epoch_seed(seed: int, epoch: int) -> int:
    """The augmentation/permutation seed of ``epoch`` for run seed ``seed`` (63-bit, deterministic)."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch), 0x51C1]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 62) - 1)


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """Image order of ``epoch``: a permutation of ``range(n)``, identical on every rank."""
    g = torch.Generator(device="cpu")
    g.manual_seed(epoch_seed(seed, epoch))
    return torch.randperm(n, generator=g)


# ------------------------------------------------------------------------------------------
# Checkpoints.
# ------------------------------------------------------------------------------------------

def _plain(obj: Any) -> Any:
    """``obj`` reduced to JSON types (so it survives ``torch.load(weights_only=True)``)."""
    return json.loads(json.dumps(obj, default=str))


def read_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint written by :func:`pretrain` (``weights_only=True``), on CPU.

    Raises :class:`MakError` naming the file when it is missing, unreadable or not a mak checkpoint.
    """
    path = input_file(path, "checkpoint")
    try:
        data = path.read_bytes()  # one read: the hash below is of the bytes that are loaded
        ckpt = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise MakError(f"{path}: unreadable checkpoint ({first_line(exc)})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT or "model" not in ckpt or "config" not in ckpt:
        raise MakError(f"{path}: not a mak pretrain checkpoint")
    if int(ckpt.get("version", 0)) > FORMAT_VERSION:
        raise MakError(f"{path}: checkpoint format version {ckpt.get('version')} is newer than this mak")
    ckpt["sha256"] = hashlib.sha256(data).hexdigest()
    return ckpt


def load_model(checkpoint: str | os.PathLike, device: str | torch.device = "cpu"):
    """Rebuild the pre-trained model from ``checkpoint``: returns ``(SimCLRModel, config)``.

    The model is in eval mode on ``device``; ``config`` is the checkpoint's plain config dict
    (``backbone``, ``image_size``, ``channels``, ``feat_dim`` ...) plus ``checkpoint``: the sha256
    of the bytes loaded, the epochs completed and whether the pre-training finished.
    """
    from mak.train.models import SimCLRModel

    ckpt = read_checkpoint(checkpoint)
    cfg = dict(ckpt["config"])
    epoch, epochs = int(ckpt.get("epoch", 0)), int(cfg.get("epochs", 0))
    cfg["checkpoint"] = {"sha256": ckpt["sha256"], "epoch": epoch, "epochs": epochs, "finished": epoch >= epochs}
    device = auto_device(device or "cpu")
    try:
        model = SimCLRModel(cfg["backbone"], int(cfg["channels"]))
        model.load_state_dict(ckpt["model"])
    except MakError:
        raise
    except Exception as exc:
        lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
        detail = lines[1] if len(lines) > 1 else (lines[0] if lines else type(exc).__name__)
        raise MakError(f"{checkpoint}: checkpoint does not match the {cfg.get('backbone')!r} model of this "
                       f"mak version ({detail[:200]})") from None
    model.eval()
    return model.to(torch.device(device)), cfg


def _save_checkpoint(path: Path, state: dict) -> None:
    """Atomically; through a file object, so the archive's record names (and the bytes) do not
    depend on the temporary file's random name."""
    with atomic_path(path, suffix=".pt") as tmp, open(tmp, "wb") as fh:
        torch.save(state, fh)


def _write_log(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["epoch", "loss", "lr", "images_per_s"])
    for r in rows:
        w.writerow([r["epoch"], f"{r['loss']:.6f}", f"{r['lr']:.6g}", f"{r['images_per_s']:.1f}"])
    write_text(path, buf.getvalue())


# ------------------------------------------------------------------------------------------
# Data.
# ------------------------------------------------------------------------------------------

def _report_bad(source, bad: list[tuple[int, str]], what: str = "unreadable seed image") -> MakError:
    """One-line error for the first unreadable image (its reason names the path) and the count."""
    more = f" (and {len(bad) - 1} more unreadable images)" if len(bad) > 1 else ""
    return MakError(f"{what} {bad[0][1]}{more}")


def _scan(source, size: int, channels: int, num_workers: int, cache: bool,
          rows: range | None = None) -> tuple[torch.Tensor | None, list[int]]:
    """Decode every image once through DataLoader workers.

    Returns the uint8 cache (N x C x S x S) when ``cache`` and the list of unreadable rows.
    """
    from torch.utils.data import DataLoader, Subset

    from mak.data.sources import ImageDataset

    ds = ImageDataset(source, size, channels, mode="resize")
    n = len(source)
    rows = range(n) if rows is None else rows
    sub = Subset(ds, list(rows)) if len(rows) != n else ds
    loader = DataLoader(sub, batch_size=256, shuffle=False, num_workers=num_workers,
                        persistent_workers=False)
    images = torch.empty((n, channels, size, size), dtype=torch.uint8) if cache else None
    bad: list[int] = []
    for imgs, idx, ok in loader:
        idx = torch.as_tensor(idx, dtype=torch.int64)
        ok = torch.as_tensor(ok, dtype=torch.bool)
        if images is not None:
            images[idx] = imgs
        if not bool(ok.all()):
            bad.extend(int(i) for i in idx[~ok])
    return images, bad


class _CachedBatches:
    """Global batches of one epoch sliced from the in-memory uint8 cache, this rank's part only."""

    def __init__(self, cache: torch.Tensor, order: torch.Tensor, local_batch: int, steps: int):
        self.cache, self.order, self.local_batch, self.steps = cache, order, local_batch, steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        b = self.local_batch
        order_dev = self.order.to(self.cache.device)
        for s in range(self.steps):
            yield self.cache.index_select(0, order_dev[s * b:(s + 1) * b]), self.order[s * b:(s + 1) * b]


def _rank_order(perm: torch.Tensor, world: int, rank: int) -> torch.Tensor:
    """This rank's share of the epoch permutation (as DistributedSampler does: ``perm[rank::world]``).

    Step ``s`` of every rank together covers ``perm[s*B:(s+1)*B]`` of the global order, so the
    global batches are the same whatever the world size.
    """
    usable = (perm.numel() // world) * world
    return perm[:usable][rank::world]


class _PermutationSampler(torch.utils.data.Sampler):
    """Streams this rank's share of a per-epoch permutation (set with :meth:`set_epoch`)."""

    def __init__(self, n: int, seed: int, world: int, rank: int):
        self.n, self.seed, self.world, self.rank, self.epoch = n, seed, world, rank, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n // self.world

    def __iter__(self):
        return iter(_rank_order(epoch_permutation(self.n, self.seed, self.epoch), self.world, self.rank).tolist())


# ------------------------------------------------------------------------------------------
# Training.
# ------------------------------------------------------------------------------------------

def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Learning-rate multiplier at optimizer step ``step`` (0-based): linear warm-up, then cosine."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    t = min(1.0, (step - warmup_steps) / span)
    return 0.5 * (1.0 + math.cos(math.pi * t))


_RESUME_KEYS = ("backbone", "image_size", "channels", "epochs", "batch_size", "base_lr",
                "warmup_epochs", "seed", "num_images", "init_weights")


_DEFAULT = defaults(PRETRAIN_OPTIONS)


def pretrain(source, out_dir: str | os.PathLike, backbone: str | None = None, epochs: int = _DEFAULT["epochs"],
             batch_size: int | None = None, base_lr: float = _DEFAULT["base_lr"], warmup_epochs: int | None = None,
             seed: int = _DEFAULT["seed"], image_size: int | None = None, channels: int | None = None,
             device: str | torch.device = "cpu", amp: bool | None = None, channels_last: bool | None = None,
             resume: bool = False, num_workers: int | None = None, progress: bool = True, *,
             stop_after: int | None = None, weights: str | os.PathLike | None = None,
             verbose: bool | None = None) -> Path:
    """Pre-train SimCLR on ``source`` (a :class:`mak.data.sources.ImageSource`); return the checkpoint path.

    Parameters
    ----------
    out_dir: directory for ``checkpoint.pt`` (written atomically after each epoch) and ``log.csv``.
    backbone: a :data:`mak.train.models.BACKBONES` name; default :func:`mak.train.models.default_backbone`
        of the image size (the small convnet for images of 64 px or less).
    epochs, batch_size: training length; ``batch_size`` is the global batch (all ranks),
        default ``min(256, N)``.
    base_lr: ``lr = base_lr * batch_size / 256``; ``warmup_epochs`` of linear warm-up (default
        ``min(10, epochs // 10)``), then cosine decay to 0, both per step.
    image_size, channels: working geometry; default from :func:`mak.data.sources.infer_geometry`.
    amp: mixed precision (``None``: auto, see :func:`mak.train.device.resolve_amp`); ``channels_last``: NHWC
        memory format (``None``: on).
    resume: continue from ``out_dir/checkpoint.pt`` (the same settings are required); without it
        an existing checkpoint in ``out_dir`` is an error.
    num_workers: DataLoader workers for decoding (default :func:`mak.train.device.default_num_workers`).
    stop_after: stop after this many epochs *in this call* (the checkpoint allows ``resume``).
    weights: pretrained backbone weights to start from (safetensors or a state dict, read with
        ``weights_only``; :func:`mak.train.models.load_backbone_weights`); the checkpoint records
        the file and its hash, and a resume must name the same file.
    progress: the progress bar (and the check of the images); verbose: the summary lines on stderr
        (default: as ``progress``).

    Raises :class:`MakError` for unreadable seed images (before training), a batch larger than
    the seed set, or a checkpoint that does not match the requested run.
    """
    if stop_after is not None and stop_after < 1:
        raise MakError(f"stop_after must be >= 1, got {stop_after}")
    epochs = by_name(PRETRAIN_OPTIONS)["epochs"].parse("epochs", epochs)
    output_dir(out_dir)
    run = _setup_run(source, out_dir, backbone, epochs, batch_size, base_lr, warmup_epochs, seed,
                     image_size, channels, device, amp, channels_last, num_workers)
    if weights is not None:  # the weights' hash keys the run (a resume must start from the same ones)
        from mak.train.models import read_weights

        run.weights = read_weights(weights)
        run.config["init_weights"] = run.weights.sha256
    with job_lock(run.out_dir):  # one writer per checkpoint directory
        path = _train(run, resume, epochs, seed, stop_after, progress, progress if verbose is None else verbose)
        if run.main_proc:  # temporaries of killed writes of this directory's files
            for name in (CHECKPOINT_NAME, LOG_NAME):
                remove_debris(run.out_dir / name)
        return path


def _train(run: "_Run", resume: bool, epochs: int, seed: int, stop_after: int | None, progress: bool,
           verbose: bool) -> Path:
    """Resume or start, then the epoch loop: what :func:`pretrain` does once its directory is locked."""
    from mak.progress import bar as progress_bar
    from mak.train.models import SimCLRModel, load_backbone_weights

    ckpt = _checkpoint_to_resume(run, resume)
    start_epoch = int(ckpt["epoch"]) if ckpt is not None else 0
    if ckpt is not None and run.main_proc:  # a kill between the checkpoint and its log.csv: the log catches up
        _write_log(run.log_path, [dict(r) for r in ckpt.get("log", [])])
    if start_epoch >= epochs:
        if run.main_proc and verbose:
            print(f"mak pretrain: {run.ckpt_path} has already finished {start_epoch} epochs", file=sys.stderr)
        return run.ckpt_path

    torch.manual_seed(seed)
    model = SimCLRModel(run.backbone, run.channels)  # built first: an unknown backbone fails fast
    if run.weights is not None and ckpt is None:  # a resume has them in its checkpoint already
        run.config["init_weights_loaded"] = load_backbone_weights(model.backbone, run.weights)
    cache = _seed_images(run, progress)
    trainer = _build_trainer(run, model, ckpt)
    del ckpt
    data = _EpochData(run, cache)
    if run.main_proc and verbose:
        _print_banner(run)

    stop_epoch = epochs if stop_after is None else min(epochs, start_epoch + stop_after)
    bar = progress_bar((stop_epoch - start_epoch) * run.steps_per_epoch, "pretrain", unit="step",
                       enabled=progress and run.main_proc, file=sys.stderr, dynamic_ncols=True)
    with bar:  # one bar for the run; its postfix names the epoch
        for epoch in range(start_epoch, stop_epoch):
            _epoch_and_outputs(run, trainer, data, epoch, bar)
    return run.ckpt_path


def _epoch_and_outputs(run: "_Run", trainer: "_Trainer", data: "_EpochData", epoch: int, bar: Any) -> None:
    """One epoch, its log row and (rank 0) its checkpoint and log.csv."""
    mean_loss, elapsed = _train_epoch(run, trainer, data.batches(epoch), epoch, bar)
    trainer.log_rows.append({"epoch": epoch + 1, "loss": mean_loss, "lr": float(trainer.scheduler.get_last_lr()[0]),
                             "images_per_s": run.steps_per_epoch * run.batch_size / max(elapsed, 1e-9)})
    if run.main_proc:
        _write_outputs(run, trainer, epoch + 1)
    D.barrier()


# ---- setup: the run's settings, resumption, seed images, model and optimizer ---------------

@dataclass
class _Run:
    """The resolved settings of one ``pretrain`` call (``config`` is what the checkpoint records)."""

    source: Any
    n: int
    out_dir: Path
    backbone: str
    epochs: int
    batch_size: int
    local_batch: int
    steps_per_epoch: int
    warmup_epochs: int
    seed: int
    image_size: int
    channels: int
    lr: float
    dev: torch.device
    world: int
    rank: int
    amp_dtype: torch.dtype | None
    use_cl: bool
    workers: int
    config: dict = field(default_factory=dict)
    weights: Any = None  # pretrained backbone weights to start from (mak.train.models.Weights), or None

    @property
    def main_proc(self) -> bool:
        return self.rank == 0

    @property
    def ckpt_path(self) -> Path:
        return self.out_dir / CHECKPOINT_NAME

    @property
    def log_path(self) -> Path:
        return self.out_dir / LOG_NAME


def _setup_run(source, out_dir, backbone, epochs, batch_size, base_lr, warmup_epochs, seed, image_size,
               channels, device, amp, channels_last, num_workers) -> _Run:
    """Join the process group, check the options and fill in the defaults."""
    from mak.data.sources import infer_geometry
    from mak.train.models import default_backbone

    dev = auto_device(device or "cpu")
    D.init(dev)
    world, rank = D.world_size(), D.rank()
    dev = D.local_device(str(dev))
    n = len(source)
    if n < 2:
        raise MakError(f"{getattr(source, 'name', 'seed set')}: needs at least 2 images to pre-train, found {n}")
    if image_size is None or channels is None:
        gs, gc = infer_geometry(source)
        image_size = int(image_size or gs)
        channels = int(channels or gc)
    image_size = by_name(PRETRAIN_OPTIONS)["image_size"].parse("image_size", image_size)
    if channels not in (1, 3):
        raise MakError(f"channels must be 1 or 3, got {channels}")
    backbone = backbone or default_backbone(image_size)
    if batch_size is None:  # even and a multiple of the world size, as `mak run` takes it for a small set
        batch_size = min(DEFAULT_BATCH_SIZE, n)
        batch_size -= batch_size % math.lcm(2, world)
    if batch_size < 2 or batch_size % world:
        raise ParameterError("batch_size", f"batch_size={batch_size} must be >= 2 and a multiple of the world "
                                           f"size {world}")
    if batch_size > n:
        raise ParameterError("batch_size", f"batch_size={batch_size} is larger than the seed set ({n} images)")
    local_batch = batch_size // world
    if warmup_epochs is None:
        warmup_epochs = min(10, epochs // 10)
    if warmup_epochs < 0 or warmup_epochs > epochs:
        raise MakError(f"warm-up epochs must be in [0, epochs], got {warmup_epochs}")
    run = _Run(source=source, n=n, out_dir=Path(out_dir), backbone=backbone, epochs=epochs, batch_size=batch_size,
               local_batch=local_batch, steps_per_epoch=(n // world) // local_batch, warmup_epochs=warmup_epochs,
               seed=seed, image_size=image_size, channels=channels, lr=base_lr * batch_size / 256.0, dev=dev,
               world=world, rank=rank, amp_dtype=resolve_amp(dev, amp), use_cl=resolve_channels_last(dev, channels_last),
               workers=default_num_workers(dev) if num_workers is None else int(num_workers))
    run.config = _config(run, base_lr)
    return run


def _config(run: _Run, base_lr: float) -> dict:
    """The run's settings as the checkpoint records them (``feat_dim`` is added with the model)."""
    return {
        "backbone": run.backbone, "image_size": int(run.image_size), "channels": int(run.channels),
        "epochs": int(run.epochs), "batch_size": int(run.batch_size), "base_lr": float(base_lr),
        "lr": float(run.lr), "warmup_epochs": int(run.warmup_epochs), "momentum": MOMENTUM,
        "weight_decay": WEIGHT_DECAY, "temperature": TEMPERATURE, "seed": int(run.seed),
        "num_images": int(run.n), "steps_per_epoch": int(run.steps_per_epoch), "world_size": int(run.world),
        "amp": str(run.amp_dtype).replace("torch.", "") if run.amp_dtype is not None else "float32",
        "channels_last": bool(run.use_cl), "source": _plain(_describe(run.source)), "transform": "resize",
    }


def _checkpoint_to_resume(run: _Run, resume: bool) -> dict | None:
    """The checkpoint in ``out_dir`` when resuming (it must match the run), else ``None``."""
    if not run.ckpt_path.exists():
        return None
    if not resume:
        raise MakError(f"{run.ckpt_path} already exists; pass --resume to continue it or choose another --out")
    ckpt = read_checkpoint(run.ckpt_path)
    old = ckpt["config"]
    diff = [k for k in _RESUME_KEYS if old.get(k) != run.config.get(k)]
    if diff:
        k = diff[0]
        raise MakError(f"{run.ckpt_path}: cannot resume, it was trained with {k}={old.get(k)!r} "
                       f"but this run has {k}={run.config.get(k)!r}")
    return ckpt


def _seed_images(run: _Run, progress: bool) -> torch.Tensor | None:
    """Validate every seed image before training; return them decoded (uint8) when they fit in memory."""
    if run.n * run.channels * run.image_size * run.image_size <= CACHE_BYTES:
        scan_workers = 0 if in_memory(run.source) else run.workers
        cache, bad_rows = _scan(run.source, run.image_size, run.channels, scan_workers, cache=True)
        if bad_rows:
            raise _report_bad(run.source, _reasons(run.source, bad_rows, run.image_size, run.channels))
        return cache
    _validate(run.source, progress and run.main_proc)
    return None


@dataclass
class _Trainer:
    """The model (DDP-wrapped under torchrun; ``core`` unwrapped), its optimizer and schedule."""

    model: Any
    core: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any
    aug: Any
    log_rows: list[dict]


def _build_trainer(run: _Run, model, ckpt: dict | None) -> _Trainer:
    """Place the model, build optimizer, schedule and augmentation; restore them from ``ckpt``."""
    from mak.train.augment import SimCLRAugment

    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
    run.config["feat_dim"] = int(model.feat_dim)
    model = model.to(run.dev)
    if run.use_cl:
        model = model.to(memory_format=torch.channels_last)
    core = model
    if run.world > 1:
        core = convert_sync_batchnorm(model, run.dev)
        model = D.wrap_ddp(core, run.dev)
    model.train()
    optimizer = torch.optim.SGD(core.parameters(), lr=run.lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    total_steps = run.epochs * run.steps_per_epoch
    warmup_steps = run.warmup_epochs * run.steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, warmup_steps))
    scaler = torch.amp.GradScaler("cuda") if (run.amp_dtype == torch.float16 and run.dev.type == "cuda") else None
    trainer = _Trainer(model=model, core=core, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                       aug=SimCLRAugment(run.image_size, run.channels), log_rows=[])
    if ckpt is not None:
        _restore(trainer, ckpt)
    return trainer


def _restore(trainer: _Trainer, ckpt: dict) -> None:
    """Optimizer, scheduler, grad-scaler and RNG states and the log of a checkpoint."""
    trainer.optimizer.load_state_dict(ckpt["optimizer"])
    trainer.scheduler.load_state_dict(ckpt["scheduler"])
    if trainer.scaler is not None and ckpt.get("scaler"):
        trainer.scaler.load_state_dict(ckpt["scaler"])
    rng = ckpt.get("rng", {})
    if "torch" in rng:
        torch.set_rng_state(rng["torch"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        with contextlib.suppress(Exception):  # another GPU count: CUDA RNG is unused by training
            torch.cuda.set_rng_state_all(list(rng["cuda"]))
    trainer.log_rows = [dict(r) for r in ckpt.get("log", [])]


class _EpochData:
    """Each epoch's batches for this rank: sliced from the in-memory cache, or streamed."""

    def __init__(self, run: _Run, cache: torch.Tensor | None):
        self.run, self.cache = run, cache
        self.loader = self.sampler = None
        if cache is None:
            from torch.utils.data import DataLoader

            from mak.data.sources import ImageDataset

            self.sampler = _PermutationSampler(run.n, run.seed, run.world, run.rank)
            self.loader = DataLoader(ImageDataset(run.source, run.image_size, run.channels, mode="resize"),
                                     batch_size=run.local_batch, sampler=self.sampler, num_workers=run.workers,
                                     drop_last=True, pin_memory=run.dev.type == "cuda",
                                     persistent_workers=run.workers > 0,
                                     prefetch_factor=4 if run.workers > 0 else None)
        elif run.dev.type == "cuda":
            self.cache = cache.to(run.dev)  # <= CACHE_BYTES: batches are then sliced on the GPU

    def batches(self, epoch: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        """``(uint8 images, source rows)`` of each step of ``epoch``."""
        run = self.run
        if self.cache is not None:
            order = _rank_order(epoch_permutation(run.n, run.seed, epoch), run.world, run.rank)
            return _CachedBatches(self.cache, order, run.local_batch, run.steps_per_epoch)
        self.sampler.set_epoch(epoch)
        return ((imgs, idx) for imgs, idx, ok in _check_ok(self.loader, run.source))


def _print_banner(run: _Run) -> None:
    print(f"mak pretrain: {run.n} images {run.channels}x{run.image_size}x{run.image_size}, "
          f"backbone {run.backbone}, batch {run.batch_size} x {run.steps_per_epoch} steps/epoch, "
          f"lr {run.lr:.4g}, {run.config['amp']}{', channels_last' if run.use_cl else ''}, "
          f"{run.dev}{f', {run.world} processes' if run.world > 1 else ''}", file=sys.stderr)


# ---- the epoch and the step -----------------------------------------------------------------

def _train_epoch(run: _Run, trainer: _Trainer, batches: Iterable, epoch: int, bar: Any) -> tuple[float, float]:
    """One pass over ``batches``, advancing the run's progress ``bar``; returns the mean loss and the seconds."""
    loss_sum = torch.zeros((), dtype=torch.float64, device=run.dev)
    t0 = time.perf_counter()
    t_last, step_last = t0, 0
    for step, (imgs, idx) in enumerate(batches):
        loss = _train_step(run, trainer, imgs, idx, epoch)
        loss_sum += loss.detach()
        if bar.disable:
            continue
        bar.update(1)
        now = time.perf_counter()
        if now - t_last > 0.5 or step + 1 == run.steps_per_epoch:
            ips = (step + 1 - step_last) * run.batch_size / max(now - t_last, 1e-9)
            bar.set_postfix(epoch=f"{epoch + 1}/{run.epochs}", loss=f"{loss.item():.4f}", img_s=f"{ips:.0f}",
                            refresh=False)
            t_last, step_last = now, step + 1
    if run.dev.type == "cuda":
        torch.cuda.synchronize(run.dev)
    elapsed = time.perf_counter() - t0
    return float(loss_sum.item()) / max(1, run.steps_per_epoch), elapsed


def _train_step(run: _Run, trainer: _Trainer, imgs: torch.Tensor, idx, epoch: int) -> torch.Tensor:
    """Two keyed views of each image, NT-Xent over the global batch, one optimizer and schedule step."""
    from mak.train.augment import view_key

    imgs = imgs.to(run.dev, non_blocking=True)
    idx = torch.as_tensor(idx, dtype=torch.int64)
    v1 = trainer.aug(imgs, keys=view_key(run.seed, 0, idx, epoch=epoch + 1))
    v2 = trainer.aug(imgs, keys=view_key(run.seed, 1, idx, epoch=epoch + 1))
    x = torch.cat([v1, v2], dim=0)
    if run.use_cl:
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast_context(run.dev, run.amp_dtype):
        _, z = trainer.model(x)
    z = z.float()
    loss = nt_xent_global(z[:run.local_batch], z[run.local_batch:], TEMPERATURE)
    trainer.optimizer.zero_grad(set_to_none=True)
    objective = loss * run.world if run.world > 1 else loss
    if trainer.scaler is not None:
        trainer.scaler.scale(objective).backward()
        trainer.scaler.step(trainer.optimizer)
        trainer.scaler.update()
    else:
        objective.backward()
        trainer.optimizer.step()
    trainer.scheduler.step()
    return loss


# ---- checkpoint and log --------------------------------------------------------------------

def _write_outputs(run: _Run, trainer: _Trainer, epoch: int) -> None:
    """Rank 0, after each epoch: ``checkpoint.pt`` (``epoch`` completed epochs) and ``log.csv``."""
    state = {
        "format": FORMAT, "version": FORMAT_VERSION, "config": _plain(run.config), "epoch": epoch,
        "model": trainer.core.state_dict(), "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict(),
        "scaler": trainer.scaler.state_dict() if trainer.scaler is not None else None,
        "rng": {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
        "log": _plain(trainer.log_rows),
    }
    run.out_dir.mkdir(parents=True, exist_ok=True)
    _save_checkpoint(run.ckpt_path, state)
    _write_log(run.log_path, trainer.log_rows)


def _check_ok(loader, source) -> Iterator:
    for imgs, idx, ok in loader:
        ok = torch.as_tensor(ok, dtype=torch.bool)
        if not bool(ok.all()):
            rows = [int(i) for i in torch.as_tensor(idx)[~ok]]
            raise _report_bad(source, _reasons(source, rows))
        yield imgs, idx, ok


def _reasons(source, rows: list[int], size: int = 32, channels: int = 1) -> list[tuple[int, str]]:
    """(row, "path: reason") for rows that failed to decode (re-read in this process)."""
    from mak.data.sources import ImageDataset

    ds = ImageDataset(source, size, channels)
    return [(i, ds.check(i) or f"{source.item(i)}: could not be decoded") for i in rows]


def in_memory(source) -> bool:
    """Whether ``source`` holds its images decoded in memory (then DataLoader workers do not pay off)."""
    try:
        return bool(source.in_memory())
    except Exception:
        return False


def _validate(source, progress: bool = True) -> None:
    from mak.data.sources import validate_all

    bad = validate_all(source, progress=progress)
    if bad:
        raise _report_bad(source, list(bad))


def _describe(source) -> dict:
    try:
        d = source.describe()
    except Exception:
        d = {}
    return d if isinstance(d, dict) else {"source": str(d)}
