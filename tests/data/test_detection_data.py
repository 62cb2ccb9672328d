"""Detection data: the bundled scenes (deterministic, exact boxes) and the COCO / YOLO readers (every entry left out
has its reason, no good image is lost, hostile file names are refused)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from visionflow.config import parse_params
from visionflow.data.fashion_mnist import FASHION_MNIST_CLASSES
from visionflow.errors import DataError
from visionflow.tasks.detection import scenes
from visionflow.tasks.detection.formats import read_coco, read_source, read_yolo
from visionflow.tasks.detection.ingest import ingest
from visionflow.tasks.detection.validate import validate


@pytest.fixture(scope="module")
def items(tmp_path_factory) -> tuple[np.ndarray, np.ndarray]:
    return scenes.training_items(tmp_path_factory.mktemp("external"))


def test_scene_boxes_are_exact_and_the_rest_is_canvas(items):
    n_boxes = 0
    for i in range(40):
        s = scenes.scene(7, i, 128, 4, *items)
        outside = np.ones((128, 128), bool)
        for (x, y, w, h, cls), mask in zip(s.boxes, s.masks):
            ys, xs = np.nonzero(mask)
            # the box is the tight extent of the item's visible pixels
            assert (x, y, w, h) == (xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)
            assert 0 <= x and 0 <= y and x + w <= 128 and y + h <= 128 and w >= 1 and h >= 1
            assert cls in FASHION_MNIST_CLASSES
            outside[int(y) : int(y + h), int(x) : int(x + w)] = False
        assert sum(m.sum() for m in s.masks) == np.logical_or.reduce([*s.masks, np.zeros((128, 128), bool)]).sum()
        assert (s.image[outside] == s.canvas[outside]).all()
        assert s.image.dtype == np.uint8 and s.image.shape == (128, 128, 3)
        assert s.canvas.std() > 2  # textured, not flat
        n_boxes += len(s.boxes)
    assert 40 <= n_boxes <= 160


def test_scenes_are_deterministic_from_the_seed(tmp_path):
    a = list(scenes.render(6, seed=3, size=96, max_objects=3, cache_dir=tmp_path))
    b = list(scenes.render(4, seed=3, size=96, max_objects=3, cache_dir=tmp_path))
    c = list(scenes.render(6, seed=4, size=96, max_objects=3, cache_dir=tmp_path))
    for (ia, ba), (ib, bb) in zip(a, b):  # scene i does not depend on how many are made
        assert (ia == ib).all() and ba == bb
    assert all(not (ia == ic).all() for (ia, _), (ic, _) in zip(a, c))
    assert all(len(boxes) <= 3 for _, boxes in a) and a[0][0].shape == (96, 96, 3)


def test_scenes_hold_some_negatives_and_sizes(items):
    counts = [len(scenes.scene(11, i, 128, 4, *items).boxes) for i in range(300)]
    assert 3 <= counts.count(0) <= 30  # about 5%
    sides = [max(b[2], b[3]) for i in range(60) for b in scenes.scene(11, i, 128, 4, *items).boxes]
    assert 10 <= min(sides) and max(sides) <= 61


def test_write_scenes_writes_canonical_coco(tmp_path):
    path = scenes.write_scenes(tmp_path / "out", n=5, seed=1, size=64, max_objects=2, cache_dir=tmp_path)
    doc = json.loads(path.read_text())
    assert [c["name"] for c in doc["categories"]] == sorted(FASHION_MNIST_CLASSES)
    assert [c["id"] for c in doc["categories"]] == list(range(1, 11))
    read = read_coco(path)
    rendered = list(scenes.render(5, seed=1, size=64, max_objects=2, cache_dir=tmp_path))
    assert [list(r.boxes) for r in read.records] == [b for _, b in rendered]
    assert not read.skipped
    assert (np.asarray(Image.open(read.records[0].path)) == rendered[0][0]).all()


# --- COCO ---------------------------------------------------------------------------------------------------


def _png(path: Path, size=(40, 30), value=100) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(path)


def make_coco(root: Path) -> Path:
    """An export with one of each problem, beside good images (a.png two boxes, e.png none)."""
    for i, name in enumerate(("a", "b", "c", "e")):
        _png(root / "images" / f"{name}.png", value=40 * i)
    _png(root.parent / "secret.png")
    os.symlink(root.parent / "secret.png", root / "images" / "link.png")
    images = [
        {"id": 1, "file_name": "a.png", "width": 40, "height": 30},
        {"id": 2, "file_name": "images/b.png", "width": 40, "height": 30},
        {"id": 3, "file_name": "c.png", "width": 40, "height": 30},
        {"id": 4, "file_name": "d.png", "width": 40, "height": 30},  # missing
        {"id": 5, "file_name": "e.png", "width": 40, "height": 30},  # no boxes
        {"id": 6, "file_name": "../secret.png", "width": 40, "height": 30},
        {"id": 7, "file_name": str(root.parent / "secret.png"), "width": 40, "height": 30},
        {"id": 8, "file_name": "link.png", "width": 40, "height": 30},
        {"id": 9, "file_name": "nul\0.png"},
        {"id": [10], "file_name": "e.png"},
    ]
    anns = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 2, 10, 10]},
        {"id": 2, "image_id": 1, "category_id": 2, "bbox": [20, 5, 19.5, 25]},
        {"id": 3, "image_id": 2, "category_id": 1, "bbox": [35, 5, 10, 10]},  # outside
        {"id": 4, "image_id": 2, "category_id": 2, "bbox": [0, 0, 5, 5]},
        {"id": 5, "image_id": 3, "category_id": 9, "bbox": [0, 0, 5, 5]},  # unknown class id
        {"id": 6, "image_id": 8, "category_id": 1, "bbox": [0, 0, 5, 5]},
    ]
    path = root / "annotations.json"
    cats = [{"id": 1, "name": "bolt"}, {"id": 2, "name": "nut"}]
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return path


def _reasons(read) -> dict[str, str]:
    return {s["path"]: s["reason"] for s in read.skipped}


def test_read_coco_keeps_every_good_image_and_says_why_for_the_rest(tmp_path):
    read = read_coco(make_coco(tmp_path / "export"))
    by_name = {r.name: r for r in read.records}
    assert sorted(by_name) == ["a.png", "c.png", "e.png", "images/b.png"]
    assert by_name["a.png"].boxes == ((1.0, 2.0, 10.0, 10.0, "bolt"), (20.0, 5.0, 19.5, 25.0, "nut"))
    assert by_name["images/b.png"].boxes == ((0.0, 0.0, 5.0, 5.0, "nut"),)  # its good box is kept
    assert by_name["c.png"].boxes == () and by_name["e.png"].boxes == ()
    assert by_name["a.png"].path == (tmp_path / "export/images/a.png").resolve()
    reasons = _reasons(read)
    assert reasons["images/b.png"] == "box_outside_image"
    assert reasons["c.png"] == "unknown_class_id"
    assert reasons["d.png"] == "missing_image"
    assert reasons["../secret.png"] == "unsafe_file_name"
    assert reasons[str(tmp_path / "secret.png")] == "unsafe_file_name"
    assert reasons["link.png"] == "symlink_outside_source"
    assert reasons["nul\0.png"] == "unsafe_file_name" and reasons["e.png"] == "malformed_image_entry"
    assert all(
        s["detail"] or s["reason"] in ("missing_image", "unsafe_file_name", "symlink_outside_source")
        for s in read.skipped
    )
    assert read.classes == ["bolt", "nut"]


@pytest.mark.parametrize(
    "text, expected",
    [
        ('{"images": [', "not valid JSON (line 1"),
        ("[1, 2]", "not a COCO file"),
        ('{"images": [], "categories": [{"id": 1}]}', "'categories' must be"),
        ('{"images": [], "categories": [{"id": 1, "name": "a/b"}]}', "not allowed"),
    ],
)
def test_read_coco_refuses_a_broken_file_in_one_line(tmp_path, text, expected):
    path = tmp_path / "annotations.json"
    path.write_text(text)
    with pytest.raises(DataError) as err:
        read_coco(path)
    assert expected in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(DataError, match="does not exist"):
        read_source(tmp_path / "nope.json")


def test_coco_source_and_reviewed_images(tmp_path):
    coco = make_coco(tmp_path / "export")
    lenient = {"min_images_per_class": 1, "min_class_balance": 0.0, "max_quarantine_fraction": 1.0}
    p = parse_params({"base": {"task": "detection"}, "detection": {"source": str(coco)}, "validate": lenient})
    res = ingest(p, tmp_path / "proj")
    raw = tmp_path / "proj/data/raw"
    assert res.n_images == 4 and sorted(f.name for f in (raw / "images").iterdir()) == [
        "a.png",
        "b.png",
        "c.png",
        "e.png",
    ]
    reasons = sorted(s["reason"] for s in res.skipped_files)
    assert reasons == [
        "box_outside_image", "malformed_image_entry", "missing_image", "symlink_outside_source", "unknown_class_id",
        "unsafe_file_name", "unsafe_file_name", "unsafe_file_name",
    ]  # fmt: skip
    assert not (raw / "images" / "secret.png").exists()

    # a reviewed copy of a.png (same bytes) replaces it with its corrected boxes; a mislabelled file is refused
    reviewed = tmp_path / "proj/data/reviewed/detection"
    reviewed.mkdir(parents=True)
    a = (tmp_path / "export/images/a.png").read_bytes()
    sha = hashlib.sha256(a).hexdigest()
    (reviewed / f"{sha}.png").write_bytes(a)
    corrected = [[2, 2, 8, 8, "bolt"], [20, 5, 9, 9, "nut"], [1, 1, 3, 3, "washer"]]
    review = {"file": f"{sha}.png", "width": 40, "height": 30, "boxes": corrected, "reviewed_at": "now"}
    (reviewed / f"{sha}.json").write_text(json.dumps(review))
    bad = "0" * 64
    (reviewed / f"{bad}.png").write_bytes(b"not these bytes")
    (reviewed / f"{bad}.json").write_text(json.dumps({"file": f"{bad}.png", "width": 4, "height": 4, "boxes": []}))
    res = ingest(p, tmp_path / "proj")
    assert not res.skipped and res.n_reviewed == 1 and res.n_images == 4
    assert "reviewed_sha256_mismatch" in {s["reason"] for s in res.skipped_files}
    names = sorted(f.name for f in (raw / "images").iterdir())
    assert names == ["b.png", "c.png", "e.png", f"reviewed__{sha}.png"]
    doc = json.loads((raw / "annotations.json").read_text())
    cats = {c["id"]: c["name"] for c in doc["categories"]}
    assert list(cats.values()) == ["bolt", "nut", "washer"]
    rid = next(i["id"] for i in doc["images"] if i["file_name"].startswith("reviewed__"))
    assert sorted((cats[a["category_id"]], a["bbox"]) for a in doc["annotations"] if a["image_id"] == rid) == [
        ("bolt", [2, 2, 8, 8]), ("nut", [20, 5, 9, 9]), ("washer", [1, 1, 3, 3])
    ]  # fmt: skip
    assert not list(raw.parent.glob("raw.*"))  # no staging or old folder left behind

    # the images whose boxes were left out are kept, and validation quarantines them with the reason
    v = validate(p, tmp_path / "proj", None)
    assert (v.n_accepted, v.quarantined_by_reason) == (2, {"box_outside_image": 1, "unknown_class_id": 1})
    held = pd.read_csv(tmp_path / "proj/data/quarantine/reasons.csv")
    assert dict(zip(held["original_path"], held["reason"])) == {
        "data/raw/images/b.png": "box_outside_image",
        "data/raw/images/c.png": "unknown_class_id",
    }
    assert held["detail"].str.contains("annotation").all()


# --- YOLO ---------------------------------------------------------------------------------------------------


def make_yolo(root: Path, classes_file: str = "classes.txt") -> Path:
    for name in ("p", "q", "r", "s", "t"):
        _png(root / "images" / f"{name}.png", size=(100, 50))
    labels = root / "labels"
    labels.mkdir()
    (labels / "p.txt").write_text("0 0.5 0.5 0.2 0.4\n1 0.25 0.25 0.1 0.1\n")
    (labels / "q.txt").write_text("7 0.5 0.5 0.2 0.2\n1 0.5 0.5 0.2 0.2\n")  # unknown class id, then a good box
    (labels / "r.txt").write_text("0 0.5 0.5\n")  # unreadable line
    (labels / "t.txt").write_text("0 0.95 0.5 0.3 0.2\n")  # past the right edge
    (labels / "orphan.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    if classes_file == "classes.txt":
        (root / "classes.txt").write_text("bolt\nnut\n")
    else:
        (root / "data.yaml").write_text("names:\n  0: bolt\n  1: nut\n")
    return root


@pytest.mark.parametrize("classes_file", ["classes.txt", "data.yaml"])
def test_read_yolo(tmp_path, classes_file):
    read = read_yolo(make_yolo(tmp_path / "yolo", classes_file))
    by_name = {r.name: r for r in read.records}
    assert sorted(by_name) == ["images/p.png", "images/q.png", "images/r.png", "images/s.png", "images/t.png"]
    assert by_name["images/p.png"].boxes == ((40.0, 15.0, 20.0, 20.0, "bolt"), (20.0, 10.0, 10.0, 5.0, "nut"))
    assert by_name["images/q.png"].boxes == ((40.0, 20.0, 20.0, 10.0, "nut"),)
    assert by_name["images/s.png"].boxes == ()  # no label file: a negative
    assert [q[0] for q in by_name["images/q.png"].problems] == ["unknown_class_id"]  # held for validation
    assert (by_name["images/p.png"].width, by_name["images/p.png"].height) == (100, 50)
    reasons = {(s["path"], s["reason"]) for s in read.skipped}
    assert reasons == {
        ("images/q.png", "unknown_class_id"),
        ("images/r.png", "unreadable_label_line"),
        ("images/t.png", "box_outside_image"),
        ("labels/orphan.txt", "label_without_image"),
    }
    assert any("labels/q.txt line 1" in s["detail"] for s in read.skipped)


def test_read_yolo_split_folders_symlinks_and_missing_classes(tmp_path):
    root = tmp_path / "rf"
    make_yolo(root / "train")
    (root / "train" / "classes.txt").rename(root / "classes.txt")
    _png(tmp_path / "outside.png")
    os.symlink(tmp_path / "outside.png", root / "train" / "images" / "evil.png")
    read = read_source(root)
    assert len(read.records) == 5 and ("train/images/evil.png", "symlink_outside_source") in {
        (s["path"], s["reason"]) for s in read.skipped
    }
    (tmp_path / "secret.txt").write_text("0 0.5 0.5 0.1 0.1 password\n")
    os.symlink(tmp_path / "secret.txt", root / "train" / "labels" / "s.txt")
    read = read_yolo(root)
    leak = [s for s in read.skipped if s["path"] == "train/images/s.png"]
    assert [s["reason"] for s in leak] == ["unreadable_label_file"] and "password" not in leak[0]["detail"]
    assert len(read.records) == 4  # s.png is left out rather than taken as an image without boxes
    (root / "classes.txt").unlink()
    with pytest.raises(DataError, match="no classes.txt or data.yaml"):
        read_yolo(root)
