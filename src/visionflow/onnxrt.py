"""ONNX Runtime sessions and batched logits: what serving, the drift check and promotion need, without torch."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def ort_session(path: Path, threads: int | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def ort_logits(session, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    out = []
    for i in range(0, len(images), batch_size):
        x = np.ascontiguousarray(np.asarray(images[i:i + batch_size]).transpose(0, 3, 1, 2))
        out.append(session.run(["logits"], {"image": x})[0])
    return np.concatenate(out)
