"""Reading what people export: COCO JSON (CVAT, Label Studio, Roboflow) and YOLO folders; writing canonical COCO.

Both readers give the same thing: one ImageRecord per usable image (its file, its boxes in COCO pixel xywh with
class names) and the entries left out, each with its reason. An entry's problem never costs another entry: a bad
box leaves out that box (its image keeps the others, and its record the problem, which ingest writes beside the
image in data/raw/annotations.json so that validation quarantines it), a missing or unsafe image file leaves out
that image. A file
that cannot be read at all (malformed JSON, no class list) raises DataError saying what to fix. File names are
untrusted: absolute names, `..` and symlinks leading out of the source are refused, never followed.
"""

from __future__ import annotations

import json
import math
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import yaml
from PIL import Image

from visionflow.data.folder_source import check_class_names
from visionflow.errors import DataError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
EDGE_TOLERANCE = 0.01  # px: exporters round; a box this little past the edge is clipped, not refused

Box = tuple[float, float, float, float, str]


@dataclass(frozen=True)
class ImageRecord:
    path: Path  # the file to copy (inside the source)
    name: str  # its name relative to the source, as reported
    boxes: tuple[Box, ...]  # COCO pixels: x, y, w, h, class name
    width: int
    height: int
    # (reason, detail) of each annotation of this image left out: kept with the image through ingest so that
    # validation quarantines it (without the box, the object would be taught as background)
    problems: tuple[tuple[str, str], ...] = ()


@dataclass
class Annotations:
    records: list[ImageRecord] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"path", "reason", "detail"}
    classes: list[str] = field(default_factory=list)  # the class names the source declares

    def skip(self, path: str, reason: str, detail: str = "") -> None:
        self.skipped.append({"path": path, "reason": reason, "detail": detail})


def _inside(path: Path, base: Path) -> tuple[Path | None, str]:
    """(the regular file to read, "") or (None, why not): no symlink may lead outside base."""
    try:
        st = path.lstat()
    except (OSError, ValueError):  # ValueError: a NUL byte in the name
        return None, "missing_image"
    real = Path(os.path.realpath(path))
    if not real.is_relative_to(Path(os.path.realpath(base))):
        return None, "symlink_outside_source"
    if stat.S_ISLNK(st.st_mode):
        try:
            st = real.stat()
        except OSError:
            return None, "dangling_symlink"
    return (real, "") if stat.S_ISREG(st.st_mode) else (None, "not_a_regular_file")


def resolve_image(base: Path, name: str) -> tuple[Path | None, str]:
    """An image named in an annotation file: beside it, or in the images/ folder next to it."""
    rel = PurePosixPath(name.replace("\\", "/"))
    if not name or "\0" in name or rel.is_absolute() or ".." in rel.parts or (len(name) > 1 and name[1] == ":"):
        return None, "unsafe_file_name"
    found, reason = None, "missing_image"
    for folder in (base, base / "images"):
        found, reason = _inside(folder / rel, base)
        if reason != "missing_image":
            break
    return found, reason


def _number(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) else None


def check_box(
    values: list[Any], width: int, height: int, *, judge: bool = True
) -> tuple[tuple[float, ...] | None, str, str]:
    """(x, y, w, h) from a COCO bbox, or (None, reason, detail). judge=False keeps any numeric box as it is
    (validation judges boxes itself)."""
    nums = [_number(v) for v in values] if isinstance(values, list) and len(values) == 4 else [None]
    if None in nums:
        return None, "malformed_box", f"bbox {values!r} is not 4 numbers [x, y, w, h]"
    x, y, w, h = nums
    if not judge:
        return (x, y, w, h), "", ""
    if w <= 0 or h <= 0:
        return None, "degenerate_box", f"bbox {values!r} has no area"
    t = EDGE_TOLERANCE
    if x < -t or y < -t or x + w > width + t or y + h > height + t:
        return None, "box_outside_image", f"bbox {values!r} is outside the {width}x{height} image"
    x0, y0 = max(x, 0.0), max(y, 0.0)
    return (x0, y0, min(x + w, width) - x0, min(y + h, height) - y0), "", ""


