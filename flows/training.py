"""The training flow: version, validate, split (train, evaluate, export, register, promote come next).

Tasks are thin wrappers around visionflow's stage functions; retries live here because only the orchestrator
knows which failures are worth another try (a DVC remote or the package mirror, not a corrupt dataset).
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.runtime import flow_run

from visionflow import versioning
from visionflow.config import Params, load_params
from visionflow.ingest import ingest
from visionflow.report import PIPELINE_REPORT, update_report, write_json_atomic
from visionflow.split import split
from visionflow.validate import validate


def _timed(fn, *args, **kwargs) -> tuple[Any, float]:
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


@task(retries=2, retry_delay_seconds=[5, 15])
def ingest_data(p: Params) -> tuple[dict, float]:
    res, secs = _timed(ingest, source=p.data.source, raw_dir=p.data.raw_dir, max_images=p.data.max_images,
                       seed=p.base.seed, cache_dir=Path("data/external"))
    get_run_logger().info("ingested %d images in %d classes%s", res.n_images, len(res.classes),
                          " (unchanged, skipped)" if res.skipped else "")
    return asdict(res), secs


@task(retries=3, retry_delay_seconds=[2, 5, 15])
def version_data(p: Params, root: Path) -> tuple[str, float]:
    def run() -> str:
        versioning.ensure_repo(root, p.data.remote_name, p.data.remote_url)
        versioning.commit(root, [versioning.INGEST_STAGE])
        versioning.push(root, p.data.remote_name)
        return versioning.data_version(root, p.data.raw_dir)

    dv, secs = _timed(run)
    get_run_logger().info("data version %s pushed to remote %r", dv, p.data.remote_name)
    return dv, secs


@task
def validate_data(p: Params, data_version: str) -> tuple[dict, float]:
    res, secs = _timed(validate, raw_dir=p.data.raw_dir, cfg=p.validation, manifest_path=p.data.manifest_path,
                       labels=p.data.labels, data_version=data_version)
    get_run_logger().info("%d accepted, %d quarantined %s; report %s", res.n_accepted, res.n_quarantined,
                          res.quarantined_by_reason, res.report_html)
    return asdict(res), secs


@task
def split_data(p: Params) -> tuple[dict, float]:
    res, secs = _timed(split, manifest_path=p.data.manifest_path, out_dir=p.data.splits_dir,
                       val_fraction=p.data.val_fraction, test_fraction=p.data.test_fraction, seed=p.base.seed)
    return asdict(res), secs


@task(retries=2, retry_delay_seconds=[2, 5])
def record_stages(root: Path, stages: list[str]) -> float:
    """Record derived outputs in dvc.lock so `dvc status`/`dvc repro` agree with what the flow produced."""
    _, secs = _timed(versioning.commit, root, stages)
    return secs


@flow(name="visionflow-training", log_prints=True)
def training_flow(params_path: str = "params.yaml", overrides: list[str] | None = None,
                  report_path: str = str(PIPELINE_REPORT)) -> dict[str, Any]:
    start = time.perf_counter()
    root = Path(params_path).resolve().parent
    p = load_params(params_path, overrides)
    report = Path(report_path)
    write_json_atomic(report, {"status": "running", "flow_run_id": str(flow_run.id), "params_digest": p.digest()})

    ingested, t_ingest = ingest_data(p)
    data_version, t_version = version_data(p, root)
    validated, t_validate = validate_data(p, data_version)
    splits, t_split = split_data(p)
    t_record = record_stages(root, ["validate", "split"])

    stage_seconds = {"ingest": t_ingest, "version": t_version + t_record, "validate": t_validate,
                     "split": t_split}
    summary = {
        "status": "completed",
        "data_version": data_version,
        "n_images": validated["n_images"],
        "n_accepted": validated["n_accepted"],
        "n_quarantined": validated["n_quarantined"],
        "quarantined_by_reason": validated["quarantined_by_reason"],
        "splits": splits["counts"],
        "stage_seconds": {k: round(v, 3) for k, v in stage_seconds.items()},
        "total_seconds": round(time.perf_counter() - start, 3),
    }
    update_report(report, **summary)
    return summary
