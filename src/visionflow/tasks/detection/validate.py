"""Validate for detection: every raw image checked as for classification, every box by a great-expectations suite.

The images go through the classification checks unchanged (guarded decoding, format, size and pixel limits:
visionflow.data.validate), less the single-label ones; the boxes get a suite of their own on a one-row-per-box
table: inside the image, not degenerate (detection.min_box_px), a known class (data.labels when set, else the
annotation file's categories), not a duplicate (same class, IoU >= detection.duplicate_iou). An image failing any
of them is quarantined with its reason (data/quarantine/images/, reasons.csv, and annotations.json holding the
quarantined images' boxes as received, to fix). Images without boxes are allowed, and counted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from visionflow.config import Params
from visionflow.data.expectations import Check, SuiteOutcome, run_suite
from visionflow.data.imageio import DecodeRules
from visionflow.data.quarantine import quarantine_reasons, write_quarantine
from visionflow.data.validate import (
    TEXT_COLUMNS,
    Progress,
    ValidationResult,
    _class_table,
    _problems,
    _summary,
    class_checks,
    image_checks,
    inspect_file,
)
from visionflow.data.validation_report import write_reports
from visionflow.errors import DataError
from visionflow.paths import ProjectPaths
from visionflow.tasks.detection.formats import EDGE_TOLERANCE, ImageRecord, read_coco, write_coco

MANIFEST_COLUMNS = [
    "path",
    "sha256",
    "width",
    "height",
    "format",
    "mode",
    "brightness",
    "contrast",
    "blur",
    "n_boxes",
    "classes",
    "boxes",
]
QUARANTINE_FOLDER = "images"  # data/quarantine/images/<file>, as in data/raw
_SINGLE_LABEL = {"unknown_label", "label_conflict"}  # classification's checks that have no meaning here


@dataclass(frozen=True)
class DetectionValidationResult(ValidationResult):
    n_negatives: int = 0  # accepted images without boxes
    n_boxes: int = 0  # boxes on accepted images


def boxes_json(boxes) -> str:
    """The manifest's and split CSVs' `boxes` column (the package's contract)."""
    return json.dumps([[round(float(v), 3) for v in b[:4]] + [b[4]] for b in boxes])


def read_detection_manifest(path: Path) -> pd.DataFrame:
    """A detection manifest or split CSV, its text columns kept as text (a class named "1" stays a string)."""
    return pd.read_csv(path, dtype={**TEXT_COLUMNS, "classes": str, "boxes": str}, keep_default_na=False)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    ix = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    union = a[2] * a[3] + b[2] * b[3] - ix * iy
    return ix * iy / union if union > 0 else 0.0


def box_table(rows: pd.DataFrame, duplicate_iou: float) -> pd.DataFrame:
    """One row per box of the decodable images: what the box suite checks. A box is a duplicate when an earlier box
    of its image has its class and overlaps it at duplicate_iou or more."""
    out = []
    for r in rows.itertuples():
        if pd.isna(r.width):
            continue  # undecodable: quarantined by the image suite already
        kept: list[tuple[np.ndarray, str]] = []
        for i, (x, y, w, h, cls) in enumerate(r.box_list):
            xywh = np.array([x, y, w, h], float)
            dup = any(c == cls and _iou(xywh, k) >= duplicate_iou for k, c in kept)
            kept.append((xywh, cls))
            out.append(
                {
                    "box": f"{r.path}#{i}",
                    "path": r.path,
                    "cls": cls,
                    "overflow": float(max(-x, -y, x + w - r.width, y + h - r.height)),
                    "min_side": float(min(w, h)),
                    "duplicate": dup,
                    "what": f"box {i} {[round(float(v), 3) for v in xywh]} {cls!r} in {r.width:.0f}x{r.height:.0f}",
                }
            )
    return pd.DataFrame(out, columns=["box", "path", "cls", "overflow", "min_side", "duplicate", "what"])


# the box suite's reasons, in the order an image's first failing box is reported
BOX_REASONS = ("box_outside_image", "degenerate_box", "unknown_class", "duplicate_box")


def box_checks(min_box_px: float, known: list[str]):
    def build(E) -> list[Check]:
        outside, degenerate, unknown, duplicate = BOX_REASONS
        return [
            Check(E.ExpectColumnValuesToBeBetween(column="overflow", max_value=EDGE_TOLERANCE), outside),
            Check(E.ExpectColumnValuesToBeBetween(column="min_side", min_value=min_box_px), degenerate),
            Check(E.ExpectColumnValuesToBeInSet(column="cls", value_set=known), unknown),
            Check(E.ExpectColumnValuesToBeInSet(column="duplicate", value_set=[False]), duplicate),
        ]

    return build


def _image_suite(cfg):
    """The classification image checks without the single-label ones, plus: the same bytes annotated two ways."""

    def build(E) -> list[Check]:
        checks = [c for c in image_checks(cfg, [])(E) if c.reason not in _SINGLE_LABEL]
        return checks + [Check(E.ExpectColumnValuesToBeInSet(column="box_conflict", value_set=[False]), "box_conflict")]

    return build


def _inspect(records: list[ImageRecord], rules: DecodeRules, paths: ProjectPaths, progress) -> pd.DataFrame:
    rows = []
    for done, r in enumerate(records, 1):
        row = inspect_file(r.path, QUARANTINE_FOLDER, rules)
        row.update(path=paths.relative(r.path), box_list=list(r.boxes), boxes=boxes_json(r.boxes))
        row["declared_size"] = (r.width, r.height)  # as annotated, for the quarantine's own annotations file
        rows.append(row)
        if progress and (done % 500 == 0 or done == len(records)):
            progress(done, len(records))
    df = pd.DataFrame(rows)
    for col in ("decode_detail", "format", "mode", "width", "height", "sha256"):
        if col not in df:
            df[col] = None
    df["n_boxes"] = df["box_list"].map(len)
    df["classes"] = df["box_list"].map(lambda bs: "|".join(sorted({b[4] for b in bs})))
    boxes_per_sha = df[df["sha256"].notna()].groupby("sha256")["boxes"].nunique()
    df["box_conflict"] = df["sha256"].isin(set(boxes_per_sha[boxes_per_sha > 1].index))
    return df


def _box_reasons(df: pd.DataFrame, boxes: SuiteOutcome, table: pd.DataFrame) -> None:
    """Give each image not yet quarantined the reason of its first failing box (in the suite's order of checks)."""
    by_key = table.set_index("box")
    for reason in BOX_REASONS:
        for key in boxes.failing.get(reason, []):
            hit = (df["path"] == by_key.at[key, "path"]) & df["quarantine_reason"].isna()
            df.loc[hit, "quarantine_reason"] = reason
            df.loc[hit, "decode_detail"] = f"{by_key.at[key, 'what']}: {reason}"


def _run_boxes(table: pd.DataFrame, d, known: list[str]) -> SuiteOutcome:
    if table.empty:  # only negatives: nothing to check (great-expectations wants rows)
        return SuiteOutcome("boxes", True, [], {}, {})
    return run_suite("boxes", table, "box", box_checks(d.min_box_px, known))


def validate(p: Params, root: Path, data_version: str | None, progress: Progress | None = None) -> ValidationResult:
    """Check data/raw (images/ and annotations.json); write the accepted manifest, the quarantine and the report."""
    paths = ProjectPaths.of(p, root)
    cfg = p.validation.model_copy(update={"quarantine_dir": paths.quarantine, "report_dir": paths.validation_reports})
    coco = paths.raw / "annotations.json"
    if not coco.is_file():
        raise DataError(f"{coco} not found: run `visionflow ingest` first (with base.task: detection)")
    ann = read_coco(coco, judge_boxes=False)
    if not ann.records:
        raise DataError(f"{coco} lists no usable image: run `visionflow ingest --force`")
    df = _inspect(ann.records, DecodeRules.from_params(cfg), paths, progress)
    known = sorted(p.data.labels) if p.data.labels else ann.classes

    images = run_suite("images", df.drop(columns="box_list"), "path", _image_suite(cfg))
    df["quarantine_reason"] = quarantine_reasons(df, images)
    _annotation_reasons(df, ann.records)
    table = box_table(df[df["quarantine_reason"].isna()], p.detection.duplicate_iou)
    boxes = _run_boxes(table, p.detection, known)
    _box_reasons(df, boxes, table)
    accepted = df[df["quarantine_reason"].isna()].copy()
    rejected = df[df["quarantine_reason"].notna()].copy()
    write_quarantine(rejected, paths.quarantine, paths)
    _quarantined_annotations(rejected, paths)

    per_class = pd.Series([b[4] for bs in accepted["box_list"] for b in bs], dtype=object).value_counts()
    counts = per_class.reindex(known, fill_value=0)
    classes = run_suite("classes", _class_table(counts), "label", class_checks(cfg))
    problems = _problems(cfg, n_images=len(df), n_rejected=len(rejected), classes=classes)

    paths.manifest.parent.mkdir(parents=True, exist_ok=True)
    accepted[MANIFEST_COLUMNS].to_csv(paths.manifest, index=False)
    summary = _summary(df, accepted, rejected, counts, problems, data_version, images, classes)
    summary["suites"]["boxes"] = boxes.results
    n_negatives = int((accepted["n_boxes"] == 0).sum())
    summary.update(n_negatives=n_negatives, n_boxes=int(accepted["n_boxes"].sum()), ingest_problems=ann.skipped)
    report_dir = write_reports(paths.validation_reports, summary, images, classes)
    (report_dir / "great_expectations_boxes.json").write_text(json.dumps(boxes.raw, indent=1, default=str))
    if problems:
        raise DataError(
            "validation failed:\n  "
            + "\n  ".join(problems)
            + f"\nQuarantined files are in {paths.quarantine}/ (reasons.csv says why); "
            + f"the full report is {report_dir / 'index.html'}"
        )
    return DetectionValidationResult(
        n_images=len(df),
        n_accepted=len(accepted),
        n_quarantined=len(rejected),
        quarantined_by_reason={str(k): int(v) for k, v in summary["quarantined_by_reason"].items()},
        class_counts=summary["class_counts"],
        manifest_path=str(paths.manifest),
        report_json=str(report_dir / "validation.json"),
        report_html=str(report_dir / "index.html"),
        success=True,
        n_negatives=n_negatives,
        n_boxes=summary["n_boxes"],
    )


def _annotation_reasons(df: pd.DataFrame, records: list[ImageRecord]) -> None:
    """An image with an annotation ingest could not take (a malformed box, an unknown category id) is quarantined:
    accepting it without that box would teach the model that the object is background."""
    for i, r in zip(df.index, records):
        if r.problems and pd.isna(df.at[i, "quarantine_reason"]):
            df.at[i, "quarantine_reason"], df.at[i, "decode_detail"] = r.problems[0]


def _quarantined_annotations(rejected: pd.DataFrame, paths: ProjectPaths) -> None:
    """The quarantined images' boxes as received, as COCO beside reasons.csv: fix them there and ingest again."""
    records = [
        ImageRecord(Path(r.path), Path(r.path).name, tuple(r.box_list), *r.declared_size) for r in rejected.itertuples()
    ]
    classes = sorted({b[4] for r in records for b in r.boxes})
    write_coco(paths.quarantine / "annotations.json", records, classes)
