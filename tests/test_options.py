"""Declared parameters: one declaration per option, checked the same way from the API, the CLI and configs."""
from __future__ import annotations

import numpy as np
import pytest

import mak
from mak.errors import MakError
from mak.options import Option, ParameterError, choice, integer, number, or_auto, resolve, switch
from mak.run.config import load_config
from mak.selection.strategies import SELECT_DEFAULTS, SELECT_OPTIONS

BENCH = ["data.benchmark.build=true"]


@pytest.mark.parametrize("parse, good, bad", [
    (integer(2), [(2, 2), ("7", 7), (np.int64(3), 3)], [1, "x", 2.5, True, None, "2.0"]),
    (number(0.0, 1.0), [(1, 1.0), ("0.25", 0.25), (np.float32(0.5), 0.5)], [0, 0.0, 1.01, "nan", "inf", "x", False]),
    (number(0.0, 1.0, low_open=False), [(0, 0.0), (1.0, 1.0)], [-0.1, 2]),
    (number(0.0), [(1e9, 1e9)], [0, -1]),
    (choice("a", "b"), [("a", "a")], ["c", 1, None]),
    (switch, [("on", True), ("OFF", False), (True, True), ("yes", True)], ["maybe", 1, None]),
    (or_auto(integer(1)), [("auto", "auto"), ("3", 3)], ["many", 0]),
])
def test_parsers_accept_values_and_text_and_name_the_parameter_on_error(parse, good, bad):
    for value, want in good:
        got = parse("p", value)
        assert got == want and type(got) is type(want)
    for value in bad:
        with pytest.raises(ParameterError, match=r"^p=.* must be") as exc:
            parse("p", value)
        assert exc.value.param == "p" and isinstance(exc.value, ValueError)


def test_resolve_fills_defaults_and_rejects_unknown_names_listing_the_valid_ones():
    declared = (Option("k", 5, "h", integer(1)), Option("mode", "a", "h", choice("a", "b")))
    assert resolve(declared, {}, "thing") == {"k": 5, "mode": "a"}
    assert resolve(declared, {"k": "7", "mode": None}, "thing") == {"k": 7, "mode": "a"}
    with pytest.raises(ParameterError, match=r"unknown option 'kk' for thing \(valid: k, mode\)"):
        resolve(declared, {"kk": 1}, "thing")


@pytest.mark.parametrize("kwargs, message", [
    ({"budget": 0}, "^budget=0 must be an integer >= 1"),
    ({"budget": 2.5}, "^budget=2.5 must be an integer >= 1"),
    ({"alpha": 1.5}, r"^alpha=1.5 must be a number in \[0, 1\]"),
    ({"core_ratio": 0}, "^core_ratio=0 must be a number > 0"),
    ({"partitions": 0}, "^partitions=0 must be an integer >= 1"),
    ({"batch_size": 1}, "^batch_size=1 must be an integer >= 2"),
    ({"temperature": -1}, "^temperature=-1 must be a number > 0"),
    ({"clusters": 0}, "^clusters=0 must be an integer >= 1"),
    ({"seed": -1}, "^seed=-1 must be an integer >= 0"),
])
def test_select_names_a_bad_parameter_before_any_work(rng, kwargs, message):
    seed, pool = rng.normal(size=(20, 4)), rng.normal(size=(50, 4))
    views = rng.normal(size=(2, 50, 3))
    args = {"budget": 5, **kwargs}
    with pytest.raises(MakError, match=message):
        mak.select(seed, pool, views, args.pop("budget"), strategy="mak", **args)


def test_cli_flags_and_config_keys_come_from_the_same_declarations():
    from mak.cli import build_parser
    from mak.run.config import DEFAULTS

    args = build_parser().parse_args(["select", "--pool-store", "p", "--budget", "3", "--out", "o"])
    for o in SELECT_OPTIONS:
        assert getattr(args, o.key or o.name) == o.default == SELECT_DEFAULTS[o.name]
        if o.name != "seed":  # a run's seed is run.seed
            assert DEFAULTS["select"][o.key or o.name] == o.default
    args = build_parser().parse_args(["select", "--pool-store", "p", "--budget", "3", "--out", "o",
                                      "--ecle-batch-size", "64", "--alpha", "0.25"])
    assert args.ecle_batch_size == 64 and args.alpha == 0.25


@pytest.mark.parametrize("assignment, message", [
    ("select.budget=abc", "select.budget='abc' must be an integer >= 1"),
    ("select.budget=-5", "select.budget=-5 must be an integer >= 1"),
    ("select.alpha=2", r"select.alpha=2 must be a number in \[0, 1\]"),
    ("select.partitions=0", "select.partitions=0 must be an integer >= 1"),
    ("select.ecle_batch_size=x", "select.ecle_batch_size='x' must be an integer >= 2"),
    ("select.strategies=5", "select.strategies must be a strategy name or a list of them, got 5"),
    ("select.strategies=[robust, nope]", "unknown strategy 'nope'"),
    ("select.clusters=ten", "select.clusters='ten' must be an integer >= 1"),
    ("select.colusters=10", r"^unknown config key 'select.colusters' \(did you mean 'select.clusters'\?\)$"),
    ("select.zzzq=1", r"unknown config key 'select.zzzq' \(select takes: strategies, budget, alpha, clusters, "),
    ("selct.budget=1", r"unknown config key 'selct' \(did you mean 'select'\?\)"),
    ("pretrain.epochs=ten", "pretrain.epochs='ten' must be an integer >= 1"),
    ("pretrain.lr=fast", "pretrain.lr='fast' must be a number > 0"),
    ("pretrain.amp=maybe", "pretrain.amp='maybe' must be on or off or null"),
    ("pretrain.workers=-1", "pretrain.workers=-1 must be an integer >= 0 or null"),
    ("run.repeats=x", "run.repeats='x' must be an integer >= 1"),
    ("run.seed=1.5", "run.seed=1.5 must be an integer >= 0"),
    ("embed.dtype=int8", "embed.dtype='int8' must be one of: float16, float32"),
    ("embed.views=-1", r"embed.views=-1 must be 0 \(no views\) or an integer >= 2"),
    ("retrain.match=both", "retrain.match='both' must be one of: epochs, steps"),
    ("evaluate.shots=0", "evaluate.shots=0 must be an integer >= 1"),
    ("data.benchmark.scale=-1", "data.benchmark.scale=-1 must be a number > 0"),
    ("data.benchmark.build=sometimes", "data.benchmark.build='sometimes' must be on or off"),
])
def test_config_values_are_checked_at_load_naming_the_key(assignment, message):
    with pytest.raises(MakError, match=message):
        load_config(None, BENCH + [assignment])


def test_valid_config_values_are_parsed_to_their_types():
    cfg = load_config(None, BENCH + ["select.budget=40", "select.alpha=1", "select.strategies=mak", "pretrain.lr=1",
                                     "pretrain.amp=off", "pretrain.workers=null"])
    sel = cfg["select"]
    assert sel["budget"] == 40 and sel["alpha"] == 1.0 and type(sel["alpha"]) is float and sel["strategies"] == ["mak"]
    assert cfg["pretrain"]["lr"] == 1.0 and cfg["pretrain"]["amp"] is False and cfg["pretrain"]["workers"] is None
