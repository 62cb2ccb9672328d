"""ONNX Runtime sessions, batched model outputs and softmax: the one inference helper that serving, the drift check
and promotion share, without torch."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


def ort_session(path: Path, threads: int | None = None, accelerated: bool = False):
    """accelerated: the pipeline's batch inference (drift embeddings, promotion comparisons) runs on CUDA when
    this ONNX Runtime has its CUDA provider (the onnxruntime-gpu build) and a GPU is there; serving stays on CPU."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    providers = ["CPUExecutionProvider"]
    if accelerated and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    return ort.InferenceSession(str(path), sess_options=opts, providers=providers)


def ort_outputs(
    session, images: np.ndarray, outputs: Sequence[str] = ("logits",), batch_size: int | None = 256
) -> list[np.ndarray]:
    """The named outputs for uint8 NHWC images (the graph takes NCHW), run `batch_size` images at a time (None:
    all in one call) and concatenated: one array per name, in the order given."""
    images = np.asarray(images)
    step = batch_size or max(len(images), 1)
    runs = [
        session.run(list(outputs), {"image": np.ascontiguousarray(images[i : i + step].transpose(0, 3, 1, 2))})
        for i in range(0, len(images), step)
    ]
    return [np.concatenate([run[k] for run in runs]) for k in range(len(outputs))]


def ort_logits(session, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    return ort_outputs(session, images, ("logits",), batch_size)[0]


def softmax(logits: np.ndarray) -> np.ndarray:
    """Class probabilities from a (n, classes) array of logits."""
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)
