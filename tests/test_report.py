"""The HTML run report (mak.run.report.write_report) on a small fake run."""
from __future__ import annotations

import csv
import html
import re
from pathlib import Path

import numpy as np
import pytest

from mak.run.report import find_gate, read_scores, write_report

N_POOL = 240
BUDGET = 40
EVIL = "<script>alert(1)</script>"


def _pool_items() -> list[str]:
    rng = np.random.default_rng(0)
    labels = rng.integers(-1, 5, size=N_POOL)
    items = [f"images/pool/{i:05d}.png {int(labels[i])}" for i in range(N_POOL)]
    items[3] = f"images/pool/{EVIL}.png {int(labels[3])}"
    return items


def _write_scores(path: Path, items: list[str], seed: int, with_scores: bool = True) -> list[int]:
    rng = np.random.default_rng(seed)
    picks = [int(i) for i in rng.permutation(N_POOL)[:BUDGET]]
    if 3 not in picks:
        picks[0] = 3  # the item with markup in its name is the first pick
    else:
        picks.remove(3)
        picks.insert(0, 3)
    rank = {i: r for r, i in enumerate(picks)}
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["index", "item", "ecle", "distance", "score", "selected", "pick_rank"])
        for i, it in enumerate(items):
            e, d, s = (repr(float(v)) for v in rng.normal(size=3)) if with_scores else ("", "", "")
            r = rank.get(i)
            w.writerow([i, it, e, d, s, 1 if r is not None else 0, "" if r is None else r])
    return picks


def _counts(items: list[str], rows: list[int]) -> dict[str, int]:
    out: dict[str, int] = {}
    for i in rows:
        lab = items[i].split()[-1]
        out[lab] = out.get(lab, 0) + 1
    return out


@pytest.fixture
def fake_run(tmp_path: Path) -> dict:
    items = _pool_items()
    seed_items = [f"images/seed/{i:04d}.png {c}" for c, n in enumerate((50, 20, 8, 4, 2)) for i in range(n)]
    seed_counts = _counts(seed_items, list(range(len(seed_items))))
    strategies = {}
    for k, name in enumerate(("robust", "random", "mak")):
        d = tmp_path / "select" / name
        d.mkdir(parents=True)
        picks = _write_scores(d / "scores.csv", items, seed=k + 1, with_scores=name != "random")
        summary: dict = {"strategy": name, "parameters": {"budget": BUDGET, "alpha": 0.5},
                         "counts": {"pool": N_POOL, "selected": BUDGET}, "info": {}}
        if name == "robust":
            rng = np.random.default_rng(7)
            summary["counts"].update({"gate_rejected": 31, "gate_kept": N_POOL - 31})
            edges = np.linspace(0.0, 1.0, 11)
            seed_heldout = np.histogram(rng.random(84) * 0.5, edges)[0]
            summary["info"]["gate"] = {"score": "centroid+share", "term": "centroid", "threshold": 0.42,
                                       "quantile": 0.99, "rejected": 31, "kept": N_POOL - 31,
                                       "histogram": {"edges": edges.tolist(), "seed_heldout": seed_heldout.tolist(),
                                                     "pool": None}}
        strategies[name] = {"scores_csv": d / "scores.csv", "summary": summary,
                            "class_counts_seed": seed_counts, "class_counts_selected": _counts(items, picks)}
    logs = {}
    for name in ("pretrain (seed)", "retrain robust", "retrain random"):
        p = tmp_path / name.replace(" ", "_") / "log.csv"
        p.parent.mkdir(parents=True)
        rows = ["epoch,loss,lr,images_per_s"] + [f"{e},{5.0 - 0.3 * e + 0.01 * len(name):.6f},0.1,100.0"
                                                   for e in range(1, 6)]
        p.write_text("\n".join(rows) + "\n")
        logs[name] = p
    results = [
        {"strategy": "none", "ood_rate": None, "few_share": None, "fullshot_acc": 0.801, "fewshot_acc": 0.612,
         "knn_acc": 0.755, "group_acc": {"many": 0.9, "medium": 0.6, "few": 0.2}, "group_std": 0.287},
        {"strategy": "robust", "ood_rate": {"mean": 0.012, "std": 0.004}, "few_share": {"mean": 0.153, "std": 0.02},
         "fullshot_acc": {"mean": 0.8234, "std": 0.0051}, "fewshot_acc": {"mean": 0.6456, "std": 0.0131},
         "knn_acc": {"mean": 0.7712, "std": 0.003},
         "group_acc": {"many": {"mean": 0.91, "std": 0.01}, "medium": {"mean": 0.65, "std": 0.02},
                       "few": {"mean": 0.377, "std": 0.042}},
         "group_std": {"mean": 0.2174, "std": 0.011}},
        {"strategy": "random", "ood_rate": 0.506, "few_share": 0.009, "fullshot_acc": 0.81, "fewshot_acc": 0.62,
         "knn_acc": 0.76, "group_acc": {"many": 0.92, "medium": 0.61, "few": 0.25}, "group_std": 0.27},
        {"strategy": "mak", "ood_rate": 0.596, "few_share": 0.016},  # no evaluation figures at all
    ]

    def pool_images(i: int) -> np.ndarray:
        r = np.random.default_rng(i)
        return r.integers(0, 256, size=(28, 28) if i % 2 else (28, 28, 3), dtype=np.uint8)

    return {"tmp": tmp_path, "items": items, "seed_items": seed_items, "strategies": strategies,
            "logs": logs, "results": results, "pool_images": pool_images}


