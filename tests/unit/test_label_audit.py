"""Label audit (confident learning, area under the margin) on synthetic data where the wrong labels are known."""

from __future__ import annotations

import numpy as np
import pytest

from visionflow.errors import DataError
from visionflow.monitoring import label_audit as la


def _noisy(seed: int, n: int = 4000, k: int = 10, flip: float = 0.05, sharpness: float = 4.0):
    """True labels, a classifier's probabilities (about 90% accurate, confusions between neighbouring classes as
    real ones are) and the given labels with a share flipped at random."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, k, n)
    logits = rng.normal(0, 1, (n, k))
    logits[np.arange(n), truth] += sharpness
    logits[np.arange(n), (truth + 1) % k] += sharpness / 3  # a look-alike class
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    given = truth.copy()
    flipped = rng.choice(n, int(flip * n), replace=False)
    given[flipped] = (truth[flipped] + rng.integers(1, k, len(flipped))) % k
    return truth, given, probs, flipped


@pytest.mark.parametrize("seed", range(3))
def test_confident_learning_finds_flipped_labels(seed):
    truth, given, probs, flipped = _noisy(seed)
    issues = la.find_label_issues(given, probs)
    precision, recall = la.precision_recall(issues.index, flipped)
    assert precision >= 0.8 and recall >= 0.8, (precision, recall)
    # the suggestion is the true class for most found flips
    found = np.isin(issues.index, flipped)
    assert (issues.suggested[found] == truth[issues.index[found]]).mean() > 0.9
    assert np.all(np.diff(issues.self_confidence) >= 0)  # most likely wrong first


def test_no_flips_means_few_issues_and_the_joint_counts_every_sample():
    _, given, probs, _ = _noisy(7, flip=0.0)
    joint = la.confident_joint(given, probs)
    assert joint.sum() == pytest.approx(len(given))
    assert np.trace(joint) / joint.sum() > 0.95
    assert len(la.find_label_issues(given, probs).index) < 0.03 * len(given)


def test_thresholds_are_the_mean_self_confidence_and_an_absent_class_gets_one():
    labels = np.array([0, 0, 1])
    probs = np.array([[0.8, 0.2, 0.0], [0.6, 0.4, 0.0], [0.3, 0.7, 0.0]])
    assert la.class_thresholds(labels, probs) == pytest.approx([0.7, 0.7, 1.0])


@pytest.mark.parametrize(
    "labels, probs",
    [
        (np.array([0, 1]), np.ones((3, 2)) / 2),  # counts differ
        (np.array([0, 2]), np.ones((2, 2)) / 2),  # label outside the classes
        (np.array([0, 1]), np.array([[np.nan, 1], [0.5, 0.5]])),
        (np.array([], dtype=int), np.zeros((0, 2))),
    ],
)
def test_bad_input_is_a_clear_error(labels, probs):
    with pytest.raises(DataError, match="label audit"):
        la.find_label_issues(labels, probs)


def test_area_under_the_margin_separates_mislabelled_samples_by_the_threshold_samples():
    rng = np.random.default_rng(0)
    epochs, n = 8, 1000
    wrong = rng.choice(n, 50, replace=False)
    ramp = np.linspace(0.5, 4, epochs)[:, None]
    per_epoch = ramp + rng.normal(0, 0.5, (epochs, n))
    per_epoch[:, wrong] = -0.5 * ramp + rng.normal(0, 0.5, (epochs, len(wrong)))
    threshold_samples = (-0.5 * ramp + rng.normal(0, 0.5, (epochs, 40))).mean(axis=0)
    aum = la.area_under_margin(per_epoch)
    flagged = np.flatnonzero(aum <= la.aum_threshold(threshold_samples))
    precision, recall = la.precision_recall(flagged, wrong)
    assert precision >= 0.9 and recall >= 0.9


def test_margin_is_the_assigned_logit_minus_the_best_other():
    logits = np.array([[2.0, 1.0, 0.5], [0.0, 3.0, 1.0]])
    assert la.margins(logits, np.array([0, 0])) == pytest.approx([1.0, -3.0])
