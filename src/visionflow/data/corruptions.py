"""Named image corruptions, each with five severities: the one registry behind the robustness suite (evaluation)
and the drift simulator's shifts (simulated production batches).

A corruption maps severity 1..5 to its one parameter (fixed values, no random ranges) and makes, for that parameter
and a random generator, the function that corrupts one uint8 image. Any randomness comes from the generator, so
the same seed gives the same pixels every time.

The two suites keep their own tables because they answer different questions: ROBUSTNESS measures a model under
the corruptions albumentations implements (at the model's input), SHIFTS writes the images a changed camera or
lighting would send (files as received, colour casts and upscaling included). A name such as "blur" can be in both,
with each suite's own strength.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

from visionflow.errors import DataError

ImageFn = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Corruption:
    severities: tuple[float, ...]  # severity 1..5 -> the parameter
    make: Callable[[float, np.random.Generator], ImageFn]  # (parameter, randomness) -> one image's corruption


def corrupter(
    suite: dict[str, Corruption], name: str, severity: int, rng: np.random.Generator, kind: str = "corruption"
) -> ImageFn:
    """The function that applies `name` at `severity` to one image; `kind` is what the suite's user calls one."""
    if name not in suite:
        raise DataError(f"unknown {kind} {name!r}: choose one of {', '.join(suite)}")
    if not 1 <= severity <= 5:
        raise DataError(f"severity must be 1..5, got {severity}")
    return suite[name].make(suite[name].severities[severity - 1], rng)


# --- the robustness suite: albumentations transforms -----------------------------------------------------------


def _albumentation(build: Callable[[float], object]) -> Callable[[float, np.random.Generator], ImageFn]:
    def make(value: float, rng: np.random.Generator) -> ImageFn:
        import albumentations as A  # here: the simulator and the serving image never load it

        tf = A.Compose([build(value)])
        # Compose(seed=s) is default_rng(s) for the pixels' randomness; the Python generator only decides p=1 draws.
        tf.set_random_state(rng, random.Random(0))
        return lambda img: tf(image=img)["image"]

    return make


def _brightness(v: float):
    import albumentations as A

    return A.RandomBrightnessContrast(brightness_limit=(v, v), contrast_limit=(0, 0), p=1)


def _contrast(v: float):
    import albumentations as A

    return A.RandomBrightnessContrast(brightness_limit=(0, 0), contrast_limit=(v, v), p=1)


def _gaussian_blur(sigma: float):
    import albumentations as A

    k = max(3, int(2 * round(3 * sigma) + 1))
    return A.GaussianBlur(blur_limit=(k, k), sigma_limit=(sigma, sigma), p=1)


def _gauss_noise(std: float):
    import albumentations as A

    return A.GaussNoise(std_range=(std, std), mean_range=(0, 0), p=1)


def _compression(quality: float):
    import albumentations as A

    return A.ImageCompression(quality_range=(int(quality), int(quality)), p=1)


def _pixelate(scale: float):
    import albumentations as A

    return A.Downscale(
        scale_range=(scale, scale), interpolation_pair={"downscale": cv2.INTER_AREA, "upscale": cv2.INTER_NEAREST}, p=1
    )


ROBUSTNESS: dict[str, Corruption] = {
    "brightness": Corruption((-0.1, -0.2, -0.3, -0.4, -0.5), _albumentation(_brightness)),  # darker lighting
    "contrast": Corruption((-0.15, -0.3, -0.45, -0.6, -0.7), _albumentation(_contrast)),  # washed-out contrast
    "blur": Corruption((0.5, 0.8, 1.1, 1.5, 2.0), _albumentation(_gaussian_blur)),  # Gaussian sigma in pixels
    "noise": Corruption((0.03, 0.06, 0.09, 0.13, 0.18), _albumentation(_gauss_noise)),  # std, fraction of range
    "jpeg": Corruption((80, 60, 40, 25, 10), _albumentation(_compression)),  # JPEG quality
    "pixelate": Corruption((0.85, 0.7, 0.55, 0.45, 0.35), _albumentation(_pixelate)),  # downscale, then back up
}


# --- the simulator's shifts: pixel arithmetic in float, rounded to uint8 once ------------------------------------

PixelOp = Callable[[np.ndarray, float, np.random.Generator], np.ndarray]


def _pixels(op: PixelOp) -> Callable[[float, np.random.Generator], ImageFn]:
    def make(value: float, rng: np.random.Generator) -> ImageFn:
        return lambda img: np.clip(op(img.astype(np.float32), value, rng), 0, 255).round().astype(np.uint8)

    return make


def _color_cast(f: np.ndarray, s: float, _rng: np.random.Generator) -> np.ndarray:
    rgb = np.repeat(f[..., None], 3, axis=2) if f.ndim == 2 else f
    tint = np.array([255.0, 160.0, 60.0], dtype=np.float32)
    return rgb * (1 - s) + (rgb / 255.0) * tint * s + tint * s * 0.15


def _upscale(f: np.ndarray, s: float, _rng: np.random.Generator) -> np.ndarray:
    h, w = f.shape[:2]
    return cv2.resize(f, (round(w * s), round(h * s)), interpolation=cv2.INTER_CUBIC)


# Chosen so that severity 1 is barely visible and 5 is severe. HxW grey or HxWx3 in; color_cast gives HxWx3.
SHIFTS: dict[str, Corruption] = {
    "none": Corruption((0, 0, 0, 0, 0), _pixels(lambda f, s, rng: f)),
    # lighting: pixel values scaled down
    "darker": Corruption((0.8, 0.65, 0.5, 0.4, 0.3), _pixels(lambda f, s, rng: f * s)),
    # lighting: blend towards white (over-exposure)
    "brighter": Corruption((0.1, 0.2, 0.3, 0.4, 0.5), _pixels(lambda f, s, rng: f + (255.0 - f) * s)),
    # focus / motion: Gaussian sigma in pixels at 28 px
    "blur": Corruption((0.6, 0.9, 1.2, 1.6, 2.2), _pixels(lambda f, s, rng: cv2.GaussianBlur(f, (0, 0), sigmaX=s))),
    # compression: JPEG quality; the pixels are untouched, the batch's files are written as JPEG at this quality
    "jpeg": Corruption((60, 40, 25, 15, 8), _pixels(lambda f, s, rng: f)),
    # sensor noise: Gaussian std in grey levels
    "noise": Corruption((6, 10, 16, 24, 32), _pixels(lambda f, s, rng: f + rng.normal(0, s, f.shape))),
    # white balance: blend towards an orange tint (RGB files)
    "color_cast": Corruption((0.1, 0.2, 0.3, 0.45, 0.6), _pixels(_color_cast)),
    # a new camera: upscaled by this factor, bicubic
    "resolution": Corruption((1.5, 2.0, 2.5, 3.0, 4.0), _pixels(_upscale)),
}
