"""The run report: one self-contained HTML file comparing the strategies of a ``mak run``.

:func:`write_report` writes ``report.html``: a page that opens offline (inline CSS, charts as
inline SVG drawn here, thumbnails as ``data:`` PNG URIs; no script, no external resource) and
that a person can read at a glance:

* a header with the run's key takeaways (best Few-group accuracy, most balanced, lowest
  out-of-domain rate, ...), each with its margin over the seed alone ("none");
* the comparison table (strategies x few-shot All / Many / Medium / Few / group std, full-shot,
  kNN, out-of-domain rate, Few share; ``mean +- std`` over repeats, the best value of each column
  highlighted) with a legend, and a bar per strategy of what its selection is made of;
* one collapsible section per strategy: per-class counts of seed vs seed + selection (plus the
  selection's out-of-domain count), histograms of ECLE and of distance for selected vs not
  selected pool images (split by in-domain / out-of-domain when the items carry labels), the
  seed-calibrated gate (held-out seed distances vs pool distances with the threshold) when the
  selection's ``summary.json`` holds one, thumbnail grids of the first-picked images, a random
  sample of the selection and the farthest not-selected images, and a table of the first picks;
* a grid of random pool images, the training-loss curves and the run's notes.

Every text taken from the inputs is HTML-escaped, and the file is pure ASCII (other characters
become character references), written atomically. The package, one concept a module:

* ``inputs``: reading run outputs (item labels, ``scores.csv`` streamed into flat arrays,
  training logs, gates in a ``summary.json``);
* ``charts``: the SVG chart kit; ``thumbs``: pool images as inline thumbnails and their grids;
  ``style``: colours and the stylesheet; ``format``: numbers and text;
* ``context``: one report's normalised inputs and shared lookups; ``comparison``, ``strategy``,
  ``gates`` and ``page``: the sections and the page around them.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np

from mak.atomic import write_text
from mak.run.report.context import Context
from mak.run.report.inputs import find_gate, read_scores  # re-exported: the tests read gates and scores
from mak.run.report.page import render_page

__all__ = ["find_gate", "read_scores", "write_report"]


def write_report(out_path: str | os.PathLike, *, title: str, results: list[dict],
                 strategies: dict[str, dict], seed_items: list[str],
                 pool_images: Callable[[int], np.ndarray] | None, pool_items: list[str],
                 loss_logs: dict[str, str | Path], notes: list[str] | None = None,
                 class_names: dict[str, str] | None = None) -> Path:
    """Write the run report, one self-contained HTML file, atomically to ``out_path``; return its path.

    Args:
        title: the page title (e.g. the run name).
        results: one dict per strategy (and ``"none"``, the seed alone) with ``strategy``,
            ``ood_rate``, ``few_share``, ``fullshot_acc``, ``fewshot_acc`` (optionally
            ``fewshot_std``), ``knn_acc``, ``group_acc`` (``many``/``medium``/``few``) and
            ``group_std``; each figure a fraction, ``{"mean": x, "std": y}`` or None (over repeats:
            ``values`` lists the repeats' values in order). Optionally ``per_class_acc``
            (``{class: figure}``) and, with repeats, ``per_rank_acc``
            (:func:`mak.run.results.per_rank_acc`): the table is by seed-count rank; without it,
            repeat 0's values, as the classes' seed counts differ between repeats.
        strategies: per strategy name, ``scores_csv`` (path of the selection's scores.csv),
            ``summary`` (its summary.json dict; an in-domain gate in it is drawn),
            ``class_counts_seed`` and ``class_counts_selected`` (``{class: count}``, ``"-1"`` =
            out-of-domain). Any key may be missing.
        seed_items: the seed's item lines (for its size, and its class counts when not given); with
            repeats, repeat 0's seed.
        pool_images: ``pool_images(i)`` -> uint8 HxW or HxWxC array of pool row ``i``; None
            leaves the thumbnail grids out.
        pool_items: the pool's item lines, by pool row (labels, tooltips, the pool size).
        loss_logs: run name -> training ``log.csv`` (``epoch, loss, lr, images_per_s``).
        notes: free-text lines shown at the end of the page.
        class_names: label -> name (the benchmark's Fashion-MNIST names), shown for the labels.
    """
    out = Path(out_path)
    page = render_page(Context(title, results, strategies, seed_items, pool_images, pool_items, loss_logs, notes,
                               out_dir=out.parent, class_names=class_names))
    write_text(out, page)
    return out
