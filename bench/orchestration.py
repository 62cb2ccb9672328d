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

import json
import time
from typing import Any

from bench.common import REPO, Context, goal, single
from bench.orchestration_mlflow import mlflow_row
from bench.orchestration_prefect import prefect_rows

NAME = "orchestration"


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
