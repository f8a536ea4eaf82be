"""Selection analysis: what a strategy picked from a labeled open-world pool.

The labels come from the benchmark's split files (``relative/path LABEL`` lines; label -1 marks an
out-of-domain image) and are read here only, after selection: no part of pretraining, embedding
or selection reads them.

:func:`analyse_selection` reports, for the labels of the selected pool items:

- ``ood_rate``: the share of the selection that is out-of-domain (label -1);
- ``counts``: the number of selected items per class (``"0"`` .. ``"C-1"``);
- ``group_share`` (and ``many_share`` / ``medium_share`` / ``few_share``): the share of the
  selection in each group of classes. The denominator is **all** selected items, out-of-domain
  ones included, so ``many + medium + few + near_rate + ood_rate == 1``: a strategy cannot
  raise its Few share by picking junk;
- ``near_rate``: the share of the selection in classes outside the groups, i.e. images of the
  seed's kind but of classes the seed lacks (0 when the groups cover every class);
- ``balance``: the class balance of seed + selection over the grouped (seed) classes: the
  normalised entropy ``H(p) / log(C)`` of the class distribution (1 = perfectly balanced, 0 =
  one class) and the imbalance ratio ``max count / max(min count, 1)``; the same for the seed
  alone under ``seed_balance``.
"""
from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

import numpy as np

from mak.errors import MakError

OOD_LABEL = -1
GROUPS: tuple[str, ...] = ("many", "medium", "few")


def labels_from_items(lines: Iterable[str]) -> np.ndarray:
    """Parse the label of each split-file line: its last whitespace-separated token.

    ``"images/pool/000123.png 4"`` -> 4; ``-1`` marks an out-of-domain item. A line with no
    label (a single token, an empty line or a last token that is not an integer) raises
    :class:`MakError` naming the line.
    """
    labels: list[int] = []
    for n, line in enumerate(lines, 1):
        tokens = str(line).split()
        if len(tokens) < 2:
            raise MakError(f"item {n} has no label ({str(line).strip()!r}); expected 'relative/path LABEL'")
        try:
            labels.append(int(tokens[-1]))
        except ValueError:
            raise MakError(
                f"item {n} has no integer label ({str(line).strip()!r}); expected 'relative/path LABEL'"
            ) from None
    return np.asarray(labels, dtype=np.int64)


def class_counts(labels: Sequence[int] | np.ndarray, num_classes: int) -> np.ndarray:
    """Counts of labels ``0 .. num_classes-1`` (out-of-domain -1 ignored); other labels -> MakError."""
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    bad = y[(y != OOD_LABEL) & ((y < 0) | (y >= num_classes))]
    if bad.size:
        raise MakError(f"label {int(bad[0])} is outside 0..{num_classes - 1} (and is not {OOD_LABEL}, out-of-domain)")
    return np.bincount(y[y >= 0], minlength=num_classes).astype(np.int64)


def balance(counts: Sequence[int] | np.ndarray) -> dict[str, float]:
    """Class balance of per-class ``counts``.

    ``entropy``: ``H(p) / log(C)`` with ``p = counts / sum`` (natural logs, ``0 log 0 = 0``;
    1.0 when C == 1; 0.0 when all counts are 0); ``imbalance``: ``max / max(min, 1)``.
    """
    c = np.asarray(counts, dtype=np.float64)
    total = c.sum()
    if total <= 0:
        entropy = 0.0
    elif len(c) == 1:
        entropy = 1.0
    else:
        p = c[c > 0] / total
        entropy = float(-(p * np.log(p)).sum() / math.log(len(c)))
    imbalance = float(c.max() / max(c.min(), 1.0)) if len(c) else 0.0
    return {"entropy": entropy, "imbalance": imbalance}


def _normalise_groups(groups: Mapping[str, Iterable[int]], num_classes: int) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    seen: set[int] = set()
    for g in GROUPS:
        members = [int(c) for c in groups.get(g, [])]
        for c in members:
            if not 0 <= c < num_classes:
                raise MakError(f"group {g!r} holds class {c}, outside 0..{num_classes - 1}")
            if c in seen:
                raise MakError(f"class {c} is in more than one group")
            seen.add(c)
        out[g] = members
    unknown = set(groups) - set(GROUPS)
    if unknown:
        raise MakError(f"unknown group(s) {', '.join(sorted(unknown))}; expected many, medium, few")
    return out


