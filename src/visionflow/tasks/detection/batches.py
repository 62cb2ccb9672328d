"""Simulated detection batches, and reviewed batches taken in as labelled data.

A batch is a folder the drift check, the promotion gate and the retraining flow read like a production drop:

    <batch>/<name>_00000.png|jpg   the images (shifted as a changed camera or light would send them)
    <batch>/annotations.json       COCO: file_name relative to the folder, the true boxes (the "reviewed" answer)
    <batch>/batch.json             shift, severity, seed, source, counts

Images come from scenes nobody trained on (the bundled scene generator under another seed than base.seed), under
the same named shifts and corruption code as classification's simulator (visionflow.monitoring.simulate); boxes
follow the image when a shift rescales it. take_in copies a reviewed batch into serve.reviewed_dir/detection/ as
<sha256>.<ext> beside <sha256>.json, the form the detection ingest reads.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import shutil
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from visionflow.config import Params
from visionflow.errors import DataError
from visionflow.paths import ProjectPaths
from visionflow.report import write_json_atomic

ANNOTATIONS = "annotations.json"
SCENES_SOURCE = "fashion-mnist-scenes"  # detection.source's bundled default (tasks.detection.scenes)
Box = tuple[float, float, float, float, str]
# (n, seed) -> n (HxWx3 uint8 RGB image, [(x, y, w, h, class_name), ...]) pairs
ImageSource = Callable[[int, int], Iterable[tuple[np.ndarray, list[Box]]]]
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_FORMATS = {"PNG": "png", "JPEG": "jpg", "BMP": "bmp", "WEBP": "webp"}


def test_split_source(p: Params, root: Path) -> ImageSource:
    """A user's dataset: its test split's images (a seeded draw, the same order for any n) with their boxes."""

    def images(n: int, seed: int) -> Iterator[tuple[np.ndarray, list[Box]]]:
        import pandas as pd

        from visionflow.monitoring.simulate import as_taken

        paths = ProjectPaths.of(p, root)
        test = paths.splits / "test.csv"
        if not test.is_file():
            raise DataError(f"{test} not found: run the detection pipeline before simulating batches")
        rows = pd.read_csv(test, dtype=str, keep_default_na=False).sort_values("path").reset_index(drop=True)
        for i in np.random.default_rng(seed).permutation(len(rows))[:n]:
            img = as_taken(paths.resolve(rows.at[i, "path"]))
            rgb = np.repeat(img[..., None], 3, axis=2) if img.ndim == 2 else img
            yield rgb, [tuple(b) for b in json.loads(rows.at[i, "boxes"] or "[]")]

    return images


def scenes_source(p: Params, root: Path) -> ImageSource:
    """The bundled scene generator at the pipeline's scene size and object count."""

    def render(n: int, seed: int) -> Iterator[tuple[np.ndarray, list[Box]]]:
        from visionflow.tasks.detection.scenes import render

        d = p.detection
        cache = ProjectPaths.of(p, root).external
        return render(n, seed=seed, size=d.scene_size, max_objects=d.max_objects, cache_dir=cache)

    return render


