"""Stage entry points: params in, typed result out. The CLI, dvc.yaml (through the CLI) and the Prefect flows all
call these, so each stage is wired to its configuration in exactly one place.

Relative paths in params.yaml are relative to the project root (the folder holding params.yaml). Stages that
touch MLflow assume the entry point has set it up (registry.tracking.setup_mlflow, once per process).

base.task picks what a stage does: each stage dispatches once, at its top, to visionflow.tasks.detection for
detection; the code below it is classification's. Versioning, publishing the checkpoint and the reports are shared.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from visionflow.config import Params
from visionflow.data import versioning
from visionflow.data.ingest import IngestResult, Progress, ingest
from visionflow.data.split import SplitResult, split
from visionflow.data.validate import ValidationResult, validate
from visionflow.errors import DataError, VersioningError
from visionflow.paths import ProjectPaths
from visionflow.report import write_json_atomic

if TYPE_CHECKING:  # the model stages import torch, MLflow and ONNX when they run, not when the CLI starts
    from visionflow.registry.export import ExportResult
    from visionflow.registry.promotion import PromoteResult
    from visionflow.registry.register import RegisterResult
    from visionflow.registry.variants import VariantResult
    from visionflow.tasks.detection.evaluate import DetEvalResult
    from visionflow.tasks.detection.export import DetExportResult
    from visionflow.training.evaluate import EvalResult
    from visionflow.training.train import TrainResult


def _detection(p: Params) -> bool:
    return p.base.task == "detection"


def ingest_stage(p: Params, root: Path, *, force: bool = False, progress: Progress | None = None) -> IngestResult:
    if _detection(p):
        from visionflow.tasks.detection.ingest import ingest as ingest_detection

        return ingest_detection(p, root, force=force, progress=progress)
    paths = ProjectPaths.of(p, root)
    return ingest(
        source=p.data.source,
        raw_dir=paths.raw,
        max_images=p.data.max_images,
        seed=p.base.seed,
        cache_dir=paths.external,
        force=force,
        progress=progress,
        reviewed_dir=paths.reviewed,
        shard_bytes=int(p.data.shard_mb * 2**20) if p.data.layout == "shards" else None,
        label_overrides=paths.label_overrides,
        labels=p.data.labels,
    )


@dataclass(frozen=True)
class VersionResult:
    data_version: str
    remote: str
    pushed: bool


def version_stage(p: Params, root: Path, *, push: bool = True) -> VersionResult:
    url = versioning.ensure_repo(root, p.data.remote_name, p.data.remote_url)
    versioning.commit(root, [versioning.INGEST_STAGE])
    if push:
        versioning.push(root, p.data.remote_name)
    return VersionResult(data_version=versioning.data_version(root, p.data.raw_dir), remote=url, pushed=push)


def current_data_version(p: Params, root: Path) -> str | None:
    try:
        return versioning.data_version(root, p.data.raw_dir)
    except VersioningError:
        return None


def validate_stage(
    p: Params, root: Path, data_version: str | None, progress: Progress | None = None
) -> ValidationResult:
    if _detection(p):
        from visionflow.tasks.detection.validate import validate as validate_detection

        return validate_detection(p, root, data_version, progress=progress)
    paths = ProjectPaths.of(p, root)
    cfg = p.validation.model_copy(update={"quarantine_dir": paths.quarantine, "report_dir": paths.validation_reports})
    return validate(
        raw_dir=paths.raw,
        cfg=cfg,
        manifest_path=paths.manifest,
        labels=p.data.labels,
        data_version=data_version,
        progress=progress,
        project=paths,
    )


def split_stage(p: Params, root: Path) -> SplitResult:
    if _detection(p):
        from visionflow.tasks.detection.split import split as split_detection

        return split_detection(p, root)
    paths = ProjectPaths.of(p, root)
    return split(
        manifest_path=paths.manifest,
        out_dir=paths.splits,
        val_fraction=p.data.val_fraction,
        test_fraction=p.data.test_fraction,
        seed=p.base.seed,
    )


def train_stage(
    p: Params, root: Path, data_version: str | None, *, flow_run_id: str | None = None, progress: bool = True, log=None
) -> TrainResult:
    """Train (or resume, or reuse) and publish the best checkpoint at models/model.ckpt.

    log: a logger for the input decision and the per-epoch lines (default: the visionflow.training.train logger).
    """
    if _detection(p):
        from visionflow.tasks.detection.train import train
    else:
        from visionflow.training.train import train

    paths = ProjectPaths.of(p, root)
    res = train(p=p, root=root, data_version=data_version, flow_run_id=flow_run_id, progress=progress, log=log)
    paths.checkpoint.parent.mkdir(parents=True, exist_ok=True)
    tmp = paths.checkpoint.with_suffix(".ckpt.tmp")
    shutil.copyfile(paths.root / res.best_checkpoint, tmp)
    os.replace(tmp, paths.checkpoint)
    _publish_dynamics(paths, res)
    res = replace(res, model_checkpoint=paths.relative(paths.checkpoint))
    write_json_atomic(paths.train_report, asdict(res))
    return res


def _publish_dynamics(paths: ProjectPaths, res: TrainResult) -> None:
    """The run's training-dynamics table beside the published model (reports/training_dynamics.csv + .json), or
    none when the run recorded none (a run from before the table existed): a stale table is removed, never kept
    next to another model."""
    target = paths.training_dynamics
    source = paths.root / res.training_dynamics if res.training_dynamics else None
    for suffix in (".json", ".csv"):  # the description first: the audit reads the table only when both exist
        dst = target.with_suffix(suffix)
        if source is not None and source.with_suffix(suffix).is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source.with_suffix(suffix), dst.with_suffix(suffix + ".tmp"))
            os.replace(dst.with_suffix(suffix + ".tmp"), dst)
        else:
            dst.unlink(missing_ok=True)


def _trained(paths: ProjectPaths) -> dict:
    """reports/train.json, or a DataError saying to train first when it or the checkpoint is missing."""
    if not paths.train_report.is_file() or not paths.checkpoint.is_file():
        raise DataError(
            f"no trained model ({paths.relative(paths.checkpoint)}, {paths.relative(paths.train_report)})"
            ": run `visionflow train` first"
        )
    return json.loads(paths.train_report.read_text())


def evaluate_stage(p: Params, root: Path) -> EvalResult | DetEvalResult:
    if _detection(p):
        from visionflow.tasks.detection.evaluate import evaluate as evaluate_detection

        _trained(ProjectPaths.of(p, root))
        return evaluate_detection(p, root)
    from visionflow.data.cache import project_split
    from visionflow.training.evaluate import evaluate
    from visionflow.training.train import load_classifier

    paths = ProjectPaths.of(p, root)
    trained = _trained(paths)
    model = load_classifier(paths.checkpoint)
    hp = model.hparams
    test = project_split(paths, "test", classes=list(hp.classes), image_size=hp.image_size, channels=hp.channels)
    return evaluate(
        net=model.net,
        images=test.images,
        labels=test.labels,
        classes=list(hp.classes),
        cfg=p.evaluate,
        seed=p.base.seed,
        report_dir=paths.evaluation_reports,
        mlflow_run_id=trained["mlflow_run_id"],
    )


class GateFailed(DataError):
    """A gate refused the artifact; the message lists every reason."""


def export_stage(p: Params, root: Path) -> ExportResult | DetExportResult:
    """ONNX export with preprocessing inside, model card, and the parity gate (raises GateFailed on failure)."""
    if _detection(p):
        from visionflow.tasks.detection.export import export as export_detection

        _trained(ProjectPaths.of(p, root))
        res = export_detection(p, root)
        if not res.passed:
            raise GateFailed("ONNX parity gate failed: " + "; ".join(res.reasons))
        return res
    import numpy as np

    from visionflow.data.cache import project_split
    from visionflow.registry.export import ExportResult, export_onnx, log_parity, parity_check, write_model_card
    from visionflow.training.train import load_classifier

    paths = ProjectPaths.of(p, root)
    if not paths.checkpoint.is_file():
        raise DataError(f"no trained model at {paths.relative(paths.checkpoint)}: run `visionflow train` first")
    model = load_classifier(paths.checkpoint)
    hp = model.hparams
    trained = json.loads(paths.train_report.read_text()) if paths.train_report.is_file() else {}
    onnx_path = export_onnx(
        model.net, image_size=hp.image_size, channels=hp.channels, path=paths.onnx_dir / "model.onnx"
    )
    test = project_split(paths, "test", classes=list(hp.classes), image_size=hp.image_size, channels=hp.channels)
    n = min(len(test.labels), max(p.export.parity_images, 1))
    parity = parity_check(model.net, onnx_path, np.asarray(test.images[:n]), tolerance=p.export.parity_tolerance)
    card = write_model_card(
        onnx_path,
        image_size=hp.image_size,
        channels=hp.channels,
        classes=list(hp.classes),
        model_name=hp.model_name,
        data_version=trained.get("data_version"),
        extra={"mlflow_run_id": trained.get("mlflow_run_id")},
    )
    res = ExportResult(**asdict(parity), onnx_path=paths.relative(onnx_path), card=card)
    write_json_atomic(paths.export_report, asdict(res))
    if trained.get("mlflow_run_id"):
        log_parity(trained["mlflow_run_id"], parity)
    if not parity.passed:
        raise GateFailed("ONNX parity gate failed: " + "; ".join(parity.reasons))
    return res


def register_stage(p: Params, root: Path, *, flow_run_id: str | None = None) -> RegisterResult:
    if _detection(p):
        from visionflow.tasks.detection.promotion import register as register_detection

        return register_detection(p, root, flow_run_id=flow_run_id)
    from visionflow.registry.register import register
    from visionflow.registry.tracking import lineage_tags
    from visionflow.training.train import load_classifier

    paths = ProjectPaths.of(p, root)
    for f in (paths.train_report, paths.export_report):
        if not f.is_file():
            raise DataError(f"{paths.relative(f)} not found: run `visionflow train`, `evaluate` and `export` first")
    trained = json.loads(paths.train_report.read_text())
    exported = json.loads(paths.export_report.read_text())
    ev_file = paths.evaluation_reports / "evaluation.json"
    evaluated = json.loads(ev_file.read_text()) if ev_file.is_file() else {}
    if evaluated.get("mlflow_run_id") != trained["mlflow_run_id"]:
        raise DataError(
            f"{ev_file} does not describe the model in {paths.relative(paths.train_report)} (MLflow run "
            f"{trained['mlflow_run_id']}): run `visionflow evaluate` first"
        )
    lineage = lineage_tags(
        data_version=trained.get("data_version"), root=root, params_digest=p.digest(), flow_run_id=flow_run_id
    )
    return register(
        model_name=p.model_name,
        net=load_classifier(paths.checkpoint).net,
        onnx_path=paths.resolve(exported["onnx_path"]),
        exported=exported,
        evaluated=evaluated,
        mlflow_run_id=trained["mlflow_run_id"],
        lineage=lineage,
    )


def champion_weights(p: Params, root: Path) -> Path | None:
    """The champion's backbone weights (downloaded from its MLflow run), or None when there is no champion."""
    from visionflow.registry.warm_start import champion_weights as download

    return download(p.model_name, ProjectPaths.of(p, root).warm_start)


