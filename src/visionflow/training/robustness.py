"""Corruption-robustness suite: the test split under brightness, contrast, blur, noise, JPEG and pixelation.

Each corruption has five severities; the transform for a severity is fixed (no random ranges) and the suite is
seeded, so the same model gets the same numbers every time. The drift simulator reuses these corruptions.
"""

from __future__ import annotations

from collections.abc import Callable

import albumentations as A
import cv2
import numpy as np

# Severity 1..5 -> the one parameter of each corruption.
SEVERITY_TABLE: dict[str, tuple[float, ...]] = {
    "brightness": (-0.1, -0.2, -0.3, -0.4, -0.5),      # darker lighting (fraction of full range)
    "contrast": (-0.15, -0.3, -0.45, -0.6, -0.7),      # washed-out contrast
    "blur": (0.5, 0.8, 1.1, 1.5, 2.0),                  # Gaussian sigma in pixels
    "noise": (0.03, 0.06, 0.09, 0.13, 0.18),            # sensor noise std, fraction of full range
    "jpeg": (80, 60, 40, 25, 10),                       # JPEG quality
    "pixelate": (0.85, 0.7, 0.55, 0.45, 0.35),          # downscale factor before scaling back up
}


def _brightness(v: float) -> A.BasicTransform:
    return A.RandomBrightnessContrast(brightness_limit=(v, v), contrast_limit=(0, 0), p=1)


def _contrast(v: float) -> A.BasicTransform:
    return A.RandomBrightnessContrast(brightness_limit=(0, 0), contrast_limit=(v, v), p=1)


def _blur(sigma: float) -> A.BasicTransform:
    k = max(3, int(2 * round(3 * sigma) + 1))
    return A.GaussianBlur(blur_limit=(k, k), sigma_limit=(sigma, sigma), p=1)


def _noise(std: float) -> A.BasicTransform:
    return A.GaussNoise(std_range=(std, std), mean_range=(0, 0), p=1)


def _jpeg(quality: float) -> A.BasicTransform:
    return A.ImageCompression(quality_range=(int(quality), int(quality)), p=1)


def _pixelate(scale: float) -> A.BasicTransform:
    return A.Downscale(scale_range=(scale, scale),
                       interpolation_pair={"downscale": cv2.INTER_AREA, "upscale": cv2.INTER_NEAREST}, p=1)


CORRUPTIONS: dict[str, Callable[[float], A.BasicTransform]] = {
    "brightness": _brightness, "contrast": _contrast, "blur": _blur, "noise": _noise, "jpeg": _jpeg,
    "pixelate": _pixelate,
}


def corruption(name: str, severity: int, seed: int = 0) -> A.Compose:
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; known: {sorted(CORRUPTIONS)}")
    if not 1 <= severity <= 5:
        raise ValueError("severity must be 1..5")
    return A.Compose([CORRUPTIONS[name](SEVERITY_TABLE[name][severity - 1])], seed=seed)


def corrupt_batch(images: np.ndarray, name: str, severity: int, seed: int = 0) -> np.ndarray:
    """Apply one corruption to (N, H, W, C) uint8 images; returns a new array of the same shape."""
    tf = corruption(name, severity, seed)
    out = np.empty_like(images)
    for i in range(len(images)):
        img = np.asarray(images[i])
        res = tf(image=img if img.shape[-1] != 1 else img[..., 0])["image"]
        out[i] = res.reshape(img.shape)
    return out
