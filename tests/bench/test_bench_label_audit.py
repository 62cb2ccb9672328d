"""The label-audit benchmark's own parts (the full benchmark trains three times: opt-in, not a test)."""

from __future__ import annotations

import pandas as pd

from bench.label_audit import flip_labels, precision_at_recall, relabel


def test_flips_are_seeded_and_to_another_class_and_relabel_undoes_them(tmp_path):
    split = tmp_path / "train.csv"
    labels = [c for c in "abcd" for _ in range(25)]
    original = pd.DataFrame({"path": [f"img{i}.png" for i in range(100)], "label": labels, "sha256": "x"})
    original.to_csv(split, index=False)
    truth = flip_labels(split, 0.05, seed=3)
    flipped = pd.read_csv(split)
    changed = flipped[flipped["label"] != original["label"]]
    assert len(truth) == len(changed) == 5 and set(changed["path"]) == set(truth)
    assert all(original.set_index("path").loc[p, "label"] == t for p, t in truth.items())
    original.to_csv(split, index=False)
    assert flip_labels(split, 0.05, seed=3) == truth  # the same seed flips the same rows
    relabel(split, truth)
    assert pd.read_csv(split).equals(original)


def test_precision_at_recall_is_the_shortest_prefix_that_reaches_it():
    ranking = ["w1", "c1", "w2", "c2", "w3", "c3", "w4", "w5"]
    wrong = {"w1", "w2", "w3", "w4", "w5"}
    assert precision_at_recall(ranking, wrong, 0.8) == (round(4 / 7, 4), 7)  # reported to 4 places
    assert precision_at_recall(ranking, wrong, 0.2) == (1.0, 1)
    assert precision_at_recall(ranking[:3], wrong, 0.8) == (None, 3)
