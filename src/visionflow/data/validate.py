"""Validate: a manifest of every raw image, checked by a great-expectations suite; failures are quarantined.

data/raw stays exactly as versioned (moving files out of it would change the data version behind DVC's back).
A file that fails an expectation is copied to data/quarantine/<class>/ with its reason in reasons.csv and left out
of the accepted manifest, which is what every later stage reads. The suites run through
visionflow.data.expectations; the quarantine and the report are written by visionflow.data.quarantine and
visionflow.data.validation_report.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from visionflow.config import ValidateParams
from visionflow.data import shards
from visionflow.data.expectations import Check, SuiteOutcome, run_suite
from visionflow.data.folder_source import check_class_names
from visionflow.data.imageio import (
    DecodeRules,
    RejectedImage,
    image_properties,
    open_guarded,
    read_limited,
    sha256_bytes,
    sha256_file,
    stored_size,
    to_array,
)
from visionflow.data.quarantine import quarantine_reasons, write_quarantine
from visionflow.data.validation_report import write_reports
from visionflow.errors import DataError
from visionflow.paths import ProjectPaths

MANIFEST_COLUMNS = [
    "path",
    "label",
    "sha256",
    "file_size",
    "decodable",
    "decode_error",
    "format",
    "mode",
    "width",
    "height",
    "brightness",
    "contrast",
    "blur",
]
Progress = Callable[[int, int], None]
# pandas' C parser crashes the interpreter (segfault, pandas 2.3.3) when it tries to infer a number from some
# sha256 strings such as "4e2768937653187fab...": text columns are always read as text.
TEXT_COLUMNS = {
    c: str for c in ("path", "label", "sha256", "original_path", "quarantined_as", "reason", "detail", "format", "mode")
}


def read_manifest(path: Path) -> pd.DataFrame:
    """Read a manifest or reasons CSV written by this package, with text columns kept as text."""
    return pd.read_csv(path, dtype=TEXT_COLUMNS, keep_default_na=False, na_values={"detail": [""]})


def failure_detail(exc: BaseException) -> str:
    """'struct.error: ...' rather than 'error: ...': the exception's module says where it came from."""
    kind = type(exc)
    name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    return f"{name}: {exc}"


def inspect_file(path: Path, label: str, rules: DecodeRules) -> dict[str, Any]:
    """One manifest row. Never raises for a bad image: the row says what is wrong."""
    row: dict[str, Any] = dict.fromkeys(MANIFEST_COLUMNS)
    row.update(path=str(path), label=label, decodable=False)
    try:
        row["file_size"] = stored_size(path)
        if row["file_size"] > rules.max_bytes:
            row["sha256"] = (
                shards.lookup(*located).sha256 if (located := shards.split_locator(path)) else sha256_file(path)
            )
            raise RejectedImage("file_too_large", f"{row['file_size']} bytes > limit {rules.max_bytes}")
        data = read_limited(path, None)
        row["sha256"] = sha256_bytes(data)
        img = open_guarded(data, rules)
        row.update(format=img.format, mode=img.mode, width=img.size[0], height=img.size[1])
        row.update(image_properties(to_array(img, channels=1)))
        row["decodable"] = True
    except shards.ShardError as exc:
        # damaged storage, not a bad image: stop, rather than quarantine an image that is fine in the DVC cache
        raw_dir = Path(path).parent.parent  # <raw_dir>/shard-<hash>.tar#<class>/<file>
        raise DataError(f"{exc}. No image is lost: {shards.restore_hint(raw_dir)}") from None
    except RejectedImage as exc:
        row["decode_error"] = exc.reason
        row["decode_detail"] = exc.detail
    except OSError as exc:
        row["decode_error"] = "unreadable_file"
        row["decode_detail"] = str(exc)
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types past the guard, e.g. for EXIF it cannot re-serialise
        row["decode_error"] = "decode_failed"
        row["decode_detail"] = failure_detail(exc)
    return row


def _inspect_chunk(args: tuple[list[tuple[str, str]], DecodeRules]) -> list[dict[str, Any]]:
    items, rules = args
    return [inspect_file(Path(p), label, rules) for p, label in items]