def promote_stage(p: Params, root: Path, version: str | None = None, eval_batch: Path | None = None) -> PromoteResult:
    """Judge a registered version against every gate and the current champion; move aliases if it wins.

    eval_batch: a reviewed production batch (e.g. the drifted data that triggered retraining) added to the paired
    comparison, and reported separately as `eval_batch_accuracy` for challenger and champion.
    """
    if _detection(p):
        from visionflow.tasks.detection.promotion import promote as promote_detection

        return promote_detection(p, root, version, eval_batch)
    from visionflow.data.imageio import DecodeRules
    from visionflow.registry.promotion import ComparisonImages, promote

    paths = ProjectPaths.of(p, root)
    images = ComparisonImages(
        paths=paths,
        cfg=p.evaluate,
        seed=p.base.seed,
        eval_batch=eval_batch,
        rules=DecodeRules.from_params(p.validation),
    )
    res = promote(
        model_name=p.model_name,
        version=version,
        cfg=p.registry,
        seed=p.base.seed,
        lock_dir=paths.mlruns,
        images=images,
    )
    write_json_atomic(paths.registry_report, asdict(res))
    return res


def quantize_stage(p: Params, root: Path, version: str | None = None) -> VariantResult | None:
    """The export.quantize variant (int8, fp16) of the classifier's `version` (default: its champion), registered
    as <model_name>-<precision> and made its champion only through its gates against the fp32 parent
    (reports/quantize/); None when export.quantize is none. Config refuses it for detection."""
    if p.export.quantize == "none":
        return None
    from visionflow.registry.variants import quantize_variant

    return quantize_variant(p, root, version)


