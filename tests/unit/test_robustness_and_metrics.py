import numpy as np
import pytest

from visionflow.training.evaluate import classification_metrics
from visionflow.training.robustness import CORRUPTIONS, SEVERITY_TABLE, corrupt_batch


@pytest.fixture
def images():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:28, 0:28]
    base = (np.sin(xx / 3) * 60 + 128 + np.cos(yy / 4) * 40).astype(np.float64)
    return np.stack(
        [np.clip(base + rng.normal(0, 5, base.shape), 0, 255).astype(np.uint8)[..., None] for _ in range(8)]
    )


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_corruption_deterministic_and_monotone(images, name):
    a = corrupt_batch(images, name, 3, seed=5)
    b = corrupt_batch(images, name, 3, seed=5)
    assert a.shape == images.shape and a.dtype == np.uint8
    assert np.array_equal(a, b), "the suite must give the same images every run"
    damage = [np.abs(corrupt_batch(images, name, s, seed=5).astype(float) - images).mean() for s in (1, 3, 5)]
    assert 0 < damage[0] < damage[2], damage


def test_every_corruption_has_five_severities():
    assert set(SEVERITY_TABLE) == set(CORRUPTIONS)
    assert all(len(v) == 5 for v in SEVERITY_TABLE.values())


def test_classification_metrics_known_values():
    logits = np.array([[5, 0, 0], [0, 5, 0], [0, 5, 0], [0, 0, 5]], dtype=np.float32)
    labels = np.array([0, 1, 2, 2])
    m = classification_metrics(logits, labels, ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["per_class"]["c"]["recall"] == pytest.approx(0.5)
    assert m["per_class"]["b"]["precision"] == pytest.approx(0.5)
    assert m["confusion"].tolist() == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]
    assert 0 < m["ece"] < 1