def _write(run: dict, **over) -> str:
    kw = dict(title=f"Fake run {EVIL}", results=run["results"], strategies=run["strategies"],
              seed_items=run["seed_items"], pool_images=run["pool_images"], pool_items=run["items"],
              loss_logs=run["logs"], notes=["a note & more"])
    kw.update(over)
    out = write_report(run["tmp"] / "out" / "report.html", **kw)
    assert out == run["tmp"] / "out" / "report.html" and out.is_file()
    text = out.read_text(encoding="ascii")  # pure ASCII by construction
    assert not list(out.parent.glob(".*tmp"))  # atomic: no temporary left behind
    return text


def _row(text: str, name: str) -> str:
    m = re.search(r'<tr class="[a-z]+"><td class="name">(?:(?!</tr>).)*?>' + re.escape(name) + r"<.*?</tr>",
                  text, re.S)
    assert m, f"no table row for {name}"
    return m.group(0)


def test_report_full(fake_run: dict) -> None:
    text = _write(fake_run)
    assert text.startswith("<!DOCTYPE html>")
    # self-contained: no external reference of any kind
    assert "http://" not in text  # inline SVG in HTML needs no xmlns
    assert "https://" not in text
    assert not re.search(r"<(script|link)\b", text, re.I)
    assert not re.search(r'src="(?!data:)', text)
    # the table: a row per strategy, mean +- std formatted in percent
    robust = _row(text, "robust")
    assert "64.6<span class=\"sd\">&plusmn;1.3</span>" in robust  # few-shot all
    assert "37.7<span class=\"sd\">&plusmn;4.2</span>" in robust  # Few group
    assert "82.3<span class=\"sd\">&plusmn;0.5</span>" in robust  # full-shot
    assert "1.2<span class=\"sd\">&plusmn;0.4</span>" in robust  # OOD rate
    assert "21.7<span class=\"sd\">&plusmn;1.1</span>" in robust  # group std
    random_row = _row(text, "random")
    assert ">50.6<" in random_row and ">62.0<" in random_row and ">25.0<" in random_row
    none_row = _row(text, "none (seed alone)")
    assert ">80.1<" in none_row and "&ndash;" in none_row  # OOD rate unavailable for the seed alone
    mak_row = _row(text, "mak")
    assert mak_row.count("&ndash;") == 7 and ">59.6<" in mak_row
    # best per column highlighted: robust's Few, lowest OOD rate is robust's, lowest std robust's
    assert '<td class="best">37.7' in robust and '<td class="best">1.2' in robust
    assert '<td class="best">21.7' in robust
    assert '<td class="best">' not in mak_row.replace('<td class="best">1.6', "")  # only Few share, if any
    # takeaways
    assert "Best Few-group accuracy" in text and "+17.7 pts vs seed alone" in text
    assert "Lowest out-of-domain rate" in text
    # charts and thumbnails
    assert text.count("<svg") >= 1 + 3 + 2 * 2 + 1  # loss, class bars x3, ecle/distance x2, gate
    assert text.count("data:image/png;base64,") >= 32 * 3
    assert "Training loss" in text and "retrain robust" in text
    # escaping: the item name with markup and the title never appear raw
    assert EVIL not in text
    assert html.escape(EVIL) in text
    assert "a note &amp; more" in text
    # the gate of robust, with its threshold
    assert "Centroid gate" in text and "gate 0.42" in text and "31 pool images rejected" in text
    # in-domain / out-of-domain split of the histograms (items carry labels)
    assert "in-domain &#183; not selected" in text and "out-of-domain &#183;" in text


