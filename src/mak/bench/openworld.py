"""The open-world benchmark: a long-tailed seed and a half-junk pool built from Fashion-MNIST.

:func:`build_benchmark` (``mak bench build``) writes, from Fashion-MNIST's real images, a set of
*split-file datasets* on disk (PNG files plus text files of ``relative/path LABEL`` lines), so
that every other command reads them exactly as it reads a user's data::

    DIR/benchmark.json                 manifest (counts, class order, groups, budget, ...)
    DIR/seed.txt      images/seed/000000.png 7     long-tailed seed set
    DIR/pool.txt      images/pool/000000.png -1    in-domain (milder tail) + out-of-domain, shuffled
    DIR/fullshot.txt  images/fullshot/...          balanced labeled train split for the linear probe
    DIR/fewshot.txt   images/fewshot/...           labeled pool the few-shot probe draws from
    DIR/test.txt      images/test/...              Fashion-MNIST's test images
    DIR/sources.txt   images/pool/000000.png glyph 17   where each image came from
    DIR/images/{seed,pool,fullshot,fewshot,test}/NNNNNN.png   28 x 28 grayscale

Counts at ``scale`` 1.0 (``k`` = rank of the class in the class order, 0 = head):

- seed: ``round(1000 * 100 ** (-k / 9))`` = 1000, 599, 359, 215, 129, 77, 46, 28, 17, 10
  (2,480 images; exponential profile, imbalance 100);
- pool, in-domain: ``round(2000 * 10 ** (-k / 9))`` = 2000, 1549, ..., 258, 200 (8,175; the
  same class order, imbalance 10) plus as many out-of-domain images (half glyphs, half
  textures, see :mod:`mak.bench.glyphs`): 16,350 in all, shuffled. ``ood_ratio`` (default 1) sets
  the out-of-domain count to that many times the in-domain pool (4: 80% junk);
- fullshot: 1,000 per class; fewshot: 100 per class; test: all 10,000 test images.

The class label written in the split files is the original Fashion-MNIST label (0-9: T-shirt/top,
Trouser, Pullover, Dress, Coat, Sandal, Shirt, Sneaker, Bag, Ankle boot); out-of-domain images
have label -1. The class order (head to tail) is a permutation of the labels drawn from ``seed``.
Seed, pool, fullshot and fewshot use disjoint images of the 60,000 training images; test uses
the 10,000 test images. The labels are there for analysis and evaluation only: pretraining,
embedding and selection must not read them.

Classes the seed lacks (``near_classes`` K, default 0): the last K classes of the class order
appear only in the pool, ``NEAR_PER_CLASS`` = 2,000 images each (as many as the pool's head
class), the way a web pool holds images of the seed's kind but of other classes. The seed then
holds the first ``10 - K`` classes (the same exponential profile over ``10 - K`` ranks: 1,000
down to 10), the pool's seed classes the pool profile over those ranks, and the evaluation
splits (fullshot, fewshot, test) the seed's classes only. ``pool_classes`` ``"disjoint"`` is
the paper's setting (ImageNet-100-LT seed, ImageNet-900 pool): the pool holds **no** image of a
seed class, only the K classes the seed lacks (K defaults to 4 there: a seed of six classes,
1,000 / 398 / 158 / 63 / 25 / 10, two in each group) plus the out-of-domain images;
``ood_ratio`` is relative to those K x 2,000 images.

``scale`` multiplies every count (rounded, at least 2 per class; the few-shot pool keeps at
least ``2 * shots`` = 20 per class so that draws of 10 differ). The Many / Medium / Few groups
are defined by the unrounded seed profile against thresholds ``300 * scale`` and ``30 * scale``
(``> many``, ``few..many``, ``< few``), i.e. the same classes by rank at every scale: at
scale 1.0 three Many, four Medium and three Few classes. The default budget is twice the seed
size. The same ``seed`` gives the same bytes (on the same machine: the glyphs depend on the
installed fonts).
"""
from __future__ import annotations

import gzip
import json
import math
import os
import struct
import zlib
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from mak.atomic import atomic_dir
from mak.errors import MakError
from mak.options import Option, by_name, choice, defaults, integer, number