# The closed loop's steps (flows/monitoring.py), dispatched on the task like the stages above.


def drift_stage(
    p: Params, root: Path, *, batch: Path | None = None, log_path: Path | None = None, since: float | None = None
) -> dict:
    """The drift verdict on a batch folder or the prediction log since a time (reports/drift/<batch>/)."""
    if _detection(p):
        return _detection_drift(p, root, batch)
    from visionflow.monitoring.drift import check

    return check(p, root, batch=batch, log_path=log_path, since=since)


def _detection_drift(p: Params, root: Path, batch: Path | None) -> dict:
    from visionflow.registry.store import CHAMPION, alias_version, download_onnx
    from visionflow.tasks.detection.drift import check_batch

    if batch is None:
        raise DataError(
            "the detection drift check reads batch folders; the prediction log (which records boxes per image) is "
            "not read for detection yet: check a folder of production images with --batch"
        )
    version = alias_version(p.model_name, CHAMPION)
    if version is None:
        raise DataError(f"{p.model_name} has no champion yet: run the pipeline first (`make pipeline`)")
    onnx, card = download_onnx(p.model_name, version, ProjectPaths.of(p, root).drift_models / f"v{version}")
    return check_batch(p, root, batch, onnx, card, version=version, log_to_mlflow=True)