def analyse_selection(
    selected_labels: Sequence[int] | np.ndarray,
    seed_labels: Sequence[int] | np.ndarray,
    groups: Mapping[str, Iterable[int]],
    num_classes: int = 10,
) -> dict:
    """Analyse a selection given the labels of the selected items and of the seed set.

    ``groups`` maps ``many`` / ``medium`` / ``few`` to lists of class labels (e.g. a benchmark
    manifest's ``groups``). Returns a JSON-ready dict: ``n_selected``, ``ood_count``,
    ``ood_rate``, ``near_count``, ``near_rate``, ``counts`` (per class, string keys), ``group_counts``, ``group_share``,
    ``many_share``, ``medium_share``, ``few_share`` (shares of all selected items, OOD included),
    ``seed_counts``, ``combined_counts`` (seed + selection), ``balance`` (of seed + selection)
    and ``seed_balance``. An empty selection has rates and shares of 0.
    """
    sel = np.asarray(selected_labels, dtype=np.int64).reshape(-1)
    seed = np.asarray(seed_labels, dtype=np.int64).reshape(-1)
    return _analysis(class_counts(sel, num_classes), class_counts(seed, num_classes), int(sel.size),
                     int((sel == OOD_LABEL).sum()), groups)


def _analysis(sel_counts: np.ndarray, seed_counts: np.ndarray, n: int, ood: int,
              groups: Mapping[str, Iterable[int]]) -> dict:
    """:func:`analyse_selection` from per-class counts of the selection and the seed, the number
    of selected items ``n`` and how many of them are out of domain."""
    num_classes = len(sel_counts)
    grp = _normalise_groups(groups, num_classes)
    group_counts = {g: int(sel_counts[grp[g]].sum()) if grp[g] else 0 for g in GROUPS}
    share = {g: (group_counts[g] / n if n else 0.0) for g in GROUPS}
    grouped = sorted(c for g in GROUPS for c in grp[g])
    near = int(sel_counts.sum()) - sum(group_counts.values())
    combined = seed_counts + sel_counts
    return {
        "n_selected": n,
        "ood_count": ood,
        "ood_rate": ood / n if n else 0.0,
        "near_count": near,
        "near_rate": near / n if n else 0.0,
        "counts": {str(c): int(sel_counts[c]) for c in range(num_classes)},
        "group_counts": group_counts,
        "group_share": share,
        "many_share": share["many"],
        "medium_share": share["medium"],
        "few_share": share["few"],
        "groups": grp,
        "seed_counts": {str(c): int(seed_counts[c]) for c in range(num_classes)},
        "combined_counts": {str(c): int(combined[c]) for c in range(num_classes)},
        "balance": balance(combined[grouped] if grouped else combined),
        "seed_balance": balance(seed_counts[grouped] if grouped else seed_counts),
    }


def regroup(analysis: Mapping, groups: Mapping[str, Iterable[int]]) -> dict:
    """``analysis`` (of :func:`analyse_selection`) over other Many/Medium/Few ``groups``: the same
    per-class counts of the selection and the seed, every group figure recomputed from them."""
    num_classes = max([len(analysis["counts"])] + [int(c) + 1 for g in groups.values() for c in g])

    def counts(key: str) -> np.ndarray:
        return np.array([int(analysis[key].get(str(c), 0)) for c in range(num_classes)], dtype=np.int64)

    return _analysis(counts("counts"), counts("seed_counts"), int(analysis["n_selected"]),
                     int(analysis["ood_count"]), groups)


def format_analysis(results: Mapping[str, Mapping]) -> str:
    """A printable table of several analyses, ``{strategy: analyse_selection(...)}``."""
    header = (f"{'strategy':<22}{'n':>7}{'ood':>8}{'near':>8}{'many':>8}{'medium':>8}{'few':>8}"
              f"{'entropy':>9}{'imbal.':>8}")
    lines = [header, "-" * len(header)]
    for name, r in results.items():
        lines.append(
            f"{name:<22}{r['n_selected']:>7d}{r['ood_rate']:>8.3f}{r['near_rate']:>8.3f}{r['many_share']:>8.3f}"
            f"{r['medium_share']:>8.3f}{r['few_share']:>8.3f}{r['balance']['entropy']:>9.3f}"
            f"{r['balance']['imbalance']:>8.1f}"
        )
    return "\n".join(lines)
