"""Progress bars that suit where they are shown: a live bar on a terminal, whole lines in a log.

:func:`bar` is the one way the package makes a progress bar. In a notebook (``tqdm.auto`` picks
the widget) or when the bar's stream (standard error by default) is a terminal, it is tqdm's
usual bar, redrawn in place. Otherwise -- a log file, a pipe, CI, ``nohup``, a cluster job --
redrawing in place would fill the log with ``\\r``-joined frames, so the bar writes whole lines
instead, each ending in ``\\n``:

* nothing while the work is young: the first line comes with the first update at least
  ``MAK_PROGRESS_INTERVAL`` seconds (default 30) after the bar was made, so quick steps stay out
  of the log;
* then at most one line every ``MAK_PROGRESS_INTERVAL`` seconds, e.g.
  ``k-center: 45% 450/1000 [00:30<00:36, 15.0pick/s]``;
* on close, one final line with the count and the elapsed time, e.g.
  ``k-center: done, 1000/1000 pick in 01:05 (15.3pick/s)`` (``stopped`` instead of ``done`` when
  the count fell short of the total), when a line was shown or the work took at least a second
  (:data:`FINAL_AFTER`): a log records how long each step took without the quick ones.

``MAK_PROGRESS_INTERVAL`` is read when a bar is made (seconds, a float >= 0; 0 writes a line at
every update; a value that is not a number is ignored). A disabled bar (``enabled=False``)
prints nothing. Messages printed with :func:`write` (or the bar's ``write``, tqdm's classmethod)
appear above a live bar and between the lines of a log.
"""
from __future__ import annotations

import os
import sys
from typing import Any, TextIO

from tqdm.std import tqdm as _std_tqdm

DEFAULT_INTERVAL = 30.0  # seconds between two lines of a bar written to a log
FINAL_AFTER = 1.0  # a bar written to a log that ran this long ends with a line (quicker ones leave none)
ENV_INTERVAL = "MAK_PROGRESS_INTERVAL"


def bar(total: int | float | None = None, desc: str | None = None, unit: str = "it", enabled: bool = True,
        initial: int | float = 0, leave: bool = False, *, interval: float | None = None, **kw: Any) -> Any:
    """A tqdm-compatible progress bar (``update``, ``set_postfix``, ``close``, ``with``, ``write``).

    ``total``: the count at completion (None: unknown); ``desc``: its label; ``unit``: what one
    count is; ``initial``: the count it starts at (a resumed run); ``leave``: keep a terminal bar
    on screen after close (a log keeps its lines anyway). ``interval``: seconds between the lines
    of a log (default: ``MAK_PROGRESS_INTERVAL``, else 30). Other keywords go to tqdm (``file``,
    ``smoothing``, ``dynamic_ncols``, ``postfix``, ...). See the module docstring for where a bar
    goes and how it looks.
    """
    from tqdm.auto import tqdm as auto

    common = dict(total=total, desc=desc, unit=unit, initial=initial, leave=leave)
    if not enabled:
        return auto(disable=True, **common, **kw)
    if _is_notebook(auto) or _is_tty(kw.get("file")):
        return auto(**common, **kw)
    for key in ("ncols", "dynamic_ncols", "mininterval", "maxinterval", "miniters", "position", "delay"):
        kw.pop(key, None)  # a log has no width, no screen rows, and its own pace
    return LineBar(**common, interval=progress_interval() if interval is None else float(interval), **kw)


def write(message: str, file: TextIO | None = None) -> None:
    """Print ``message`` (standard error by default) without breaking a bar: above a live one, between log lines."""
    _std_tqdm.write(message, file=sys.stderr if file is None else file)


def progress_interval() -> float:
    """Seconds between the lines of a bar written to a log: ``MAK_PROGRESS_INTERVAL``, else 30."""
    raw = os.environ.get(ENV_INTERVAL, "").strip()
    try:
        value = float(raw) if raw else DEFAULT_INTERVAL
    except ValueError:
        return DEFAULT_INTERVAL
    return max(0.0, value) if value == value else DEFAULT_INTERVAL  # NaN: the default


