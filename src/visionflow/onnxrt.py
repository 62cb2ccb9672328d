"""ONNX Runtime sessions, batched model outputs and softmax: the one inference helper that serving, the drift check
and promotion share, without torch."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from visionflow.errors import VisionflowError


def ort_session(path: Path, threads: int | None = None, device: str = "cpu"):
    """An ONNX Runtime session on `device` (see `providers`)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), sess_options=opts, providers=providers(device))


def providers(device: str) -> list[str]:
    """ONNX Runtime's providers for `device`: "cpu"; "cuda", the CUDA provider, which must be there (a server set
    to serve on the GPU must not quietly serve on CPU); or "auto", CUDA when this ONNX Runtime has it (the
    onnxruntime-gpu build) and a GPU is there, else CPU: the pipeline's batch inference (drift embeddings,
    promotion comparisons)."""
    import onnxruntime as ort

    if device in ("cuda", "auto") and "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "cuda":
        raise VisionflowError(
            f"serve.device is cuda, but this ONNX Runtime ({ort.__version__}) has no CUDA provider: install "
            "onnxruntime-gpu on a machine with an NVIDIA GPU, or set serve.device: cpu"
        )
    return ["CPUExecutionProvider"]


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
