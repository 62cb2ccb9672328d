"""orchestration: what Prefect and MLflow add on top of the work itself.

1. Prefect task overhead. A: a Prefect flow calling N trivial tasks one after the other, the calls timed inside
   the flow, per task; B: the same function called N times directly, per call. Both in ms per call; A - B is the
   per-task overhead, and the flow's own start and finish are kept as an extra.
   Prefect runs as `make pipeline` runs it (visionflow.flows.runtime.configure_prefect: a temporary local server with a
   fresh database under the work folder, INFO logging, results not persisted) unless PREFECT_API_URL is set.
2. Pipeline overhead, read from reports/pipeline.json when present: (total_seconds - sum of stage_seconds) /
   total_seconds, the flow's own share of a real pipeline run. Goal <= 3%.
3. MLflow logging cost. A: visionflow.training.train.train() for a short run (real or synthetic splits, under the work
   folder) with its MLFlowLogger against a temporary SQLite store, every MLflow call timed (the logger's methods
   and every MlflowClient method, outermost call only); B: the same run with the logger replaced by a no-op
   Lightning logger. Goal: MLflow seconds / training seconds <= 1% (the timed calls of A); (A - B) / B is kept as
   a cross-check. Loader workers are off (train.num_workers=0) so their start-up does not dilute the fraction.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import logging
import os
import time
from typing import Any
from unittest import mock

import yaml

from bench.common import (
    PARAMS,
    REPO,
    Context,
    Measurement,
    compare,
    goal,
    make_splits,
    quiet_lightning,
    silenced,
    single,
    summary,
    torch_state,
)

NAME = "orchestration"


# ------------------------------------------------------------------------------------------------------ Prefect


def trivial(i: int) -> int:
    """The 'work' of each task: microseconds, so what is measured is the orchestration around it."""
    return sum(range(50)) + i


def prefect_rows(ctx: Context, n_tasks: int) -> tuple[dict[str, Any], list[str]]:
    notes = []
    if not os.environ.get("PREFECT_API_URL"):
        home = ctx.tmp("orchestration/prefect-home")
        os.environ["PREFECT_HOME"] = str(home)  # bench flow runs stay out of the project's Prefect history
        notes.append(
            "Prefect: temporary local server with a fresh database (as `make pipeline` without PREFECT_API_URL)"
        )
    else:
        notes.append(f"Prefect: the server at PREFECT_API_URL={os.environ['PREFECT_API_URL']}")
    from visionflow.flows.runtime import configure_prefect

    configure_prefect(ctx.tmp("orchestration"))  # visionflow's local-run settings (env set before import)
    t0 = time.perf_counter()
    from prefect import flow, task

    trivial_task = task(trivial, name="bench-trivial")

    @flow(name="visionflow-bench-orchestration", log_prints=False)
    def many(n: int) -> float:
        """Calls n tasks one after the other, as visionflow's flows do; returns the seconds the calls took."""
        start = time.perf_counter()
        for i in range(n):
            trivial_task(i)
        return time.perf_counter() - start

    with silenced(logs=True):
        many(1)  # starts the temporary server (once per process) and warms Prefect's client
    muted = _mute_prefect_console()
    start_s = time.perf_counter() - t0
    ctx.log(f"[orchestration] Prefect ready after {start_s:.1f} s (temporary server start-up included)")

    def flow_per_task() -> Measurement:
        with silenced():
            t = time.perf_counter()
            inside = many(n_tasks)
            wall = time.perf_counter() - t
        return Measurement(
            inside / n_tasks * 1000, {"flow_wall_ms": wall * 1000, "flow_outside_tasks_ms": (wall - inside) * 1000}
        )

    def direct_per_call() -> Measurement:
        t = time.perf_counter()
        for i in range(n_tasks):
            trivial(i)
        return Measurement((time.perf_counter() - t) / n_tasks * 1000)

    row = compare(
        ctx,
        f"Prefect task vs direct call (N={n_tasks})",
        flow_per_task,
        direct_per_call,
        unit="ms per call",
        a_label="Prefect task in a flow",
        b_label="direct function call",
        higher_is_better=False,
        notes=[
            f"A = seconds of the {n_tasks} task calls timed inside the flow / {n_tasks}; the flow's own "
            "start and finish are extra.a_flow_outside_tasks_ms; Prefect start-up before the first "
            f"flow (temporary server): {start_s:.1f} s"
        ],
    )
    for handler, file in muted:
        handler.console.file = file
    over = summary([a - b for a, b in zip(row["a"]["values"], row["b"]["values"])])
    row["extra"]["per_task_overhead_ms"] = over
    row["extra"]["prefect_startup_s"] = round(start_s, 2)
    row["notes"].insert(
        0,
        f"per-task overhead {over['median']:.2f} ms (median; min {over['min']:.2f}, max "
        f"{over['max']:.2f}); flow start + finish "
        f"{row['extra']['a_flow_outside_tasks_ms']['median']:.0f} ms",
    )
    logging.getLogger("prefect").setLevel(logging.WARNING)  # no "stopping temporary server" line after the table
    return row, notes


