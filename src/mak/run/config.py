"""Run configurations for ``mak run``: defaults, YAML files and ``--set`` overrides.

A config is a nested mapping of sections (``run``, ``data``, ``pretrain``, ``embed``, ``select``,
``retrain``, ``evaluate``). Every key a user sets must exist in :data:`DEFAULTS`: an
unknown key is an error that names it, so a typo never silently falls back to a default.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Mapping

from mak.bench.evaluate import DEFAULT_FEW, DEFAULT_MANY, EVALUATE_OPTIONS
from mak.bench.openworld import BENCH_OPTIONS
from mak.errors import MakError, first_line
from mak.options import DEVICE, Option, by_name, closest
from mak.paths import input_file
from mak.run.select_job import JOB_OPTIONS
from mak.selection.strategies import SELECT_OPTIONS  # the select section's defaults and checks
from mak.train.embed import EMBED_OPTIONS
from mak.train.pretrain import DEFAULT_BATCH_SIZE, PRETRAIN_OPTIONS

_BENCH_KEYS = ("scale", "ood_ratio", "pool_classes", "near_classes")  # data.benchmark keys build_benchmark declares
_BENCH = by_name(BENCH_OPTIONS)
_PRE, _EMB, _EVAL = by_name(PRETRAIN_OPTIONS), by_name(EMBED_OPTIONS), by_name(EVALUATE_OPTIONS)
# The pretrain, embed and evaluate keys that pretrain() (and pool_mix), embed() and
# evaluate_checkpoint() declare, with `mak pretrain`'s, `mak embed`'s and `mak evaluate`'s flags: one
# check each (:func:`_kinds`), and one default unless DEFAULTS gives the key a config default of its own.
DECLARED: dict[str, Option] = {
    "pretrain.backbone": _PRE["backbone"], "pretrain.epochs": _PRE["epochs"],
    "pretrain.batch_size": _PRE["batch_size"], "pretrain.lr": _PRE["base_lr"],
    "pretrain.warmup_epochs": _PRE["warmup_epochs"], "pretrain.image_size": _PRE["image_size"],
    "pretrain.workers": _PRE["num_workers"], "pretrain.pool_mix": _PRE["mix_count"],
    "embed.views": _EMB["views"], "embed.dtype": _EMB["dtype"], "embed.batch_size": _EMB["batch_size"],
    "evaluate.shots": _EVAL["shots"], "evaluate.draws": _EVAL["draws"], "evaluate.many": _EVAL["many"],
    "evaluate.few": _EVAL["few"], "evaluate.knn_k": _EVAL["k"], "evaluate.batch_size": _EVAL["batch_size"],
}
_ALSO_NULL = ("evaluate.shots",)  # null: the few-shot split as given, fitted once (config only)


def _default(key: str) -> Any:
    return DECLARED[key].default


DEFAULTS: dict[str, Any] = {
    "run": {
        "name": "mak-run",
        "seed": 0,              # base seed; repeat r uses seed + r
        "repeats": 1,
        "device": DEVICE.default,  # auto: CUDA when available, else cpu
    },
    "data": {
        # Either build the open-world benchmark from Fashion-MNIST ...
        # ood_ratio: out-of-domain pool images per in-domain one (1: half junk; 4: 80% junk).
        # pool_classes: all (the pool holds the seed's classes) or disjoint (only classes the seed
        # lacks, the paper's setting); near_classes: how many classes only the pool holds
        # (null: 0, or 4 when disjoint).
        "benchmark": {"build": False, "seed": None, "data_dir": None, "vary_with_repeat": True,
                      **{k: _BENCH[k].default for k in _BENCH_KEYS}},
        # ... or point at your own images (split files with optional labels, or folders).
        "seed": {"split": None, "folder": None, "root": None},
        "pool": {"split": None, "folder": None, "webdataset": None, "root": None},  # webdataset: 'p-{000..099}.tar'
        # Labeled evaluation splits (split files: `path label`); optional for user data.
        "eval": {"train": None, "fewshot": None, "test": None, "root": None},
    },
    "pretrain": {
        "backbone": None,       # default: the small convnet for <= 64 px, else ResNet
        "epochs": _default("pretrain.epochs"),  # 100; the declarations: mak.train.pretrain.PRETRAIN_OPTIONS
        "batch_size": DEFAULT_BATCH_SIZE,  # the config's own 256, cut to small seed sets (the flag's: min(256, N))
        "lr": _default("pretrain.lr"),  # base lr 0.5; lr = base * batch / 256
        "warmup_epochs": _default("pretrain.warmup_epochs"),
        "image_size": _default("pretrain.image_size"),
        "amp": None,
        "channels_last": None,
        "workers": _default("pretrain.workers"),
        # robust scores with a second, pool-aware model: SimCLR on the seed + this many pool images
        # (uniform sample; auto = min(pool, 8 x seed)); 0 = robust uses the seed-only model like mak
        "pool_mix": _default("pretrain.pool_mix"),
        "pool_mix_epochs": None,  # epochs of the pool-aware model (default: epochs); its set is ~9x the seed's
    },
    "embed": {
        "views": _default("embed.views"),  # the declarations: mak.train.embed.EMBED_OPTIONS
        "dtype": _default("embed.dtype"),
        "batch_size": _default("embed.batch_size"),
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
        # the declarations: mak.bench.evaluate.EVALUATE_OPTIONS
        "shots": _default("evaluate.shots"),  # labeled images per class drawn from the few-shot split; null: the split as given
        "draws": _default("evaluate.draws"),
        "many": int(DEFAULT_MANY),  # the config's own 300 and 30 (the flags' default: the benchmark's groups);
        "few": int(DEFAULT_FEW),    # a benchmark's manifest groups still come first
        "knn_k": _default("evaluate.knn_k"),
        "batch_size": _default("evaluate.batch_size"),
    },
}


def _merge(base: dict, update: Mapping, path: str = "") -> dict:
    for key, value in update.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in base:
            near = closest(str(key), map(str, base))
            hint = f" (did you mean '{path + '.' if path else ''}{near}'?)" if near else \
                f" ({path or 'the top level'} takes: {', '.join(map(str, base))})"
            raise MakError(f"unknown config key '{where}'{hint}")
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
    _check_kinds(config)
    from mak.bench.openworld import near_class_count

    try:
        near_class_count(data["benchmark"]["pool_classes"], data["benchmark"]["near_classes"],
                         ("data.benchmark.pool_classes", "data.benchmark.near_classes"))
    except MakError as exc:
        raise MakError(f"config: {exc}") from None
    from mak.selection.strategies import STRATEGIES

    _check_select(config["select"])
    for s in config["select"]["strategies"]:
        if s not in STRATEGIES:
            raise MakError(f"config: unknown strategy '{s}' in select.strategies (choose from: {', '.join(STRATEGIES)})")
    if config["embed"]["views"] == 0:
        _check_views_needed(config["select"])


def _check_views_needed(sel: dict) -> None:
    """With embed.views 0: no strategy in select.strategies may need the pool's augmented views."""
    from mak.options import ParameterError
    from mak.selection.strategies import strategy_needs

    for s in sel["strategies"]:
        try:
            needs_views = strategy_needs(s, sel["options"])[1]  # reads the strategy's own options only
        except ParameterError:  # a bad option: named by its key when the stages are laid out
            continue
        if needs_views:
            raise MakError(f"config: embed.views=0 but strategy '{s}' needs the pool's augmented views "
                           "(set embed.views to 2 or more, or leave it out of select.strategies)")