def simulate(
    p: Params,
    root: Path,
    *,
    shift: str,
    severity: int,
    n: int,
    seed: int,
    name: str | None = None,
    skip: int = 0,
    source: ImageSource | None = None,
) -> Path:
    """Write n images under `shift` at `severity`, with their true boxes, to drift.batches_dir/<name>/ (replaced
    if it exists; name defaults to detection-<shift><severity>-seed<seed>). Returns the folder.

    source: where the images come from: by default the bundled scenes (under a seed other than base.seed, which
    rendered the training scenes) or, for a user's dataset, its test split. skip: leave out the seed's first
    `skip` images, so that batches of one seed with skip 0, n, 2n, ... never share an image."""
    from visionflow.monitoring.simulate import SHIFT_HELP, SHIFTS

    if shift not in SHIFTS:
        raise DataError(f"unknown shift {shift!r}: choose one of {SHIFT_HELP}")
    if n < 1:
        raise DataError("a batch needs at least one image (n)")
    scenes = p.detection.source == SCENES_SOURCE
    if source is None and scenes and seed == p.base.seed:
        raise DataError(f"seed {seed} is base.seed, which rendered the training scenes: choose another seed")
    source = source or (scenes_source if scenes else test_split_source)(p, root)
    name = _safe_name(name or f"detection-{shift}{severity}-seed{seed}", "batch name")
    out = ProjectPaths.of(p, root).batches / name
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        drawn = itertools.islice(source(n + skip, seed), skip, skip + n)
        records = _write_shifted(partial, name, drawn, shift, severity, np.random.default_rng(seed))
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if len(records) < n:
        shutil.rmtree(partial)
        raise DataError(
            f"asked for {n} images{f' after the first {skip}' if skip else ''} but the source gave only {len(records)}"
        )
    write_json_atomic(partial / ANNOTATIONS, to_coco(records))
    counts: dict[str, int] = {}
    for *_, boxes in records:
        for box in boxes:
            counts[box[4]] = counts.get(box[4], 0) + 1
    meta = {"task": "detection", "shift": shift, "severity": severity, "seed": seed, "skip": skip, "n": n}
    meta["box_counts"] = counts
    write_json_atomic(partial / "batch.json", meta)
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)
    return out


def _write_shifted(folder: Path, name: str, drawn, shift: str, severity: int, rng: np.random.Generator) -> list:
    """Each image shifted and encoded into `folder`; its boxes scaled as the shift scaled the image."""
    from visionflow.monitoring.simulate import apply_shift, encode

    records = []
    for k, (img, boxes) in enumerate(drawn):
        shifted = apply_shift(np.asarray(img, dtype=np.uint8), shift, severity, rng)
        data, ext = encode(shifted, shift, severity)
        file_name = f"{name}_{k:05d}.{ext}"
        (folder / file_name).write_bytes(data)
        sx, sy = shifted.shape[1] / img.shape[1], shifted.shape[0] / img.shape[0]
        scaled = [(x * sx, y * sy, w * sx, h * sy, c) for x, y, w, h, c in boxes]
        records.append((file_name, shifted.shape[1], shifted.shape[0], scaled))
    return records


def to_coco(records: list[tuple[str, int, int, list[Box]]]) -> dict[str, Any]:
    """COCO from (file_name, width, height, boxes): 1-based category ids into the sorted class names."""
    classes = sorted({b[4] for *_, boxes in records for b in boxes})
    cat = {c: i + 1 for i, c in enumerate(classes)}
    images, annotations = [], []
    for i, (file_name, width, height, boxes) in enumerate(records, start=1):
        images.append({"id": i, "file_name": file_name, "width": int(width), "height": int(height)})
        for x, y, w, h, c in boxes:
            bbox = [round(float(v), 2) for v in (x, y, w, h)]
            annotations.append(
                {"id": len(annotations) + 1, "image_id": i, "category_id": cat[c], "bbox": bbox,
                 "area": round(bbox[2] * bbox[3], 2), "iscrowd": 0}
            )  # fmt: skip
    return {"images": images, "annotations": annotations, "categories": [{"id": cat[c], "name": c} for c in classes]}


