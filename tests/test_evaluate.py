"""Evaluation metrics (mak.bench.evaluate) against hand-computed examples and brute-force references."""
from __future__ import annotations

import json

import numpy as np
import pytest

from mak.cli import main
from mak.errors import MakError
from mak.bench.evaluate import (
    class_groups,
    evaluate_features,
    fewshot_probe,
    format_table,
    group_accuracy,
    group_std,
    knn_accuracy,
    knn_predict,
    linear_probe,
    per_class_accuracy,
)


def _clusters(n_per_class: int, classes: list[int], dim: int = 8, spread: float = 0.3, seed: int = 0):
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(123).normal(size=(max(classes) + 1, dim)) * 3
    y = np.repeat(classes, n_per_class)
    x = centers[y] + rng.normal(scale=spread, size=(len(y), dim))
    return x.astype(np.float32), y


def test_linear_probe_separable_is_perfect_and_deterministic():
    tx, ty = _clusters(30, [2, 5, 7])
    qx, qy = _clusters(20, [2, 5, 7], seed=1)
    res = linear_probe(tx, ty, qx, qy)
    assert res.accuracy == 1.0
    np.testing.assert_array_equal(res.predictions, qy)
    assert set(res.classes.tolist()) == {2, 5, 7}
    again = linear_probe(tx, ty, qx, qy)
    np.testing.assert_array_equal(again.predictions, res.predictions)
    pred, acc = linear_probe(tx, ty, qx)  # no test labels: predictions only
    assert acc is None and (pred == qy).all()


def test_linear_probe_hand_example_1d():
    # 1-D threshold problem: x < 0 -> class 0, x > 0 -> class 1
    tx = np.array([[-3.0], [-2.0], [-1.0], [1.0], [2.0], [3.0]])
    ty = np.array([0, 0, 0, 1, 1, 1])
    qx = np.array([[-0.5], [0.5], [-10.0], [10.0]])
    res = linear_probe(tx, ty, qx, np.array([0, 1, 0, 1]))
    assert res.accuracy == 1.0
    # one class only, and a constant feature: no crash
    assert (linear_probe(tx, np.zeros(6, int), qx).predictions == 0).all()
    res = linear_probe(np.hstack([tx, np.ones((6, 1))]), ty, np.hstack([qx, np.ones((4, 1))]), np.array([0, 1, 0, 1]))
    assert res.accuracy == 1.0
    with pytest.raises(MakError, match="dimension"):
        linear_probe(tx, ty, np.zeros((2, 3)))


def _knn_brute(tx, ty, qx, k, temperature, weighted):
    tn = tx / np.linalg.norm(tx, axis=1, keepdims=True)
    classes = sorted(set(ty.tolist()))
    preds = []
    for q in qx:
        qn = q / np.linalg.norm(q)
        sims = [float(np.dot(qn, t)) for t in tn]
        order = sorted(range(len(sims)), key=lambda i: -sims[i])[:k]
        votes = {c: 0.0 for c in classes}
        for i in order:
            votes[int(ty[i])] += np.exp(sims[i] / temperature) if weighted else 1.0
        best = max(votes.values())
        preds.append(min(c for c in classes if votes[c] == best))
    return np.array(preds)


@pytest.mark.parametrize("weighted", [True, False])
def test_knn_against_brute_force(weighted):
    rng = np.random.default_rng(0)
    tx = rng.normal(size=(120, 6))
    ty = rng.integers(0, 4, size=120) * 3  # labels 0, 3, 6, 9
    qx = rng.normal(size=(45, 6))
    qy = rng.integers(0, 4, size=45) * 3
    for k in (1, 5, 20):
        ref = _knn_brute(tx, ty, qx, k, 0.07, weighted)
        pred = knn_predict(tx, ty, qx, k=k, temperature=0.07, weighted=weighted, chunk_size=7)
        np.testing.assert_array_equal(pred, ref)
        res = knn_accuracy(tx, ty, qx, qy, k=k, weighted=weighted, chunk_size=16)
        assert res.accuracy == pytest.approx(float((ref == qy).mean()))
    # k larger than the training set is clipped
    assert knn_predict(tx[:3], ty[:3], qx, k=20).shape == (45,)


def test_knn_hand_example():
    tx = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    ty = np.array([0, 0, 1])
    qx = np.array([[1.0, 0.05], [0.05, 1.0]])
    assert knn_predict(tx, ty, qx, k=1).tolist() == [0, 1]
    # majority of k=3: class 0 holds two votes for both queries
    assert knn_predict(tx, ty, qx, k=3, weighted=False).tolist() == [0, 0]