FORMAT = "mak-openworld-benchmark"
FORMAT_VERSION = 1
MANIFEST = "benchmark.json"
SPLITS: tuple[str, ...] = ("seed", "pool", "fullshot", "fewshot", "test")
NUM_CLASSES = 10
IMAGE_SIZE = 28
CLASS_NAMES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
OOD_LABEL = -1

# Profiles at scale 1.0.
SEED_MAX, SEED_IMBALANCE = 1000, 100.0
POOL_MAX, POOL_IMBALANCE = 2000, 10.0
FULLSHOT_PER_CLASS = 1000
FEWSHOT_PER_CLASS = 100
FEWSHOT_SHOTS = 10
TEST_PER_CLASS = 1000
MANY_THRESHOLD, FEW_THRESHOLD = 300.0, 30.0
NEAR_PER_CLASS = POOL_MAX  # pool images of each class the seed lacks
POOL_CLASSES: tuple[str, ...] = ("all", "disjoint")  # the pool holds the seed's classes, or only others
DISJOINT_NEAR_CLASSES = 4  # classes the seed lacks when pool_classes is disjoint and K is not given
TRAIN_PER_CLASS = 6000  # Fashion-MNIST's training images per class

# build_benchmark's options, declared once: `mak bench build`'s flags and `mak run`'s data.benchmark keys.
BENCH_OPTIONS: tuple[Option, ...] = (
    Option("seed", 0, "random seed: class order, image picks, generated images (default 0)", integer(0), "S"),
    Option("scale", 1.0, "multiply every image count by F (at least 2 per class; default 1.0)", number(0.0), "F"),
    Option("ood_ratio", 1.0, "out-of-domain pool images per in-domain pool image (default 1: half the pool is "
           "junk; 4: 80%)", number(0.0, low_open=False), "R"),
    Option("pool_classes", POOL_CLASSES[0], "all: the pool holds the seed's classes (milder tail) and "
           "--near-classes others; disjoint: it holds only classes the seed lacks, as in the paper (default all)",
           choice(*POOL_CLASSES), "|".join(POOL_CLASSES)),
    Option("near_classes", None, f"K classes appear only in the pool, {NEAR_PER_CLASS:,} images each; the seed "
           f"keeps the other {NUM_CLASSES} - K (default 0, or {DISJOINT_NEAR_CLASSES} with --pool-classes disjoint)",
           integer(0), "K"),
    Option("budget", None, "selection budget recorded in the manifest (default: 2 x seed size)", integer(1), "N"),
)

DEFAULT_DATA_DIRS: tuple[str, ...] = ("/usr/share/datasets/fashion-mnist",)
DATA_PACKAGE = "dataset-fashion-mnist"
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


# --------------------------------------------------------------------------- Fashion-MNIST


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed) of unsigned bytes into a numpy array."""
    path = Path(path)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as fh:
            data = fh.read()
    except (OSError, EOFError) as exc:
        raise MakError(f"{path}: cannot read IDX file ({exc})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise MakError(f"{path}: not an IDX file (bad magic number)")
    dtype_code, ndim = data[2], data[3]
    if dtype_code != 0x08:
        raise MakError(f"{path}: unsupported IDX element type 0x{dtype_code:02x} (expected unsigned bytes)")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise MakError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    n = int(np.prod(shape)) if shape else 1
    if len(data) - header != n:
        raise MakError(f"{path}: IDX payload has {len(data) - header} bytes, header says {n}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def find_fashion_mnist(data_dir: str | os.PathLike | None = None) -> Path:
    """Locate a directory holding Fashion-MNIST's four IDX files (``.gz`` or not).

    Looks in ``data_dir`` when given, else ``$MAK_DATA_DIR`` and the Debian package's
    ``/usr/share/datasets/fashion-mnist``. Raises :class:`MakError` saying what to do otherwise.
    """
    if data_dir is not None:
        candidates = [Path(data_dir)]
    else:
        env = os.environ.get("MAK_DATA_DIR")
        candidates = ([Path(env)] if env else []) + [Path(d) for d in DEFAULT_DATA_DIRS]
    for d in candidates:
        if all(_idx_file(d, name) is not None for pair in _FILES.values() for name in pair):
            return d
    where = ", ".join(str(d) for d in candidates)
    raise MakError(
        f"Fashion-MNIST not found in {where} (need train-images-idx3-ubyte[.gz], "
        f"train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz]); "
        f"install the Debian package {DATA_PACKAGE} (apt-get install {DATA_PACKAGE}) "
        f"or pass --data-dir DIR with those files"
    )


def _idx_file(d: Path, name: str) -> Path | None:
    for cand in (d / f"{name}.gz", d / name):
        if cand.is_file():
            return cand
    return None


def load_fashion_mnist(split: str, data_dir: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(images uint8 N x 28 x 28, labels int64 N)`` of split ``train`` or ``test``."""
    if split not in _FILES:
        raise MakError(f"unknown Fashion-MNIST split {split!r}; expected train or test")
    d = find_fashion_mnist(data_dir)
    img_name, lab_name = _FILES[split]
    images = read_idx(_idx_file(d, img_name))
    labels = read_idx(_idx_file(d, lab_name)).astype(np.int64)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise MakError(f"{d}: Fashion-MNIST {split} images {images.shape} and labels {labels.shape} do not match")
    if labels.min() < 0 or labels.max() >= NUM_CLASSES:
        raise MakError(f"{d}: Fashion-MNIST {split} labels outside 0..{NUM_CLASSES - 1}")
    return images, labels


