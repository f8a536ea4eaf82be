"""User-facing errors.

Every problem caused by the user's input (a missing file, a corrupt image, mismatched
dimensions, a budget larger than the pool...) is raised as :class:`MakError`. The CLI prints
its message as a single line on stderr and exits with code 2; the Python API lets it propagate.
"""
from __future__ import annotations


class MakError(ValueError):
    """A one-line, user-facing error about bad input (a ``ValueError``). The CLI exits with code 2 on it."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))  # always one line


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first non-empty line of an exception's message (at most ``limit`` characters), or its
    type's name when the message is empty, for quoting a library's error in a :class:`MakError`."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return (lines[0] if lines else type(exc).__name__)[:limit]