def test_report_without_images_and_optional_values(fake_run: dict) -> None:
    results = [{"strategy": "robust", "fewshot_acc": 0.5}, {"strategy": "none"}, {"strategy": "random",
               "fewshot_acc": None, "group_acc": None, "ood_rate": {"mean": 0.5, "std": None}}]
    unlabeled = [f"images/pool/{i:05d}.png" for i in range(N_POOL)]
    unlabeled[3] = f"images/pool/{EVIL}.png"
    strategies = {}
    for k, name in enumerate(("robust", "random")):
        p = fake_run["tmp"] / "unlabeled" / name / "scores.csv"
        p.parent.mkdir(parents=True)
        _write_scores(p, unlabeled, seed=k, with_scores=name != "random")
        strategies[name] = {"scores_csv": p, "summary": {}}
    text = _write(fake_run, results=results, strategies=strategies, pool_images=None, pool_items=unlabeled,
                  loss_logs={}, notes=None, seed_items=[])
    assert "Per-class counts" not in text  # no labels and no counts: no class chart
    assert "data:image/png" not in text
    assert "<svg" in text  # the score histograms still come out
    assert "Centroid gate" not in text
    assert "in-domain &#183;" not in text and "all pool images" in text  # no labels: no split
    assert ">50.0<" in _row(text, "robust")
    assert ">50.0<" in _row(text, "random")
    assert EVIL not in text  # the first-picks table shows the item, escaped
    assert html.escape(EVIL) in text


def test_report_minimal_inputs(tmp_path: Path) -> None:
    out = write_report(tmp_path / "r.html", title="empty", results=[], strategies={}, seed_items=[],
                       pool_images=None, pool_items=[], loss_logs={"missing": tmp_path / "nope.csv"})
    text = out.read_text()
    assert "<h1>empty</h1>" in text and "loss log missing" in text


def test_failing_image_is_a_placeholder(fake_run: dict) -> None:
    def bad(i: int) -> np.ndarray:
        if i % 3 == 0:
            raise OSError("corrupt")
        return np.zeros((28, 28), np.uint8)

    text = _write(fake_run, pool_images=bad)
    assert 'class="miss"' in text and "could not be loaded" in text


def test_gate_is_read_from_its_named_fields_and_streaming_reader(fake_run: dict) -> None:
    gate = {"score": "centroid+share+ratio", "threshold": 0.5, "quantile": 0.99, "rejected": 4,
            "histogram": {"edges": [0, 0.5, 1], "seed_heldout": [3, 1], "pool": [5, 9]}}
    share = {"threshold": 0.1, "histogram": {"edges": [0, 0.2, 0.4, 1], "seed_heldout": [1, 1, 1], "pool": [1, 2, 3]}}
    # the seed-share term's histogram sits beside the gate's and comes first: the gate's own is read
    g = find_gate({"info": {"seed_share": share, "gate": gate}})
    assert g is not None and list(g.edges) == [0, 0.5, 1] and list(g.pool_counts) == [5, 9]
    assert (g.threshold, g.quantile, g.rejected, g.term) == (0.5, 0.99, 4, "centroid")
    assert find_gate({"info": {"gate": {**gate, "score": "share+ratio"}}}).term == "share"
    # no gate, or a gate without a threshold: nothing; a malformed histogram: the threshold alone
    assert find_gate({"info": {"robust": {"alpha": 0.5}, "seed_share": share}}) is None
    assert find_gate({"counts": {"gate_threshold": 0.3}}) is None
    g = find_gate({"info": {"gate": {**gate, "histogram": {"edges": [0, 1], "seed_heldout": [1, 2]}}}})
    assert g.threshold == 0.5 and g.edges is None
    sc = read_scores(fake_run["strategies"]["robust"]["scores_csv"], keep_rank=5)
    assert sc.n == N_POOL and int(sc.selected.sum()) == BUDGET
    assert sorted(sc.rank[sc.rank >= 0].tolist()) == list(range(BUDGET))
    assert sc.items[3].startswith("images/pool/<script>") and len(sc.items) == 5
    assert sc.csv_labels is not None and sc.csv_labels.dtype == np.int64