# --------------------------------------------------------------------------- counts


def _round(x: float) -> int:
    return int(math.floor(x + 0.5))


def profile(max_count: float, imbalance: float, num_classes: int = NUM_CLASSES) -> list[float]:
    """Unrounded exponential long-tail profile: ``max_count * imbalance ** (-k / (C - 1))``."""
    if num_classes == 1:
        return [float(max_count)]
    return [max_count * imbalance ** (-k / (num_classes - 1)) for k in range(num_classes)]


def profile_counts(
    max_count: float, imbalance: float, num_classes: int = NUM_CLASSES, scale: float = 1.0, minimum: int = 2
) -> list[int]:
    """Per-rank counts ``max(minimum, round(scale * max_count * imbalance ** (-k / (C - 1))))``."""
    return [max(minimum, _round(scale * x)) for x in profile(max_count, imbalance, num_classes)]


def near_class_count(pool_classes: str = "all", near_classes: int | None = None,
                     names: tuple[str, str] = ("--pool-classes", "--near-classes")) -> int:
    """The number K of classes the seed lacks, checked: ``near_classes``, or 4 when disjoint, else 0.

    The seed keeps at least two classes (K <= 8); a disjoint pool needs K >= 1. Errors name the
    parameters as ``names`` (option names by default).
    """
    if pool_classes not in POOL_CLASSES:
        raise MakError(f"{names[0]} must be one of {', '.join(POOL_CLASSES)}, got {pool_classes!r}")
    if near_classes is None:
        return DISJOINT_NEAR_CLASSES if pool_classes == "disjoint" else 0
    low = 1 if pool_classes == "disjoint" else 0
    if isinstance(near_classes, bool) or not isinstance(near_classes, int) or not low <= near_classes <= NUM_CLASSES - 2:
        raise MakError(f"{names[1]} must be an integer from {low} to {NUM_CLASSES - 2} "
                       f"when {names[0]} is {pool_classes}, got {near_classes!r}")
    return near_classes