def _kinds() -> dict[str, Any]:
    """The parser of every typed key outside ``select`` (whose keys are mak.select's declarations)."""
    from mak.options import choice, device, integer, or_none, switch, text

    declared = {}  # a declared key: the declaration's parser, taking null too where the config's default is null
    for key, o in DECLARED.items():
        section, leaf = key.split(".")
        declared[key] = or_none(o.parse) if DEFAULTS[section][leaf] is None or key in _ALSO_NULL else o.parse

    def of(section: str) -> dict[str, Any]:
        return {k: v for k, v in declared.items() if k.startswith(f"{section}.")}

    count = integer(1)
    return {
        "run.name": text, "run.seed": integer(0), "run.repeats": count, "run.device": device,
        "data.benchmark.build": switch, "data.benchmark.seed": or_none(integer(0)),
        "data.benchmark.vary_with_repeat": switch,
        **{f"data.benchmark.{k}": _BENCH[k].parse if _BENCH[k].default is not None else or_none(_BENCH[k].parse)
           for k in _BENCH_KEYS},
        **of("pretrain"), "pretrain.amp": or_none(switch),
        "pretrain.channels_last": or_none(switch), "pretrain.pool_mix_epochs": or_none(count),
        **of("embed"),
        "retrain.enabled": switch, "retrain.match": choice("epochs", "steps"), "retrain.epochs": or_none(count),
        **of("evaluate"),
    }


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
    from mak.options import ParameterError

    try:
        for o in SELECT_OPTIONS:
            key = o.key or o.name
            if key in sel:
                sel[key] = o.parse(f"select.{key}", sel[key])
        if sel["budget"] is not None:
            sel["budget"] = by_name(JOB_OPTIONS)["budget"].parse("select.budget", sel["budget"])
    except ParameterError as exc:
        raise MakError(f"config: {exc}") from None
    if isinstance(sel["strategies"], str):
        sel["strategies"] = [sel["strategies"]]
    if not isinstance(sel["strategies"], list) or not sel["strategies"] or \
            not all(isinstance(x, str) for x in sel["strategies"]):
        raise MakError(f"config: select.strategies must be a strategy name or a list of them, "
                       f"got {sel['strategies']!r}")
