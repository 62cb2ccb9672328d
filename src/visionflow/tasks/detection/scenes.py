"""The bundled detection dataset: Fashion-MNIST items placed on textured, unevenly lit canvases, with exact boxes.

No download: the items come from the Fashion-MNIST training images that the classification default already uses
(visionflow.data.fashion_mnist). Each scene holds 0 to max_objects items at random scales and places; a box is the
tight extent of its item's visible pixels (each item's pixels are disjoint from every other's, and boxes overlap
little), so every pixel outside all boxes is the bare canvas. Everything about scene i comes from (seed, i) alone:
the first k scenes are the same whatever n, and a different seed gives new scenes.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from visionflow.data.fashion_mnist import FASHION_MNIST_CLASSES, Progress, load_fashion_mnist, locate_fashion_mnist

# Reused from the camera-like photos so both bundled sources share one look of surface and light.
from visionflow.data.photos import _background, _lighting
from visionflow.tasks.detection.formats import ImageRecord, write_coco

SCENES_SOURCE = "fashion-mnist-scenes"
GENERATOR_VERSION = 1  # part of ingest's record of what raw_dir holds: bump when a seed's scenes change
TRAIN_ITEMS = 60_000  # load_fashion_mnist lists the training images first; scenes draw only from those
NEGATIVE_SHARE = 0.05  # scenes with no item: images without boxes are part of real detection data
SCALE = (0.14, 0.47)  # an item's longer side as a share of the canvas side (18-60 px on 128 px canvases)
MAX_BOX_IOU = 0.3  # boxes may overlap this much at most (the items' pixels never do)
_INK = 0.08  # an item pixel fainter than this (after scaling) is background, not cloth

Box = tuple[float, float, float, float, str]


@dataclass(frozen=True)
class Scene:
    image: np.ndarray  # (size, size, 3) uint8 RGB
    canvas: np.ndarray  # the same scene without its items
    masks: tuple[np.ndarray, ...]  # each item's visible pixels, (size, size) bool, in the order of boxes
    boxes: tuple[Box, ...]


def _item(rng: np.random.Generator, item: np.ndarray, size: int) -> np.ndarray:
    """The item scaled to a random size and aspect: its coverage in [0, 1], zero where there is no cloth."""
    side = rng.uniform(*SCALE) * size
    aspect = rng.uniform(0.8, 1.25)
    w, h = max(4, round(side * min(1.0, aspect))), max(4, round(side * min(1.0, 1 / aspect)))
    tile = cv2.resize(item.astype(np.float32) / 255.0, (w, h), interpolation=cv2.INTER_LINEAR)
    alpha = np.clip(tile * 2.5, 0, 1)  # the item's dim edges are still cloth
    alpha[tile < _INK] = 0
    return alpha


def _iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    ix = max(0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def _place(
    rng: np.random.Generator, alpha: np.ndarray, size: int, taken: np.ndarray, boxes: list[tuple[int, int, int, int]]
) -> tuple[int, int, tuple[int, int, int, int]] | None:
    """Where the item's tile goes (x0, y0) and its tight box, or None when no free place was found."""
    ys, xs = np.nonzero(alpha)
    if len(xs) == 0:
        return None
    h, w = alpha.shape
    for _ in range(12):
        x0, y0 = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
        box = (x0 + int(xs.min()), y0 + int(ys.min()), int(xs.max() - xs.min()) + 1, int(ys.max() - ys.min()) + 1)
        if any(_iou(box, b) > MAX_BOX_IOU for b in boxes):
            continue
        if not (taken[y0 : y0 + h, x0 : x0 + w] & (alpha > 0)).any():
            return x0, y0, box
    return None


def scene(seed: int, index: int, size: int, max_objects: int, items: np.ndarray, labels: np.ndarray) -> Scene:
    """Scene `index` of `seed`: its image, its bare canvas, its items' pixels and their boxes."""
    rng = np.random.default_rng([seed, index])
    light = _lighting(rng, size, size)
    canvas = _background(rng, size, size) * light
    image = canvas.copy()
    n = 0 if rng.random() < NEGATIVE_SHARE else int(rng.integers(1, max_objects + 1))
    taken = np.zeros((size, size), bool)
    boxes: list[tuple[int, int, int, int]] = []
    names: list[str] = []
    masks: list[np.ndarray] = []
    for _ in range(n):
        k = int(rng.integers(0, len(items)))
        alpha = _item(rng, items[k], size)
        placed = _place(rng, alpha, size, taken, boxes)
        if placed is None:
            continue
        x0, y0, box = placed
        window = np.s_[y0 : y0 + alpha.shape[0], x0 : x0 + alpha.shape[1]]
        colour = rng.uniform(0.05, 1.0, 3).astype(np.float32)
        a = alpha[..., None]
        image[window] = image[window] * (1 - a) + colour * (0.35 + 0.65 * a) * light[window] * a
        mask = np.zeros((size, size), bool)
        mask[window] = alpha > 0
        taken |= mask
        masks.append(mask)
        boxes.append(box)
        names.append(FASHION_MNIST_CLASSES[int(labels[k])])
    return Scene(
        _to_u8(image),
        _to_u8(canvas),
        tuple(masks),
        tuple((float(x), float(y), float(w), float(h), c) for (x, y, w, h), c in zip(boxes, names)),
    )


def _to_u8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x * 255), 0, 255).astype(np.uint8)


def training_items(cache_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """The Fashion-MNIST training images and their labels (the test images are never drawn into scenes)."""
    images, labels = load_fashion_mnist(locate_fashion_mnist(cache_dir))
    return images[:TRAIN_ITEMS], labels[:TRAIN_ITEMS]


def render(
    n: int, *, seed: int, size: int, max_objects: int, cache_dir: Path
) -> Iterator[tuple[np.ndarray, list[Box]]]:
    """n scenes: (size x size x 3 uint8 RGB image, [(x, y, w, h, class_name), ...]) in COCO pixel boxes."""
    items, labels = training_items(Path(cache_dir))
    for i in range(n):
        s = scene(seed, i, size, max_objects, items, labels)
        yield s.image, list(s.boxes)


def scene_name(index: int) -> str:
    return f"scene_{index:06d}.png"


def write_scenes(
    out_dir: Path, *, n: int, seed: int, size: int, max_objects: int, cache_dir: Path, progress: Progress | None = None
) -> Path:
    """Write n scenes as out_dir/images/scene_<i>.png and their COCO out_dir/annotations.json (returned), with
    every Fashion-MNIST class as a category (1-based, sorted names: the package's contract)."""
    out_dir = Path(out_dir)
    images_dir = out_dir / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for i, (image, boxes) in enumerate(render(n, seed=seed, size=size, max_objects=max_objects, cache_dir=cache_dir)):
        path = images_dir / scene_name(i)
        Image.fromarray(image, mode="RGB").save(path, compress_level=1)
        records.append(ImageRecord(path, path.name, tuple(boxes), size, size))
        if progress and ((i + 1) % 500 == 0 or i + 1 == n):
            progress(i + 1, n)
    return write_coco(out_dir / "annotations.json", records, sorted(FASHION_MNIST_CLASSES))
