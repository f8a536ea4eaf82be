"""Run configurations for ``mak run``: defaults, YAML files and ``--set`` overrides.

A config is a nested mapping of sections (``run``, ``data``, ``pretrain``, ``embed``, ``select``,
``retrain``, ``evaluate``). Every key a user sets must exist in :data:`DEFAULTS`: an
unknown key is an error that names it, so a typo never silently falls back to a default.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Mapping

from mak.bench.evaluate import DEFAULT_DRAWS, DEFAULT_K, DEFAULT_SHOTS
from mak.errors import MakError, first_line
from mak.paths import input_file
from mak.selection.strategies import SELECT_OPTIONS  # the select section's defaults and checks
from mak.train.embed import DEFAULT_BATCH_SIZE as EMBED_BATCH_SIZE, DEFAULT_DTYPE, DEFAULT_VIEWS
from mak.train.pretrain import DEFAULT_BASE_LR, DEFAULT_BATCH_SIZE, DEFAULT_EPOCHS

DEFAULTS: dict[str, Any] = {
    "run": {
        "name": "mak-run",
        "seed": 0,              # base seed; repeat r uses seed + r
        "repeats": 1,
        "device": "auto",       # auto: CUDA when available, else cpu
    },
    "data": {
        # Either build the open-world benchmark from Fashion-MNIST ...
        # ood_ratio: out-of-domain pool images per in-domain one (1: half junk; 4: 80% junk).
        # pool_classes: all (the pool holds the seed's classes) or disjoint (only classes the seed
        # lacks, the paper's setting); near_classes: how many classes only the pool holds
        # (null: 0, or 4 when disjoint).
        "benchmark": {"build": False, "scale": 1.0, "seed": None, "data_dir": None, "vary_with_repeat": True,
                      "ood_ratio": 1.0, "pool_classes": "all", "near_classes": None},
        # ... or point at your own images (split files with optional labels, or folders).
        "seed": {"split": None, "folder": None, "root": None},
        "pool": {"split": None, "folder": None, "webdataset": None, "root": None},  # webdataset: 'p-{000..099}.tar'
        # Labeled evaluation splits (split files: `path label`); optional for user data.
        "eval": {"train": None, "fewshot": None, "test": None, "root": None},
    },
    "pretrain": {
        "backbone": None,       # default: the small convnet for <= 64 px, else ResNet
        "epochs": DEFAULT_EPOCHS,  # 100; the defaults' sources: mak.train.pretrain
        "batch_size": DEFAULT_BATCH_SIZE,
        "lr": DEFAULT_BASE_LR,     # base lr 0.5; lr = base * batch / 256
        "warmup_epochs": None,
        "image_size": None,
        "amp": None,
        "channels_last": None,
        "workers": None,
        # robust scores with a second, pool-aware model: SimCLR on the seed + this many pool images
        # (uniform sample; auto = min(pool, 8 x seed)); 0 = robust uses the seed-only model like mak
        "pool_mix": "auto",
        "pool_mix_epochs": None,  # epochs of the pool-aware model (default: epochs); its set is ~9x the seed's
    },
    "embed": {
        "views": DEFAULT_VIEWS,
        "dtype": DEFAULT_DTYPE,
        "batch_size": EMBED_BATCH_SIZE,
    },
    "select": {
        "strategies": ["robust", "mak", "random"],
        "budget": None,         # default: the benchmark's (2 x seed) or required for user data
        # alpha, clusters, core_ratio, temperature, ecle_batch_size, partitions: mak.select's (SELECT_OPTIONS)
        **{o.key or o.name: o.default for o in SELECT_OPTIONS if o.name != "seed"},
        "options": {},          # strategy options, e.g. {gate_quantile: 0.99, tail: ecle}; each goes to the strategies that declare it
    },
    "retrain": {
        # false, or no labeled evaluation (no benchmark, no data.eval train + test): stop after selection
        "enabled": True,
        "match": "epochs",      # epochs: same epochs on seed + selection; steps: same optimizer steps
        "epochs": None,         # default: pretrain.epochs
    },
    "evaluate": {
        "shots": DEFAULT_SHOTS,  # labeled images per class drawn from the few-shot split; null: the split as given
        "draws": DEFAULT_DRAWS,
        "many": 300,
        "few": 30,
        "knn_k": DEFAULT_K,
        "batch_size": EMBED_BATCH_SIZE,
    },
}


def _merge(base: dict, update: Mapping, path: str = "") -> dict:
    for key, value in update.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in base:
            raise MakError(f"unknown config key '{where}'")
        if isinstance(base[key], dict) and key != "options":
            if not isinstance(value, Mapping):
                raise MakError(f"config key '{where}' must be a mapping, got {value!r}")
            _merge(base[key], value, where)
        else:
            base[key] = copy.deepcopy(value)
    return base


def parse_value(text: str) -> Any:
    """A ``--set`` value as YAML would read it (numbers, booleans, null, lists)."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_set(config: dict, assignment: str) -> dict:
    """Apply one ``section.key=value`` override (nested keys with dots)."""
    if "=" not in assignment:
        raise MakError(f"--set expects KEY=VALUE, got '{assignment}'")
    key, value = assignment.split("=", 1)
    parts = key.strip().split(".")
    update: Any = parse_value(value)
    for part in reversed(parts):
        update = {part: update}
    return _merge(config, update)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """Defaults, updated by the YAML file at ``path`` (if any), then by ``--set`` overrides."""
    import yaml

    config = copy.deepcopy(DEFAULTS)
    if path is not None:
        path = input_file(path, "config file")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise MakError(f"{path}: invalid YAML ({first_line(exc)})") from None
        if not isinstance(loaded, Mapping):
            raise MakError(f"{path}: a config must be a mapping of sections")
        try:
            _merge(config, loaded)
        except MakError as exc:
            raise MakError(f"{path}: {exc}") from None
    for assignment in overrides:
        apply_set(config, assignment)
    validate(config)
    return config


