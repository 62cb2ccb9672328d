"""Validate: a manifest of every raw image, checked by a great-expectations suite; failures are quarantined.

data/raw stays exactly as versioned (moving files out of it would change the data version behind DVC's back).
A file that fails an expectation is copied to data/quarantine/<class>/ with its reason in reasons.csv and left out
of the accepted manifest, which is what every later stage reads.
"""

from __future__ import annotations

import html
import json
import os
import shutil
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from visionflow.config import ValidateParams
from visionflow.data.folder_source import check_class_names
from visionflow.data.imageio import (
    DecodeRules,
    RejectedImage,
    image_properties,
    open_guarded,
    sha256_bytes,
    sha256_file,
    to_array,
)
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
        row["file_size"] = path.stat().st_size
        if row["file_size"] > rules.max_bytes:
            row["sha256"] = sha256_file(path)
            raise RejectedImage("file_too_large", f"{row['file_size']} bytes > limit {rules.max_bytes}")
        data = path.read_bytes()
        row["sha256"] = sha256_bytes(data)
        img = open_guarded(data, rules)
        row.update(format=img.format, mode=img.mode, width=img.size[0], height=img.size[1])
        row.update(image_properties(to_array(img, channels=1)))
        row["decodable"] = True
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
    if not raw_dir.is_dir():
        raise DataError(f"{raw_dir} does not exist: run `visionflow ingest` first")
    classes = sorted(d for d in raw_dir.iterdir() if d.is_dir())
    # Folder names become labels in the manifest, the model card and the review page; a raw folder made before
    # ingest checked them (an old data version, a hand-made folder) is held to the same rule.
    check_class_names([d.name for d in classes], str(raw_dir))
    items = [(str(f), d.name) for d in classes for f in sorted(d.iterdir()) if f.is_file()]
    if not items:
        raise DataError(f"{raw_dir} holds no images: expected {raw_dir}/<class>/<image files>")
    return items


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


# --- great-expectations -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    """One expectation plus the quarantine reason given to each row that fails it."""

    expectation: Any
    reason: str


@dataclass
class SuiteOutcome:
    name: str
    success: bool
    results: list[dict[str, Any]]
    failing: dict[str, list[str]]  # reason -> paths (or keys) of the failing rows
    raw: dict[str, Any]


def _gx_context():
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    # analytics off in the context's own config: the GX_ANALYTICS_ENABLED variable is the entry point's to set
    config = DataContextConfig(analytics_enabled=False, store_backend_defaults=InMemoryStoreBackendDefaults())
    ctx = gx.get_context(mode="ephemeral", project_config=config)
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    return gx, ctx


def run_suite(name: str, df: pd.DataFrame, key: str, checks: Callable[[Any], list[Check]]) -> SuiteOutcome:
    """Run a great-expectations suite on a dataframe; `key` names the column that identifies failing rows."""
    gx, ctx = _gx_context()
    df = df.reset_index(drop=True)  # failing rows are reported by index; it must be unique
    asset = ctx.data_sources.add_pandas(name).add_dataframe_asset(f"{name}_frame")
    batch = asset.add_batch_definition_whole_dataframe("all")
    suite = ctx.suites.add(gx.ExpectationSuite(name=f"{name}_suite"))
    reasons: dict[str, str] = {}
    for check in checks(gx.expectations):
        exp = suite.add_expectation(check.expectation)
        reasons[exp.id] = check.reason
    definition = ctx.validation_definitions.add(gx.ValidationDefinition(data=batch, suite=suite, name=name))
    res = definition.run(
        batch_parameters={"dataframe": df},
        result_format={"result_format": "COMPLETE", "unexpected_index_column_names": [key]},
    )
    failing: dict[str, list[str]] = {}
    summary = []
    for r in res.results:
        cfg = r.expectation_config
        reason = reasons.get(cfg.id, cfg.type)
        bad = [str(item[key]) for item in (r.result.get("unexpected_index_list") or [])]
        if not r.success and not bad and r.result.get("observed_value") is not None:
            bad = ["<dataset>"]
        if bad:
            failing.setdefault(reason, []).extend(bad)
        summary.append(
            {
                "expectation": cfg.type,
                "column": cfg.kwargs.get("column"),
                "reason": reason,
                "success": r.success,
                "unexpected_count": r.result.get("unexpected_count"),
                "element_count": r.result.get("element_count"),
                "kwargs": {k: v for k, v in cfg.kwargs.items() if k not in ("batch_id", "column")},
            }
        )
    return SuiteOutcome(name, bool(res.success), summary, failing, res.to_json_dict())


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
    raw_dir = Path(raw_dir)
    df = build_manifest(raw_dir, DecodeRules.from_params(cfg), workers=workers, progress=progress)
    if project is not None:
        df["path"] = df["path"].map(project.relative)
    df["label_conflict"] = _label_conflicts(df)
    known = sorted(labels) if labels else sorted(df["label"].unique())

    images = run_suite("images", df, "path", image_checks(cfg, known))
    df["quarantine_reason"] = _quarantine_reasons(df, images)
    accepted = df[df["quarantine_reason"].isna()].copy()
    rejected = df[df["quarantine_reason"].notna()].copy()
    _write_quarantine(rejected, Path(cfg.quarantine_dir), project)

    counts = accepted.groupby("label").size().reindex(known, fill_value=0)
    class_df = pd.DataFrame({"label": counts.index, "count": counts.values})
    class_df["balance"] = class_df["count"] / max(int(class_df["count"].max()), 1)
    classes = run_suite("classes", class_df, "label", class_checks(cfg))

    fraction = len(rejected) / max(len(df), 1)
    problems: list[str] = []
    if fraction > cfg.max_quarantine_fraction:
        problems.append(
            f"{len(rejected)} of {len(df)} images quarantined ({fraction:.1%}), over the "
            f"validate.max_quarantine_fraction limit of {cfg.max_quarantine_fraction:.1%}"
        )
    for reason, keys in classes.failing.items():
        problems.append(f"{reason}: {', '.join(sorted(set(keys)))}")

    manifest_path = Path(manifest_path)
    manifest_path.parent.mkdir(parents=True, exist_ok=True)
    accepted[[c for c in MANIFEST_COLUMNS if c not in ("decodable", "decode_error")]].to_csv(manifest_path, index=False)

    by_reason = rejected["quarantine_reason"].value_counts().to_dict()
    summary = {
        "success": not problems,
        "data_version": data_version,
        "n_images": len(df),
        "n_accepted": len(accepted),
        "n_quarantined": len(rejected),
        "quarantined_fraction": fraction,
        "quarantined_by_reason": by_reason,
        "class_counts": {k: int(v) for k, v in counts.items()},
        "problems": problems,
        "quarantined": rejected[["path", "label", "quarantine_reason", "decode_detail"]]
        .fillna("")
        .to_dict(orient="records"),
        "suites": {"images": images.results, "classes": classes.results},
    }
    report_dir = _write_reports(Path(cfg.report_dir), summary, images, classes)
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
        quarantined_by_reason={str(k): int(v) for k, v in by_reason.items()},
        class_counts=summary["class_counts"],
        manifest_path=str(manifest_path),
        report_json=str(report_dir / "validation.json"),
        report_html=str(report_dir / "index.html"),
        success=True,
    )