def _load_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read the COCO file {path}: {exc}; check the path in detection.source") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}): re-export it as COCO JSON"
        ) from None


def _categories(data: Any, path: Path) -> dict[Any, str]:
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f"{path} is not a COCO file: expected an object with 'images', 'annotations', 'categories'")
    cats = data.get("categories")
    if not isinstance(cats, list) or not all(isinstance(c, dict) and "id" in c and "name" in c for c in cats):
        raise DataError(f"{path}: 'categories' must be a list of {{'id', 'name'}} objects: re-export it as COCO JSON")
    by_id = {_key(c["id"]): str(c["name"]) for c in cats}
    if None in by_id or len(by_id) != len(cats) or len(set(by_id.values())) != len(cats):
        raise DataError(f"{path}: category ids and names must be unique; fix 'categories'")
    check_class_names(sorted(by_id.values()), f"{path} categories")
    return by_id


def _image_size(entry: dict, found: Path) -> tuple[int, int]:
    w, h = entry.get("width"), entry.get("height")
    if isinstance(w, int) and isinstance(h, int) and w > 0 and h > 0:
        return w, h
    return _header_size(found)


def _header_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as img:  # the header only: no pixel is decoded
        return img.size


def _key(v: Any) -> int | str | None:
    """An id as COCO writes it (a number or a string); anything else (a list, null) is no id."""
    return v if isinstance(v, int | str) and not isinstance(v, bool) else None


def _coco_images(
    data: dict, base: Path, out: Annotations, dropped: dict[Any, list[tuple[str, str]]]
) -> dict[Any, tuple[str, Path, int, int]]:
    """id -> (name, file, width, height) of each image entry whose file is there and safe to read; the problems
    an earlier ingest noted on an image go to `dropped`."""
    images: dict[Any, tuple[str, Path, int, int]] = {}
    seen: set[Path] = set()
    for entry in data["images"]:
        name = entry.get("file_name") if isinstance(entry, dict) else None
        if not isinstance(name, str) or _key(entry.get("id")) is None or entry["id"] in images:
            out.skip(str(name or entry)[:200], "malformed_image_entry", "needs a unique 'id' and a 'file_name'")
            continue
        found, reason = resolve_image(base, name)
        if found is None or found in seen:
            out.skip(name, reason or "duplicate_image_entry", "" if reason else f"{found} is listed twice")
            continue
        try:
            images[entry["id"]] = (name, found, *_image_size(entry, found))
        except Exception as exc:  # noqa: BLE001 - any Pillow failure on an untrusted header means the same
            out.skip(name, "unreadable_image", f"{type(exc).__name__}: {exc}")
            continue
        seen.add(found)
        for problem in entry.get("ingest_problems") or []:  # written by write_coco: see ImageRecord.problems
            reason, detail = map(str, problem) if isinstance(problem, list) and len(problem) == 2 else ("?", "")
            dropped.setdefault(entry["id"], []).append((reason, detail))
            out.skip(name, reason, detail)
    return images


