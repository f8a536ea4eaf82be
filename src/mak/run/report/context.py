"""One report's inputs, normalised, and the lookups every section of the page shares.

:class:`Context` holds the arguments of :func:`mak.run.report.write_report` (missing ones as empty
containers), gives each strategy its colour and anchor, labels scores rows, finds item text, and
collects what the sections have to say about unreadable inputs (``warnings``, shown under Notes).
Pool labels and thumbnails are computed once, on first use.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from mak.run.report.format import esc
from mak.run.report.inputs import fetch_items, labels_of, read_scores, Scores
from mak.run.report.style import NONE_COLOR, PALETTE
from mak.run.report.thumbs import Thumbs


class Context:
    """The state one page is built from (see :func:`mak.run.report.write_report` for the inputs)."""

    def __init__(self, title: str, results: list[dict], strategies: Mapping[str, Mapping[str, Any]],
                 seed_items: Sequence[str], pool_images: Callable[[int], np.ndarray] | None,
                 pool_items: Sequence[str], loss_logs: Mapping[str, str | Path],
                 notes: Sequence[str] | None, out_dir: Path | None = None,
                 class_names: Mapping[str, str] | None = None) -> None:
        self.title = str(title)
        self.out_dir = out_dir  # where the page is written: links are relative to it
        self.class_names = {str(k): str(v) for k, v in (class_names or {}).items()}
        self.results = [r for r in (results or []) if isinstance(r, Mapping)]
        self.strategies = dict(strategies or {})
        self.seed_items = list(seed_items or [])
        self.pool_items = pool_items if pool_items is not None else []
        self.loss_logs = dict(loss_logs or {})
        self.notes = [str(n) for n in (notes or [])]
        self.thumbs = Thumbs(pool_images)
        self.warnings: list[str] = []
        names = [str(r.get("strategy", f"#{i}")) for i, r in enumerate(self.results)]
        names += [n for n in self.strategies if n not in names]
        self.names = names
        self.colors: dict[str, str] = {}
        k = 0
        for n in names:
            if n == "none":
                self.colors[n] = NONE_COLOR
            else:
                self.colors[n] = PALETTE[k % len(PALETTE)]
                k += 1
        self.anchors = {n: f"s{i}-{re.sub(r'[^A-Za-z0-9_-]+', '-', n)[:40]}" for i, n in enumerate(names)}
        self._pool_labels: np.ndarray | None | bool = False  # False = not computed yet

    def chip(self, name: str) -> str:
        """The strategy's name on a pill of its colour."""
        return f'<span class="chip" style="background:{self.colors.get(name, NONE_COLOR)}">{esc(name)}</span>'

    def pool_labels(self) -> np.ndarray | None:
        """Labels of ``pool_items`` by pool row, or None when an item has no integer label."""
        if self._pool_labels is False:
            self._pool_labels = labels_of(self.pool_items)
        return self._pool_labels  # type: ignore[return-value]

    def labels_for(self, sc: Scores) -> np.ndarray | None:
        """Labels of the rows of ``sc``: from ``pool_items`` when they cover it, else from the csv items."""
        pl = self.pool_labels()
        if pl is not None and sc.n and int(sc.index.min()) >= 0 and int(sc.index.max()) < len(pl):
            return pl[sc.index]
        if sc.csv_labels is None and pl is not None:  # labels were skipped on the first read
            sc.csv_labels = read_scores(sc.path, 0, parse_labels=True).csv_labels
        return sc.csv_labels

    def item_text(self, sc: Scores | None, indices: Sequence[int]) -> dict[int, str]:
        """Item lines of pool rows: from ``pool_items``, else from ``sc`` (read again for those not kept)."""
        out: dict[int, str] = {}
        missing = []
        for i in indices:
            i = int(i)
            if 0 <= i < len(self.pool_items):
                out[i] = str(self.pool_items[i])
            elif sc is not None and i in sc.items:
                out[i] = sc.items[i]
            else:
                missing.append(i)
        if missing and sc is not None:
            got = fetch_items(sc.path, missing)
            sc.items.update(got)
            out.update(got)
        return out

    def strategy_of(self, run: str) -> str | None:
        """The strategy a run name refers to (the longest strategy name appearing as a token)."""
        best = None
        for s in self.names:
            if re.search(rf"(?<![\w+]){re.escape(s)}(?![\w+])", run) and (best is None or len(s) > len(best)):
                best = s
        return best