def test_gate_binned_histogram_is_drawn(fake_run: dict) -> None:
    st = dict(fake_run["strategies"])
    st["robust"] = {**st["robust"], "summary": {"info": {"gate": {
        "threshold": 0.6, "rejected": 12, "histogram": {"edges": np.linspace(0, 1, 11).tolist(),
                                                        "seed_heldout": [1, 4, 9, 4, 1, 0, 0, 0, 0, 0],
                                                        "pool": [2, 8, 20, 30, 30, 20, 15, 10, 5, 2]}}}}}
    text = _write(fake_run, strategies=st)
    assert "Centroid gate" in text and "gate 0.6" in text and "12 pool images rejected" in text


def test_seed_share_histogram_is_drawn_next_to_the_gate(fake_run: dict) -> None:
    st = dict(fake_run["strategies"])
    st["robust"] = {**st["robust"], "summary": {"info": {"seed_share": {
        "threshold": 0.08, "k": 50, "rejected": 7, "histogram": {"edges": np.linspace(0, 1, 6).tolist(),
                                                                  "seed_heldout": [1, 3, 9, 4, 1],
                                                                  "pool": [20, 8, 30, 30, 2]}}}}}
    text = _write(fake_run, strategies=st)
    assert "Seed-share gate" in text and "gate 0.08" in text and "7 pool images below it" in text
    # a malformed histogram is skipped, not drawn and not a crash
    st["robust"]["summary"]["info"]["seed_share"]["histogram"]["pool"] = [1, 2]
    assert "Seed-share gate" not in _write(fake_run, strategies=st)
    # the classifier gate gets its own chart
    st["robust"]["summary"]["info"]["seed_ratio"] = {
        "threshold": -1.5, "rejected": 9, "histogram": {"edges": np.linspace(-8, 2, 6).tolist(),
                                                       "seed_heldout": [0, 0, 1, 5, 12], "pool": [40, 3, 2, 9, 30]}}
    text = _write(fake_run, strategies=st)
    assert "Seed-vs-pool classifier gate" in text and "gate -1.5" in text and "9 pool images below it" in text


def test_report_of_a_real_robust_selection(fake_run: dict, tmp_path: Path) -> None:
    """A real `robust` summary.json: the centroid gate's chart is its own histogram; the time is the total."""
    import json

    from mak.run.select_job import select_stores

    rng = np.random.default_rng(3)
    for name, n, shift in (("seed", 60, 0.0), ("pool", N_POOL, 0.3)):
        store = tmp_path / name
        store.mkdir()
        np.save(store / "features.npy", (rng.normal(size=(n, 8)) + shift).astype(np.float32))
        (store / "items.txt").write_text("".join(f"{name}/{i}.png {i % 5}\n" for i in range(n)))
    select_stores(tmp_path / "seed", tmp_path / "pool", tmp_path / "sel", BUDGET, strategy="robust", progress=False,
                  ratio_bags=1, ratio_epochs=2, ratio_hidden=8, gate_quantile=0.9)
    summary = json.loads((tmp_path / "sel" / "summary.json").read_text())
    gate = summary["info"]["gate"]
    st = {"robust": {**fake_run["strategies"]["robust"], "scores_csv": tmp_path / "sel" / "scores.csv",
                     "summary": summary}}
    text = _write(fake_run, strategies=st)
    chart = text[text.index("Centroid gate"):]
    chart = chart[:chart.index("</figure>")]
    assert "held-out seed (n=60)" in chart
    assert sum(gate["histogram"]["seed_heldout"]) == 60 and f"pool (n={N_POOL})" in chart
    assert f"gate {gate['threshold']:.3g}" in chart and "distance to the nearest seed centroid" in chart
    assert f"selection took {summary['timings_s']['total']:.1f}s" in text
    for name in ("selection.txt", "scores.csv", "summary.json"):  # links relative to the page
        assert f'href="../sel/{name}"' in text
    assert summary["timings_s"]["total"] < sum(summary["timings_s"].values())  # the sum would overstate it