def _quarantine_reasons(df: pd.DataFrame, images: SuiteOutcome) -> pd.Series:
    """Each row's quarantine reason (None: accepted): its first failing expectation (the suite result keeps them
    all), and for an undecodable image the decoder's own reason."""
    reason_of: dict[str, str] = {}
    for reason, paths in images.failing.items():
        for p in paths:
            reason_of.setdefault(p, reason)
    reasons = df["path"].map(reason_of).astype(object)
    undecodable = reasons == "undecodable"
    reasons[undecodable] = df.loc[undecodable, "decode_error"].fillna("undecodable")
    return reasons


def _write_reports(report_dir: Path, summary: dict[str, Any], images: SuiteOutcome, classes: SuiteOutcome) -> Path:
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "validation.json").write_text(json.dumps(summary, indent=2, default=str))
    (report_dir / "great_expectations.json").write_text(
        json.dumps({"images": images.raw, "classes": classes.raw}, indent=1, default=str)
    )
    (report_dir / "index.html").write_text(_render_html(summary))
    return report_dir


def _write_quarantine(rejected: pd.DataFrame, qdir: Path, project: ProjectPaths | None) -> None:
    shutil.rmtree(qdir, ignore_errors=True)  # derived from raw_dir, which still holds every original
    qdir.mkdir(parents=True, exist_ok=True)
    for row in rejected.itertuples():
        src = project.resolve(row.path) if project else Path(row.path)
        dest = qdir / row.label / src.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            shutil.copyfile(src, dest)
        except OSError:
            pass  # an unreadable file is still listed in reasons.csv
    out = rejected[["path", "label", "quarantine_reason", "decode_detail", "sha256", "file_size"]].copy()
    stored = [qdir / r.label / Path(r.path).name for r in rejected.itertuples()]
    out.insert(1, "quarantined_as", [project.relative(q) if project else str(q) for q in stored])
    out.rename(columns={"path": "original_path", "quarantine_reason": "reason", "decode_detail": "detail"}).to_csv(
        qdir / "reasons.csv", index=False
    )


def _render_html(summary: dict[str, Any]) -> str:
    def table(rows: list[dict[str, Any]], cols: list[str]) -> str:
        head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(str(r.get(c, '')))}</td>" for c in cols) + "</tr>" for r in rows
        )
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    status = "PASSED" if summary["success"] else "FAILED"
    suites = "".join(
        f"<h3>{name}</h3>"
        + table(
            [dict(r, success="yes" if r["success"] else "NO") for r in rows],
            ["expectation", "column", "reason", "success", "unexpected_count", "element_count"],
        )
        for name, rows in summary["suites"].items()
    )
    classes = table([{"label": k, "count": v} for k, v in summary["class_counts"].items()], ["label", "count"])
    quarantined = table(summary["quarantined"][:500], ["path", "label", "quarantine_reason", "decode_detail"])
    problems = "".join(f"<li>{html.escape(p)}</li>" for p in summary["problems"]) or "<li>none</li>"
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>visionflow validation</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse;margin-bottom:1.5em}}
td,th{{border:1px solid #ccc;padding:3px 8px;font-size:13px}} .PASSED{{color:#070}} .FAILED{{color:#b00}}</style>
</head><body><h1>Data validation: <span class="{status}">{status}</span></h1>
<p>data version {html.escape(str(summary["data_version"]))}: {summary["n_images"]} images,
{summary["n_accepted"]} accepted, {summary["n_quarantined"]} quarantined
({summary["quarantined_fraction"]:.2%})</p><h2>Problems</h2><ul>{problems}</ul>
<h2>Expectation suites (great-expectations)</h2>{suites}<h2>Accepted images per class</h2>{classes}
<h2>Quarantined files (first 500)</h2>{quarantined}</body></html>"""
