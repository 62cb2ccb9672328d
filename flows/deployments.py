"""Deployment definitions: the hourly drift check, the nightly retraining, and retraining on a drift event.

Serve them from this machine (a process that polls for scheduled and triggered runs; needs a Prefect server,
e.g. `prefect server start`, and PREFECT_API_URL pointing at it):

    python -m flows.deployments serve

Or register them on a work pool of a Prefect server, where workers (process, docker or Kubernetes) run them, with
the training flow as a fourth deployment `visionflow-training/train` (server mode, see infra/README.md):

    python -m flows.deployments deploy --work-pool visionflow-process          # code from this checkout
    python -m flows.deployments deploy --work-pool visionflow-k8s --image REGISTRY/visionflow-train:TAG

Schedules come from params.yaml (drift.schedule_cron, drift.retrain_cron). The retraining deployment
`visionflow-retraining/retrain-on-drift` reacts to `visionflow.drift.detected` events whose resource carries
`visionflow.retrain=requested`, i.e. only alarms that won the cool-down claim, and fires at most once per cool-down
window (threshold 1 within drift.cooldown_hours), so a burst of alarms starts one retraining; `concurrency_limit=1`
keeps even a manual extra run from overlapping it.
"""

from __future__ import annotations

import argparse
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

from visionflow.flows.runtime import configure_prefect

DRIFT_DEPLOYMENT = "hourly-drift-check"
NIGHTLY_DEPLOYMENT = "nightly-retraining"
ON_DRIFT_DEPLOYMENT = "retrain-on-drift"
TRAIN_DEPLOYMENT = "train"
DEFAULT_WORK_POOL = "visionflow-process"
REPO = Path(__file__).resolve().parent.parent


def specs(params_path: str = "params.yaml", *, resolve: bool = True) -> list[tuple[Any, dict[str, Any]]]:
    """(flow, deployment options) for every deployment; the same definitions back `serve` and `deploy`.

    resolve: pass params_path to the runs as an absolute path (serve, a process pool on this checkout); a path
    relative to the run's working directory (the image's /app) otherwise.
    """
    from visionflow.config import load_params
    from visionflow.flows.monitoring import drift_check_flow, retraining_flow
    from visionflow.flows.training import training_flow

    p = load_params(params_path)
    params_path = str(Path(params_path).resolve()) if resolve else params_path
    return [
        (
            drift_check_flow,
            dict(
                name=DRIFT_DEPLOYMENT,
                cron=p.drift.schedule_cron,
                concurrency_limit=1,
                parameters={"params_path": params_path, "use_prediction_log": True, "retrain": "event"},
                description="Drift check of the predictions served since the last check; "
                "emits visionflow.drift.detected.",
                tags=["visionflow", "drift"],
            ),
        ),
        (
            retraining_flow,
            dict(
                name=NIGHTLY_DEPLOYMENT,
                cron=p.drift.retrain_cron,
                concurrency_limit=1,
                parameters={"params_path": params_path, "reason": "scheduled"},
                description="Nightly retraining on the current data (reviewed images included) "
                "with the promotion gate.",
                tags=["visionflow", "retraining"],
            ),
        ),
        (retraining_flow, _on_drift_options(p, params_path)),
        (
            training_flow,
            dict(
                name=TRAIN_DEPLOYMENT,
                parameters={"params_path": params_path},
                description="The whole training flow: ingest, version, validate, split, train, evaluate, export, "
                "register, promote.",
                tags=["visionflow", "training"],
            ),
        ),
    ]


def _on_drift_options(p, params_path: str) -> dict[str, Any]:
    """The retraining deployment that a drift event starts: the trigger and its cool-down."""
    from prefect.events import DeploymentEventTrigger

    from visionflow.flows.monitoring import DRIFT_EVENT

    return dict(
        name=ON_DRIFT_DEPLOYMENT,
        concurrency_limit=1,
        triggers=[
            DeploymentEventTrigger(
                name="retrain on drift",
                expect={DRIFT_EVENT},
                match={"visionflow.retrain": "requested"},
                # threshold 1 within the cool-down: the server fires once, then ignores matching events
                # until the window ends (a second guard behind the ledger's claim)
                threshold=1,
                within=timedelta(hours=p.drift.cooldown_hours),
                parameters={
                    "params_path": params_path,
                    "reason": "drift",
                    "batch": "{{ event.payload.batch }}",
                    "eval_batch": "{{ event.payload.eval_batch }}",
                    "claim_id": "{{ event.payload.claim_id }}",
                    "augment": "{{ event.payload.augment }}",
                },
            )
        ],
        description="Retraining started by a drift alarm that won the cool-down claim.",
        tags=["visionflow", "retraining"],
    )


