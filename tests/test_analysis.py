"""Selection analysis (mak.bench.analysis) against hand-computed examples."""
from __future__ import annotations

import math

import numpy as np
import pytest

from mak.bench.analysis import analyse_selection, balance, format_analysis, labels_from_items, regroup
from mak.errors import MakError


def test_labels_from_items():
    lines = ["images/pool/000001.png 3", "images/pool/000002.png -1", "a b c.png 7\n", "x.png\t0"]
    np.testing.assert_array_equal(labels_from_items(lines), [3, -1, 7, 0])
    with pytest.raises(MakError, match="no label"):
        labels_from_items(["images/pool/000001.png 3", "images/pool/000002.png"])
    with pytest.raises(MakError, match="integer label"):
        labels_from_items(["my image.png"])
    with pytest.raises(MakError, match="no label"):
        labels_from_items([""])
    assert labels_from_items([]).shape == (0,)


def test_balance_by_hand():
    b = balance([10, 10, 10, 10])
    assert b["entropy"] == pytest.approx(1.0) and b["imbalance"] == 1.0
    b = balance([30, 10, 0])
    p = np.array([0.75, 0.25])
    assert b["entropy"] == pytest.approx(-(p * np.log(p)).sum() / math.log(3))
    assert b["imbalance"] == 30.0  # min clipped at 1
    b = balance([5, 0, 0, 0])
    assert b["entropy"] == 0.0 and b["imbalance"] == 5.0


def test_analyse_selection_by_hand():
    groups = {"many": [0], "medium": [1], "few": [2, 3]}
    selected = [-1, -1, 0, 1, 1, 2, 3, 3, -1, 0]  # 3 OOD, many 2, medium 2, few 3
    seed = [0] * 8 + [1] * 4 + [2] * 2 + [3]  # 8, 4, 2, 1
    r = analyse_selection(selected, seed, groups, num_classes=4)
    assert r["n_selected"] == 10 and r["ood_count"] == 3
    assert r["ood_rate"] == pytest.approx(0.3)
    assert r["counts"] == {"0": 2, "1": 2, "2": 1, "3": 2}
    # shares of ALL selected items, OOD in the denominator
    assert r["many_share"] == pytest.approx(0.2)
    assert r["medium_share"] == pytest.approx(0.2)
    assert r["few_share"] == pytest.approx(0.3)
    assert r["many_share"] + r["medium_share"] + r["few_share"] + r["ood_rate"] == pytest.approx(1.0)
    assert r["combined_counts"] == {"0": 10, "1": 6, "2": 3, "3": 3}
    p = np.array([10, 6, 3, 3]) / 22
    assert r["balance"]["entropy"] == pytest.approx(-(p * np.log(p)).sum() / math.log(4))
    assert r["balance"]["imbalance"] == pytest.approx(10 / 3)
    assert r["seed_balance"]["imbalance"] == 8.0
    assert "few" in format_analysis({"x": r})


def test_classes_outside_the_groups_are_near():
    """Classes the seed lacks count as near: shares still sum to 1, balance is over the seed's classes."""
    groups = {"many": [0], "medium": [1], "few": [2]}
    selected = [-1, 0, 1, 2, 2, 3, 3, 3, 4, -1]  # OOD 2, many 1, medium 1, few 2, near 3 + 1
    seed = [0] * 6 + [1] * 3 + [2]
    r = analyse_selection(selected, seed, groups, num_classes=5)
    assert r["near_count"] == 4 and r["near_rate"] == pytest.approx(0.4)
    assert r["many_share"] + r["medium_share"] + r["few_share"] + r["near_rate"] + r["ood_rate"] == pytest.approx(1.0)
    p = np.array([7, 4, 3]) / 14  # seed + pick over classes 0, 1, 2 only
    assert r["balance"]["entropy"] == pytest.approx(-(p * np.log(p)).sum() / math.log(3))
    assert r["balance"]["imbalance"] == pytest.approx(7 / 3) and r["seed_balance"]["imbalance"] == 6.0
    assert r["counts"]["3"] == 3 and r["counts"]["4"] == 1
    full = analyse_selection([0, 1, 2, -1], seed, groups, num_classes=3)
    assert full["near_count"] == 0 and full["near_rate"] == 0.0
    assert "near" in format_analysis({"x": r})


def test_analyse_selection_edge_cases():
    groups = {"many": [0], "medium": [], "few": [1]}
    r = analyse_selection([], [0, 1], groups, num_classes=2)
    assert r["ood_rate"] == 0.0 and r["few_share"] == 0.0 and r["n_selected"] == 0
    with pytest.raises(MakError, match="outside"):
        analyse_selection([5], [0], groups, num_classes=2)
    with pytest.raises(MakError, match="more than one group"):
        analyse_selection([0], [0], {"many": [0], "few": [0]}, num_classes=2)


def test_regroup_equals_the_analysis_of_the_labels_under_the_new_groups():
    rng = np.random.default_rng(0)
    sel = rng.choice([-1, 0, 1, 2, 3, 4, 5, 6], size=200)  # OOD and a class (6) the seed lacks
    seed = rng.choice(6, size=120, p=[0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
    first = analyse_selection(sel, seed, {"many": [0, 1], "medium": [2, 3], "few": [4, 5]}, num_classes=7)
    other = {"many": [0], "medium": [1, 2], "few": [3, 4, 5]}
    assert regroup(first, other) == analyse_selection(sel, seed, other, num_classes=7)
    assert regroup(first, other)["few_share"] == np.isin(sel, [3, 4, 5]).mean()


def test_run_results_take_the_pick_shares_over_the_evaluations_groups():
    """Without a benchmark manifest the selection's analysis uses evaluate's default thresholds; the
    figures of `mak run` regroup it by the groups the evaluation used."""
    from mak.run.results import _repeat_figures

    sel = np.array([0] * 5 + [1] * 3 + [2] * 2 + [-1] * 10)
    seed = np.array([0] * 50 + [1] * 20 + [2] * 4)
    an = analyse_selection(sel, seed, {"many": [0], "medium": [1], "few": [2]}, num_classes=3)
    ev = {"groups": {"many": [0], "medium": [], "few": [1, 2]}, "group_acc": {"few": 0.5}}
    figures = _repeat_figures(ev, an)
    assert figures["few_share"] == 5 / 20 and figures["ood_rate"] == 10 / 20
    assert _repeat_figures({}, an)["few_share"] == 2 / 20  # no evaluation groups: the analysis as written
