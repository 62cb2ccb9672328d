"""Deployment definitions: the hourly drift check, the nightly retraining, and retraining on a drift event.

Serve them from this machine (a process that polls for scheduled and triggered runs; needs a Prefect server,
e.g. `prefect server start`, and PREFECT_API_URL pointing at it):

    python -m flows.deployments serve

Schedules come from params.yaml (drift.schedule_cron, drift.retrain_cron). The retraining deployment
`visionflow-retraining/retrain-on-drift` reacts to `visionflow.drift.detected` events whose resource carries
`visionflow.retrain=requested`, i.e. only alarms that won the cool-down claim, and fires at most once per cool-down
window (threshold 1 within drift.cooldown_hours), so a burst of alarms starts one retraining; `concurrency_limit=1`
keeps even a manual extra run from overlapping it.
"""

from __future__ import annotations

import argparse
from datetime import timedelta
from pathlib import Path
from typing import Any

from flows.runtime import configure_prefect

DRIFT_DEPLOYMENT = "hourly-drift-check"
NIGHTLY_DEPLOYMENT = "nightly-retraining"
ON_DRIFT_DEPLOYMENT = "retrain-on-drift"


def build(params_path: str = "params.yaml") -> list[Any]:
    from prefect.events import DeploymentEventTrigger

    from flows.monitoring import DRIFT_EVENT, drift_check_flow, retraining_flow
    from visionflow.config import load_params

    p = load_params(params_path)
    params_path = str(Path(params_path).resolve())
    return [
        drift_check_flow.to_deployment(
            name=DRIFT_DEPLOYMENT, cron=p.drift.schedule_cron, concurrency_limit=1,
            parameters={"params_path": params_path, "use_prediction_log": True, "retrain": "event"},
            description="Drift check of the predictions served since the last check; emits visionflow.drift.detected.",
            tags=["visionflow", "drift"]),
        retraining_flow.to_deployment(
            name=NIGHTLY_DEPLOYMENT, cron=p.drift.retrain_cron, concurrency_limit=1,
            parameters={"params_path": params_path, "reason": "scheduled"},
            description="Nightly retraining on the current data (reviewed images included) with the promotion gate.",
            tags=["visionflow", "retraining"]),
        retraining_flow.to_deployment(
            name=ON_DRIFT_DEPLOYMENT, concurrency_limit=1,
            triggers=[DeploymentEventTrigger(
                name="retrain on drift", expect={DRIFT_EVENT},
                match={"visionflow.retrain": "requested"},
                # threshold 1 within the cool-down: the server fires once, then ignores matching events until the
                # window ends (a second guard behind the ledger's claim)
                threshold=1, within=timedelta(hours=p.drift.cooldown_hours),
                parameters={"params_path": params_path, "reason": "drift",
                            "batch": "{{ event.payload.batch }}",
                            "eval_batch": "{{ event.payload.eval_batch }}",
                            "claim_id": "{{ event.payload.claim_id }}"})],
            description="Retraining started by a drift alarm that won the cool-down claim.",
            tags=["visionflow", "retraining"]),
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.deployments", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["serve"], help="serve the deployments from this process")
    parser.add_argument("--params", default="params.yaml", help="params file the runs read")
    args = parser.parse_args(argv)
    configure_prefect(Path(args.params).resolve().parent)
    from prefect import serve

    serve(*build(args.params))


if __name__ == "__main__":
    main()
