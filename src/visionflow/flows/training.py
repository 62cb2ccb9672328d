"""The training flow: ingest, version, validate, split, train, evaluate, export, register, promote.

Tasks are thin wrappers around visionflow.stages; retries live here because only the orchestrator knows which
failures are worth another try (a DVC remote or the package mirror; not a corrupt dataset, not a diverging model).
An interrupted run is picked up by running the flow again: ingest skips unchanged data, DVC skips unchanged
files, and training resumes from its last checkpoint.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect import flow, get_run_logger, task
from prefect.runtime import flow_run

from visionflow import stages
from visionflow.config import Params, load_params
from visionflow.data import versioning
from visionflow.data.ingest import MARKER
from visionflow.data.relabel import missing_warning
from visionflow.flows.runtime import offline_env
from visionflow.paths import ProjectPaths
from visionflow.registry.tracking import setup_mlflow
from visionflow.report import update_report, write_json_atomic

if TYPE_CHECKING:
    from visionflow.registry.export import ExportResult
    from visionflow.registry.promotion import PromoteResult
    from visionflow.registry.register import RegisterResult
    from visionflow.training.evaluate import EvalResult
    from visionflow.training.train import TrainResult


def _timed(fn, *args, **kwargs) -> tuple[Any, float]:
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


@task(retries=2, retry_delay_seconds=[5, 15])
def ingest_data(p: Params, root: Path) -> tuple[dict, float]:
    res, secs = _timed(stages.ingest_stage, p, root)
    get_run_logger().info(
        "ingested %d images in %d classes%s%s%s",
        res.n_images,
        len(res.classes),
        " (source unchanged, not rewritten)" if res.skipped else "",
        f", {res.n_reviewed} of them reviewed production images" if res.n_reviewed else "",
        f"; {res.n_shards} shards, content version {res.content_version[:12]}" if res.n_shards else "",
    )
    if res.overrides_applied:
        get_run_logger().info(
            "label overrides applied: %d image(s) moved to their corrected class", res.overrides_applied
        )
    if warning := missing_warning(ProjectPaths.of(p, root).label_overrides, res.overrides_missing):
        get_run_logger().warning(warning)
    if res.skipped_files:  # symlinks out of the source, unreadable files...: said, not silently dropped
        reasons = Counter(f["reason"] for f in res.skipped_files)
        get_run_logger().warning(
            "left out %d source entries (%s); each with its reason in %s",
            len(res.skipped_files),
            ", ".join(f"{r} {n}" for r, n in reasons.items()),
            Path(res.raw_dir).parent / MARKER,
        )
    return asdict(res), secs


@task(retries=3, retry_delay_seconds=[2, 5, 15])
def version_data(p: Params, root: Path) -> tuple[str, float]:
    res, secs = _timed(stages.version_stage, p, root)
    get_run_logger().info("data version %s pushed to %s", res.data_version, res.remote)
    return res.data_version, secs


@task
def validate_data(p: Params, root: Path, data_version: str) -> tuple[dict, float]:
    res, secs = _timed(stages.validate_stage, p, root, data_version)
    get_run_logger().info(
        "%d accepted, %d quarantined %s; report %s",
        res.n_accepted,
        res.n_quarantined,
        res.quarantined_by_reason,
        res.report_html,
    )
    return asdict(res), secs


@task
def split_data(p: Params, root: Path) -> tuple[dict, float]:
    res, secs = _timed(stages.split_stage, p, root)
    return asdict(res), secs


@task
def train_model(p: Params, root: Path, data_version: str) -> tuple[TrainResult, float]:
    # Per-epoch lines go to the run logger (the flow run's logs in Prefect, and the console, piped or not); a
    # rich progress bar is added when a person is watching a terminal.
    log = get_run_logger()
    res, secs = _timed(
        stages.train_stage, p, root, data_version, flow_run_id=str(flow_run.id), progress=sys.stderr.isatty(), log=log
    )
    log.info(
        "trained %s: best %s %.4f after %d/%d steps (%s); MLflow run %s",
        p.architecture,
        res.monitor,
        res.best_val_acc,
        res.global_step,
        res.max_steps,
        "reused" if res.reused else "resumed" if res.resumed else "fresh",
        res.mlflow_run_id,
    )
    return res, secs


@task
def audit_labels(p: Params, root: Path) -> dict[str, Any] | None:
    """The training split's label audit from the run's training dynamics (visionflow.monitoring.audit): the
    suspects go to reports/label_audit/ and the review page's label audit view. Advisory: a missing table (a run
    reused from before training dynamics were recorded) is a warning, not a failed pipeline."""
    from dataclasses import asdict

    from visionflow.errors import DataError
    from visionflow.monitoring.audit import audit_train, log_audit

    log = get_run_logger()
    if p.base.task != "classification":  # the audit ranks one label per image; boxes have no such margin yet
        log.info("label audit: not available for %s", p.base.task)
        return None
    try:
        res = audit_train(p, root)
    except DataError as exc:
        log.warning("label audit skipped: %s", exc)
        return None
    log_audit(res, root)
    log.info(
        "label audit: %d of %d training labels suspected (%.1f%%, area under the margin < %g); list %s, "
        "top %s; decide them on the review page's label audit view",
        res.flagged,
        res.samples,
        100 * res.share_flagged,
        res.threshold,
        res.suspects,
        res.grid or "-",
    )
    return asdict(res)


@task
def evaluate_model(p: Params, root: Path) -> tuple[EvalResult, float]:
    res, secs = _timed(stages.evaluate_stage, p, root)
    get_run_logger().info("%s", res.headline())
    return res, secs


@task
def export_model(p: Params, root: Path) -> tuple[ExportResult, float]:
    res, secs = _timed(stages.export_stage, p, root)
    get_run_logger().info("%s", res.headline())
    return res, secs


@task(retries=2, retry_delay_seconds=[5, 15])
def register_model(p: Params, root: Path) -> tuple[RegisterResult, float]:
    return _timed(stages.register_stage, p, root, flow_run_id=str(flow_run.id))


@task
def promote_model(p: Params, root: Path, version: str, eval_batch: str | None = None) -> tuple[PromoteResult, float]:
    res, secs = _timed(stages.promote_stage, p, root, version, Path(eval_batch) if eval_batch else None)
    log = get_run_logger()
    if res.promoted:
        log.info("v%s promoted to champion (was %s)", version, res.champion_before)
    else:
        log.warning("v%s refused: %s", version, "; ".join(res.reasons))
    return res, secs


@task
def quantize_model(p: Params, root: Path, version: str) -> tuple[dict | None, float]:
    """The export.quantize variant of the registered version against it (nothing when export.quantize is none)."""
    res, secs = _timed(stages.quantize_stage, p, root, version)
    if res is not None:
        (get_run_logger().info if res.promoted else get_run_logger().warning)("%s", res.headline())
    return (asdict(res) if res is not None else None), secs


@task(retries=2, retry_delay_seconds=[2, 5])
def record_stages(root: Path, names: list[str]) -> float:
    """Record derived outputs in dvc.lock so `dvc status`/`dvc repro` agree with what the flow produced."""
    _, secs = _timed(versioning.commit, root, names)
    return secs


@flow(name="visionflow-training", log_prints=True)
def training_flow(
    params_path: str = "params.yaml",
    overrides: list[str] | None = None,
    report_path: str | None = None,
    eval_batch: str | None = None,
) -> dict[str, Any]:
    """Ingest -> version -> validate -> split -> train -> evaluate -> export -> register -> promote.

    report_path: where the summary goes (default reports/pipeline.json; relative to the project root).
    eval_batch: a reviewed batch folder (images + labels.csv) added to the promotion comparison (retraining).
    """
    offline_env()  # a deployment's worker process starts here, not in the CLI
    start = time.perf_counter()
    root = Path(params_path).resolve().parent
    p = load_params(params_path, overrides)
    setup_mlflow(p.registry.tracking_uri, root, p.base.project, p.registry.artifact_location)
    report = root / report_path if report_path else ProjectPaths.of(p, root).pipeline_report
    write_json_atomic(report, {"status": "running", "flow_run_id": str(flow_run.id), "params_digest": p.digest()})

    _, t_ingest = ingest_data(p, root)
    data_version, t_version = version_data(p, root)
    validated, t_validate = validate_data(p, root, data_version)
    splits, t_split = split_data(p, root)
    trained, t_train = train_model(p, root, data_version)
    label_audit = audit_labels(p, root)
    evaluated, t_evaluate = evaluate_model(p, root)
    exported, t_export = export_model(p, root)
    registered, t_register = register_model(p, root)
    decision, t_promote = promote_model(p, root, registered.version, eval_batch)
    variant, t_quantize = quantize_model(p, root, registered.version)
    t_version += record_stages(root, ["validate", "split", "train", "evaluate", "export"])
    seconds = {
        "ingest": t_ingest,
        "version": t_version,
        "validate": t_validate,
        "split": t_split,
        "train": t_train,
        "evaluate": t_evaluate,
        "export": t_export,
        "register": t_register,
        "promote": t_promote,
        **({"quantize": t_quantize} if variant is not None else {}),
    }
    summary = _summary(
        data_version=data_version,
        validated=validated,
        splits=splits,
        trained=trained,
        evaluated=evaluated,
        exported=exported,
        registered=registered,
        decision=decision,
    )
    summary.update(
        status="completed",
        label_audit=label_audit,
        **({"variant": variant} if variant is not None else {}),
        stage_seconds={k: round(v, 3) for k, v in seconds.items()},
        total_seconds=round(time.perf_counter() - start, 3),
    )
    update_report(report, **summary)
    return summary


def _summary(
    *,
    data_version: str,
    validated: dict,
    splits: dict,
    trained: TrainResult,
    evaluated: EvalResult,
    exported: ExportResult,
    registered: RegisterResult,
    decision: PromoteResult,
) -> dict[str, Any]:
    """The run's summary (the pipeline report) from each stage's result."""
    return {
        "data_version": data_version,
        "n_images": validated["n_images"],
        "n_accepted": validated["n_accepted"],
        "n_quarantined": validated["n_quarantined"],
        "quarantined_by_reason": validated["quarantined_by_reason"],
        "splits": splits["counts"],
        "onnx": exported.summary(),
        "registry": decision.summary(),
        **evaluated.summary(),
        "mlflow_run_id": trained.mlflow_run_id,
        "train": {
            k: getattr(trained, k)
            for k in ("best_val_acc", "monitor", "global_step", "max_steps", "resumed", "reused", "seconds", "runtime")
        },
    }
