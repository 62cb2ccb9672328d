"""MLflow set-up and lineage tags. Local default: SQLite + artifacts under mlruns/; any URI by configuration."""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

from visionflow.errors import VisionflowError
from visionflow.paths import MLRUNS

# The local default store, inside the project's mlruns/ folder (ProjectPaths.mlruns)
LOCAL_DB = f"{MLRUNS}/mlflow.db"
LOCAL_ARTIFACTS = f"{MLRUNS}/artifacts"


def tracking_uri(configured: str | None, root: Path) -> str:
    """registry.tracking_uri in params.yaml, else MLFLOW_TRACKING_URI, else the local SQLite store.

    An explicit params value wins over the environment because mlflow.set_tracking_uri() itself exports
    MLFLOW_TRACKING_URI: in a long-lived process the variable may name a store set earlier, not the user's choice.
    """
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{(Path(root) / LOCAL_DB).resolve()}"


def setup_mlflow(configured: str | None, root: Path, experiment: str, artifact_location: str | None = None) -> str:
    """Point MLflow at the store and make sure the experiment exists; returns the experiment id.

    MLflow's store is process-global: entry points (CLI commands, Prefect flows, bench scripts, test fixtures) call
    this once; library code assumes it was called. artifact_location: see ensure_experiment.
    """
    import mlflow

    uri = tracking_uri(configured, root)
    # MLflow draws a tqdm bar on stderr for every artifact download (each command that loads a model), terminal or
    # not: noise between a command's own lines, and in logs. MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=true brings it back.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    with _quiet_store_creation():
        return ensure_experiment(experiment, root, artifact_location)


@contextlib.contextmanager
def _quiet_store_creation() -> Iterator[None]:
    """MLflow logs "Creating initial MLflow database tables" (and alembic its migrations) at INFO when it makes a
    new SQLite store: not news to a user, and printed before a command's own first line or error."""
    loggers = [logging.getLogger(name) for name in ("mlflow.store.db.utils", "alembic.runtime.migration")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def ensure_experiment(experiment: str, root: Path, artifact_location: str | None = None) -> str:
    """The id of `experiment` in the store MLflow points at (setup_mlflow), created if missing.

    artifact_location (registry.artifact_location) only applies to experiments created here; None keeps the
    local store's mlruns/artifacts, or a tracking server's own default (its proxied artifact store).
    """
    import mlflow

    uri = mlflow.get_tracking_uri()
    try:
        exp = mlflow.get_experiment_by_name(experiment)
        if exp is None:
            location = artifact_location
            if location is None and (uri.startswith("sqlite:///") or "://" not in uri):
                location = (Path(root) / LOCAL_ARTIFACTS).resolve().as_uri()
            try:
                return mlflow.create_experiment(experiment, artifact_location=location)
            except mlflow.exceptions.MlflowException as exc:  # created meanwhile by a concurrent run
                if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code) and "already exists" not in str(exc):
                    raise
                return mlflow.get_experiment_by_name(experiment).experiment_id
        return exp.experiment_id
    except Exception as exc:  # connection refused, auth, DNS: say where and what to do
        if isinstance(exc, VisionflowError):
            raise
        text = str(exc)
        if any(code in text for code in ("401", "403", "Unauthorized", "Forbidden", "Permission denied")):
            raise VisionflowError(
                f"MLflow tracking server at {uri} refused the credentials ({text[:200]}): set "
                "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD for a user with write "
                "access"
            ) from None
        raise VisionflowError(
            f"MLflow tracking server at {uri} is not reachable ({type(exc).__name__}: "
            f"{text[:300]}); start it, or unset MLFLOW_TRACKING_URI / "
            "registry.tracking_uri to use the local store"
        ) from None


def git_commit(root: Path) -> str:
    """The checkout's commit (+ "-dirty"); in an image without .git, VISIONFLOW_GIT_COMMIT set at build time."""
    if not (Path(root) / ".git").exists() and os.environ.get("VISIONFLOW_GIT_COMMIT"):
        return os.environ["VISIONFLOW_GIT_COMMIT"]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    if sha.returncode != 0:
        return "unknown"
    return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def lineage_tags(
    *, data_version: str | None, root: Path, params_digest: str, flow_run_id: str | None = None
) -> dict[str, str]:
    return {
        "visionflow.data_version": data_version or "unversioned",
        "visionflow.git_commit": git_commit(root),
        "visionflow.params_hash": params_digest,
        "visionflow.flow_run_id": flow_run_id or os.environ.get("PREFECT__FLOW_RUN_ID", "none"),
    }


def run_name(*, model: str, data_version: str | None, params_digest: str) -> str:
    """A training run's name in MLflow: what was trained on which data with which params.

    MLflow's own random names come from the global RNG, which the training seed fixes: every run got the same.
    """
    return f"{model}-data-{(data_version or 'unversioned')[:8]}-params-{params_digest[:8]}"


def detail_tags(section: str, figures: dict[str, float]) -> list:
    """One-off figures as `visionflow.<section>.<name>` tags for MLflowClient.log_batch: searchable, and
    without the one-point chart per figure that a metric gets in MLflow's UI."""
    from mlflow.entities import RunTag

    return [RunTag(f"visionflow.{section}.{k}", f"{float(v):.6g}") for k, v in figures.items()]


class SystemMetrics:
    """MLflow's system metrics (system/cpu_utilization_percentage, system/system_memory_usage_megabytes, and
    system/gpu_<i>_utilization_percentage and _memory_usage_megabytes when nvidia-ml-py can see a GPU) for a run
    that Lightning's MLFlowLogger created, which does not start MLflow's monitor itself.

    MLflow's monitor logs only whole sampling intervals: a run shorter than one interval would get nothing. On
    exit, one last sample is taken and logged with whatever the interval had collected, so every run has them.
    """

    def __init__(self, run_id: str, uri: str, interval_s: float, resumed: bool):
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self.monitor = SystemMetricsMonitor(
            run_id, sampling_interval=interval_s, resume_logging=resumed, tracking_uri=uri
        )

    def __enter__(self) -> SystemMetrics:
        self.monitor.start()
        return self

    def __exit__(self, *exc) -> None:
        m = self.monitor
        m.finish()
        m.collect_metrics()
        m.publish_metrics(m.aggregate_metrics())
        m.mlflow_logger.flush()
