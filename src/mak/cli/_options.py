"""Declared options (:mod:`mak.options`) as command-line flags: one declaration, one flag."""
from __future__ import annotations

import argparse
from typing import Any

from mak.options import Option

_UNSET: Any = object()


def add_option(p: argparse.ArgumentParser | Any, opt: Option, default: Any = _UNSET, help: str | None = None) -> None:
    """``opt`` as a flag on ``p`` (a parser or an argument group), its value typed and checked by
    the option's parser (``--gate off``). ``default``/``help`` replace the declared ones where a
    command's flag differs (e.g. ``None``: only what the user gave is passed on)."""
    p.add_argument(opt.flag, type=opt.argparse_type(), metavar=opt.metavar, required=opt.required,
                   default=opt.default if default is _UNSET else default,
                   help=(help or opt.help).replace("%", "%%"))  # argparse formats help with %


def values(args: argparse.Namespace, declared: tuple[Option, ...], *leave_out: str) -> dict[str, Any]:
    """``{name: value}`` of the flags of ``declared`` as parsed into ``args`` (as the API's keywords)."""
    return {o.name: getattr(args, o.key or o.name) for o in declared if o.name not in leave_out}