class LineBar(_std_tqdm):
    """A tqdm bar for streams that are not terminals: whole lines at most every ``interval`` seconds, then a last one.

    No ``\\r``, no cursor movement, no clearing: every write is a complete line.
    """

    monitor_interval = 0  # no monitor thread: lines come from updates (and close) only

    def __init__(self, *args: Any, interval: float = DEFAULT_INTERVAL, **kw: Any) -> None:
        self.interval = max(0.0, float(interval))
        self._line_t: float | None = None  # when the last line (or the bar) started; None during tqdm's setup
        self._shown = False
        # refresh from update() no more often than a line may be written; check the clock at every update
        super().__init__(*args, mininterval=self.interval, miniters=1, **kw)
        self._line_t = self.start_t

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        """Write the current state as one line if ``interval`` seconds have passed since the last one.

        A ``msg`` (tqdm clearing or replacing the bar on screen) means nothing in a log and is dropped.
        """
        if msg is not None or self._line_t is None:
            return True
        now = self._time()
        if now - self._line_t < self.interval:
            return True
        self._line_t = now
        self._shown = True
        self._emit(self._line())
        return True

    def clear(self, nolock: bool = False) -> None:
        """Nothing to clear: lines already written stay in the log."""

    def moveto(self, n: int) -> None:
        """No cursor to move in a log."""

    def close(self) -> None:
        """Write the final line (when a line was shown or the work took at least :data:`FINAL_AFTER`
        seconds, or ``interval`` when that is shorter), then close."""
        if getattr(self, "disable", True):
            return
        self.disable = True
        self._decr_instances(self)
        if not hasattr(self, "start_t"):
            return
        if self._shown or self._time() - self.start_t >= min(FINAL_AFTER, self.interval):
            with self._lock:
                self._emit(self._line(final=True))

    def _line(self, final: bool = False) -> str:
        d = dict(self.format_dict, ncols=None)
        head = "{desc}: " if self.desc else ""
        if final:
            d["rate"] = None  # the overall rate: this run's count over the elapsed time
            word = "done" if self.total is None or self.n >= self.total else "stopped"
            of = "/{total_fmt}" if self.total is not None else ""
            d["bar_format"] = head + word + ", {n_fmt}" + of + " {unit} in {elapsed} ({speed}{postfix})"
        elif self.total:
            d["bar_format"] = head + "{percentage:.0f}% {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {speed}{postfix}]"
        else:
            d["bar_format"] = head + "{n_fmt} {unit} [{elapsed}, {speed}{postfix}]"
        if self.desc:
            d["prefix"] = self.desc[:-2] if self.desc.endswith(": ") else self.desc
        d["speed"] = self._speed(d)
        return self.format_meter(**d).replace("\r", " ").replace("\n", " ")

    def _speed(self, d: dict) -> str:
        """tqdm's rate (``12.50img/s``, or ``3.20s/step`` when slower than one a second), unpadded."""
        rate, unit = d["rate"], self.unit
        if rate is None and d["elapsed"]:
            rate = (self.n - self.initial) / d["elapsed"]
        if not rate:
            return f"?{unit}/s"
        scale = (lambda v: self.format_sizeof(v, divisor=self.unit_divisor)) if self.unit_scale else "{:.2f}".format
        return f"{scale(1 / rate)}s/{unit}" if rate < 1 else f"{scale(rate)}{unit}/s"

    def _emit(self, line: str) -> None:
        try:
            self.fp.write(line + "\n")
            getattr(self.fp, "flush", lambda: None)()
        except ValueError:  # the stream was closed under us (interpreter exit)
            pass


def _is_notebook(cls: type) -> bool:
    """Whether ``tqdm.auto`` chose the notebook widget (its stream is no terminal, yet it draws in place)."""
    return any(c.__module__ == "tqdm.notebook" for c in cls.__mro__)


def _is_tty(stream: Any) -> bool:
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


__all__ = ["DEFAULT_INTERVAL", "ENV_INTERVAL", "FINAL_AFTER", "LineBar", "bar", "progress_interval", "write"]