def benchmark_counts(
    scale: float = 1.0, shots: int = FEWSHOT_SHOTS, ood_ratio: float = 1.0,
    pool_classes: str = "all", near_classes: int | None = None,
) -> dict[str, list[int]]:
    """Per-rank image counts of each split at ``scale`` (rank 0 = head class, 10 ranks).

    Keys: ``seed``, ``pool`` (in-domain only), ``pool_ood`` (one number: out-of-domain images,
    ``round(ood_ratio x`` the in-domain pool size``)``), ``fullshot``, ``fewshot``, ``test``.
    The last K ranks (``near_classes``) are the classes the seed lacks: 0 in every split but the
    pool; with ``pool_classes`` disjoint the seed's ranks have no pool images.
    """
    declared = by_name(BENCH_OPTIONS)  # the checks of `mak bench build`'s flags and the config's keys
    scale = declared["scale"].parse("scale", scale)
    ood_ratio = declared["ood_ratio"].parse("ood_ratio", ood_ratio)
    k = near_class_count(pool_classes, near_classes)
    s = NUM_CLASSES - k  # the seed's classes
    near = [max(2, _round(NEAR_PER_CLASS * scale))] * k
    pool_seed = [0] * s if pool_classes == "disjoint" else profile_counts(POOL_MAX, POOL_IMBALANCE, s, scale)
    counts = {
        "seed": profile_counts(SEED_MAX, SEED_IMBALANCE, s, scale) + [0] * k,
        "pool": pool_seed + near,
        "fullshot": [max(2, _round(FULLSHOT_PER_CLASS * scale))] * s + [0] * k,
        "fewshot": [max(2 * shots, _round(FEWSHOT_PER_CLASS * scale))] * s + [0] * k,
        "test": [min(TEST_PER_CLASS, max(2, _round(TEST_PER_CLASS * scale)))] * s + [0] * k,
    }
    counts["pool_ood"] = [_round(ood_ratio * sum(counts["pool"]))]
    need = max(sum(counts[split][r] for split in ("seed", "pool", "fullshot", "fewshot")) for r in range(NUM_CLASSES))
    if need > TRAIN_PER_CLASS:
        raise MakError(
            f"--scale {scale:g} needs {need} training images for the head class but Fashion-MNIST "
            f"has {TRAIN_PER_CLASS} per class; use a scale of at most "
            f"{TRAIN_PER_CLASS / (SEED_MAX + POOL_MAX + FULLSHOT_PER_CLASS + FEWSHOT_PER_CLASS):.2f}"
        )
    return counts


def group_ranks(many: float = MANY_THRESHOLD, few: float = FEW_THRESHOLD,
                num_classes: int = NUM_CLASSES) -> dict[str, list[int]]:
    """Ranks in the Many (> many), Medium (few..many) and Few (< few) groups of a seed of ``num_classes``.

    Decided on the unrounded, unscaled seed profile against the unscaled thresholds, which is the
    same as the scaled profile against ``many * scale`` and ``few * scale`` before rounding.
    """
    out: dict[str, list[int]] = {"many": [], "medium": [], "few": []}
    for rank, x in enumerate(profile(SEED_MAX, SEED_IMBALANCE, num_classes)):
        out["many" if x > many else "few" if x < few else "medium"].append(rank)
    return out


# --------------------------------------------------------------------------- building


def _permute(rng: np.random.Generator, idx: np.ndarray) -> np.ndarray:
    return idx[rng.permutation(len(idx))]


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def encode_png(image: np.ndarray) -> bytes:
    """Encode a 2-D uint8 array as an 8-bit grayscale PNG.

    A minimal encoder (no filtering, zlib level 6): about twice as fast as PIL for tiny images,
    and its bytes depend on nothing but the pixels (and zlib), not on the PIL version.
    """
    a = np.asarray(image)
    if a.ndim != 2 or a.dtype != np.uint8:
        raise ValueError("encode_png expects a 2-D uint8 array")
    h, w = a.shape
    raw = np.zeros((h, w + 1), np.uint8)  # a leading 0 per row: filter type None
    raw[:, 1:] = a
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
        + _png_chunk(b"IDAT", zlib.compress(raw.tobytes(), 6))
        + _png_chunk(b"IEND", b"")
    )


def _write_pngs(folder: Path, images: np.ndarray, tick: Callable[[int], Any] | None = None) -> list[str]:
    """Write ``images[i]`` to ``folder/{i:06d}.png``; return the file names. ``tick(1)`` after each."""
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"{i:06d}.png" for i in range(len(images))]
    for name, img in zip(names, images):
        with open(folder / name, "wb") as fh:
            fh.write(encode_png(img))
        if tick is not None:
            tick(1)
    return names


def _check_out(out: Path, overwrite: bool) -> None:
    """Raise MakError unless ``out`` is absent, an empty directory, or may be overwritten."""
    if out.exists() and not out.is_dir():
        raise MakError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise MakError(f"{out} already exists and is not empty (use --overwrite to replace it)")


def _pick_train_indices(
    rng: np.random.Generator, train_y: np.ndarray, class_order: list[int], counts: dict[str, list[int]], scale: float
) -> dict[str, list[np.ndarray]]:
    """Draw disjoint training indices of each class for the seed, pool, fullshot and fewshot splits."""
    picked: dict[str, list[np.ndarray]] = {s: [] for s in ("seed", "pool", "fullshot", "fewshot")}
    for rank, label in enumerate(class_order):
        idx = _permute(rng, np.flatnonzero(train_y == label))
        start = 0
        for split in ("seed", "pool", "fullshot", "fewshot"):
            n = counts[split][rank]
            if start + n > len(idx):
                raise MakError(
                    f"Fashion-MNIST class {label} has {len(idx)} training images, the benchmark needs "
                    f"more at --scale {scale:g}"
                )
            picked[split].append(idx[start: start + n])
            start += n
    return picked


