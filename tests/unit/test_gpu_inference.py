"""The pipeline's batch inference on the accelerator: out-of-memory fallback, and the device it reports."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from visionflow.config import EvaluateParams
from visionflow.training.evaluate import evaluate, in_batches, inference_device, predict_logits
from visionflow.training.model import build_net


def _limited(limit: int, calls: list[int]):
    """A batch function that fails like a GPU out of memory above `limit` images."""

    def fn(i: int, j: int) -> np.ndarray:
        calls.append(j - i)
        if j - i > limit:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory: tried a batch of {j - i}")
        return np.arange(i, j)

    return fn


@pytest.mark.parametrize("n,batch,limit", [(1000, 512, 100), (37, 64, 1), (300, 256, 255), (5, 8, 8), (0, 4, 1)])
def test_out_of_memory_falls_back_to_smaller_batches(n, batch, limit, caplog):
    calls: list[int] = []
    with caplog.at_level(logging.WARNING, logger="visionflow.training.evaluate"):
        out = in_batches(_limited(limit, calls), n, batch)
    assert np.array_equal(np.concatenate(out) if out else np.arange(0), np.arange(n))
    assert all(len(b) <= limit for b in out)
    halvings = [r for r in caplog.records if "out of memory" in r.getMessage()]
    assert bool(halvings) == (min(batch, n) > limit)
    if halvings:
        assert "retrying with batches of" in halvings[-1].getMessage()
        # the smaller size is kept: after the last halving no batch is tried above the limit again
        assert max(calls[calls.index(max(c for c in calls if c <= limit)) :]) <= limit


def test_out_of_memory_with_one_image_is_raised():
    with pytest.raises(torch.cuda.OutOfMemoryError):
        in_batches(_limited(0, []), 10, 4)


def test_predict_logits_gives_the_same_logits_whatever_the_batch():
    net = build_net("test_resnet", 3, 1)
    images = np.random.default_rng(0).integers(0, 256, (33, 16, 16, 1), dtype=np.uint8)
    whole = predict_logits(net, images, batch_size=64, device="cpu")
    for b in (1, 7, 32):
        np.testing.assert_allclose(predict_logits(net, images, batch_size=b, device="cpu"), whole, atol=1e-5)


def test_evaluation_runs_on_the_inference_device_and_says_so(tmp_path):
    net = build_net("test_resnet", 3, 1)
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (24, 16, 16, 1), dtype=np.uint8)
    labels = rng.integers(0, 3, 24)
    cfg = EvaluateParams(severities=[1], corruptions=["noise", "blur"], robustness_images=12)
    res = evaluate(net=net, images=images, labels=labels, classes=["a", "b", "c"], cfg=cfg, seed=0, report_dir=tmp_path)
    payload = json.loads((tmp_path / "evaluation.json").read_text())
    assert payload["device"] == inference_device() == ("cuda" if torch.cuda.is_available() else "cpu")
    expected = (predict_logits(net, images, device="cpu").argmax(1) == labels).mean()
    assert res.test_accuracy == pytest.approx(expected)