def _entry(name: str, few: float, std: float | None) -> dict:
    v = few if std is None else {"mean": few, "std": std}
    return {"strategy": name, "ood_rate": None, "few_share": None, "fullshot_acc": v, "fewshot_acc": v,
            "knn_acc": v, "group_acc": {"many": v, "medium": v, "few": v}, "group_std": None}


@pytest.mark.parametrize("repeats, winner", [(2, False), (3, True)])
def test_two_repeats_name_no_accuracy_winner(fake_run, repeats, winner):
    """A lead beyond the spread of 2 repeats is not enough to name a winner; of 3 it is."""
    def entry(name, m):
        v = {"mean": m, "std": 0.005, "values": [m] * repeats}
        return {"strategy": name, "ood_rate": None, "few_share": None, "fullshot_acc": v, "fewshot_acc": v,
                "knn_acc": v, "group_acc": {"many": v, "medium": v, "few": v}, "group_std": None}
    cards = _cards(_write(fake_run, results=[entry("none", 0.5), entry("robust", 0.6)]))
    assert ("Best Few-group accuracy" in cards) == winner
    assert (f"{repeats} repeats cannot tell their differences from noise" in cards) == (not winner)


def _cards(text: str) -> str:
    return text[:text.index("</header>")]


@pytest.mark.parametrize("runs, winner", [
    ([("none", 0.50, None), ("robust", 0.60, None)], False),           # one run: no winner, say so
    ([("none", 0.50, 0.08), ("robust", 0.55, 0.06)], False),           # repeats, lead within the spread
    ([("none", 0.50, 0.01), ("robust", 0.60, 0.02)], True),            # repeats, lead beyond the spread
])
def test_headline_cards_name_a_winner_only_beyond_the_spread(fake_run, runs, winner):
    cards = _cards(_write(fake_run, results=[_entry(*r) for r in runs]))
    assert ("Best Few-group accuracy" in cards) == winner
    assert ("Single run" in cards) == (runs[0][2] is None)
    assert ("No strategy leads" in cards) == (not winner and runs[0][2] is not None)


def test_epoch_axes_have_whole_ticks():
    from mak.run.report.charts import svg_lines

    svg = svg_lines([("run", "#000", "", np.array([1.0, 2.0, 3.0]), np.array([5.0, 4.0, 3.5]))],
                    "epoch", "loss", "t")
    assert ">1.5<" not in svg and ">2.5<" not in svg and ">2<" in svg and ">3<" in svg


def test_per_class_table_with_the_benchmarks_class_names(fake_run):
    results = [dict(r) for r in fake_run["results"]]
    results[0]["per_class_acc"] = {"0": 0.9, "1": 0.5, "4": 0.1}
    results[1]["per_class_acc"] = {"0": 0.8, "1": 0.7, "4": 0.3}  # one run: a value per class
    names = {"0": "T-shirt/top", "1": "Trouser", "4": "Coat"}
    text = _write(fake_run, results=results, class_names=names)
    table = text[text.index("Few-shot accuracy per class"):]
    table = table[:table.index("</table>")]
    # columns by seed count, most first (the fake seed: 50 of class 0, 20 of 1, 2 of 4)
    assert table.index("T-shirt/top") < table.index("Trouser") < table.index("Coat")
    assert "seed 50" in table and "seed 2" in table
    assert table.count('class="best"') == 3  # one best per column
    assert "Trouser" in text[text.index("Per-class counts"):]  # the class bars are named too


def _per_class_section(text: str) -> str:
    table = text[text.index("Few-shot accuracy per class"):]
    return table[:table.index("</table>")]


def _x_ticks(svg: str) -> list[str]:
    return re.findall(r'text-anchor="middle" class="tick">([^<]*)<', svg)


