"""Simulated production batches: held-out images under a named shift, with their true labels kept aside.

A batch is a folder the drift check and the retraining flow read like any production drop:

    <out>/images/<id>.png|jpg   the images, unlabelled (what a camera would send)
    <out>/labels.csv            file,label: the "reviewed" labels a person would have given them
    <out>/batch.json            shift, severity, seed, source, counts

Images come from data nobody trained on: for the bundled Fashion-MNIST, the part of the 70,000 images that the
ingest stage did not take (data.max_images); for a folder dataset, the test split.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from visionflow.data import corruptions
from visionflow.data.imageio import read_limited
from visionflow.errors import DataError
from visionflow.paths import ProjectPaths

SHIFTS = corruptions.SHIFTS  # severity 1..5 -> each shift's strength (see visionflow.data.corruptions)
SHIFT_HELP = ", ".join(SHIFTS)


@dataclass(frozen=True)
class Batch:
    folder: Path
    images: list[Path]
    labels: list[str] | None
    meta: dict


def apply_shift(img: np.ndarray, shift: str, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Shift one uint8 image (HxW grey or HxWx3). Returns uint8; colour_cast returns HxWx3."""
    return corruptions.corrupter(SHIFTS, shift, severity, rng, kind="shift")(img)


def as_taken(path: Path | str) -> np.ndarray:
    """A stored image (a file or a shard member) as the camera took it: grey stays grey, anything else is RGB."""
    with Image.open(io.BytesIO(read_limited(path, None))) as im:
        return np.asarray(im.convert("L") if Image.getmodebase(im.mode) == "L" else im.convert("RGB"))


def encode(img: np.ndarray, shift: str, severity: int) -> tuple[bytes, str]:
    pil = Image.fromarray(img)
    buf = io.BytesIO()
    if shift == "jpeg":
        pil.save(buf, "JPEG", quality=int(SHIFTS["jpeg"].severities[severity - 1]))
        return buf.getvalue(), "jpg"
    pil.save(buf, "PNG")
    return buf.getvalue(), "png"


def heldout_pool(p, root: Path) -> tuple[list[np.ndarray] | None, list[Path] | None, list[str], str]:
    """Images nobody trained on: (arrays or None, paths or None, labels, description)."""
    from visionflow.data.fashion_mnist import FASHION_MNIST, FASHION_MNIST_CLASSES, not_ingested

    paths = ProjectPaths.of(p, root)
    if p.data.source == FASHION_MNIST and p.data.max_images is not None:
        images, labels = not_ingested(paths.external, p.data.max_images, p.base.seed)
        return (
            list(images),
            None,
            [FASHION_MNIST_CLASSES[int(k)] for k in labels],
            f"fashion-mnist images not ingested ({len(labels)})",
        )
    test = paths.splits / "test.csv"
    if not test.is_file():
        raise DataError(f"{test} not found: run `visionflow split` (or the pipeline) before simulating batches")
    from visionflow.data.validate import read_manifest

    m = read_manifest(test)
    return None, [paths.resolve(x) for x in m["path"]], list(m["label"]), f"test split ({len(m)})"


@dataclass(frozen=True)
class LoopSize:
    """How many held-out images each of the demo loop's two batches gets; n == 0: the loop is skipped."""

    n: int
    pool: int
    note: str


