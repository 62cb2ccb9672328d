"""Fashion-MNIST, the bundled default dataset: found in (or unpacked from) Debian's `dataset-fashion-mnist`
package, read from its idx files, and written to raw_dir as PNGs (`fashion-mnist`) or as camera-like photos
(`fashion-mnist-photos`, see visionflow.data.photos). The drift simulator draws its held-out images from here too.
"""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from visionflow.data import photos
from visionflow.data.photos import Progress
from visionflow.errors import DataError

FASHION_MNIST = "fashion-mnist"
FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
FASHION_MNIST_CLASSES = (
    "tshirt_top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle_boot",
)
_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
_IDX_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


def _has_idx(folder: Path) -> bool:
    return all((folder / f).is_file() for f in _IDX_FILES)


def locate_fashion_mnist(cache_dir: Path) -> Path:
    """Find the Debian package's files, installing it (root) or unpacking the .deb (no root) when missing."""
    unpacked = cache_dir / "deb" / "usr/share/datasets/fashion-mnist"
    for candidate in (_SYSTEM_DIR, unpacked):
        if _has_idx(candidate):
            return candidate
    if shutil.which("apt-get") is None:
        raise DataError(
            f"Fashion-MNIST not found and apt-get is unavailable: install the Debian package "
            f"{FASHION_MNIST_PACKAGE}, or set data.source in params.yaml to your own folder-per-class dataset"
        )
    if os.geteuid() == 0:
        cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", FASHION_MNIST_PACKAGE]
        if subprocess.run(cmd, capture_output=True).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], capture_output=True)
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise DataError(f"apt-get install {FASHION_MNIST_PACKAGE} failed:\n{proc.stderr[-2000:]}")
        if _has_idx(_SYSTEM_DIR):
            return _SYSTEM_DIR
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        proc = subprocess.run(["apt-get", "download", FASHION_MNIST_PACKAGE], cwd=tmp, capture_output=True, text=True)
        if proc.returncode != 0:
            raise DataError(
                f"could not download {FASHION_MNIST_PACKAGE} with apt-get ({proc.stderr.strip()[-500:]}); "
                "run `apt-get update` or point data.source at your own dataset"
            )
        deb = next(Path(tmp).glob("*.deb"))
        subprocess.run(["dpkg-deb", "-x", str(deb), str(cache_dir / "deb")], check=True)
    if not _has_idx(unpacked):
        raise DataError(f"{FASHION_MNIST_PACKAGE} unpacked but its idx files are missing under {unpacked}")
    return unpacked


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as fh:
        data = fh.read()
    magic = int.from_bytes(data[:4], "big")
    ndim = magic & 0xFF
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def balanced_indices(labels: np.ndarray, max_images: int | None, seed: int) -> np.ndarray:
    """Indices of at most max_images items, spread as evenly as possible over classes, deterministic in seed."""
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    per_class = {c: rng.permutation(np.flatnonzero(labels == c)) for c in classes}
    if max_images is None or max_images >= len(labels):
        chosen = np.concatenate(list(per_class.values()))
    else:
        quota = {c: 0 for c in classes}
        remaining = max_images
        # Round-robin fill so small classes are exhausted first and the rest share what is left.
        while remaining > 0:
            open_classes = [c for c in classes if quota[c] < len(per_class[c])]
            if not open_classes:
                break
            share = max(1, remaining // len(open_classes))
            for c in open_classes:
                take = min(share, len(per_class[c]) - quota[c], remaining)
                quota[c] += take
                remaining -= take
                if remaining == 0:
                    break
        chosen = np.concatenate([per_class[c][: quota[c]] for c in classes])
    return np.sort(chosen)


def load_fashion_mnist(idx_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """All 70,000 items (train then test): images (N, 28, 28) uint8 and labels (N,) indexing FASHION_MNIST_CLASSES."""
    images = np.concatenate([_read_idx(idx_dir / _IDX_FILES[0]), _read_idx(idx_dir / _IDX_FILES[2])])
    labels = np.concatenate([_read_idx(idx_dir / _IDX_FILES[1]), _read_idx(idx_dir / _IDX_FILES[3])])
    return images, labels


def export_fashion_mnist(
    idx_dir: Path, raw_dir: Path, max_images: int | None, seed: int, progress: Progress | None = None
) -> dict[str, int]:
    images, labels = load_fashion_mnist(idx_dir)
    chosen = balanced_indices(labels, max_images, seed)
    counts: dict[str, int] = {}
    for name in FASHION_MNIST_CLASSES:
        (raw_dir / name).mkdir(parents=True, exist_ok=True)
    for done, i in enumerate(chosen, 1):
        name = FASHION_MNIST_CLASSES[int(labels[i])]
        # The original index in the 70k set names the file, so the same image always has the same path.
        Image.fromarray(images[i], mode="L").save(raw_dir / name / f"fmnist_{i:05d}.png", optimize=False)
        counts[name] = counts.get(name, 0) + 1
        if progress and (done % 500 == 0 or done == len(chosen)):
            progress(done, len(chosen))
    return counts


def export_photos(
    idx_dir: Path, raw_dir: Path, max_images: int | None, seed: int, progress: Progress | None = None
) -> dict[str, int]:
    """One camera-like photo per chosen Fashion-MNIST item (the same items `fashion-mnist` would choose), made by a
    process pool on every core."""
    images, labels = load_fashion_mnist(idx_dir)
    chosen = balanced_indices(labels, max_images, seed)
    return photos.write_photos(raw_dir, images, labels, chosen, list(FASHION_MNIST_CLASSES), seed, progress=progress)


# data.source values ingest makes from the bundled dataset, and how
GENERATED_SOURCES = {FASHION_MNIST: export_fashion_mnist, photos.PHOTOS_SOURCE: export_photos}


def not_ingested(cache_dir: Path, max_images: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The items ingest leaves out for (max_images, seed), images and labels: data nobody trained on."""
    images, labels = load_fashion_mnist(locate_fashion_mnist(cache_dir))
    used = np.zeros(len(labels), bool)
    used[balanced_indices(labels, max_images, seed)] = True
    keep = np.flatnonzero(~used)
    return images[keep], labels[keep]
