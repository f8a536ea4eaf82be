"""Declared parameters: each option is declared once (name, default, one-line help, parser).

A strategy declares its options as a tuple of :class:`Option`; :func:`resolve` turns what a user
passed (Python values from :func:`mak.select`, strings from the command line, YAML values from a
``mak run`` config) into the effective settings, and rejects an unknown name with a message that
lists the valid ones. The command line builds its flags from the same declarations
(``--gate-quantile`` for ``gate_quantile``), so a flag, a config key and a keyword argument are
one option with one default and one check.

Errors are :class:`ParameterError` (a :class:`~mak.errors.MakError`) and name the parameter as
``name=value``; the command line rewrites that name to its flag.

Parsers (:func:`integer`, :func:`number`, :func:`choice`, :func:`switch`, :func:`or_auto`) accept
the Python value or its text and return the canonical value.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from mak.errors import MakError

Parser = Callable[[str, Any], Any]  # (name, value) -> canonical value; raises ParameterError


class ParameterError(MakError):
    """A bad value or an unknown name for a declared parameter; ``param`` is its name, ``related``
    other parameters the message names (as ``name=``, which the command line shows as flags)."""

    def __init__(self, param: str, message: str, related: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.param = param
        self.related = related


@dataclass(frozen=True)
class Option:
    """One declared option: ``name`` (a Python identifier), its ``default``, one line of ``help``."""

    name: str
    default: Any
    help: str
    parse: Parser
    metavar: str | None = None
    key: str | None = None  # its name on the command line and in configs, when not ``name``
    required: bool = False  # no default: a caller must give it (the command line's flag is required)

    @property
    def flag(self) -> str:
        return "--" + (self.key or self.name).replace("_", "-")

    def argparse_type(self) -> Callable[[str], Any]:
        """An argparse ``type``: the parsed value, or argparse's one-line error without the name."""
        return argparse_type(self.parse, self.name)


def argparse_type(parse: Parser, name: str) -> Callable[[str], Any]:
    """``parse`` as an argparse ``type``: the parsed value, or argparse's one-line error without the name."""
    import argparse

    def convert(text: str) -> Any:
        try:
            return parse(name, text)
        except ParameterError as exc:
            msg = str(exc)
            raise argparse.ArgumentTypeError(msg[len(name) + 1:] if msg.startswith(f"{name}=") else msg) from None
    convert.__name__ = name
    return convert


def _fail(name: str, value: Any, what: str) -> ParameterError:
    return ParameterError(name, f"{name}={value!r} must be {what}")


def _from_text(name: str, raw: Any, cast: Callable[[str], Any], what: str) -> Any:
    """``cast`` of a text value (command line, ``--set``); any other value as it is."""
    if not isinstance(raw, str):
        return raw
    try:
        return cast(raw.strip())
    except ValueError:
        raise _fail(name, raw, what) from None


def integer(low: int) -> Parser:
    """An integer >= ``low`` (an integral text like "5" too; not a bool, not 2.5)."""
    def parse(name: str, raw: Any) -> int:
        value = _from_text(name, raw, int, f"an integer >= {low}")
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < low:
            raise _fail(name, raw, f"an integer >= {low}")
        return int(value)
    return parse


def number(low: float, high: float | None = None, low_open: bool = True) -> Parser:
    """A finite number in (low, high] (``low_open``) or [low, high]; ``high`` None: unbounded."""
    lo_txt = "(" if low_open else "["
    what = f"a number in {lo_txt}{low:g}, {high:g}]" if high is not None else f"a number {'>' if low_open else '>='} {low:g}"

    def parse(name: str, raw: Any) -> float:
        value = _from_text(name, raw, float, what)
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise _fail(name, raw, what)
        v = float(value)
        if not np.isfinite(v) or (v <= low if low_open else v < low) or (high is not None and v > high):
            raise _fail(name, raw, what)
        return v
    return parse


def choice(*names: str) -> Parser:
    """One of ``names``."""
    def parse(name: str, value: Any) -> str:
        if value not in names:
            raise ParameterError(name, f"{name}={value!r} must be one of: {', '.join(names)}")
        return str(value)
    return parse


def switch(name: str, value: Any) -> bool:
    """on/off, true/false, yes/no or a bool."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, str) and value.lower() in ("on", "off", "true", "false", "yes", "no"):
        return value.lower() in ("on", "true", "yes")
    raise _fail(name, value, "on or off")


def or_auto(inner: Parser) -> Parser:
    """The string ``auto``, or what ``inner`` accepts."""
    def parse(name: str, value: Any) -> Any:
        if value == "auto":
            return "auto"
        try:
            return inner(name, value)
        except ParameterError as exc:
            raise ParameterError(name, f"{exc} or 'auto'") from None
    return parse


def text(name: str, value: Any) -> str:
    """Any string."""
    if not isinstance(value, str):
        raise _fail(name, value, "a string")
    return value


def device(name: str, value: Any) -> str:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (whether this machine has it is checked where it is used)."""
    if not (isinstance(value, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?", value.strip().lower())):
        raise _fail(name, value, "auto, cpu, cuda or cuda:N")
    return value.strip().lower()


# The device every command and `mak run` (run.device) take.
DEVICE = Option("device", "auto", "auto, cpu, cuda or cuda:N (default auto: CUDA when available)", device, "DEV")


def or_none(inner: Parser) -> Parser:
    """None (YAML ``null``), or what ``inner`` accepts."""
    def parse(name: str, value: Any) -> Any:
        if value is None:
            return None
        try:
            return inner(name, value)
        except ParameterError as exc:
            raise ParameterError(name, f"{exc} or null") from None
    return parse


def by_name(declared: Sequence[Option]) -> dict[str, Option]:
    """``{name: option}`` of the declarations."""
    return {o.name: o for o in declared}


def defaults(declared: Sequence[Option]) -> dict[str, Any]:
    """``{name: default}`` of the declarations."""
    return {o.name: o.default for o in declared}


def closest(name: str, choices: Iterable[str]) -> str | None:
    """The one of ``choices`` a misspelt ``name`` most likely meant (None: none is close)."""
    import difflib

    found = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.8)
    return found[0] if found else None


def resolve(declared: Sequence[Option], given: Mapping[str, Any], owner: str) -> dict[str, Any]:
    """The effective settings: every declared option, parsed from ``given`` (None: the default).

    An option name that ``declared`` does not hold raises :class:`ParameterError` naming it and
    listing the valid ones (``owner`` says whose options they are, e.g. "strategy 'robust'").
    """
    known = by_name(declared)
    for key in given:
        if key not in known:
            valid = f"valid: {', '.join(sorted(known))}" if known else "it takes none"
            near = closest(str(key), known)
            hint = f"did you mean '{near}'? " if near else ""
            raise ParameterError(key, f"unknown option '{key}' for {owner} ({hint}{valid})")
    out = {}
    for o in declared:
        value = given.get(o.name)
        if value is None and o.required:
            raise ParameterError(o.name, f"'{o.name}' is required ({owner})")
        out[o.name] = o.default if value is None else o.parse(o.name, value)
    return out


__all__ = ["DEVICE", "Option", "ParameterError", "device", "argparse_type", "by_name", "choice", "defaults", "integer", "number",
           "or_auto", "or_none", "resolve", "switch", "text"]
