"""Camera-like photos made from Fashion-MNIST: the photo-size path for data.source, the tests and the benchmarks.

Each photo is one Fashion-MNIST item (so its label is real) composited onto a textured, unevenly lit background,
with a soft shadow, sensor noise (shot noise grows with the signal) and a slight defocus, then stored as a camera
would: a JPEG at quality 75-95, some with an EXIF orientation (the pixels stored turned, so that applying the
orientation gives the upright photo), some CMYK JPEGs, some 16-bit PNGs (JPEG is 8-bit). Everything about photo i
comes from (seed, item index) alone, so a photo is the same bytes whichever worker makes it and however many.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from visionflow.data.pools import default_workers, pool_worker_setup

PHOTOS_SOURCE = "fashion-mnist-photos"
GENERATOR_VERSION = 1  # part of ingest's record of what raw_dir holds: bump when a seed's photos change
Progress = Callable[[int, int], None]

# (width, height) and how often: most photos 1280x960, some portrait, some larger
SIZES: tuple[tuple[tuple[int, int], float], ...] = (
    ((1280, 960), 0.6),
    ((960, 1280), 0.1),
    ((1600, 1200), 0.15),
    ((2048, 1536), 0.12),
    ((4000, 3000), 0.03),
)
# how a photo is stored, and how often
KINDS: tuple[tuple[str, float], ...] = (("jpeg", 0.8), ("exif", 0.1), ("cmyk", 0.05), ("png16", 0.05))
JPEG_ONLY: tuple[tuple[str, float], ...] = (("jpeg", 0.85), ("exif", 0.1), ("cmyk", 0.05))

# EXIF orientations a camera writes (upright, upside down, turned right, turned left) -> the transpose that turns
# the upright photo into the stored pixels (the inverse of what a viewer applies)
_STORED = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}
_NOISE_BANK = (1400, 1400)
PNG16_MAX_PIXELS = 2_000_000  # rows, columns of the shared unit-noise field each photo takes a window of


@dataclass(frozen=True)
class PhotoSpec:
    """What photo number `item` looks like and how it is stored: drawn from (seed, item) only."""

    item: int
    label: int
    width: int
    height: int
    kind: str
    quality: int
    orientation: int  # EXIF orientation of a stored "exif" photo; 1 otherwise

    @property
    def suffix(self) -> str:
        return ".png" if self.kind == "png16" else ".jpg"


def _pick(rng: np.random.Generator, table: tuple[tuple[object, float], ...]) -> object:
    weights = np.array([w for _, w in table], dtype=np.float64)
    return table[int(rng.choice(len(table), p=weights / weights.sum()))][0]


def photo_spec(seed: int, item: int, label: int, sizes=SIZES, kinds=KINDS) -> PhotoSpec:
    rng = np.random.default_rng([seed, item, 0])
    width, height = _pick(rng, sizes)
    kind = _pick(rng, kinds)
    if kind == "png16" and width * height > PNG16_MAX_PIXELS:
        # sensor noise leaves a 16-bit PNG at ~6 bytes a pixel: 4000x3000 would be 60 MB, over validate.max_file_mb
        width, height = (1280, 960) if width >= height else (960, 1280)
    orientation = int(rng.choice(list(_STORED))) if kind == "exif" else 1
    return PhotoSpec(
        item=item,
        label=label,
        width=int(width),
        height=int(height),
        kind=str(kind),
        quality=int(rng.integers(75, 96)),
        orientation=orientation,
    )


_bank: np.ndarray | None = None


def _noise_bank() -> np.ndarray:
    """Unit Gaussian noise, made once per process (fixed seed): each photo reads a window of it at an offset of its
    own, which costs a copy instead of drawing millions of normals per photo."""
    global _bank
    if _bank is None:
        _bank = np.random.default_rng(12345).standard_normal((*_NOISE_BANK, 3), dtype=np.float32)
    return _bank


def _smooth_field(rng: np.random.Generator, w: int, h: int, cells: int, channels: int = 1) -> np.ndarray:
    """A smooth random field in [0, 1] of size (h, w, channels): a coarse random grid, upscaled."""
    grid = rng.random((max(2, cells * h // w), cells, channels), dtype=np.float32)
    out = cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)
    return out.reshape(h, w, channels)


def _background(rng: np.random.Generator, lw: int, lh: int) -> np.ndarray:
    """Albedo of a surface (table top, fabric, wall), float32 (lh, lw, 3) in [0, 1]: a base colour, blotches and a
    grain or weave."""
    base = rng.uniform(0.25, 0.85, 3).astype(np.float32) * rng.uniform(0.6, 1.0)
    # blotches mostly in brightness, a little in hue
    tex = 0.7 + 0.5 * _smooth_field(rng, lw, lh, int(rng.integers(4, 16))) + 0.1 * _smooth_field(rng, lw, lh, 5, 3)
    yy, xx = np.mgrid[0:lh, 0:lw].astype(np.float32)
    angle, freq = rng.uniform(0, np.pi), rng.uniform(0.08, 0.3)
    warp = 6 * _smooth_field(rng, lw, lh, 6)[..., 0]
    grain = 1 + rng.uniform(0.03, 0.12) * np.sin(freq * (xx * np.cos(angle) + yy * np.sin(angle)) + warp)
    return np.clip(base * tex * grain[..., None], 0, 1)


def _lighting(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """Uneven light over the scene, (h, w, 1): a linear falloff from one side, a lens vignette, a warm or cool cast."""
    lw, lh = max(8, w // 8), max(8, h // 8)
    yy, xx = np.mgrid[0:lh, 0:lw].astype(np.float32)
    yy, xx = yy / lh - 0.5, xx / lw - 0.5
    angle = rng.uniform(0, 2 * np.pi)
    ramp = 1 + rng.uniform(0.2, 0.6) * (xx * np.cos(angle) + yy * np.sin(angle))
    vignette = 1 - rng.uniform(0.15, 0.45) * (xx**2 + yy**2) * 2
    light = (ramp * vignette * rng.uniform(0.75, 1.15)).astype(np.float32)
    return cv2.resize(light, (w, h), interpolation=cv2.INTER_LINEAR)[..., None]


def _item_layer(rng: np.random.Generator, item: np.ndarray, w: int, h: int) -> tuple[np.ndarray, np.ndarray]:
    """The item upscaled, turned a little and placed: its colour (h, w, 3) and coverage (h, w, 1), both float32."""
    side = int(min(w, h) * rng.uniform(0.45, 0.75))
    tile = cv2.resize(item.astype(np.float32) / 255.0, (side, side), interpolation=cv2.INTER_CUBIC)
    turn = cv2.getRotationMatrix2D((side / 2, side / 2), rng.uniform(-15, 15), 1.0)
    tile = np.clip(cv2.warpAffine(tile, turn, (side, side)), 0, 1)
    x0 = int(rng.integers(0, w - side + 1))
    y0 = int(rng.integers(0, h - side + 1))
    alpha = np.zeros((h, w), np.float32)
    alpha[y0 : y0 + side, x0 : x0 + side] = np.clip(tile * 2.5, 0, 1)  # the item's dim edges are still cloth
    shade = np.zeros((h, w), np.float32)
    shade[y0 : y0 + side, x0 : x0 + side] = tile
    colour = rng.uniform(0.1, 0.95, 3).astype(np.float32)
    return (0.25 + 0.75 * shade)[..., None] * colour, alpha[..., None]


def _noise_window(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    bank = _noise_bank()
    if h <= bank.shape[0] and w <= bank.shape[1]:  # the usual case: a view, no copy
        y0, x0 = (int(rng.integers(0, n - m + 1)) for n, m in zip(bank.shape, (h, w)))
        return bank[y0 : y0 + h, x0 : x0 + w]
    rows = (int(rng.integers(0, bank.shape[0])) + np.arange(h)) % bank.shape[0]
    cols = (int(rng.integers(0, bank.shape[1])) + np.arange(w)) % bank.shape[1]
    return bank[rows[:, None], cols[None, :]]


def _optics(rng: np.random.Generator, item: np.ndarray, w: int, h: int) -> np.ndarray:
    """What the lens forms of the scene, float32 (h, w, 3) in [0, 1]: the surface, the item's shadow, the item,
    uneven light. Smooth at the sensor's scale (the item is 28 px at the source), so the caller makes it at a
    quarter of the sensor's size and upscales it."""
    scene = _background(rng, w, h)
    colour, alpha = _item_layer(rng, item, w, h)
    # a soft shadow: the item's coverage, blurred and offset towards a light outside the frame
    shadow = cv2.GaussianBlur(alpha[..., 0], (0, 0), min(w, h) * 0.02)
    dx, dy = (int(v) for v in rng.integers(-min(w, h) // 30, min(w, h) // 30 + 1, 2))
    shadow = np.roll(shadow, (dy, dx), axis=(0, 1))[..., None]
    scene *= 1 - 0.45 * shadow
    scene += alpha * (colour - scene)
    scene *= _lighting(rng, w, h)
    return scene


def render_photo(spec: PhotoSpec, item: np.ndarray, seed: int) -> np.ndarray:
    """The upright photo as float32 (h, w, 3) RGB in [0, 1], before it is quantised and stored."""
    rng = np.random.default_rng([seed, spec.item, 1])
    w, h = spec.width, spec.height
    optics = _optics(rng, item, w // 4, h // 4)
    scene = cv2.resize(optics, (w, h), interpolation=cv2.INTER_LINEAR)
    # sensor noise: read noise plus shot noise that grows with the signal (higher ISO: more of both)
    iso = rng.uniform(0.002, 0.01)  # after the in-camera denoising a JPEG has had: 0.5-4 levels at full light
    sigma = cv2.resize(iso * np.sqrt(optics.mean(axis=2) * 3 + 0.25), (w, h), interpolation=cv2.INTER_LINEAR)
    scene += _noise_window(rng, w, h) * sigma[..., None]
    return np.clip(scene, 0, 1, out=scene)


def encode_photo(spec: PhotoSpec, scene: np.ndarray) -> bytes:
    """Store the photo as spec.kind says."""
    if spec.kind == "png16":
        deep = (scene * 65535 + 0.5).astype(np.uint16)
        ok, buf = cv2.imencode(".png", np.ascontiguousarray(deep[..., ::-1]), [cv2.IMWRITE_PNG_COMPRESSION, 1])
        if not ok:
            raise RuntimeError("OpenCV could not encode a 16-bit PNG")
        return buf.tobytes()
    img = Image.fromarray(cv2.convertScaleAbs(scene, alpha=255), "RGB")  # rounded; scene is clipped to [0, 1]
    exif = Image.Exif()
    exif[0x010F], exif[0x0110] = "visionflow", "fashion-mnist-photos"  # Make, Model
    if spec.kind == "exif":
        img = img.transpose(_STORED[spec.orientation])
        exif[0x0112] = spec.orientation
    elif spec.kind == "cmyk":
        img = img.convert("CMYK")
    out = io.BytesIO()
    img.save(out, "JPEG", quality=spec.quality, exif=exif.tobytes())
    return out.getvalue()


def make_photo(spec: PhotoSpec, item: np.ndarray, seed: int) -> bytes:
    return encode_photo(spec, render_photo(spec, item, seed))


def photo_name(spec: PhotoSpec) -> str:
    """The item's index in the 70k set names the file, so the same item is always the same path."""
    return f"photo_{spec.item:05d}{spec.suffix}"


def _write_chunk(args: tuple[Path, int, list[PhotoSpec], list[str], np.ndarray]) -> int:
    out_dir, seed, specs, class_names, items = args
    for spec, item in zip(specs, items):
        path = out_dir / class_names[spec.label] / photo_name(spec)
        tmp = path.with_name(".partial-" + path.name)
        tmp.write_bytes(make_photo(spec, item, seed))
        os.replace(tmp, path)
    return len(specs)


def write_photos(
    out_dir: Path,
    images: np.ndarray,
    labels: np.ndarray,
    chosen: Iterable[int],
    class_names: list[str],
    seed: int,
    *,
    sizes=SIZES,
    kinds=KINDS,
    workers: int | None = None,
    progress: Progress | None = None,
) -> dict[str, int]:
    """One photo per chosen item into out_dir/<class>/, made by a process pool; returns the count per class."""
    specs = [photo_spec(seed, int(i), int(labels[i]), sizes, kinds) for i in chosen]
    for name in class_names:
        (Path(out_dir) / name).mkdir(parents=True, exist_ok=True)
    chunk = 16
    tasks = [
        (Path(out_dir), seed, specs[k : k + chunk], list(class_names), images[[s.item for s in specs[k : k + chunk]]])
        for k in range(0, len(specs), chunk)
    ]
    workers = min(workers or default_workers(), len(tasks)) or 1
    done = 0
    if workers == 1:
        results: Iterable[int] = map(_write_chunk, tasks)
        for n in results:
            done += n
            if progress:
                progress(done, len(specs))
    else:
        # spawn: a pool forked inside a flow run inherits its threads and locks (see datamodule._loader)
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=pool_worker_setup) as pool:
            for n in pool.map(_write_chunk, tasks):
                done += n
                if progress:
                    progress(done, len(specs))
    counts: dict[str, int] = {}
    for s in specs:
        counts[class_names[s.label]] = counts.get(class_names[s.label], 0) + 1
    return counts