def read_coco(path: Path, *, judge_boxes: bool = True) -> Annotations:
    """A COCO JSON export; images beside it or in its images/ folder. judge_boxes=False: boxes as they are
    (validation reads data/raw/annotations.json so, to judge them itself)."""
    path = Path(path)
    data = _load_json(path)
    by_id = _categories(data, path)
    out = Annotations(classes=sorted(by_id.values()))
    dropped: dict[Any, list[tuple[str, str]]] = {}  # image id -> (reason, detail) of each annotation left out
    images = _coco_images(data, path.parent, out, dropped)
    boxes: dict[Any, list[Box]] = {i: [] for i in images}
    annotations = data.get("annotations") or []
    for ann in annotations if isinstance(annotations, list) else []:
        image_id = _key(ann.get("image_id")) if isinstance(ann, dict) else None
        if image_id not in images:
            continue  # its image was left out (and reported), or never listed
        name, _, w, h = images[image_id]
        which = f"annotation {ann.get('id')}: "  # skipped under its image's name, so a reader can tell whose box
        if ann.get("iscrowd"):  # an ignore region, not a missing object: nothing to hold against the image
            out.skip(name, "crowd_region", f"{which}iscrowd regions mark groups, not one object")
            continue
        category = _key(ann.get("category_id"))
        if category not in by_id:
            box, reason, detail = None, "unknown_class_id", f"category_id {ann.get('category_id')!r} is not listed"
        else:
            box, reason, detail = check_box(ann.get("bbox"), w, h, judge=judge_boxes)
        if box is None:
            out.skip(name, reason, which + detail)
            dropped.setdefault(image_id, []).append((reason, which + detail))
            continue
        boxes[image_id].append((*box, by_id[category]))
    for image_id, (name, found, w, h) in images.items():
        problems = tuple(dropped.get(image_id, ()))
        out.records.append(ImageRecord(found, name, tuple(boxes[image_id]), w, h, problems))
    return out


def _yolo_classes(folder: Path) -> list[str]:
    txt, data_yaml = folder / "classes.txt", folder / "data.yaml"
    if not txt.is_file() and not data_yaml.is_file():
        raise DataError(f"YOLO folder {folder} has no classes.txt or data.yaml `names`: add one listing the classes")
    try:
        if txt.is_file():
            names = [n.strip() for n in txt.read_text(encoding="utf-8").splitlines() if n.strip()]
        else:
            raw = (yaml.safe_load(data_yaml.read_text(encoding="utf-8")) or {}).get("names")
            names = [str(raw[k]) for k in sorted(raw)] if isinstance(raw, dict) else [str(n) for n in raw or []]
    except (OSError, UnicodeDecodeError, yaml.YAMLError, AttributeError, TypeError) as exc:
        why = " ".join(str(exc).split())  # YAML errors span lines; the message is one
        raise DataError(f"the class list of YOLO folder {folder} cannot be read ({why}): fix it") from None
    if not names or len(set(names)) != len(names):
        raise DataError(f"YOLO folder {folder}: the class list is empty or repeats a name; fix classes.txt/data.yaml")
    check_class_names(names, f"YOLO folder {folder} classes")
    return names


def _yolo_splits(folder: Path) -> list[Path]:
    """Folders holding images/ and labels/: the folder itself, or its split folders (Roboflow: train, valid, test)."""
    if (folder / "images").is_dir():
        return [folder]
    splits = sorted(d for d in folder.iterdir() if d.is_dir() and not d.is_symlink() and (d / "images").is_dir())
    if not splits:
        raise DataError(f"YOLO folder {folder} has no images/ folder (expected images/ and labels/ beside classes.txt)")
    return splits


def _yolo_line(line: str, classes: list[str], w: int, h: int) -> tuple[Box | None, str, str]:
    parts = line.split()
    try:
        k, cx, cy, bw, bh = int(parts[0]), *map(float, parts[1:])
    except (ValueError, IndexError, TypeError):
        return None, "unreadable_label_line", f"{line!r} is not `class cx cy w h`"
    if not 0 <= k < len(classes):
        return None, "unknown_class_id", f"class id {k} in {line!r}; the class list has {len(classes)} names"
    box, reason, detail = check_box([(cx - bw / 2) * w, (cy - bh / 2) * h, bw * w, bh * h], w, h)
    return (None, reason, f"{line!r}: {detail}") if box is None else ((*box, classes[k]), "", "")


