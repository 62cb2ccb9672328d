"""Fixtures of the serving tests."""

from __future__ import annotations

import pytest

from tests.helpers import DETECTOR_CLASSES, DETECTOR_SCORES, detector_onnx


@pytest.fixture(scope="session")
def detector(tmp_path_factory):
    """(ONNX path, classes, scores): the real detector set to find one whole-image box per class (built once: the
    build and export take seconds)."""
    path = detector_onnx(tmp_path_factory.mktemp("detector") / "det.onnx", DETECTOR_CLASSES, DETECTOR_SCORES)
    return path, DETECTOR_CLASSES, DETECTOR_SCORES