def validate(config: dict) -> None:
    """Cross-field checks with one-line errors."""
    data = config["data"]
    if not data["benchmark"]["build"]:
        for part in ("seed", "pool"):
            if not (data[part]["split"] or data[part]["folder"] or data[part].get("webdataset")):
                raise MakError(f"config: data.{part}.split, .folder{' or .webdataset' if part == 'pool' else ''} "
                               "is required (or set data.benchmark.build: true)")
        if config["select"]["budget"] is None:
            raise MakError("config: select.budget is required for user data")
    from mak.bench.openworld import check_ood_ratio, near_class_count

    check_ood_ratio(data["benchmark"]["ood_ratio"], "config: data.benchmark.ood_ratio")
    near_class_count(data["benchmark"]["pool_classes"], data["benchmark"]["near_classes"],
                     ("config: data.benchmark.pool_classes", "data.benchmark.near_classes"))
    _check_kinds(config)
    from mak.selection.strategies import STRATEGIES

    _check_select(config["select"])
    for s in config["select"]["strategies"]:
        if s not in STRATEGIES:
            raise MakError(f"config: unknown strategy '{s}' in select.strategies (choose from: {', '.join(STRATEGIES)})")


def _kinds() -> dict[str, Any]:
    """The parser of every typed key outside ``select`` (whose keys are mak.select's declarations)."""
    from mak.options import choice, integer, number, or_auto, or_none, switch, text

    count = integer(1)
    return {
        "run.name": text, "run.seed": integer(0), "run.repeats": count, "run.device": text,
        "data.benchmark.build": switch, "data.benchmark.scale": number(0.0),
        "data.benchmark.seed": or_none(integer(0)), "data.benchmark.vary_with_repeat": switch,
        "data.benchmark.pool_classes": text, "data.benchmark.near_classes": or_none(integer(0)),
        "pretrain.backbone": or_none(text), "pretrain.epochs": count, "pretrain.batch_size": integer(2),
        "pretrain.lr": number(0.0), "pretrain.warmup_epochs": or_none(integer(0)),
        "pretrain.image_size": or_none(count), "pretrain.amp": or_none(switch),
        "pretrain.channels_last": or_none(switch), "pretrain.workers": or_none(integer(0)),
        "pretrain.pool_mix": or_auto(integer(0)), "pretrain.pool_mix_epochs": or_none(count),
        "embed.views": _views, "embed.dtype": choice("float16", "float32"), "embed.batch_size": count,
        "retrain.enabled": switch, "retrain.match": choice("epochs", "steps"), "retrain.epochs": or_none(count),
        "evaluate.shots": or_none(count), "evaluate.draws": count, "evaluate.many": count, "evaluate.few": integer(0),
        "evaluate.knn_k": count, "evaluate.batch_size": count,
    }


def _views(name: str, raw: Any) -> int:
    """Augmented views per image: 0 (none) or at least 2 (ECLE needs pairs)."""
    from mak.options import ParameterError, integer

    value = integer(0)(name, raw)
    if value == 1:
        raise ParameterError(name, f"{name}={raw!r} must be 0 (no views) or an integer >= 2")
    return value


def _check_kinds(config: dict) -> None:
    """Type and range of every key in :func:`_kinds`, parsed in place; errors name the key."""
    from mak.options import ParameterError

    for key, parse in _kinds().items():
        *sections, leaf = key.split(".")
        node = config
        for part in sections:
            node = node[part]
        try:
            node[leaf] = parse(key, node[leaf])
        except ParameterError as exc:
            raise MakError(f"config: {exc}") from None


def _check_select(sel: dict) -> None:
    """select.* values parsed by the declarations mak.select and ``mak select`` use, each named on error."""
    from mak.options import ParameterError, integer

    try:
        for o in SELECT_OPTIONS:
            key = o.key or o.name
            if key in sel:
                sel[key] = o.parse(f"select.{key}", sel[key])
        if sel["budget"] is not None:
            sel["budget"] = integer(1)("select.budget", sel["budget"])
    except ParameterError as exc:
        raise MakError(f"config: {exc}") from None
    if isinstance(sel["strategies"], str):
        sel["strategies"] = [sel["strategies"]]
    if not isinstance(sel["strategies"], list) or not sel["strategies"] or \
            not all(isinstance(x, str) for x in sel["strategies"]):
        raise MakError(f"config: select.strategies must be a strategy name or a list of them, "
                       f"got {sel['strategies']!r}")
