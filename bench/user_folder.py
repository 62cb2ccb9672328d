"""A realistic "own folder of images", as a first-time user brings it: `python -m bench.user_folder DIR`.

One sub-folder per class; RGB images of mixed sizes, aspect ratios and formats (JPEG and PNG, a few greyscale),
plus the debris real folders carry: a truncated JPEG, a zero-byte file, a text file named .jpg, and three
symlinks (one to an image inside the folder, one to a file outside it, one dangling). The classes are learnable:
each has its own hue and stripe pattern (orientation and frequency), under random phase, brightness and noise, so
a small model trained at 28 px separates them well above chance.

The defaults (10 classes x 180 images + 6 odd entries = 1,806 files) are the size of issue 21's folder; tests use
the same function with fewer, smaller images.
"""

from __future__ import annotations

import argparse
import colorsys
import os
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("apple", "bridge", "cloud", "desert", "forest", "glacier", "harbour", "meadow", "street", "volcano")
# Outside every folder this writes: the symlink that points out of the source root.
OUTSIDE_TARGET = "/etc/hostname"


def class_image(rng: np.random.Generator, k: int, n_classes: int, width: int, height: int) -> np.ndarray:
    """An RGB uint8 image of class k: hue k/n, stripes at angle and frequency set by k, random phase and noise."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    scale = min(width, height)
    angle = np.pi * (k % 4) / 4 + rng.normal(0, 0.08)
    freq = (2 + k % 3 * 1.5) / scale * 2 * np.pi  # 2, 3.5 or 5 stripes across the short side
    stripes = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * freq + rng.uniform(0, 2 * np.pi))
    hue = (k / n_classes + rng.normal(0, 0.015)) % 1.0
    rgb = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.55, 0.9), 1.0))
    value = rng.uniform(0.55, 0.95) * (0.6 + 0.4 * stripes[..., None])
    img = value * rgb * 255 + rng.normal(0, 12, (height, width, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _save(img: Image.Image, path_stem: Path, rng: np.random.Generator) -> Path:
    if rng.random() < 0.6:
        path = path_stem.with_suffix(".jpg")
        img.save(path, "JPEG", quality=int(rng.integers(70, 96)))
    else:
        path = path_stem.with_suffix(".png")
        img.save(path, "PNG")
    return path


def make_user_folder(
    root: Path,
    *,
    per_class: int = 180,
    n_classes: int = 10,
    min_side: int = 40,
    max_side: int = 160,
    grey_fraction: float = 0.02,
    debris: bool = True,
    symlinks: bool = True,
    seed: int = 0,
) -> Path:
    """Write the folder under `root` (created) and return it; deterministic for a seed."""
    if not 1 <= n_classes <= len(CLASSES):
        raise ValueError(f"n_classes must be 1..{len(CLASSES)}")
    rng = np.random.default_rng(seed)
    root = Path(root)
    written: list[Path] = []
    for k, name in enumerate(CLASSES[:n_classes]):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for j in range(per_class):
            w, h = (int(v) for v in rng.integers(min_side, max_side + 1, size=2))
            img = Image.fromarray(class_image(rng, k, n_classes, w, h), "RGB")
            if rng.random() < grey_fraction:
                img = img.convert("L")
            written.append(_save(img, folder / f"IMG_{k:02d}{j:04d}", rng))
    first = root / CLASSES[0]
    if debris:
        jpeg = next(p for p in written if p.suffix == ".jpg")
        (first / "truncated.jpg").write_bytes(jpeg.read_bytes()[: max(64, jpeg.stat().st_size // 3)])
        (first / "empty.png").write_bytes(b"")
        (root / CLASSES[min(1, n_classes - 1)] / "notes.jpg").write_text("camera settings: f/2.8, 1/250 s\n")
    if symlinks:
        inside = next(p for p in written if p.parent == first)
        (first / "copy_of_first.jpg").symlink_to(os.path.relpath(inside, first))
        (first / "outside.jpg").symlink_to(OUTSIDE_TARGET)
        (first / "dangling.jpg").symlink_to("no_such_file.jpg")
    return root


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.user_folder", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("dir", type=Path, help="folder to write (created; must be empty or absent)")
    ap.add_argument("--per-class", type=int, default=180)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-symlinks", action="store_true", help="leave the three symlinks out")
    args = ap.parse_args(argv)
    if args.dir.exists() and any(args.dir.iterdir()):
        ap.error(f"{args.dir} is not empty")
    make_user_folder(
        args.dir, per_class=args.per_class, n_classes=args.classes, seed=args.seed, symlinks=not args.no_symlinks
    )
    n = sum(1 for _ in args.dir.rglob("*") if not _.is_dir())
    print(
        f"{args.dir}: {args.classes} classes, {n} files (good images, 3 broken files"
        f"{', 3 symlinks' if not args.no_symlinks else ''})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