def list_raw(raw_dir: Path) -> list[tuple[str, str]]:
    """(path, label) of every raw image: files of the loose layout, or shard locators (visionflow.data.shards)."""
    if not raw_dir.is_dir():
        raise DataError(f"{raw_dir} does not exist: run `visionflow ingest` first")
    if shards.is_sharded(raw_dir):
        return _list_shards(raw_dir)
    classes = sorted(d for d in raw_dir.iterdir() if d.is_dir())
    # Folder names become labels in the manifest, the model card and the review page; a raw folder made before
    # ingest checked them (an old data version, a hand-made folder) is held to the same rule.
    check_class_names([d.name for d in classes], str(raw_dir))
    items = [(str(f), d.name) for d in classes for f in sorted(d.iterdir()) if f.is_file()]
    if not items:
        raise DataError(f"{raw_dir} holds no images: expected {raw_dir}/<class>/<image files>")
    return items


def _list_shards(raw_dir: Path) -> list[tuple[str, str]]:
    restore = shards.restore_hint(raw_dir)
    folders = sorted(p.name for p in raw_dir.iterdir() if p.is_dir())
    if folders:  # checked first: both ways out replace data/raw, so the user moves these images out before
        raise DataError(
            f"{raw_dir} holds both shards and class folders ({', '.join(folders[:3])}): move the folders out (new "
            f"images belong in the data.source folder), then {restore}"
        )
    problems = shards.verify(raw_dir)
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise DataError(f"{raw_dir}: {'; '.join(problems[:3])}{more}. No image is lost: {restore}")
    members = shards.read_index(raw_dir)
    check_class_names(sorted({m.label for m in members}), str(raw_dir))
    if not members:
        raise DataError(f"{raw_dir} holds shards with no images: run `visionflow ingest --force`")
    return [(shards.locator(raw_dir, m), m.label) for m in members]


def build_manifest(
    raw_dir: Path, rules: DecodeRules, workers: int | None = None, progress: Progress | None = None
) -> pd.DataFrame:
    items = list_raw(raw_dir)
    workers = workers if workers is not None else min(os.cpu_count() or 1, 8)
    chunk = 512
    chunks = [(items[i : i + chunk], rules) for i in range(0, len(items), chunk)]
    rows: list[dict[str, Any]] = []
    if workers <= 1 or len(chunks) == 1:
        results: Iterable[list[dict[str, Any]]] = map(_inspect_chunk, chunks)
        for part in results:
            rows.extend(part)
            if progress:
                progress(len(rows), len(items))
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for part in pool.map(_inspect_chunk, chunks):
                rows.extend(part)
                if progress:
                    progress(len(rows), len(items))
    df = pd.DataFrame(rows)
    for col in MANIFEST_COLUMNS + ["decode_detail"]:
        if col not in df:
            df[col] = None
    return df


# --- the suites (great-expectations) -----------------------------------------------------------------------


def image_checks(cfg: ValidateParams, labels: list[str]) -> Callable[[Any], list[Check]]:
    def build(E) -> list[Check]:
        return [
            Check(E.ExpectColumnValuesToBeInSet(column="decodable", value_set=[True]), "undecodable"),
            Check(
                E.ExpectColumnValuesToBeInSet(column="format", value_set=list(cfg.allowed_formats)),
                "format_not_allowed",
            ),
            Check(
                E.ExpectColumnValuesToBeBetween(column="width", min_value=cfg.min_width, max_value=cfg.max_width),
                "width_out_of_bounds",
            ),
            Check(
                E.ExpectColumnValuesToBeBetween(column="height", min_value=cfg.min_height, max_value=cfg.max_height),
                "height_out_of_bounds",
            ),
            Check(E.ExpectColumnValuesToBeInSet(column="label", value_set=labels), "unknown_label"),
            Check(E.ExpectColumnValuesToBeInSet(column="label_conflict", value_set=[False]), "label_conflict"),
            Check(E.ExpectColumnValuesToNotBeNull(column="sha256"), "unreadable_file"),
        ]

    return build


def class_checks(cfg: ValidateParams) -> Callable[[Any], list[Check]]:
    def build(E) -> list[Check]:
        return [
            Check(
                E.ExpectColumnValuesToBeBetween(column="count", min_value=cfg.min_images_per_class),
                "too_few_images_in_class",
            ),
            Check(
                E.ExpectColumnValuesToBeBetween(column="balance", min_value=cfg.min_class_balance), "class_imbalance"
            ),
        ]

    return build


# --- the stage ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ValidationResult:
    n_images: int
    n_accepted: int
    n_quarantined: int
    quarantined_by_reason: dict[str, int]
    class_counts: dict[str, int]
    manifest_path: str
    report_json: str
    report_html: str
    success: bool


def _label_conflicts(df: pd.DataFrame) -> pd.Series:
    # The same bytes under two labels cannot both be right, and would leak across splits: quarantine every copy.
    decodable = df[df["sha256"].notna()]
    n_labels = decodable.groupby("sha256")["label"].nunique()
    conflicted = set(n_labels[n_labels > 1].index)
    return df["sha256"].isin(conflicted)


