"""Corruption-robustness suite: the test split under brightness, contrast, blur, noise, JPEG and pixelation.

Each corruption has five severities; the transform for a severity is fixed (no random ranges) and the suite is
seeded, so the same model gets the same numbers every time. The corruptions live in visionflow.data.corruptions,
the registry the drift simulator's shifts come from too.
"""

from __future__ import annotations

import numpy as np

from visionflow.data.corruptions import ROBUSTNESS, corrupter

CORRUPTIONS = ROBUSTNESS
SEVERITY_TABLE: dict[str, tuple[float, ...]] = {name: c.severities for name, c in ROBUSTNESS.items()}


def corrupt_batch(images: np.ndarray, name: str, severity: int, seed: int = 0) -> np.ndarray:
    """Apply one corruption to (N, H, W, C) uint8 images; returns a new array of the same shape."""
    corrupt = corrupter(ROBUSTNESS, name, severity, np.random.default_rng(seed))
    out = np.empty_like(images)
    for i in range(len(images)):
        img = np.asarray(images[i])
        out[i] = corrupt(img if img.shape[-1] != 1 else img[..., 0]).reshape(img.shape)
    return out
