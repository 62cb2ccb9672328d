"""Data tier: the real bundled dataset from Debian's dataset-fashion-mnist package."""

import numpy as np
import pytest
from PIL import Image

from visionflow.data.fashion_mnist import FASHION_MNIST_CLASSES, balanced_indices
from visionflow.data.ingest import ingest


def test_balanced_indices_even_and_deterministic():
    labels = np.repeat(np.arange(3), [5, 50, 50])
    a = balanced_indices(labels, 30, seed=1)
    assert np.array_equal(a, balanced_indices(labels, 30, seed=1))
    counts = np.bincount(labels[a])
    assert counts.tolist() == [5, 13, 12] or sorted(counts.tolist()) == [5, 12, 13]
    assert len(balanced_indices(labels, None, seed=0)) == 105


@pytest.mark.slow
def test_ingest_real_fashion_mnist(tmp_path):
    res = ingest(source="fashion-mnist", raw_dir=tmp_path / "raw", max_images=300, seed=0, cache_dir=tmp_path / "cache")
    assert res.n_images == 300 and set(res.classes) == set(FASHION_MNIST_CLASSES)
    assert set(res.classes.values()) == {30}
    img = Image.open(next((tmp_path / "raw" / "trouser").iterdir()))
    assert img.size == (28, 28) and img.mode == "L"
    again = ingest(
        source="fashion-mnist", raw_dir=tmp_path / "raw", max_images=300, seed=0, cache_dir=tmp_path / "cache"
    )
    assert again.skipped
