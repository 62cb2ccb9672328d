"""orchestration, part 1: Prefect's cost per task, against calling the same function directly."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from bench.common import Context, Measurement, compare, summary
from bench.process_state import silenced


def trivial(i: int) -> int:
    """The 'work' of each task: microseconds, so what is measured is the orchestration around it."""
    return sum(range(50)) + i


def _use_prefect(ctx: Context) -> list[str]:
    """Prefect as `make pipeline` runs it: a temporary local server unless PREFECT_API_URL names one; the note
    says which."""
    if not os.environ.get("PREFECT_API_URL"):
        home = ctx.tmp("orchestration/prefect-home")
        os.environ["PREFECT_HOME"] = str(home)  # bench flow runs stay out of the project's Prefect history
        note = "Prefect: temporary local server with a fresh database (as `make pipeline` without PREFECT_API_URL)"
    else:
        note = f"Prefect: the server at PREFECT_API_URL={os.environ['PREFECT_API_URL']}"
    from visionflow.flows.runtime import configure_prefect

    configure_prefect(ctx.tmp("orchestration"))  # visionflow's local-run settings (env set before import)
    return [note]


def _bench_flow():
    """A flow of n trivial tasks called one after the other, as visionflow's flows call theirs."""
    from prefect import flow, task

    trivial_task = task(trivial, name="bench-trivial")

    @flow(name="visionflow-bench-orchestration", log_prints=False)
    def many(n: int) -> float:
        """Calls n tasks one after the other, as visionflow's flows do; returns the seconds the calls took."""
        start = time.perf_counter()
        for i in range(n):
            trivial_task(i)
        return time.perf_counter() - start

    return many


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


def _add_overhead(row: dict[str, Any], start_s: float) -> None:
    """A - B per pair (the per-task overhead) and Prefect's start-up, as extras and the row's first note."""
    over = summary([a - b for a, b in zip(row["a"]["values"], row["b"]["values"])])
    row["extra"]["per_task_overhead_ms"] = over
    row["extra"]["prefect_startup_s"] = round(start_s, 2)
    row["notes"].insert(
        0,
        f"per-task overhead {over['median']:.2f} ms (median; min {over['min']:.2f}, max "
        f"{over['max']:.2f}); flow start + finish "
        f"{row['extra']['a_flow_outside_tasks_ms']['median']:.0f} ms",
    )


def prefect_rows(ctx: Context, n_tasks: int) -> tuple[dict[str, Any], list[str]]:
    notes = _use_prefect(ctx)
    t0 = time.perf_counter()
    many = _bench_flow()
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
    _add_overhead(row, start_s)
    logging.getLogger("prefect").setLevel(logging.WARNING)  # no "stopping temporary server" line after the table
    return row, notes
