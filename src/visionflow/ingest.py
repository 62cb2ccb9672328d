"""Ingest: bring a dataset into data/raw/<class>/ as received, ready to be versioned.

Two sources go through the same path: the bundled default (Fashion-MNIST from Debian's `dataset-fashion-mnist`
package) and a user's folder with one sub-folder per class. Files are copied byte for byte; judging them is the
validation stage's job, so the data version names exactly what was received.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from visionflow.errors import DataError

FASHION_MNIST = "fashion-mnist"
FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
FASHION_MNIST_CLASSES = (
    "tshirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle_boot",
)
_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
_IDX_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
              "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
MARKER = ".ingest.json"  # written beside raw_dir, not inside it, so it never changes the data version

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class IngestResult:
    raw_dir: str
    source: str
    n_images: int
    classes: dict[str, int]
    skipped: bool
    n_reviewed: int = 0


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
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
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


def export_fashion_mnist(idx_dir: Path, raw_dir: Path, max_images: int | None, seed: int,
                         progress: Progress | None = None) -> dict[str, int]:
    images = np.concatenate([_read_idx(idx_dir / _IDX_FILES[0]), _read_idx(idx_dir / _IDX_FILES[2])])
    labels = np.concatenate([_read_idx(idx_dir / _IDX_FILES[1]), _read_idx(idx_dir / _IDX_FILES[3])])
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


def _class_dirs(source: Path) -> list[Path]:
    if not source.exists():
        raise DataError(f"data source {source} does not exist: set data.source in params.yaml to a folder "
                        "with one sub-folder per class, or to 'fashion-mnist'")
    if not source.is_dir():
        raise DataError(f"data source {source} is a file; it must be a folder with one sub-folder per class")
    dirs = sorted(p for p in source.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not dirs:
        raise DataError(f"data source {source} has no class sub-folders: expected {source}/<class name>/<images>")
    empty = [d.name for d in dirs if not any(f.is_file() and not f.name.startswith(".") for f in d.rglob("*"))]
    if empty:
        raise DataError(f"data source {source}: class folder(s) with no files: {', '.join(empty)}. "
                        "Add images or remove the empty folder(s).")
    return dirs


def copy_folder_dataset(source: Path, raw_dir: Path, max_images: int | None, seed: int,
                        progress: Progress | None = None) -> dict[str, int]:
    files: list[tuple[str, Path]] = []
    for d in _class_dirs(source):
        for f in sorted(d.rglob("*")):
            if f.is_file() and not f.name.startswith("."):
                files.append((d.name, f))
    labels = np.array([label for label, _ in files])
    chosen = balanced_indices(labels, max_images, seed) if max_images else np.arange(len(files))
    counts: dict[str, int] = {}
    for done, i in enumerate(chosen, 1):
        label, src = files[int(i)]
        rel = src.relative_to(source / label)
        # Nested sub-folders are flattened into the class folder; the name keeps them apart.
        dest = raw_dir / label / "__".join(rel.parts)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)
        counts[label] = counts.get(label, 0) + 1
        if progress and (done % 500 == 0 or done == len(chosen)):
            progress(done, len(chosen))
    return counts


REVIEWED_PREFIX = "reviewed__"


def _listing_ok(raw_dir: Path, counts: dict[str, int]) -> bool:
    try:
        return all(sum(1 for f in (raw_dir / c).iterdir() if f.is_file() and not f.name.startswith(REVIEWED_PREFIX))
                   == n for c, n in counts.items())
    except FileNotFoundError:
        return False


def sync_reviewed(reviewed_dir: Path | None, raw_dir: Path) -> dict[str, int]:
    """Mirror reviewed images (data/reviewed/<class>/<file>) into raw_dir/<class>/reviewed__<file>.

    Reviewed images are labelled production data (the review page, or a reviewed batch): they join the dataset, so
    the next data version includes them. Copies are byte for byte; a reviewed file removed from reviewed_dir leaves
    the dataset too (DVC keeps every earlier version).
    """
    wanted: dict[Path, Path] = {}
    if reviewed_dir is not None and Path(reviewed_dir).is_dir():
        for d in sorted(p for p in Path(reviewed_dir).iterdir() if p.is_dir() and not p.name.startswith(".")):
            for f in sorted(d.iterdir()):
                if f.is_file() and not f.name.startswith("."):
                    wanted[raw_dir / d.name / f"{REVIEWED_PREFIX}{f.name}"] = f
    present = {f for f in raw_dir.glob(f"*/{REVIEWED_PREFIX}*") if f.is_file()}
    for stale in present - set(wanted):
        stale.unlink()
    counts: dict[str, int] = {}
    for dest, src in wanted.items():
        if dest not in present or dest.stat().st_size != src.stat().st_size:
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(".partial-" + dest.name)
            shutil.copyfile(src, tmp)
            os.replace(tmp, dest)
        counts[dest.parent.name] = counts.get(dest.parent.name, 0) + 1
    return counts


def ingest(*, source: str, raw_dir: Path, max_images: int | None, seed: int, cache_dir: Path,
           force: bool = False, progress: Progress | None = None, reviewed_dir: Path | None = None) -> IngestResult:
    """Write the dataset to raw_dir (skipped when raw_dir already holds exactly this source and selection), then
    add the reviewed production images from reviewed_dir."""
    raw_dir = Path(raw_dir)
    res = _ingest_source(source=source, raw_dir=raw_dir, max_images=max_images, seed=seed, cache_dir=cache_dir,
                         force=force, progress=progress)
    reviewed = sync_reviewed(reviewed_dir, raw_dir)
    if not reviewed:
        return res
    classes = dict(res.classes)
    for c, n in reviewed.items():
        classes[c] = classes.get(c, 0) + n
    return IngestResult(res.raw_dir, res.source, sum(classes.values()), classes, res.skipped, sum(reviewed.values()))


def _ingest_source(*, source: str, raw_dir: Path, max_images: int | None, seed: int, cache_dir: Path,
                   force: bool, progress: Progress | None) -> IngestResult:
    spec = {"source": source, "max_images": max_images, "seed": seed}
    if source != FASHION_MNIST:
        src = Path(source).expanduser().resolve()
        _class_dirs(src)  # fail on a bad source before touching raw_dir
        spec["source"] = str(src)
        spec["mtime"] = max(p.stat().st_mtime for p in src.rglob("*"))
    marker = raw_dir.parent / MARKER
    if not force and marker.is_file():
        previous = json.loads(marker.read_text())
        if previous.get("spec") == spec and _listing_ok(raw_dir, previous["classes"]):
            return IngestResult(str(raw_dir), source, sum(previous["classes"].values()), previous["classes"], True)

    staging = raw_dir.with_name(raw_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    if source == FASHION_MNIST:
        counts = export_fashion_mnist(locate_fashion_mnist(cache_dir), staging, max_images, seed, progress)
    else:
        counts = copy_folder_dataset(Path(spec["source"]), staging, max_images, seed, progress)
    # Swap in only when complete: an interrupted ingest leaves the previous raw_dir untouched.
    if raw_dir.exists():
        old = raw_dir.with_name(raw_dir.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        # DVC may have made cached files read-only; renaming the folder is still allowed.
        raw_dir.rename(old)
        staging.rename(raw_dir)
        _force_rmtree(old)
    else:
        staging.rename(raw_dir)
    marker.write_text(json.dumps({"spec": spec, "classes": counts}, indent=2))
    return IngestResult(str(raw_dir), source, sum(counts.values()), counts, False)


def _force_rmtree(path: Path) -> None:
    def _chmod_retry(func, p, _exc_info):
        os.chmod(p, 0o700)
        func(p)

    shutil.rmtree(path, onerror=_chmod_retry)


def result_dict(result: IngestResult) -> dict:
    return asdict(result)
