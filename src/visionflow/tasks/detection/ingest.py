"""Ingest for detection: data/raw/images/<files> and data/raw/annotations.json (canonical COCO), ready to version.

The source is the bundled scenes (visionflow.tasks.detection.scenes), a COCO JSON export or a YOLO folder (read by
visionflow.tasks.detection.formats); images are copied byte for byte, so the data version names exactly what was
received, and judging them is the validation stage's job. Reviewed images (data/reviewed/detection/<sha256>.<ext>
beside <sha256>.json, written by the review page) join as images/reviewed__<sha256>.<ext> with their corrected
boxes, replacing a source image with the same bytes. raw_dir is rebuilt beside itself and swapped in only when
complete, so stale files never survive and an interrupted ingest leaves the previous data as it was.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections import Counter
from dataclasses import replace
from pathlib import Path, PurePosixPath

from visionflow.config import Params
from visionflow.data.fashion_mnist import Progress
from visionflow.data.folder_source import REVIEWED_PREFIX, _open_regular, class_name_problem, flat_names
from visionflow.data.imageio import sha256_file
from visionflow.data.ingest import IngestResult, _force_rmtree
from visionflow.errors import DataError
from visionflow.paths import ProjectPaths
from visionflow.tasks.detection import scenes
from visionflow.tasks.detection.formats import (
    IMAGE_SUFFIXES,
    Annotations,
    ImageRecord,
    _inside,
    check_box,
    read_coco,
    read_source,
    write_coco,
)

MARKER = ".ingest-detection.json"  # beside raw_dir, not inside it, so it never changes the data version
REVIEWED_SUBDIR = "detection"  # data/reviewed/detection/: the review page's corrected images
_SHA = re.compile(r"^[0-9a-f]{64}$")


def _reviewed_entry(folder: Path, meta: Path) -> tuple[ImageRecord | None, str, str, list[dict[str, str]]]:
    """One reviewed image: (record, its sha256, "", box problems) or (None, "", reason, [])."""
    sha = meta.stem
    try:
        doc = json.loads(meta.read_text(encoding="utf-8"))
        file, width, height, boxes = doc["file"], doc["width"], doc["height"], doc["boxes"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        return None, "", f"unreadable_review: {type(exc).__name__}: {exc}", []
    ok_size = all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (width, height))
    if not _SHA.match(sha) or not isinstance(boxes, list) or not ok_size:
        return None, "", "malformed_review: needs <sha256>.json with file, width, height, boxes", []
    suffix = PurePosixPath(file).suffix.lower() if isinstance(file, str) else ""
    if file != f"{sha}{PurePosixPath(file).suffix}" or suffix not in IMAGE_SUFFIXES:
        return None, "", f"unsafe_file_name: 'file' must be {sha}.<image type>, not {file!r}", []
    found, reason = _inside(folder / file, folder)
    if found is None:
        return None, "", reason, []
    if sha256_file(found) != sha:
        return None, "", f"reviewed_sha256_mismatch: {file}'s bytes do not hash to its name", []
    kept, problems = [], []
    for box in boxes:
        cls = box[4] if isinstance(box, list) and len(box) == 5 else None
        malformed = (None, "malformed_box", "a box is [x, y, w, h, class name]")
        xywh, why, detail = check_box(box[:4], width, height) if isinstance(cls, str) else malformed
        if xywh is not None and (bad := class_name_problem(cls)):
            xywh, why, detail = None, "bad_class_name", f"{cls!r} {bad}"
        if xywh is None:
            problems.append({"path": f"{meta.name}: {box!r}", "reason": why, "detail": detail})
        else:
            kept.append((*xywh, cls))
    noted = tuple((q["reason"], q["detail"]) for q in problems)
    return ImageRecord(found, f"{REVIEWED_PREFIX}{file}", tuple(kept), width, height, noted), sha, "", problems


def read_reviewed(folder: Path) -> tuple[dict[str, ImageRecord], list[dict[str, str]]]:
    """sha256 -> reviewed record, and the reviewed entries (or boxes) left out with their reasons."""
    records: dict[str, ImageRecord] = {}
    skipped: list[dict[str, str]] = []
    if not folder.is_dir():
        return records, skipped
    for meta in sorted(folder.glob("*.json")):
        if meta.name.startswith("."):
            continue
        record, sha, reason, problems = _reviewed_entry(folder, meta)
        if record is None:
            why, _, detail = reason.partition(": ")
            skipped.append({"path": f"reviewed/{meta.name}", "reason": why, "detail": detail})
        else:
            records[sha] = record
            skipped.extend(dict(p, path=f"reviewed/{p['path']}") for p in problems)
    return records, skipped


def _fingerprint(records, skipped) -> str:
    """Changes when an image is added, removed, resized or touched, its boxes change, or the skipped entries do."""
    h = hashlib.sha256()
    for r in records:
        st = r.path.stat()
        h.update(json.dumps([r.name, r.boxes, r.width, r.height, st.st_size, st.st_mtime_ns]).encode())
    h.update(json.dumps(skipped).encode())
    return h.hexdigest()


def _raw_name(name: str) -> tuple[str, ...]:
    """Where a source image goes under images/: its path without the `images` folders (train/images/a.jpg ->
    train__a.jpg once flattened)."""
    parts = tuple(p for p in PurePosixPath(name.replace("\\", "/")).parts if p != "images")
    return parts or (name,)


def _copy(record: ImageRecord, dest: Path) -> str:
    """Copy byte for byte (never through a symlink swapped in since the read), returning the sha256."""
    h = hashlib.sha256()
    with _open_regular(record.path) as src, dest.open("wb") as out:
        for block in iter(lambda: src.read(1 << 20), b""):
            h.update(block)
            out.write(block)
    return h.hexdigest()


def _stage_source(ann: Annotations, staging: Path, progress: Progress | None) -> list[tuple[str, ImageRecord, str]]:
    """Copy the source's images into staging/images: (sha256, record named as in raw, its source name) for each
    one copied."""
    images = staging / "images"
    images.mkdir(parents=True, exist_ok=True)
    out = []
    names = flat_names([_raw_name(r.name) for r in ann.records])
    for done, (record, name) in enumerate(zip(ann.records, names), 1):
        try:
            sha = _copy(record, images / name)
        except OSError as exc:
            ann.skip(record.name, "unreadable_file", exc.strerror or str(exc))
            (images / name).unlink(missing_ok=True)
            continue
        out.append((sha, replace(record, path=images / name, name=name)))
        if progress and (done % 500 == 0 or done == len(ann.records)):
            progress(done, len(ann.records))
    return out


def _read(p: Params, paths: ProjectPaths) -> tuple[Annotations | None, dict]:
    """The source (None for the bundled scenes, generated later) and what identifies it for the skip check."""
    d = p.detection
    if d.source == scenes.SCENES_SOURCE:
        spec = {"n": d.scenes, "size": d.scene_size, "max_objects": d.max_objects, "seed": p.base.seed}
        return None, spec | {"generator": scenes.GENERATOR_VERSION}
    ann = read_source(d.source)  # fails on a bad source before raw_dir is touched
    return ann, {
        "source": str(Path(d.source).expanduser().resolve()),
        "listing": _fingerprint(ann.records, ann.skipped),
    }


def ingest(p: Params, root: Path, *, force: bool = False, progress: Progress | None = None) -> IngestResult:
    """Write data/raw/images and data/raw/annotations.json from detection.source and the reviewed images; skipped
    when they already hold exactly these inputs (force: write them anyway)."""
    paths = ProjectPaths.of(p, root)
    raw = paths.raw
    reviewed, reviewed_skipped = read_reviewed(paths.reviewed / REVIEWED_SUBDIR)
    ann, spec = _read(p, paths)
    spec = {"task": "detection", **spec, "reviewed": _fingerprint(reviewed.values(), reviewed_skipped)}
    marker = raw.parent / MARKER
    if not force and (previous := _previous(marker, raw)) is not None and previous["spec"] == spec:
        return _result(raw, p.detection.source, previous, skipped=True)

    staging = raw.with_name(raw.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        if ann is None:
            d = p.detection
            coco = scenes.write_scenes(
                staging, n=d.scenes, seed=p.base.seed, size=d.scene_size, max_objects=d.max_objects,
                cache_dir=paths.external, progress=progress,
            )  # fmt: skip
            ann = read_coco(coco)
            staged = [(sha256_file(r.path), replace(r, name=r.path.name)) for r in ann.records]
        else:
            staged = _stage_source(ann, staging, progress)
        records = _merge_reviewed(staged, reviewed, staging / "images")
        if not records:
            reasons = Counter(s["reason"] for s in [*ann.skipped, *reviewed_skipped])
            raise DataError(
                f"{p.detection.source} gave no usable image (left out: {dict(reasons)}); data/raw is unchanged"
            )
        classes = sorted({*ann.classes, *(b[4] for r in records for b in r.boxes)})
        write_coco(staging / "annotations.json", records, classes)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # a failed or interrupted ingest leaves nothing half-written
        raise
    _swap_in(staging, raw)
    counts = Counter(b[4] for r in records for b in r.boxes)
    record = {
        "spec": spec,
        "n_images": len(records),
        "boxes_per_class": {c: counts.get(c, 0) for c in classes},
        "n_reviewed": len(reviewed),
        "skipped_files": [*ann.skipped, *reviewed_skipped],
    }
    marker.write_text(json.dumps(record, indent=2))
    return _result(raw, p.detection.source, record, skipped=False)


def _merge_reviewed(staged, reviewed: dict[str, ImageRecord], images: Path) -> list[ImageRecord]:
    """The source's records, less those a reviewed image replaces (same bytes), plus the reviewed ones copied in."""
    records = []
    for sha, r in staged:
        if sha in reviewed:
            r.path.unlink()  # staged already: the reviewed copy takes its place
        else:
            records.append(r)
    for _, r in sorted(reviewed.items()):
        _copy(r, images / r.name)
        records.append(replace(r, path=images / r.name))
    return records


def _previous(marker: Path, raw: Path) -> dict | None:
    """What the last ingest wrote, when raw_dir still holds it (the annotations file and that many images)."""
    try:
        previous = json.loads(marker.read_text())
        n_files = sum(1 for f in (raw / "images").iterdir() if f.is_file())
    except (OSError, ValueError):
        return None
    ok = (raw / "annotations.json").is_file() and n_files == previous.get("n_images")
    return previous if ok else None


def _swap_in(staging: Path, raw: Path) -> None:
    if raw.exists():
        old = raw.with_name(raw.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        raw.rename(old)  # DVC may have made cached files read-only; renaming the folder is still allowed
        staging.rename(raw)
        _force_rmtree(old)
    else:
        raw.parent.mkdir(parents=True, exist_ok=True)
        staging.rename(raw)


def _result(raw: Path, source: str, record: dict, *, skipped: bool) -> IngestResult:
    return IngestResult(
        raw_dir=str(raw),
        source=source,
        n_images=record["n_images"],
        classes=record["boxes_per_class"],
        skipped=skipped,
        n_reviewed=record["n_reviewed"],
        skipped_files=tuple(record["skipped_files"]),
    )