def _yolo_image(out: Annotations, base: Path, image: Path, label: Path, classes: list[str]) -> None:
    name = image.relative_to(base).as_posix()
    found, reason = _inside(image, base)
    if found is None:
        out.skip(name, reason)
        return
    try:
        w, h = _header_size(found)
    except Exception as exc:  # noqa: BLE001 - any Pillow failure on an untrusted header means the same
        out.skip(name, "unreadable_image", f"{type(exc).__name__}: {exc}")
        return
    lines: list[str] = []  # no label file: a negative
    if label.exists() or label.is_symlink():
        text, reason = _inside(label, base)
        try:
            if text is None:
                raise OSError(reason)
            lines = text.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            out.skip(name, "unreadable_label_file", f"{label.relative_to(base).as_posix()}: {exc}")
            return
    boxes, problems = [], []
    for n, line in enumerate(lines, 1):
        if line.strip() and not line.lstrip().startswith("#"):
            box, reason, detail = _yolo_line(line, classes, w, h)
            if box is None:
                problems.append((reason, f"{label.relative_to(base).as_posix()} line {n}: {detail}"))
                out.skip(name, *problems[-1])
            else:
                boxes.append(box)
    out.records.append(ImageRecord(found, name, tuple(boxes), w, h, tuple(problems)))


def read_yolo(folder: Path) -> Annotations:
    """A YOLO folder: images/ + labels/ (one `class cx cy w h` line per box, normalised; no label file: no boxes),
    classes from classes.txt or data.yaml `names`; or split folders (train/, valid/, test/) each holding both."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"YOLO folder {folder} does not exist: set detection.source to a COCO file or a YOLO folder")
    classes = _yolo_classes(folder)
    out = Annotations(classes=sorted(classes))
    for split in _yolo_splits(folder):
        used: set[str] = set()
        for image in sorted((split / "images").iterdir()):
            if image.name.startswith(".") or image.suffix.lower() not in IMAGE_SUFFIXES:
                out.skip(image.relative_to(folder).as_posix(), "not_an_image", "hidden, or not an image file type")
                continue
            used.add(image.stem)
            _yolo_image(out, folder, image, split / "labels" / f"{image.stem}.txt", classes)
        labels = sorted((split / "labels").glob("*.txt")) if (split / "labels").is_dir() else []
        for label in labels:
            if label.stem not in used:
                out.skip(label.relative_to(folder).as_posix(), "label_without_image", "no image has this name")
    return out


def read_source(source: str | Path) -> Annotations:
    """A COCO JSON file or a YOLO folder, told apart by what the path is."""
    path = Path(source).expanduser().resolve()
    if path.is_dir():
        return read_yolo(path)
    if path.is_file():
        return read_coco(path)
    raise DataError(
        f"detection.source {source} does not exist: give a COCO JSON file, a YOLO folder or the bundled scenes"
    )


def write_coco(path: Path, records: list[ImageRecord], classes: list[str]) -> Path:
    """Canonical COCO (the package's contract): file_name is each record's name; categories are the sorted class
    names with 1-based ids. Written atomically."""
    ids = {c: i for i, c in enumerate(sorted(classes), 1)}
    images, annotations = [], []
    for image_id, r in enumerate(records, 1):
        images.append({"id": image_id, "file_name": r.name, "width": r.width, "height": r.height})
        if r.problems:
            images[-1]["ingest_problems"] = [list(q) for q in r.problems]
        for x, y, w, h, c in r.boxes:
            bbox = [round(float(v), 3) for v in (x, y, w, h)]
            annotations.append(
                {"id": len(annotations) + 1, "image_id": image_id, "category_id": ids[c], "bbox": bbox}
                | {"area": round(bbox[2] * bbox[3], 3), "iscrowd": 0}
            )
    doc = {"images": images, "annotations": annotations, "categories": [{"id": i, "name": c} for c, i in ids.items()]}
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(doc, separators=(",", ":")))
    os.replace(tmp, path)
    return path