def _pick_test_indices(
    rng: np.random.Generator, test_y: np.ndarray, class_order: list[int], counts: dict[str, list[int]]
) -> np.ndarray:
    """Draw the sorted test indices: ``counts["test"][rank]`` of each class, or all of a class when it has no more."""
    test_pick = []
    for rank, label in enumerate(class_order):
        idx = np.flatnonzero(test_y == label)
        n = counts["test"][rank]
        test_pick.append(np.sort(_permute(rng, idx)[:n]) if n < len(idx) else idx)
    return np.sort(np.concatenate(test_pick))


def _ood_images(
    n_ood: int, seed: int, fonts: Sequence[str | os.PathLike], tick: Callable[[int], Any] | None = None,
) -> tuple[np.ndarray, list[str], int]:
    """Generate ``n_ood`` out-of-domain images (half glyphs, rounding up); return images, provenance, glyph count."""
    from mak.bench import glyphs  # lazy: reading a benchmark needs neither PIL nor fonts

    n_glyph = (n_ood + 1) // 2
    ood_images, ood_kinds = glyphs.make_ood_images(n_glyph, n_ood - n_glyph, seed=seed, size=IMAGE_SIZE, fonts=fonts,
                                                   tick=tick)
    ood_index = list(range(n_glyph)) + list(range(n_ood - n_glyph))
    return ood_images, [f"{k} {j}" for k, j in zip(ood_kinds, ood_index)], n_glyph


def _assemble_splits(
    rng: np.random.Generator, train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
    picked: dict[str, list[np.ndarray]], test_idx: np.ndarray, ood_images: np.ndarray, ood_prov: list[str],
) -> dict[str, tuple[np.ndarray, np.ndarray, list[str]]]:
    """Shuffle each split's images into ``(images, labels, provenance)``; the pool mixes in the out-of-domain images."""
    splits: dict[str, tuple[np.ndarray, np.ndarray, list[str]]] = {}
    for split in ("seed", "fullshot", "fewshot"):
        idx = _permute(rng, np.concatenate(picked[split]))
        splits[split] = (train_x[idx], train_y[idx], [f"fmnist-train {int(i)}" for i in idx])
    pool_idx = np.concatenate(picked["pool"])
    pool_images = np.concatenate([train_x[pool_idx], ood_images])
    pool_labels = np.concatenate([train_y[pool_idx], np.full(len(ood_prov), OOD_LABEL, np.int64)])
    pool_prov = [f"fmnist-train {int(i)}" for i in pool_idx] + ood_prov
    order = rng.permutation(len(pool_images))
    splits["pool"] = (pool_images[order], pool_labels[order], [pool_prov[i] for i in order])
    splits["test"] = (test_x[test_idx], test_y[test_idx], [f"fmnist-test {int(i)}" for i in test_idx])
    return splits


def _check_budget(budget: int | None, seed_size: int, n_pool: int) -> int:
    """The selection budget: ``budget`` (default twice the seed size), checked to lie in 1..``n_pool``."""
    if budget is None:
        budget = 2 * seed_size
    budget = int(budget)
    if budget < 1 or budget > n_pool:
        raise MakError(f"--budget must be between 1 and the pool size {n_pool}, got {budget}")
    return budget