def build(params_path: str = "params.yaml") -> list[Any]:
    """Deployments for `serve` (runs in this process, on this machine)."""
    return [fl.to_deployment(**opts) for fl, opts in specs(params_path)]


ENTRYPOINTS = {
    "visionflow-drift-check": "src/visionflow/flows/monitoring.py:drift_check_flow",
    "visionflow-retraining": "src/visionflow/flows/monitoring.py:retraining_flow",
    "visionflow-training": "src/visionflow/flows/training.py:training_flow",
}


DEPLOYMENT_NAMES = (DRIFT_DEPLOYMENT, NIGHTLY_DEPLOYMENT, ON_DRIFT_DEPLOYMENT, TRAIN_DEPLOYMENT)


def deploy(
    params_path: str = "params.yaml",
    work_pool: str = DEFAULT_WORK_POOL,
    image: str | None = None,
    job_variables: dict[str, Any] | None = None,
    only: list[str] | None = None,
) -> list[str]:
    """Register the deployments (every one, or those named in `only`) on a work pool of the Prefect server at
    PREFECT_API_URL; returns their ids.

    Without an image the runs execute this checkout's code (a process pool on this machine or a shared
    filesystem); with one, the image's copy (WORKDIR /app, as infra/docker/train.Dockerfile builds it).
    `only` lets a pool take part of the work, e.g. training on a GPU pool while the drift checks run elsewhere.
    """
    from prefect import Flow

    unknown = sorted(set(only or ()) - set(DEPLOYMENT_NAMES))
    if unknown:
        raise ValueError(f"unknown deployment(s) {unknown}: choose from {list(DEPLOYMENT_NAMES)}")
    ids = []
    for fl, opts in specs(params_path, resolve=image is None):
        if only and opts["name"] not in only:
            continue
        if image is None:
            fl = Flow.from_source(source=str(REPO), entrypoint=ENTRYPOINTS[fl.name])
        ids.append(
            str(
                fl.deploy(
                    **opts,
                    work_pool_name=work_pool,
                    image=image,
                    build=False,
                    push=False,
                    job_variables=job_variables or {},
                    print_next_steps=False,
                )
            )
        )
    return ids


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m flows.deployments", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "action",
        choices=["serve", "deploy"],
        help="serve: run the deployments from this process; deploy: register them on a work pool",
    )
    parser.add_argument("--params", default="params.yaml", help="params file the runs read")
    parser.add_argument(
        "--work-pool",
        default=os.environ.get("VISIONFLOW_WORK_POOL", DEFAULT_WORK_POOL),
        help="work pool for `deploy` (default: $VISIONFLOW_WORK_POOL or %(default)s)",
    )
    parser.add_argument(
        "--image", default=None, help="`deploy` for a docker or Kubernetes pool: the training image that holds the code"
    )
    parser.add_argument(
        "--only",
        nargs="+",
        choices=DEPLOYMENT_NAMES,
        metavar="NAME",
        help=f"`deploy` only these deployments (of: {', '.join(DEPLOYMENT_NAMES)}); default all",
    )
    args = parser.parse_args(argv)
    if args.action == "deploy" and not os.environ.get("PREFECT_API_URL"):
        parser.exit(
            2,
            "deploy needs a Prefect server: set PREFECT_API_URL (and PREFECT_API_AUTH_STRING when "
            "it has authentication), e.g. http://127.0.0.1:4200/api\n",
        )
    configure_prefect(Path(args.params).resolve().parent)
    if args.action == "deploy":
        for dep_id in deploy(args.params, args.work_pool, args.image, only=args.only):
            print(dep_id)
        print(
            f"registered on work pool {args.work_pool!r}; start a worker: prefect worker start --pool "
            f"{args.work_pool}; run one: prefect deployment run 'visionflow-training/{TRAIN_DEPLOYMENT}'"
        )
        return
    from prefect import serve

    serve(*build(args.params))


if __name__ == "__main__":
    main()