def _mute_prefect_console() -> list[tuple[Any, Any]]:
    """Point Prefect's console handlers at /dev/null: run and task logs are still formatted, written and shipped
    to the API as in a pipeline run (part of the cost measured), but not printed over the benchmark's output."""
    from prefect.logging.handlers import PrefectConsoleHandler

    devnull = open(os.devnull, "w")  # lives as long as the process
    loggers = [logging.getLogger()] + [
        lg for lg in logging.root.manager.loggerDict.values() if isinstance(lg, logging.Logger)
    ]
    muted = []
    for lg in loggers:
        for handler in lg.handlers:
            if isinstance(handler, PrefectConsoleHandler) and all(handler is not h for h, _ in muted):
                muted.append((handler, handler.console.file))
                handler.console.file = devnull
    return muted


# ------------------------------------------------------------------------------------------- pipeline report


def pipeline_row() -> dict[str, Any] | None:
    path = REPO / "reports/pipeline.json"
    if not path.is_file():
        return None
    report = json.loads(path.read_text())
    total = report.get("total_seconds")
    stages = report.get("stage_seconds") or {}
    if not total or not stages:
        return single(
            "pipeline overhead (reports/pipeline.json)",
            None,
            unit="fraction",
            label="flow time outside stages",
            notes=[f"reports/pipeline.json has no total/stage seconds (status {report.get('status')!r})"],
        )
    outside = total - sum(stages.values())
    return single(
        "pipeline overhead (reports/pipeline.json)",
        outside / total,
        unit="fraction",
        label="flow time outside stages / total",
        the_goal=goal("<= 3%", "<=", 0.03, on="value"),
        extra={
            "total_seconds": total,
            "sum_stage_seconds": round(sum(stages.values()), 3),
            "stage_seconds": stages,
            "status": report.get("status"),
            "report_mtime": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(path.stat().st_mtime)),
        },
        notes=[
            f"from the last pipeline run on this checkout: {outside:.2f} s of {total:.2f} s outside "
            f"the {len(stages)} timed stages ({', '.join(stages)})"
        ],
    )


# ----------------------------------------------------------------------------------------------------- MLflow