def _manifest(
    seed: int, scale: float, class_order: list[int], num_seed: int, pool_classes: str, ood_ratio: float,
    n_glyph: int, n_ood: int, budget: int,
) -> dict[str, Any]:
    """The benchmark's manifest, with empty ``counts`` and ``totals`` (see :func:`_fill_counts`)."""
    ranks = group_ranks(num_classes=num_seed)
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "seed": seed,
        "scale": float(scale),
        "source": "Fashion-MNIST",
        "image_size": IMAGE_SIZE,
        "channels": 1,
        "num_classes": NUM_CLASSES,
        "class_names": {str(c): CLASS_NAMES[c] for c in range(NUM_CLASSES)},
        "class_order": class_order,
        "seed_classes": class_order[:num_seed],
        "near_classes": class_order[num_seed:],
        "pool_classes": pool_classes,
        "ood_label": OOD_LABEL,
        "splits": {s: f"{s}.txt" for s in SPLITS},
        "sources": "sources.txt",
        "counts": {},
        "totals": {},
        "pool_ood": {"glyph": n_glyph, "texture": n_ood - n_glyph},
        "groups": {g: [class_order[r] for r in rs] for g, rs in ranks.items()},
        "group_thresholds": {"many": MANY_THRESHOLD * scale, "few": FEW_THRESHOLD * scale},
        "profiles": {
            "seed": {"max": SEED_MAX, "imbalance": SEED_IMBALANCE},
            "pool": {"max": POOL_MAX, "imbalance": POOL_IMBALANCE, "ood_ratio": float(ood_ratio),
                     "near_per_class": NEAR_PER_CLASS},
        },
        "fewshot_shots": FEWSHOT_SHOTS,
        "budget": budget,
    }


def _fill_counts(manifest: dict[str, Any], splits: dict[str, tuple[np.ndarray, np.ndarray, list[str]]]) -> None:
    """Record each split's per-label image counts and total in ``manifest``."""
    for split in SPLITS:
        labels = splits[split][1]
        keys = list(range(NUM_CLASSES)) + ([OOD_LABEL] if split == "pool" else [])
        manifest["counts"][split] = {str(c): int((labels == c).sum()) for c in keys}
        manifest["totals"][split] = int(len(labels))


def _write_benchmark(
    out: Path, splits: dict[str, tuple[np.ndarray, np.ndarray, list[str]]], manifest: dict[str, Any],
    tick: Callable[[int], Any] | None = None,
) -> None:
    """Write the images, split lists, ``sources.txt`` and manifest into ``out`` atomically."""
    try:
        with atomic_dir(out, overwrite=True) as tmp:
            source_lines = []
            for split in SPLITS:
                images, labels, prov = splits[split]
                _write_pngs(tmp / "images" / split, np.ascontiguousarray(images), tick)
                names = [f"images/{split}/{i:06d}.png" for i in range(len(images))]
                lines = "".join(f"{n} {int(y)}\n" for n, y in zip(names, labels))
                (tmp / f"{split}.txt").write_text(lines, encoding="utf-8")
                source_lines += [f"{n} {p}\n" for n, p in zip(names, prov)]
            (tmp / "sources.txt").write_text("".join(source_lines), encoding="utf-8")
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    except OSError as exc:
        raise MakError(f"cannot write the benchmark to {out}: {exc}") from None


_DEFAULT = defaults(BENCH_OPTIONS)


