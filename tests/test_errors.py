from __future__ import annotations

from mak.errors import MakError, first_line


def test_a_mak_error_is_one_line():
    assert str(MakError("a\n  b\tc ")) == "a b c"


def test_first_line_quotes_a_library_error_in_one_short_line():
    assert first_line(EOFError("")) == "EOFError"
    assert first_line(ValueError("\n  \n  bad header\nsecond line")) == "bad header"
    assert first_line(ValueError("x" * 500), limit=10) == "x" * 10
