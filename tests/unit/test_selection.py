"""Budgeted selection: the ranking math (k-center spreads its picks, margins order the uncertain, random is
seeded), drifted-feature membership, and the budget's edges (0, more than the pool, an unknown strategy)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from visionflow.errors import DataError
from visionflow.monitoring.selection import drift_membership, k_center_greedy, margins, select


def _probs(top: list[float]) -> np.ndarray:
    """Two-class-ish rows: top-1 = t, top-2 = 1 - t, so the margin is 2t - 1."""
    return np.array([[t, 1 - t, 0.0] for t in top])


def test_k_center_picks_one_point_from_each_cluster_before_a_second_from_any():
    rng = np.random.default_rng(0)
    centres = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [-1, 0, 0]], dtype=np.float32)
    points = np.concatenate([c + 0.01 * rng.standard_normal((25, 3)) for c in centres])
    picked = k_center_greedy(points, 4)
    assert sorted(i // 25 for i in picked) == [0, 1, 2, 3]
    # labelled points count as covered: with clusters 0 and 1 labelled, the next picks are in 2 and 3
    picked = k_center_greedy(points, 2, centers=centres[:2])
    assert sorted(i // 25 for i in picked) == [2, 3]


def test_uncertainty_orders_by_smallest_margin_and_entropy_agrees_on_two_classes():
    probs = _probs([0.9, 0.55, 0.7, 0.51, 0.99])
    assert margins(probs) == pytest.approx([0.8, 0.1, 0.4, 0.02, 0.98])
    assert list(select(probs, np.zeros((5, 2)), 3, "uncertainty")) == [3, 1, 2]
    assert list(select(probs, np.zeros((5, 2)), 3, "uncertainty", measure="entropy")) == [3, 1, 2]


def test_random_is_seeded_and_without_repeats():
    probs, emb = _probs([0.6] * 100), np.zeros((100, 2))
    a, b = select(probs, emb, 30, "random", seed=7), select(probs, emb, 30, "random", seed=7)
    assert list(a) == list(b) and len(set(a)) == 30
    assert list(select(probs, emb, 30, "random", seed=8)) != list(a)


def test_uncertainty_diversity_spreads_over_the_uncertain_and_leaves_the_confident():
    # 40 uncertain images in two tight clusters (30 in one, 10 in the other) and 60 confident ones far away
    rng = np.random.default_rng(1)
    emb = np.concatenate(
        [
            [1, 0] + 0.01 * rng.standard_normal((30, 2)),
            [0, 1] + 0.01 * rng.standard_normal((10, 2)),
            [-1, 0] + 0.01 * rng.standard_normal((60, 2)),
        ]
    )
    top = [0.5 + 0.001 * i for i in range(30)] + [0.6] * 10 + [0.99] * 60
    chosen = select(_probs(top), emb, 4, "uncertainty-diversity", pool_factor=10)
    assert chosen[0] == 0 and all(i < 40 for i in chosen)  # the most uncertain first, no confident image
    assert any(30 <= i < 40 for i in chosen)  # uncertainty alone takes 4 from the big cluster
    assert all(i < 30 for i in select(_probs(top), emb, 4, "uncertainty"))


def test_drifted_images_come_first_among_equally_uncertain():
    ref = pd.DataFrame({"brightness": np.linspace(0.4, 0.6, 200), "contrast": np.linspace(0.1, 0.2, 200)})
    cur = pd.DataFrame({"brightness": [0.5, 0.9, 0.5, 0.95], "contrast": [0.15, 0.15, 0.5, 0.5]})
    drift = drift_membership(ref, cur, ["brightness", "contrast", "embedding_pc1"])
    assert list(drift) == [0, 0.5, 0.5, 1]
    assert drift_membership(ref, cur, ["embedding_pc1", "confidence"]) is None  # no image property moved
    chosen = select(_probs([0.6] * 4), np.eye(4), 2, "uncertainty-diversity", drift=drift)
    assert chosen[0] == 3


@pytest.mark.parametrize("strategy", ["uncertainty-diversity", "uncertainty", "random"])
def test_budget_edges(strategy):
    probs, emb = _probs([0.6, 0.7, 0.8]), np.eye(3)
    assert len(select(probs, emb, 0, strategy)) == 0
    assert sorted(select(probs, emb, 10, strategy)) == [0, 1, 2]  # a budget past the pool takes it all
    assert len(select(np.zeros((0, 3)), np.zeros((0, 4)), 5, strategy)) == 0  # an empty pool


def test_an_unknown_strategy_is_refused():
    with pytest.raises(DataError, match="unknown selection strategy 'smart'"):
        select(_probs([0.6]), np.eye(1), 1, "smart")


def test_a_reviewed_batch_with_a_selection_gives_only_the_chosen_images(tmp_path):
    from visionflow.monitoring.ledger import take_in_reviewed_batch
    from visionflow.monitoring.selection import selected_files

    batch = tmp_path / "batch"
    (batch / "images").mkdir(parents=True)
    for i in range(4):
        (batch / "images" / f"b_{i}.png").write_bytes(b"png")
    pd.DataFrame({"file": [f"b_{i}.png" for i in range(4)], "label": ["cat"] * 4}).to_csv(batch / "labels.csv")
    assert selected_files(batch) is None  # no selection: every labelled image counts
    pd.DataFrame({"file": ["b_2.png", "b_0.png"], "rank": [1, 2]}).to_csv(batch / "selection.csv", index=False)
    only = selected_files(batch)
    assert only == {"b_0.png", "b_2.png"}
    assert take_in_reviewed_batch(batch, tmp_path / "reviewed", ["cat"], only) == {"cat": 2}
    assert sorted(f.name for f in (tmp_path / "reviewed/cat").iterdir()) == ["batch__b_0.png", "batch__b_2.png"]