def test_per_class_and_groups_by_hand():
    y_true = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3])
    y_pred = np.array([0, 0, 0, 1, 1, 0, 2, 2, 0, 0, 3, 3])
    pc = per_class_accuracy(y_true, y_pred)
    assert pc == {0: 0.75, 1: 0.5, 2: 0.5, 3: 1.0}
    seed_counts = {0: 1000, 1: 300, 2: 30, 3: 10}
    assert class_groups(seed_counts) == {"many": [0], "medium": [1, 2], "few": [3]}
    ga = group_accuracy(pc, seed_counts)
    assert ga == {"many": 0.75, "medium": 0.5, "few": 1.0}
    mean = (0.75 + 0.5 + 1.0) / 3
    assert group_std(ga) == pytest.approx(np.sqrt(((0.75 - mean) ** 2 + (0.5 - mean) ** 2 + (1.0 - mean) ** 2) / 3))
    # an empty group is skipped
    ga2 = group_accuracy(pc, seed_counts, many=2000)
    assert ga2 == {"many": None, "medium": pytest.approx((0.75 + 0.5 + 0.5) / 3), "few": 1.0}
    assert group_std(ga2) == pytest.approx(abs(1.0 - ga2["medium"]) / 2)
    # explicit groups, string keys
    assert group_accuracy({"0": 0.2, "1": 0.4}, groups={"many": [0, 1]})["many"] == pytest.approx(0.3)
    assert group_std({"many": None, "medium": None, "few": None}) is None


def test_fewshot_probe_draws():
    px, py = _clusters(25, [0, 1, 2])
    qx, qy = _clusters(10, [0, 1, 2], seed=3)
    r = fewshot_probe(px, py, qx, qy, shots=5, draws=4, seed=1)
    assert r["mean"] == 1.0 and r["std"] == 0.0 and len(r["accs"]) == 4
    assert r["per_class"] == {0: 1.0, 1: 1.0, 2: 1.0}
    # noisy data: draws differ, the std is the population std of the per-draw accuracies
    px, py = _clusters(40, [0, 1, 2], spread=6.0)
    qx, qy = _clusters(30, [0, 1, 2], spread=6.0, seed=3)
    r = fewshot_probe(px, py, qx, qy, shots=3, draws=5, seed=0)
    assert r["std"] == pytest.approx(np.std(r["accs"])) and r["std"] > 0
    assert r["mean"] == pytest.approx(np.mean(r["accs"]))
    assert r == fewshot_probe(px, py, qx, qy, shots=3, draws=5, seed=0)  # deterministic
    assert r["accs"] != fewshot_probe(px, py, qx, qy, shots=3, draws=5, seed=1)["accs"]
    # shots=None: the few-shot split as given, one fit on all of it (a fixed split such as MAK's 1%)
    whole = fewshot_probe(px, py, qx, qy, shots=None, draws=5)
    assert whole["accs"] == [linear_probe(px, py, qx, qy).accuracy] and whole["std"] == 0.0
    with pytest.raises(MakError, match="shots >= 1"):
        fewshot_probe(px, py, qx, qy, shots=0)


def test_evaluate_features_and_table():
    classes = list(range(4))
    tx, ty = _clusters(30, classes, spread=0.8)
    fx, fy = _clusters(15, classes, spread=0.8, seed=5)
    qx, qy = _clusters(20, classes, spread=0.8, seed=6)
    # out-of-domain items (-1) are dropped
    tx = np.vstack([tx, np.full((5, 8), 9.0, np.float32)])
    ty = np.concatenate([ty, -np.ones(5, int)])
    seed_counts = {0: 1000, 1: 200, 2: 50, 3: 10}
    r = evaluate_features(tx, ty, fx, fy, qx, qy, seed_counts, draws=3, shots=5)
    json.dumps(r)  # JSON-ready
    assert r["n"] == {"train": 120, "fewshot_pool": 60, "test": 80, "dim": 8}
    for key in ("fullshot_acc", "fewshot_acc", "knn_acc"):
        assert 0.9 <= r[key] <= 1.0
    assert len(r["fewshot_accs"]) == 3
    assert r["groups"] == {"many": [0], "medium": [1, 2], "few": [3]}
    assert set(r["group_acc"]) == {"many", "medium", "few"}
    assert r["group_acc"]["few"] == pytest.approx(r["per_class"]["fewshot"]["3"])
    assert r["group_std"] == pytest.approx(group_std(r["group_acc"]))
    assert r["fullshot_group_acc"]["many"] == pytest.approx(r["per_class"]["fullshot"]["0"])
    assert set(r["per_class"]["knn"]) == {"0", "1", "2", "3"}
    table = format_table(r)
    assert "few-shot" in table and "kNN" in table and f"{100 * r['knn_acc']:.1f}" in table
    multi = format_table({"mak": r, "random": {**r, "fewshot_acc": {"mean": 0.5, "std": 0.01}}})
    assert "random" in multi and "50.0+-1.0" in multi
    # no seed counts: no groups; no few-shot pool: draws from the train split
    r2 = evaluate_features(tx, ty, None, None, qx, qy, draws=2, shots=5)
    assert r2["group_acc"] is None and r2["n"]["fewshot_pool"] == 120
    with pytest.raises(MakError, match="no labeled"):
        evaluate_features(tx, -np.ones(len(ty), int), None, None, qx, qy)


def test_cli_evaluate_needs_splits(capsys, tmp_path):
    rc = main(["evaluate", "--checkpoint", str(tmp_path / "none.pt")])
    assert rc == 2
    assert "--bench" in capsys.readouterr().err


def test_a_split_line_without_a_label_names_its_split_file(tmp_path):
    from PIL import Image

    from mak.bench.evaluate import _split_labels
    from mak.data.sources import SplitSource

    Image.new("L", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "train.txt").write_text("a.png 1\na.png\n")
    with pytest.raises(MakError, match=r"train\.txt: item 2 has no label \('a\.png'\)"):
        _split_labels(SplitSource(tmp_path / "train.txt"))
