"""The ``mak`` command line: a thin layer over the Python API.

Each sub-command lives in a module of :mod:`mak.cli` that defines ``HELP`` (its line in
``mak --help``) and ``register(subparsers)`` (adds its parser and sets ``func``). Only the command
being run is registered in full, so ``mak --help`` and ``mak --version`` import no torch. A :class:`~mak.errors.MakError` or an ``OSError`` (a full
disk, a read-only directory, a name too long) becomes one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
import traceback
from typing import Sequence

from mak import __version__
from mak._cores import choose_wait_policy
from mak.errors import MakError


def commands() -> list[str]:
    """The sub-command names: the public modules of this package."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


class _Parser(argparse.ArgumentParser):
    """An argument error is one line, naming the command's --help (sub-commands inherit the class)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``mak`` parser; every sub-command in full, or only ``command`` (the others by their ``HELP``)."""
    parser = _Parser(
        prog="mak",
        description="Open-world data sampling for self-supervised learning (Model-Aware K-center).",
    )
    parser.add_argument("--version", action="version", version=f"mak {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in commands():
        module = importlib.import_module(f"{__name__}.{name}")
        if command is None or name == command:
            module.register(sub)
        else:
            sub.add_parser(name, help=module.HELP)
    return parser


def with_flags(msg: str, params: Sequence[str]) -> str:
    """``msg`` with the Python names of ``params`` (``gate_quantile=``, ``'gate_quantil'``) as flags."""
    for param in params:
        flag = "--" + param.replace("_", "-")
        msg = msg.replace(f"{param}=", f"{flag} ").replace(f"'{param}'", flag)
    return msg


def _with_flags(exc: MakError) -> str:
    """The error's message, the parameters it names (:class:`~mak.options.ParameterError`) as flags."""
    from mak.options import ParameterError

    return with_flags(str(exc), (exc.param, *exc.related)) if isinstance(exc, ParameterError) else str(exc)


def _command_parser(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.ArgumentParser:
    """The (sub-)sub-command parser the words of ``argv`` lead to (``mak store import``: import's)."""
    words = iter(a for a in argv if not a.startswith("-"))
    while True:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        word = next(words, None) if subs else None
        if word is None or word not in subs[0].choices:
            return parser
        parser = subs[0].choices[word]


def _unknown_flags(command: argparse.ArgumentParser, argv: Sequence[str]) -> list[str]:
    """``--flags`` in ``argv`` that no option of ``command`` (:func:`_command_parser`) takes (nor
    abbreviates), each with the closest one when there is one: ``--budgt (did you mean --budget?)``.
    None while the words do not name a command (argparse names the bad command), and no word with
    a space (a value)."""
    if any(isinstance(a, argparse._SubParsersAction) for a in command._actions):
        return []
    known = sorted(s for a in command._actions for s in a.option_strings if s.startswith("--"))
    out = []
    for arg in argv:
        if arg == "--":
            break
        name = arg.split("=", 1)[0]
        if name.startswith("--") and " " not in name and not any(k.startswith(name) for k in known):
            from mak.options import closest  # here: `mak --help` loads no numpy

            near = closest(name, known)
            out.append(f"{name} (did you mean {near}?)" if near else name)
    return out


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that flushing it at exit raises nothing more."""
    import os

    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "torch" not in sys.modules:  # before torch loads OpenMP: sleep at once on shared cores (mak._cores)
        choose_wait_policy()
    first_word = next((a for a in argv if not a.startswith("-")), None)  # the command, if one is given
    parser = build_parser(first_word if first_word in commands() else "")
    command = _command_parser(parser, argv)
    typos = _unknown_flags(command, argv)  # before parsing: a missing required flag would hide a misspelt one
    if typos and "-h" not in argv and "--help" not in argv:
        print(f"{command.prog}: error: unrecognized arguments: {', '.join(typos)} (see {command.prog} --help)",
              file=sys.stderr)
        return 2
    args, unknown = parser.parse_known_args(argv)
    name = " ".join(filter(None, (args.command, getattr(args, f"{args.command}_command", None))))
    if unknown:  # named by the command they were given to, not by `mak`
        print(f"mak {name}: error: unrecognized arguments: {' '.join(unknown)} (see mak {name} --help)",
              file=sys.stderr)
        return 2
    try:
        rc = args.func(args)
    except MakError as exc:
        print(f"mak {name}: error: {_with_flags(exc)}", file=sys.stderr)
        return MakError.exit_code
    except BrokenPipeError:  # `mak store info ... | head`: the reader has what it wanted
        _silence_stdout()
        return 141
    except OSError as exc:  # a full disk, a read-only or missing directory, a name too long: one line
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"mak {name}: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return MakError.exit_code
    except KeyboardInterrupt as exc:
        traceback.clear_frames(exc.__traceback__)  # bars left open in the interrupted frames close first
        print(f"mak {name}: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