def test_per_class_table_over_repeats_shows_repeat_0_under_its_seed_counts(fake_run):
    from mak.run.results import _per_class_acc

    # repeat 0's seed (the fixture's) has class 0 largest; repeat 1's seed another order: a class's
    # mean over repeats would mix a head class of one repeat with a tail class of the other
    per_rep = {"none": [{"0": 0.90, "1": 0.60, "4": 0.10}, {"0": 0.20, "1": 0.70, "4": 0.95}],
               "robust": [{"0": 0.85, "1": 0.65, "4": 0.35}, {"0": 0.30, "1": 0.75}]}  # class 4 absent once
    results = [{"strategy": n, **_entry(n, 0.5, 0.01),
                "per_class_acc": _per_class_acc([{"per_class": pc} for pc in reps])} for n, reps in per_rep.items()]
    table = _per_class_section(_write(fake_run, results=results))
    assert "repeat 0 of 2 only" in table and "seed 50" in table and "seed 2" in table
    for name, reps in per_rep.items():
        row = _row(table, "none (seed alone)" if name == "none" else name)
        cells = re.findall(r"<td(?: class=\"best\")?>(.*?)</td>", row)
        shown = [(c, reps[0][c]) for c in ("0", "1", "4")]  # columns by repeat 0's seed count: 50, 20, 2
        for cell, (c, v) in zip(cells, shown):
            complete = all(c in r for r in reps)
            assert cell == (f"{100 * v:.1f}" if complete else '<span class="na">&ndash;</span>'), (name, c)


def test_per_rank_accuracy_pairs_each_repeats_head_with_the_other_repeats_head():
    """Rank k = the class with the k-th most seed images in its own repeat (ties: lower id; none: left out)."""
    from mak.run.results import per_rank_acc

    counts = [{"0": 50, "1": 20, "4": 2, "7": 0}, {"0": 3, "1": 40, "4": 9, "7": 9}]
    per_rep = [{"per_class": {"0": 0.9, "1": 0.6, "4": 0.1}}, {"per_class": {"0": 0.2, "1": 0.7, "4": 0.95, "7": 0.5}}]
    out = per_rank_acc(per_rep, counts)
    assert out["seed_images"] == [[50, 40], [20, 9], [2, 9]]  # repeat 1: 1 (40), then 4 and 7 (9 each), 0 (3)
    expected = [(0.9, 0.7), (0.6, 0.95), (0.1, 0.5)]  # rank 2 of repeat 1: class 7 (tie with 4, higher id)
    for fig, (a, b) in zip(out["acc"], expected):
        assert fig["values"] == [a, b] and fig["mean"] == pytest.approx((a + b) / 2)
        assert fig["std"] == pytest.approx(abs(a - b) / 2)


def test_per_class_table_over_repeats_is_by_seed_count_rank_when_the_results_hold_it(fake_run):
    from mak.run.results import _per_class_acc, per_rank_acc

    counts = [{"0": 50, "1": 20, "4": 2}, {"0": 3, "1": 40, "4": 9}]
    per_rep = {"none": [{"0": 0.90, "1": 0.60, "4": 0.10}, {"0": 0.20, "1": 0.70, "4": 0.95}],
               "robust": [{"0": 0.85, "1": 0.65, "4": 0.35}, {"0": 0.30, "1": 0.75, "4": 0.55}]}
    results = [{"strategy": n, **_entry(n, 0.5, 0.01),
                "per_class_acc": _per_class_acc([{"per_class": pc} for pc in reps]),
                "per_rank_acc": per_rank_acc([{"per_class": pc} for pc in reps], counts)} for n, reps in per_rep.items()]
    text = _write(fake_run, results=results)
    table = text[text.index("Few-shot accuracy by seed-count rank"):]
    table = table[:table.index("</table>")]
    assert "seed 50/40" in table and "seed 20/9" in table and "seed 2/3" in table and "repeat 0" not in table
    row = _row(table, "robust")
    cells = re.findall(r"<td(?: class=\"best\")?>(.*?)</td>", row)
    assert len(cells) == 3 and cells[0].startswith(f"{100 * (0.85 + 0.75) / 2:.1f}<span")  # the two heads