def read_batch(batch_dir: Path) -> list[tuple[Path, list[list]]]:
    """A reviewed batch's images and boxes ([x, y, w, h, class]) from its annotations.json. Raises a one-line
    DataError for a missing or malformed file, an image outside the folder, missing or listed twice, or a box that
    is not four finite numbers of a listed category."""
    batch_dir = Path(batch_dir)
    path = batch_dir / ANNOTATIONS
    if not path.is_file():
        raise DataError(f"{batch_dir} has no {ANNOTATIONS}: only a reviewed batch (COCO boxes) can be taken in")
    try:
        coco = json.loads(path.read_text(encoding="utf-8"))
        images, anns = list(coco["images"]), list(coco.get("annotations") or [])
        names = {int(c["id"]): str(c["name"]) for c in coco.get("categories") or []}
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{path} is not COCO JSON with images, annotations and categories ({exc!r})") from None
    if not images:
        raise DataError(f"{path} lists no images: the batch is empty")
    boxes: dict[Any, list[list]] = {}
    for a in anns:
        bbox, category = _box(a, path), a.get("category_id") if isinstance(a, dict) else None
        if category not in names:
            raise DataError(f"{path}: annotation {a.get('id')} names category {category!r}, not in its categories")
        boxes.setdefault(a.get("image_id"), []).append([*bbox, names[category]])
    base = batch_dir.resolve()
    out, seen = [], set()
    for im in images:
        file_name = im.get("file_name") if isinstance(im, dict) else None
        if not isinstance(file_name, str) or not file_name:
            raise DataError(f"{path}: an image entry has no file_name ({im!r:.80})")
        file = (batch_dir / file_name).resolve()
        if Path(file_name).is_absolute() or not file.is_relative_to(base) or file == base:
            raise DataError(f"{path}: file_name {file_name!r} is outside the batch folder")
        if not file.is_file():
            raise DataError(f"{path}: image {file_name!r} is missing from {batch_dir}")
        if file in seen:
            raise DataError(f"{path}: image {file_name!r} is listed twice")
        seen.add(file)
        out.append((file, boxes.get(im.get("id"), [])))
    return out


def _box(a: Any, path: Path) -> list[float]:
    bbox = a.get("bbox") if isinstance(a, dict) else None
    ok = isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)
    if not ok or not all(math.isfinite(v) for v in bbox):
        raise DataError(f"{path}: annotation {a!r:.80} has no bbox of four finite numbers [x, y, w, h]")
    return [float(v) for v in bbox]


def take_in(p: Params, root: Path, batch_dir: Path, only: list[str] | None = None) -> int:
    """Copy a reviewed batch's images with their boxes (with `only`, just those file_names) into
    serve.reviewed_dir/detection/ as <sha256>.<ext> and <sha256>.json (file, width, height, boxes, reviewed_at),
    each written atomically, the image first. The batch is left untouched. Returns the distinct images taken in."""
    from visionflow.data.imageio import DecodeRules, RejectedImage, open_guarded, read_limited, sha256_bytes

    entries = read_batch(batch_dir)
    if only is not None:
        named = {f.relative_to(Path(batch_dir).resolve()).as_posix(): (f, b) for f, b in entries}
        unknown = sorted(set(only) - set(named))
        if unknown:
            raise DataError(f"{batch_dir}: {len(unknown)} chosen image(s) not in its {ANNOTATIONS}, e.g. {unknown[:3]}")
        entries = [named[k] for k in sorted(set(only))]
    rules = DecodeRules.from_params(p.validation)
    dest_dir = ProjectPaths.of(p, root).reviewed / "detection"
    now = datetime.now(UTC).isoformat(timespec="seconds")
    taken = []
    for file, boxes in entries:  # every image checked before the first is written: a bad batch adds nothing
        data = read_limited(file, rules.max_bytes)
        try:
            img = open_guarded(data, rules)
        except RejectedImage as exc:
            raise DataError(f"{file}: {exc.reason} ({exc.detail}); fix or drop it from {ANNOTATIONS}") from None
        taken.append((data, _FORMATS.get(img.format, str(img.format).lower()), img.width, img.height, boxes))
    written = set()  # two files with the same bytes are one reviewed image
    for data, ext, width, height, boxes in taken:
        sha = sha256_bytes(data)
        written.add(sha)
        image = dest_dir / f"{sha}.{ext}"
        _write_bytes_atomic(image, data)
        record = {"file": image.name, "width": width, "height": height, "boxes": boxes, "reviewed_at": now}
        write_json_atomic(dest_dir / f"{sha}.json", record)
    return len(written)


def _write_bytes_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _safe_name(name: str, what: str) -> str:
    if not _SAFE_NAME.fullmatch(name) or ".." in name:
        raise DataError(f"{what} {name!r}: use letters, digits, '.', '_' and '-' (no path separators)")
    return name