def build_benchmark(
    out: str | os.PathLike,
    seed: int = _DEFAULT["seed"],
    scale: float = _DEFAULT["scale"],
    data_dir: str | os.PathLike | None = None,
    budget: int | None = None,
    *,
    overwrite: bool = False,
    fonts: Sequence[str | os.PathLike] | None = None,
    ood_ratio: float = _DEFAULT["ood_ratio"],
    pool_classes: str = _DEFAULT["pool_classes"],
    near_classes: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Build the open-world benchmark into directory ``out`` and return its manifest.

    See the module docstring for the layout and counts. ``budget`` defaults to twice the seed
    size. The directory is written atomically: it appears complete or not at all; an existing
    non-empty ``out`` is an error unless ``overwrite``. ``fonts`` overrides the fonts used for glyphs (default
    :func:`mak.bench.glyphs.find_fonts`). ``ood_ratio``: out-of-domain images per in-domain pool image
    (default 1: a half-junk pool; 4 = 80% junk, as a web crawl is more like). ``near_classes``: how
    many classes appear only in the pool; ``pool_classes="disjoint"``: the pool holds none of the
    seed's classes (see the module docstring). ``progress``: a bar over the images generated and written.
    """
    from mak.bench import glyphs  # lazy: reading a benchmark needs neither PIL nor fonts
    from mak.progress import bar

    seed = int(seed)
    counts = benchmark_counts(scale, ood_ratio=ood_ratio, pool_classes=pool_classes, near_classes=near_classes)
    num_seed = NUM_CLASSES - near_class_count(pool_classes, near_classes)
    out = Path(out)
    _check_out(out, overwrite)
    if fonts is None:
        fonts = glyphs.find_fonts()
    train_x, train_y = load_fashion_mnist("train", data_dir)
    test_x, test_y = load_fashion_mnist("test", data_dir)

    rng = np.random.default_rng([seed & 0xFFFFFFFF, 20211])
    class_order = [int(c) for c in rng.permutation(NUM_CLASSES)]  # rank -> Fashion-MNIST label
    picked = _pick_train_indices(rng, train_y, class_order, counts, scale)
    test_idx = _pick_test_indices(rng, test_y, class_order, counts)
    n_ood = counts["pool_ood"][0]
    n_images = n_ood + len(test_idx) + sum(len(p) for parts in picked.values() for p in parts)
    with bar(n_ood + n_images, "bench build: generate and write images", unit="img", enabled=progress) as b:
        ood_images, ood_prov, n_glyph = _ood_images(n_ood, seed, fonts, b.update)
        splits = _assemble_splits(rng, train_x, train_y, test_x, test_y, picked, test_idx, ood_images, ood_prov)
        budget = _check_budget(budget, int(sum(counts["seed"])), len(splits["pool"][0]))
        manifest = _manifest(seed, scale, class_order, num_seed, pool_classes, ood_ratio, n_glyph, n_ood, budget)
        _fill_counts(manifest, splits)
        _write_benchmark(out, splits, manifest, b.update)
    return manifest


# --------------------------------------------------------------------------- reading


def load_manifest(bench: str | os.PathLike) -> dict[str, Any]:
    """Read ``benchmark.json`` of a benchmark directory (or the file itself)."""
    path = Path(bench)
    if path.is_dir():
        path = path / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MakError(f"{path}: no benchmark manifest (build one with `mak bench build --out DIR`)") from None
    except (OSError, ValueError) as exc:
        raise MakError(f"{path}: cannot read benchmark manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise MakError(f"{path}: not a mak open-world benchmark manifest")
    return manifest


def split_path(bench: str | os.PathLike, split: str) -> Path:
    """Path of split file ``split`` (seed, pool, fullshot, fewshot, test) of a benchmark."""
    manifest = load_manifest(bench)
    if split not in manifest["splits"]:
        raise MakError(f"unknown benchmark split {split!r}; expected one of {', '.join(manifest['splits'])}")
    return Path(bench) / manifest["splits"][split]


def seed_counts(manifest: dict[str, Any]) -> dict[int, int]:
    """Per-class (Fashion-MNIST label) image counts of the seed split of a manifest."""
    classes = {int(c) for c in manifest.get("seed_classes", manifest["class_order"])}
    return {int(c): int(n) for c, n in manifest["counts"]["seed"].items() if int(c) in classes}


def groups(manifest: dict[str, Any]) -> dict[str, list[int]]:
    """The manifest's Many / Medium / Few class lists (Fashion-MNIST labels)."""
    return {g: [int(c) for c in manifest["groups"][g]] for g in ("many", "medium", "few")}


def summary(manifest: dict[str, Any]) -> str:
    """A few human-readable lines describing a built benchmark."""
    names = manifest["class_names"]
    seed_classes = manifest.get("seed_classes", manifest["class_order"])
    order = ", ".join(f"{c} ({names[str(c)]})" for c in seed_classes)
    lines = [
        f"class order (head -> tail): {order}",
        "images: " + ", ".join(f"{s} {manifest['totals'][s]}" for s in SPLITS)
        + f" (pool: {manifest['counts']['pool'][str(OOD_LABEL)]} out-of-domain)",
        "seed per class: " + " ".join(str(manifest["counts"]["seed"][str(c)]) for c in seed_classes),
        "groups: " + "; ".join(f"{g} {manifest['groups'][g]}" for g in ("many", "medium", "few")),
    ]
    near = manifest.get("near_classes") or []
    if near:
        where = "the pool holds only these" if manifest.get("pool_classes") == "disjoint" else "pool only"
        lines.append("classes the seed lacks (" + where + "): "
                     + ", ".join(f"{c} ({names[str(c)]}) {manifest['counts']['pool'][str(c)]}" for c in near))
    lines.append(f"budget: {manifest['budget']}")
    return "\n".join(lines)