def loop_batch_size(p, root: Path) -> LoopSize:
    """Size the demo loop's two disjoint batches (production, holdout) to the held-out pool.

    Each gets drift.batch_size images, or half the pool when that is smaller (a user's folder of 1,800 images
    holds out about 270); below drift.min_batch_size a drift check gives no verdict, so the loop is skipped.
    """
    pool = len(heldout_pool(p, root)[2])
    want, least = p.drift.batch_size, p.drift.min_batch_size
    n = min(want, pool // 2)
    if n < least:
        return LoopSize(
            0,
            pool,
            f"closed loop skipped: the held-out pool ({pool} images) gives two batches of "
            f"{n}, fewer than drift.min_batch_size ({least}); a larger dataset (or "
            f"data.test_fraction) gives the loop enough images",
        )
    if n < want:
        return LoopSize(
            n,
            pool,
            f"{n} images per batch: drift.batch_size ({want}) is more than half the held-out pool ({pool} images)",
        )
    return LoopSize(n, pool, f"{n} images per batch (drift.batch_size)")


def simulate(p, root: Path, out: Path, *, shift: str, severity: int, n: int, seed: int, skip: int = 0) -> Batch:
    """Write a batch of n held-out images under `shift` at `severity` to `out` (replaced if it exists).

    skip: leave out the first `skip` images of the seed's draw, so that batches with the same seed and
    skip 0, n, 2n, ... never share an image.
    """
    if shift not in SHIFTS:
        raise DataError(f"unknown shift {shift!r}: choose one of {SHIFT_HELP}")
    if n < 1:
        raise DataError("a batch needs at least one image (--n)")
    arrays, paths, labels, source = heldout_pool(p, root)
    total = len(labels)
    if skip + n > total:
        raise DataError(
            f"asked for {n} images{f' after the first {skip}' if skip else ''} but the held-out pool "
            f"({source}) has only {total}"
        )
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.permutation(total)[skip : skip + n])
    out = Path(out)
    images_dir = out / "images"
    partial = out.with_name(out.name + ".partial")
    import shutil

    shutil.rmtree(partial, ignore_errors=True)
    (partial / "images").mkdir(parents=True)
    rows, written = [], []
    for k, i in enumerate(chosen):
        img = arrays[i] if arrays is not None else as_taken(paths[i])
        data, ext = encode(apply_shift(img, shift, severity, rng), shift, severity)
        name = f"{out.name}_{k:05d}.{ext}"
        (partial / "images" / name).write_bytes(data)
        rows.append({"file": name, "label": labels[i]})
        written.append(images_dir / name)
    pd.DataFrame(rows).to_csv(partial / "labels.csv", index=False)
    meta = {
        "shift": shift,
        "severity": severity,
        "seed": seed,
        "skip": skip,
        "n": n,
        "source": source,
        "class_counts": pd.Series([r["label"] for r in rows]).value_counts().sort_index().to_dict(),
    }
    (partial / "batch.json").write_text(json.dumps(meta, indent=2))
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)
    return Batch(out, written, [r["label"] for r in rows], meta)


def load_batch(folder: Path) -> Batch:
    """A production batch: a folder of images (optionally in images/), with labels.csv when reviewed, or one
    sub-folder per class as ingest takes them (labels from the folder names)."""
    folder = Path(folder)
    if not folder.exists():
        raise DataError(f"batch folder {folder} does not exist")
    if not folder.is_dir():
        raise DataError(f"{folder} is a file: a batch is a folder of images (optionally with labels.csv)")
    images_dir = folder / "images" if (folder / "images").is_dir() else folder
    files = sorted(
        f
        for f in images_dir.iterdir()
        if f.is_file() and not f.name.startswith(".") and f.name not in ("labels.csv", "batch.json", "selection.csv")
    )
    labels = None
    if (folder / "labels.csv").is_file():
        table = pd.read_csv(folder / "labels.csv", dtype=str)
        if not {"file", "label"} <= set(table.columns):
            raise DataError(f"{folder / 'labels.csv'} must have the columns file,label")
        by_file = dict(zip(table["file"], table["label"]))
        labels = [by_file.get(f.name) for f in files]
    elif not files and images_dir == folder and any(p.is_dir() for p in folder.iterdir()):
        from visionflow.data.folder_source import scan_source  # the same walk, symlink and class-name rules as ingest

        scan = scan_source(folder.resolve())
        files, labels = [f.path for f in scan.files], [f.label for f in scan.files]
    meta = json.loads((folder / "batch.json").read_text()) if (folder / "batch.json").is_file() else {}
    return Batch(folder, files, labels, meta)
