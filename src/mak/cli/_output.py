"""What a command prints: ``--no-progress`` and ``--quiet``, the same on every command."""
from __future__ import annotations

import argparse


def add_output_flags(p: argparse.ArgumentParser, progress: bool = True) -> None:
    """``--quiet``/``-q`` (nothing but errors and warnings on stderr) and, for commands with
    progress bars, ``--no-progress`` (no bars; summaries still print)."""
    if progress:
        p.add_argument("--no-progress", action="store_true", help="hide progress bars (summaries still print)")
    p.add_argument("--quiet", "-q", action="store_true",
                   help="print nothing but errors and warnings (no progress bars, no summary)")


def show_progress(args: argparse.Namespace) -> bool:
    return not (args.quiet or getattr(args, "no_progress", False))


def say(args: argparse.Namespace, *lines: str, **kw) -> None:
    """Print ``lines`` (a summary: ``print``'s keywords apply) unless ``--quiet``."""
    if not args.quiet:
        for line in lines:
            print(line, **kw)


def silent(_line: str) -> None:
    """A ``log`` that prints nothing (``--quiet``)."""