class CallTimer:
    """Sums the wall time of wrapped calls, counting only the outermost one when they nest."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0
        self.by_name: dict[str, float] = {}  # outermost seconds per wrapped function's name
        self._depth = 0

    def wrap(self, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            if self._depth:
                return fn(*args, **kwargs)
            self._depth += 1
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                dt = time.perf_counter() - start
                self.seconds += dt
                self.calls += 1
                self.by_name[fn.__name__] = self.by_name.get(fn.__name__, 0.0) + dt
                self._depth -= 1

        return timed


@contextlib.contextmanager
def timed_mlflow(timer: CallTimer):
    """Time every MlflowClient method and the Lightning MLFlowLogger's methods (train() itself sets nothing up: the
    store is set up once, before the timed runs)."""
    from lightning.pytorch.loggers import MLFlowLogger
    from mlflow.tracking import MlflowClient

    import visionflow.training.train as vtrain

    class TimedMLFlowLogger(MLFlowLogger):
        __init__ = timer.wrap(MLFlowLogger.__init__)
        log_metrics = timer.wrap(MLFlowLogger.log_metrics)
        log_hyperparams = timer.wrap(MLFlowLogger.log_hyperparams)
        finalize = timer.wrap(MLFlowLogger.finalize)
        after_save_checkpoint = timer.wrap(MLFlowLogger.after_save_checkpoint)

        @property
        def experiment(self):
            return timer.wrap(MLFlowLogger.experiment.fget)(self)

    patches = [mock.patch.object(vtrain, "MLFlowLogger", TimedMLFlowLogger)]
    for name in dir(MlflowClient):
        attr = inspect.getattr_static(MlflowClient, name)
        if not name.startswith("_") and inspect.isfunction(attr):  # plain methods (no static/class methods)
            patches.append(mock.patch.object(MlflowClient, name, timer.wrap(attr)))
    with contextlib.ExitStack() as stack:
        for p in patches:
            stack.enter_context(p)
        yield


def null_logger_patches():
    """visionflow.training.train with a no-op logger: the training run without MLflow."""
    from lightning.pytorch.loggers.logger import Logger

    import visionflow.training.train as vtrain

    class _NoClient:
        def __getattr__(self, name):
            return lambda *a, **k: None

    class NullLogger(Logger):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__()

        @property
        def name(self) -> str:
            return "bench-null"

        @property
        def version(self) -> str:
            return "0"

        @property
        def run_id(self) -> str:
            return "bench-null-run"

        @property
        def experiment_id(self) -> str:
            return "0"

        @property
        def experiment(self):
            return _NoClient()

        def log_metrics(self, metrics, step=None) -> None:
            pass

        def log_hyperparams(self, params, *args, **kwargs) -> None:
            pass

    return [mock.patch.object(vtrain, "MLFlowLogger", NullLogger)]


def mlflow_row(ctx: Context) -> dict[str, Any]:
    from visionflow.config import load_params
    from visionflow.data.cache import build_cache
    from visionflow.registry.tracking import setup_mlflow
    from visionflow.training.train import train

    quiet_lightning()
    counts = {"train": 512, "val": 128, "test": 64} if ctx.quick else {"train": 6400, "val": 320, "test": 64}
    data = make_splits(ctx, "orchestration/mlflow", counts)
    proj = ctx.tmp("orchestration/mlflow-project")
    raw = yaml.safe_load(PARAMS.read_text())
    raw["registry"]["tracking_uri"] = f"sqlite:///{proj / 'mlflow.db'}"
    raw["data"]["splits_dir"] = str(data.splits_dir)
    raw["train"]["num_workers"] = 0
    (proj / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    p = load_params(proj / "params.yaml")
    cfg = p.train
    for split in ("train", "val", "test"):  # decode once, outside the timed runs
        build_cache(
            data.splits_dir / f"{split}.csv",
            data.cache_dir,
            classes=data.classes,
            image_size=cfg.image_size,
            channels=cfg.channels,
        )
    with silenced(logs=True):
        # the entry point's one set-up: creates the store (migrations) once, outside the timed runs
        setup_mlflow(p.registry.tracking_uri, proj, p.base.project, p.registry.artifact_location)
    steps_per_epoch = -(-data.counts["train"] // cfg.batch_size)
    max_steps = steps_per_epoch * 2
    counter = {"n": 0}

    def one_run(patches) -> float:
        counter["n"] += 1
        runs_dir = ctx.tmp(f"orchestration/runs/{counter['n']}")
        with contextlib.ExitStack() as stack:
            for patch in patches:
                stack.enter_context(patch)
            stack.enter_context(torch_state())
            stack.enter_context(silenced())
            start = time.perf_counter()
            train(
                p=p,
                root=proj,
                data_version="bench",
                runs_dir=runs_dir,
                cache_dir=data.cache_dir,
                progress=False,
                max_steps_override=max_steps,
            )
            return time.perf_counter() - start

    def with_mlflow() -> Measurement:
        timer = CallTimer()
        with timed_mlflow(timer):
            seconds = one_run([])
        metrics_s = timer.by_name.get("log_metrics", 0.0)
        return Measurement(
            seconds,
            {
                "mlflow_s": timer.seconds,
                "mlflow_calls": timer.calls,
                "mlflow_fraction": timer.seconds / seconds,
                "mlflow_metrics_s": metrics_s,
                "mlflow_fixed_s": timer.seconds - metrics_s,
            },
        )

    def without_mlflow() -> Measurement:
        return Measurement(one_run(null_logger_patches()))

    ctx.log(
        f"[orchestration] MLflow: {max_steps} training steps per run ({data.source}, "
        f"{data.counts['train']} train images, 2 epochs with validation)"
    )
    row = compare(
        ctx,
        f"MLflow logging in train() ({max_steps} steps)",
        with_mlflow,
        without_mlflow,
        unit="s",
        a_label="train() with MLFlowLogger",
        b_label="train() with a no-op logger",
        higher_is_better=False,
        the_goal=goal("MLflow share of A <= 1%", "<=", 0.01, on="extra.a_mlflow_fraction"),
        notes=[
            f"goal judged on extra.a_mlflow_fraction (timed MLflow calls / run seconds); a short run "
            f"overstates it: its fixed costs (run creation, params, two artifacts) are spread over "
            f"{max_steps} steps, not a real run's thousands; log_every_n_steps="
            f"{max(1, min(50, steps_per_epoch // 2))} here"
        ],
    )
    diff = summary([(a - b) / b for a, b in zip(row["a"]["values"], row["b"]["values"])])
    row["extra"]["differential_fraction"] = diff
    share = row["extra"]["a_mlflow_fraction"]
    row["notes"].insert(
        0,
        f"MLflow share of A {share['median']:.2%} (min {share['min']:.2%}, max "
        f"{share['max']:.2%}; {row['extra']['a_mlflow_s']['median']:.2f} s in "
        f"{row['extra']['a_mlflow_calls']['median']:.0f} calls); (A - B) / B "
        f"{diff['median']:+.2%}",
    )
    # The run is short to keep the suite within its budget, so the once-per-run MLflow calls (experiment and run
    # creation, params, two artifacts, finalize) weigh more than in a real run. Split them from the per-step
    # log_metrics and extrapolate to params.yaml's full run length (an estimate, not a measurement).
    fixed = row["extra"]["a_mlflow_fixed_s"]["median"]
    per_step = row["extra"]["a_mlflow_metrics_s"]["median"] / max_steps
    b_per_step = row["b"]["median"] / max_steps  # includes B's own start-up: the estimate leans low
    train_rows = (
        round(p.data.max_images * (1 - p.data.val_fraction - p.data.test_fraction)) if p.data.max_images else 52_500
    )
    full_steps = -(-train_rows // cfg.batch_size) * cfg.max_epochs
    projected = (fixed + per_step * full_steps) / (b_per_step * full_steps)
    row["extra"]["projected_full_run"] = {"steps": full_steps, "mlflow_fraction": projected}
    row["notes"].insert(
        1,
        f"once-per-run MLflow calls {fixed:.2f} s, log_metrics {per_step * 1000:.2f} ms per "
        f"step; extrapolated to a {full_steps}-step run ({cfg.max_epochs} epochs of "
        f"{train_rows} images): MLflow share about {projected:.2%}",
    )
    return row


def run(ctx: Context) -> dict[str, Any]:
    rows, notes = [], []
    n_tasks = 10 if ctx.quick else 100
    row, prefect_notes = prefect_rows(ctx, n_tasks)
    rows.append(row)
    notes += prefect_notes
    pr = pipeline_row()
    if pr is None:
        notes.append("pipeline overhead skipped: no reports/pipeline.json (run `make pipeline` first)")
    else:
        rows.append(pr)
    rows.append(mlflow_row(ctx))
    return {"rows": rows, "notes": notes, "config": {"prefect_tasks": n_tasks}}
