"""Every file and folder of a visionflow project, in one object resolved once from params.yaml and the project root.

Folders that params.yaml names (data.raw_dir, serve.review_dir, ...) come from there; the others are fixed by the
layout. Data files (manifests, split CSVs, the cache's index) store paths relative to the project root
(`relative`) and resolve them at read time (`resolve`), so a cloned or moved project keeps its DVC hashes, its
caches and its runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from visionflow.config import Params

MLRUNS = "mlruns"  # the local MLflow store (registry.tracking's default) and the promotion lock


@dataclass(frozen=True)
class ProjectPaths:
    root: Path
    # data
    raw: Path
    external: Path  # downloaded or unpacked source datasets (Fashion-MNIST's gz files)
    manifest: Path
    quarantine: Path
    validation_reports: Path
    splits: Path
    cache: Path  # decoded, resized images per split
    # training and evaluation
    checkpoint: Path
    train_report: Path
    evaluation_reports: Path
    warm_start: Path  # champion weights downloaded for a warm-started retraining
    train_runs: Path  # one folder per training run (run_key): checkpoints and state.json
    training_dynamics: Path  # the published model's per-sample training dynamics (+ .json beside it)
    # export and registry
    onnx_dir: Path
    export_report: Path
    registry_report: Path
    quantize_reports: Path  # reports/quantize/<precision>.md and .json: a variant against its fp32 parent
    mlruns: Path  # the local MLflow store (SQLite + artifacts) and the promotion lock
    pipeline_report: Path
    retrain_report: Path  # the retraining flow's pipeline report
    # serving
    serving_models: Path
    review: Path
    reviewed: Path
    prediction_log: Path
    loadtest_report: Path
    # monitoring
    batches: Path
    drift: Path  # drift state: retrain ledger, prediction-log cursor, the current reference
    drift_models: Path
    drift_reports: Path
    retrain_ledger: Path
    log_cursor: Path
    # label audit
    label_overrides: Path  # corrections ingest applies (visionflow.data.overrides)
    label_audit: Path  # reports/label_audit: suspects.csv, summary.json, grid.png
    held_batches: Path  # reviewed batches held back by the audit until re-reviewed

    @classmethod
    def of(cls, p: Params, root: Path) -> ProjectPaths:
        root = Path(root).resolve()
        at = root.joinpath  # an absolute path in params.yaml stays absolute (joinpath keeps it)
        drift = at("data/drift")
        return cls(
            root=root,
            raw=at(p.data.raw_dir),
            external=at("data/external"),
            manifest=at(p.data.manifest_path),
            quarantine=at(p.validation.quarantine_dir),
            validation_reports=at(p.validation.report_dir),
            splits=at(p.data.splits_dir),
            cache=at("data/cache"),
            checkpoint=at("models/model.ckpt"),
            train_report=at("reports/train.json"),
            evaluation_reports=at(p.evaluate.report_dir),
            warm_start=at("models/warm_start"),
            train_runs=at("runs/train"),
            training_dynamics=at("reports/training_dynamics.csv"),
            onnx_dir=at("models/onnx"),
            export_report=at("reports/export.json"),
            registry_report=at("reports/registry.json"),
            quantize_reports=at("reports/quantize"),
            mlruns=at(MLRUNS),
            pipeline_report=at("reports/pipeline.json"),
            retrain_report=at("reports/retrain.json"),
            serving_models=at("models/serving"),
            review=at(p.serve.review_dir),
            reviewed=at(p.serve.reviewed_dir),
            prediction_log=at(p.serve.prediction_log),
            loadtest_report=at("reports/loadtest/loadtest.json"),
            batches=at(p.drift.batches_dir),
            drift=drift,
            drift_models=at("models/drift"),
            drift_reports=at("reports/drift"),
            retrain_ledger=drift / "retrain_ledger.json",
            log_cursor=drift / "log_cursor.json",
            label_overrides=at(p.data.label_overrides),
            label_audit=at(p.review.audit_dir),
            held_batches=at(p.serve.review_dir) / "held",
        )

    def relative(self, path: Path | str) -> str:
        """The form a data file stores: relative to the project root (POSIX separators) when the path is inside
        it, absolute otherwise (a user's image folder elsewhere on the disk)."""
        path = Path(path)
        if not path.is_absolute():
            return path.as_posix()
        try:
            return path.relative_to(self.root).as_posix()
        except ValueError:
            return str(path)

    def resolve(self, stored: Path | str) -> Path:
        """A path read from a data file, made absolute against the project root."""
        return self.root / stored