def test_per_class_means_without_per_repeat_values_carry_no_seed_counts(fake_run):
    results = [dict(r) for r in fake_run["results"]]
    results[1]["per_class_acc"] = {"4": {"mean": 0.3, "std": 0.05}, "0": {"mean": 0.8, "std": 0.01}}
    table = _per_class_section(_write(fake_run, results=results))
    assert "seed 50" not in table and "seed images" not in table
    assert "columns by class id" in table and table.index(">0<") < table.index(">4<")


def test_first_picks_show_the_item_without_the_label_beside_its_label_column(fake_run):
    text = _write(fake_run)
    items = fake_run["items"]
    picks = text[text.index('<table class="picks">'):]
    picks = picks[:picks.index("</table>")]
    shown = re.findall(r'<td class="item" title="[^"]*">([^<]*)</td><td>([^<]*)</td>', picks)
    assert len(shown) == 12
    by_path = {html.escape(it.rsplit(None, 1)[0]): it.rsplit(None, 1)[1] for it in items}
    for path, label in shown:
        assert path in by_path and label == ("OOD" if by_path[path] == "-1" else by_path[path])
    for it in items:  # the grids' tooltips give the label in words, the item without it
        assert html.escape(it) not in text


def test_out_of_domain_legend_only_where_a_frame_can_mark_one(fake_run):
    assert "red frame = out-of-domain" in _write(fake_run)  # labelled pool with -1 items
    unlabeled = [it.rsplit(None, 1)[0] for it in fake_run["items"]]
    strategies = {}
    for k, name in enumerate(("robust", "random")):
        p = fake_run["tmp"] / "unlabeled" / name / "scores.csv"
        p.parent.mkdir(parents=True)
        _write_scores(p, unlabeled, seed=k)
        strategies[name] = {"scores_csv": p, "summary": {}}
    text = _write(fake_run, results=[], strategies=strategies, pool_items=unlabeled)
    assert "First picked" in text and "Random pool images" in text
    assert "out-of-domain" not in text and 'class="ood"' not in text
    in_domain = [f"{it} {i % 5}" for i, it in enumerate(unlabeled)]  # labels, none out-of-domain
    assert "red frame" not in _write(fake_run, results=[], strategies=strategies, pool_items=in_domain)


@pytest.mark.parametrize("epochs", [1, 2, 7, 20, 100])
def test_epoch_ticks_stay_within_the_data(epochs):
    from mak.run.report.charts import svg_lines

    xs = np.arange(1, epochs + 1, dtype=float)
    ticks = _x_ticks(svg_lines([("run", "#000", "", xs, 5.0 - 0.01 * xs)], "epoch", "loss", "t"))
    assert ticks and all(t.isdigit() and 1 <= int(t) <= epochs for t in ticks), ticks
    assert len(ticks) == len(set(ticks))


def test_paired_gain_columns(fake_run):
    results = [dict(r) for r in fake_run["results"]]
    results[1]["gain"] = {"all": {"mean": 0.021, "ci95": 0.008, "values": [0.02, 0.022]},
                          "few": {"mean": 0.054, "ci95": 0.03, "values": [0.05, 0.058]}}
    text = _write(fake_run, results=results)
    assert "Gain over the seed alone (paired)" in text
    row = _row(text, "robust")
    assert '2.1<span class="sd">&plusmn;0.8</span>' in row and '5.4<span class="sd">&plusmn;3.0</span>' in row


def test_near_share_column_only_where_some_pick_holds_classes_the_seed_lacks(fake_run: dict) -> None:
    text = _write(fake_run)
    assert "Near share" not in text and "classes the seed lacks" not in text  # no figure: no column
    zero = [{**r, "near_rate": 0.0} if r["strategy"] != "none" else r for r in fake_run["results"]]
    assert "Near share" not in _write(fake_run, results=zero)  # all zero: the default benchmark
    near = [{**r, "near_rate": {"mean": 0.25, "std": 0.01}} if r["strategy"] == "robust" else r
            for r in zero]
    text = _write(fake_run, results=near)
    assert "Near share" in text
    assert "25.0<span class=\"sd\">&plusmn;1.0</span>" in _row(text, "robust")
    assert 'title="classes the seed lacks: 25.0%"' in text  # its segment of robust's composition bar