def validate(
    *,
    raw_dir: Path,
    cfg: ValidateParams,
    manifest_path: Path,
    labels: list[str] | None = None,
    data_version: str | None = None,
    workers: int | None = None,
    progress: Progress | None = None,
    project: ProjectPaths | None = None,
) -> ValidationResult:
    """project: the manifest, reasons.csv and the report store paths relative to its root (None: as listed)."""
    df = build_manifest(Path(raw_dir), DecodeRules.from_params(cfg), workers=workers, progress=progress)
    if project is not None:
        df["path"] = df["path"].map(project.relative)
    df["label_conflict"] = _label_conflicts(df)
    known = sorted(labels) if labels else sorted(df["label"].unique())

    images = run_suite("images", df, "path", image_checks(cfg, known))
    df["quarantine_reason"] = quarantine_reasons(df, images)
    accepted = df[df["quarantine_reason"].isna()].copy()
    rejected = df[df["quarantine_reason"].notna()].copy()
    write_quarantine(rejected, Path(cfg.quarantine_dir), project)

    counts = accepted.groupby("label").size().reindex(known, fill_value=0)
    classes = run_suite("classes", _class_table(counts), "label", class_checks(cfg))
    problems = _problems(cfg, n_images=len(df), n_rejected=len(rejected), classes=classes)

    manifest_path = Path(manifest_path)
    manifest_path.parent.mkdir(parents=True, exist_ok=True)
    accepted[[c for c in MANIFEST_COLUMNS if c not in ("decodable", "decode_error")]].to_csv(manifest_path, index=False)

    summary = _summary(df, accepted, rejected, counts, problems, data_version, images, classes)
    report_dir = write_reports(Path(cfg.report_dir), summary, images, classes)
    if problems:
        raise DataError(
            "validation failed:\n  "
            + "\n  ".join(problems)
            + f"\nQuarantined files are in {cfg.quarantine_dir}/ (reasons.csv says why); "
            + f"the full report is {report_dir / 'index.html'}"
        )
    return ValidationResult(
        n_images=len(df),
        n_accepted=len(accepted),
        n_quarantined=len(rejected),
        quarantined_by_reason={str(k): int(v) for k, v in summary["quarantined_by_reason"].items()},
        class_counts=summary["class_counts"],
        manifest_path=str(manifest_path),
        report_json=str(report_dir / "validation.json"),
        report_html=str(report_dir / "index.html"),
        success=True,
    )


def _class_table(counts: pd.Series) -> pd.DataFrame:
    """Accepted images per class, and each class's size relative to the largest (what the class suite checks)."""
    class_df = pd.DataFrame({"label": counts.index, "count": counts.values})
    class_df["balance"] = class_df["count"] / max(int(class_df["count"].max()), 1)
    return class_df


def _problems(cfg: ValidateParams, *, n_images: int, n_rejected: int, classes: SuiteOutcome) -> list[str]:
    """What fails the stage: too much quarantined, or a class suite failure (too few images, imbalance)."""
    fraction = n_rejected / max(n_images, 1)
    problems: list[str] = []
    if fraction > cfg.max_quarantine_fraction:
        problems.append(
            f"{n_rejected} of {n_images} images quarantined ({fraction:.1%}), over the "
            f"validate.max_quarantine_fraction limit of {cfg.max_quarantine_fraction:.1%}"
        )
    for reason, keys in classes.failing.items():
        problems.append(f"{reason}: {', '.join(sorted(set(keys)))}")
    return problems


def _summary(
    df: pd.DataFrame,
    accepted: pd.DataFrame,
    rejected: pd.DataFrame,
    counts: pd.Series,
    problems: list[str],
    data_version: str | None,
    images: SuiteOutcome,
    classes: SuiteOutcome,
) -> dict[str, Any]:
    """validation.json's content (the HTML report shows the same)."""
    return {
        "success": not problems,
        "data_version": data_version,
        "n_images": len(df),
        "n_accepted": len(accepted),
        "n_quarantined": len(rejected),
        "quarantined_fraction": len(rejected) / max(len(df), 1),
        "quarantined_by_reason": rejected["quarantine_reason"].value_counts().to_dict(),
        "class_counts": {k: int(v) for k, v in counts.items()},
        "problems": problems,
        "quarantined": rejected[["path", "label", "quarantine_reason", "decode_detail"]]
        .fillna("")
        .to_dict(orient="records"),
        "suites": {"images": images.results, "classes": classes.results},
    }