def simulate_stage(p: Params, root: Path, name: str, *, shift: str, severity: int, n: int, seed: int, skip: int = 0):
    """A simulated production batch under a shift, its true labels (or boxes) kept aside: its folder."""
    if _detection(p):
        from visionflow.tasks.detection.batches import simulate as simulate_scenes

        return simulate_scenes(p, root, shift=shift, severity=severity, n=n, seed=seed, name=name, skip=skip)
    from visionflow.monitoring.simulate import simulate

    folder = root / p.drift.batches_dir / name
    return simulate(p, root, folder, shift=shift, severity=severity, n=n, seed=seed, skip=skip).folder


def loop_size_stage(p: Params, root: Path) -> tuple[int, str]:
    """Images per demo-loop batch and why; 0 when there are too few for a drift verdict."""
    if _detection(p):  # scenes are generated: as many as asked, new ones
        n = min(p.drift.batch_size, max(p.drift.min_batch_size, p.detection.scenes // 4))
        return n, f"{n} new generated scenes per batch (drift.batch_size, at most a quarter of detection.scenes)"
    from visionflow.monitoring.simulate import loop_batch_size

    size = loop_batch_size(p, root)
    return size.n, size.note


def take_in_stage(
    p: Params, root: Path, batch: Path, only: list[str] | None = None, predicted_accuracy: float | None = None
) -> dict:
    """A reviewed batch into serve.reviewed_dir for the next data version: {"images": counts, "audit": ...}."""
    if _detection(p):
        from visionflow.tasks.detection.batches import take_in

        return {"images": {"images": take_in(p, root, batch, only)}, "audit": None}
    from visionflow.data.fashion_mnist import FASHION_MNIST, FASHION_MNIST_CLASSES
    from visionflow.monitoring.batch_audit import take_in_audited

    classes = list(FASHION_MNIST_CLASSES) if p.data.source == FASHION_MNIST else None
    return take_in_audited(p, root, batch, classes, set(only) if only is not None else None, predicted_accuracy)


def warm_start_overrides(p: Params, weights: Path) -> list[str]:
    """The params a warm-started retraining runs with: the champion's weights, fewer epochs, a lower rate."""
    section = "detection" if _detection(p) else "train"
    return [
        f"{section}.pretrained_weights={weights}",
        f"{section}.max_epochs={p.drift.warm_start_epochs}",
        f"{section}.lr={p.drift.warm_start_lr if not _detection(p) else p.detection.lr / 2}",
    ]
