from __future__ import annotations

import math

import numpy as np
import pytest

from mak.run.stats import interval95, paired_gains, t975


def t_cdf(x: float, df: int, steps: int = 200_000) -> float:
    """Student's t CDF at x > 0 by the midpoint rule on its density (slow, obviously correct)."""
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    h = x / steps
    u = (np.arange(steps) + 0.5) * h
    density = np.exp(log_c - (df + 1) / 2 * np.log1p(u * u / df))
    return 0.5 + float(density.sum() * h)


@pytest.mark.parametrize("df", [1, 2, 4, 10, 11, 19, 30, 31, 45, 59, 60, 90, 200, 1000, 10**6])
def test_t975_is_the_975_quantile_of_student_t(df):
    assert t_cdf(t975(df), df) == pytest.approx(0.975, abs=2e-5)


def test_t975_falls_with_the_degrees_of_freedom_towards_the_normal():
    values = [t975(df) for df in range(1, 400)]
    assert all(a > b for a, b in zip(values, values[1:])) and values[-1] > 1.96
    with pytest.raises(ValueError, match="df=0"):
        t975(0)


def test_paired_gains_are_class_by_class_and_their_interval_is_a_t_interval():
    strategy = {"0": 0.9, "1": 0.6, "2": 0.5, "3": 0.2}
    seed_alone = {"0": 0.8, "1": 0.6, "2": 0.3, "3": 0.1}
    groups = {"many": [0], "medium": [1, 2], "few": [3]}
    g = paired_gains(strategy, seed_alone, groups)
    assert g == pytest.approx({"all": (0.1 + 0.0 + 0.2 + 0.1) / 4, "many": 0.1, "medium": 0.1, "few": 0.1})
    values = [0.01, 0.03, 0.02]
    iv = interval95(values)
    assert iv["mean"] == pytest.approx(0.02) and iv["values"] == values
    assert iv["ci95"] == pytest.approx(4.303 * np.std(values, ddof=1) / np.sqrt(3))
    assert interval95([0.5])["ci95"] is None


def test_the_results_table_shows_each_figure_in_percent():
    from mak.run.results import TABLE_COLUMNS, results_table

    results = [{"strategy": "none", "ood_rate": None, "few_share": None, "fewshot_acc": 0.5,
                "fullshot_acc": 0.75, "knn_acc": 0.625},
               {"strategy": "tailness+proximity",
                "ood_rate": {"mean": 0.0124, "std": 0.005, "values": [0.0074, 0.0174]},
                "few_share": 0.25, "fewshot_acc": 0.5, "fullshot_acc": 0.75, "knn_acc": 1.0}]
    head, *rows = results_table(results).splitlines()
    assert head.split()[:2] == ["strategy", "(%)"] and all(h in head for _, h in TABLE_COLUMNS)
    assert rows[0].split() == ["seed", "alone", "-", "-", "50.0", "75.0", "62.5"]
    assert rows[1].split() == ["tailness+proximity", "1.2", "±", "0.5", "25.0", "50.0", "75.0", "100.0"]
    assert len({len(line) for line in (head, *rows)}) == 1  # aligned columns
