"""Detection ingest -> validate -> split in a throwaway project: bundled scenes end to end, a COCO export with broken
entries, reviewed images replacing ingested ones, bad annotations quarantined with reasons, leakage-free splits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from visionflow.config import parse_params
from visionflow.errors import DataError
from visionflow.tasks.detection.formats import ImageRecord, write_coco
from visionflow.tasks.detection.ingest import ingest
from visionflow.tasks.detection.split import NEGATIVES, split, strata
from visionflow.tasks.detection.validate import MANIFEST_COLUMNS, read_detection_manifest, validate

LENIENT = {"min_images_per_class": 1, "min_class_balance": 0.0, "max_quarantine_fraction": 1.0}


def params(**detection):
    return parse_params({"base": {"task": "detection"}, "detection": detection, "validate": LENIENT})


def test_scenes_end_to_end(tmp_path):
    p = params(scenes=40, scene_size=96, max_objects=3)
    res = ingest(p, tmp_path)
    assert (res.n_images, res.skipped, res.skipped_files) == (40, False, ())
    doc = json.loads((tmp_path / "data/raw/annotations.json").read_text())
    assert len(doc["images"]) == 40 == len(list((tmp_path / "data/raw/images").iterdir()))
    assert sum(res.classes.values()) == len(doc["annotations"])
    assert ingest(p, tmp_path).skipped and not ingest(p, tmp_path, force=True).skipped

    v = validate(p, tmp_path, "dv1")
    with_boxes = {a["image_id"] for a in doc["annotations"]}
    assert (v.n_accepted, v.n_quarantined) == (40, 0)
    assert v.n_negatives == 40 - len(with_boxes) and v.n_boxes == len(doc["annotations"])
    report = json.loads(Path(v.report_json).read_text())
    assert report["n_negatives"] == v.n_negatives and "boxes" in report["suites"]
    manifest = read_detection_manifest(tmp_path / "data/validated/manifest.csv")
    assert list(manifest.columns) == MANIFEST_COLUMNS
    assert manifest["path"].str.startswith("data/raw/images/").all()

    s = split(p, tmp_path)
    frames = {n: read_detection_manifest(tmp_path / f"data/splits/{n}.csv") for n in ("train", "val", "test")}
    shas = [set(f["sha256"]) for f in frames.values()]
    assert not (shas[0] & shas[1] or shas[0] & shas[2] or shas[1] & shas[2]) and s.leakage_free
    assert sorted(pd.concat(frames.values())["path"]) == sorted(manifest["path"])
    assert list(frames["test"].columns) == MANIFEST_COLUMNS
    # stratified: every stratum with 3 or more images reaches every split
    stratum = dict(zip(manifest["path"], strata(manifest["classes"])))
    sizes = pd.Series(stratum).value_counts()
    for name, f in frames.items():
        assert set(sizes[sizes >= 3].index) <= {stratum[q] for q in f["path"]}, name
    assert s.per_class["train"][NEGATIVES] + s.per_class["val"][NEGATIVES] + s.per_class["test"][NEGATIVES] == (
        v.n_negatives
    )
    assert split(p, tmp_path, keep_previous=False).counts == s.counts  # deterministic from the seed


def test_broken_source_leaves_raw_untouched(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    ingest(params(scenes=10, scene_size=64), tmp_path)
    before = (tmp_path / "data/raw/annotations.json").read_bytes()
    with pytest.raises(DataError, match="not valid JSON"):
        ingest(params(source=str(bad)), tmp_path)
    assert (tmp_path / "data/raw/annotations.json").read_bytes() == before


def _raw_project(root: Path) -> dict[str, tuple]:
    """data/raw by hand: good images, negatives, identical twins, and one of each annotation problem."""
    images = root / "data/raw/images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    boxes = {
        "good1.png": ((2, 2, 10, 10, "bolt"),),
        "good2.png": ((5, 5, 20, 10, "nut"), (30, 5, 5, 5, "bolt")),
        "twin1.png": ((1, 1, 5, 5, "nut"),),
        "twin2.png": ((1, 1, 5, 5, "nut"),),
        "neg1.png": (),
        "neg2.png": (),
        "outside.png": ((30, 20, 20, 20, "bolt"),),
        "thin.png": ((3, 3, 0.5, 10, "bolt"),),
        "stranger.png": ((3, 3, 5, 5, "gear"),),
        "dup.png": ((3, 3, 10, 10, "nut"), (3, 3, 10, 10.2, "nut")),
        "garbage.png": ((3, 3, 5, 5, "nut"),),
        "clash1.png": ((1, 1, 5, 5, "nut"),),  # the same bytes as clash2.png, boxed differently
        "clash2.png": ((1, 1, 5, 5, "bolt"),),
    }
    twin, clash = rng.integers(0, 255, (2, 30, 40, 3), dtype=np.uint8)
    for name in boxes:
        arr = {"twin": twin, "clas": clash}.get(name[:4], rng.integers(0, 255, (30, 40, 3), dtype=np.uint8))
        Image.fromarray(arr).save(images / name)
    (images / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    records = [ImageRecord(images / n, n, b, 40, 30) for n, b in boxes.items()]
    write_coco(root / "data/raw/annotations.json", records, ["bolt", "gear", "nut"])
    return boxes


def test_validate_quarantines_bad_annotations_and_split_keeps_twins_together(tmp_path):
    _raw_project(tmp_path)
    p = parse_params({"base": {"task": "detection"}, "data": {"labels": ["bolt", "nut"]}, "validate": LENIENT})
    v = validate(p, tmp_path, None)
    assert v.quarantined_by_reason == {
        "box_outside_image": 1, "degenerate_box": 1, "unknown_class": 1, "duplicate_box": 1, "not_an_image": 1,
        "box_conflict": 2,
    }  # fmt: skip
    reasons = pd.read_csv(tmp_path / "data/quarantine/reasons.csv")
    by_file = dict(zip(reasons["original_path"].map(lambda q: Path(q).name), reasons["reason"]))
    assert by_file["outside.png"] == "box_outside_image"
    detail = dict(zip(reasons["original_path"].map(lambda q: Path(q).name), reasons["detail"]))
    assert detail["outside.png"] == "box 0 [30.0, 20.0, 20.0, 20.0] 'bolt' in 40x30: box_outside_image"
    assert by_file["thin.png"] == "degenerate_box"
    assert by_file["stranger.png"] == "unknown_class"
    assert by_file["dup.png"] == "duplicate_box"
    assert by_file["garbage.png"] == "not_an_image" and by_file["clash1.png"] == "box_conflict" and len(by_file) == 7
    assert (tmp_path / "data/quarantine/images/outside.png").is_file()
    held = json.loads((tmp_path / "data/quarantine/annotations.json").read_text())
    assert len(held["images"]) == 7 and {c["name"] for c in held["categories"]} >= {"gear", "bolt"}
    assert (v.n_accepted, v.n_negatives, v.n_boxes) == (6, 2, 5)
    report = json.loads(Path(v.report_json).read_text())
    assert report["n_negatives"] == 2 and report["n_quarantined"] == 7

    manifest = read_detection_manifest(tmp_path / "data/validated/manifest.csv")
    good2 = manifest[manifest["path"].str.endswith("good2.png")].iloc[0]
    assert good2["classes"] == "bolt|nut" and json.loads(good2["boxes"]) == [
        [5, 5, 20, 10, "nut"],
        [30, 5, 5, 5, "bolt"],
    ]
    split(p, tmp_path)
    where = {}
    for name in ("train", "val", "test"):
        for q in read_detection_manifest(tmp_path / f"data/splits/{name}.csv")["path"]:
            where[Path(q).name] = name
    assert where["twin1.png"] == where["twin2.png"] and len(where) == 6


def test_validate_without_ingest_and_strata(tmp_path):
    assert strata(["bolt|nut", "nut", "", "nut|washer"]) == ["bolt", "nut", NEGATIVES, "washer"]
    with pytest.raises(DataError, match="run `visionflow ingest` first"):
        validate(params(), tmp_path, None)
