"""ONNX Runtime sessions and batched logits: what serving, the drift check and promotion need, without torch."""

from __future__ import annotations

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


def ort_logits(session, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    out = []
    for i in range(0, len(images), batch_size):
        x = np.ascontiguousarray(np.asarray(images[i:i + batch_size]).transpose(0, 3, 1, 2))
        out.append(session.run(["logits"], {"image": x})[0])
    return np.concatenate(out)
