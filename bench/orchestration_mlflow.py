"""orchestration, part 3: what MLflow logging adds to a short train() run, against the same run with a no-op logger."""

from __future__ import annotations

import contextlib
import functools
import inspect
import time
from collections.abc import Callable
from typing import Any
from unittest import mock

from bench.common import Context, Measurement, compare, goal, scratch_project, summary
from bench.process_state import quiet_lightning, silenced, torch_state
from bench.sample_data import SplitData, make_splits


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
    """visionflow.training.train with a no-op logger and no system-metrics monitor: the training run without
    MLflow."""
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

    class NoSystemMetrics:
        """train()'s MLflow system-metrics monitor, which needs a real MLflow run: none without MLflow."""

        def __init__(self, *args, **kwargs) -> None:
            pass

        def __enter__(self) -> NoSystemMetrics:
            return self

        def __exit__(self, *exc) -> None:
            pass

    return [
        mock.patch.object(vtrain, "MLFlowLogger", NullLogger),
        mock.patch.object(vtrain, "SystemMetrics", NoSystemMetrics),
    ]


def _project(ctx: Context) -> tuple[Any, Any, SplitData]:
    """A throwaway project on a few thousand images, their cache built and the MLflow store created outside the
    timed runs."""
    from visionflow.data.cache import build_cache
    from visionflow.registry.tracking import setup_mlflow

    counts = {"train": 512, "val": 128, "test": 64} if ctx.quick else {"train": 6400, "val": 320, "test": 64}
    data = make_splits(ctx, "orchestration/mlflow", counts)
    settings = {
        "data.splits_dir": str(data.splits_dir),
        "train.num_workers": 0,
        # the cache is built here, before train() could decide "auto": the channels Context.params decides
        "train.channels": ctx.params().train.channels,
    }
    proj, p = scratch_project(ctx, "orchestration/mlflow-project", settings)
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
    return proj, p, data


def _train_runner(ctx: Context, proj, p, data: SplitData, max_steps: int) -> Callable[[list], float]:
    """one_run(patches): the seconds of one train() run of max_steps under those patches, in a fresh runs folder."""
    from visionflow.training.train import train

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

    return one_run


def _with_mlflow(one_run: Callable[[list], float]) -> Measurement:
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


def _without_mlflow(one_run: Callable[[list], float]) -> Measurement:
    return Measurement(one_run(null_logger_patches()))


def _add_share(row: dict[str, Any]) -> None:
    """(A - B) / B per pair as a cross-check, and the MLflow share as the row's first note."""
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


def _add_projection(row: dict[str, Any], p, max_steps: int) -> None:
    """The run is short to keep the suite within its budget, so the once-per-run MLflow calls (experiment and run
    creation, params, two artifacts, finalize) weigh more than in a real run. Split them from the per-step
    log_metrics and extrapolate to params.yaml's full run length (an estimate, not a measurement)."""
    cfg = p.train
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


def mlflow_row(ctx: Context) -> dict[str, Any]:
    quiet_lightning()
    proj, p, data = _project(ctx)
    steps_per_epoch = -(-data.counts["train"] // p.train.batch_size)
    max_steps = steps_per_epoch * 2
    one_run = _train_runner(ctx, proj, p, data, max_steps)
    ctx.log(
        f"[orchestration] MLflow: {max_steps} training steps per run ({data.source}, "
        f"{data.counts['train']} train images, 2 epochs with validation)"
    )
    row = compare(
        ctx,
        f"MLflow logging in train() ({max_steps} steps)",
        functools.partial(_with_mlflow, one_run),
        functools.partial(_without_mlflow, one_run),
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
    _add_share(row)
    _add_projection(row, p, max_steps)
    return row
