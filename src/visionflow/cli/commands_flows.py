"""Commands that run the Prefect flows: the whole pipeline, and a retraining now."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from visionflow.cli.commands_monitoring import existing_folder
from visionflow.cli.options import Invocation


def pipeline(
    ctx: typer.Context,
    loop: Annotated[
        bool,
        typer.Option(
            help="after the first champion, demonstrate the closed loop: a drifted "
            "batch, drift detected, retraining, a new champion."
        ),
    ] = True,
) -> None:
    """Run the whole pipeline as Prefect flows (a temporary local Prefect server starts when none is set)."""
    from visionflow.flows.runtime import configure_prefect

    run: Invocation = ctx.obj
    configure_prefect(run.root)
    from visionflow.flows.training import training_flow

    run.params()  # fail on bad params before Prefect starts its server; the flow sets MLflow up itself
    summary = training_flow(params_path=str(run.params_path), overrides=run.overrides)
    run.show("pipeline", summary)
    if loop:
        from visionflow.flows.monitoring import closed_loop_flow

        run.show("closed loop", closed_loop_flow(params_path=str(run.params_path), overrides=run.overrides))


def retrain(
    ctx: typer.Context,
    batch: Annotated[
        Path | None, typer.Option(help="reviewed batch (images + labels.csv) to add as training data.")
    ] = None,
    eval_batch: Annotated[Path | None, typer.Option(help="reviewed batch to judge challenger and champion on.")] = None,
) -> None:
    """Run the retraining flow now: reviewed data in (new data version), warm start, gates, promotion."""
    from visionflow.flows.runtime import configure_prefect

    run: Invocation = ctx.obj
    run.params()  # bad params fail here, not inside the flow
    existing_folder(batch, "--batch")
    existing_folder(eval_batch, "--eval-batch")

    configure_prefect(run.root)  # the flow sets MLflow up itself, as a deployment's run does
    from visionflow.flows.monitoring import retraining_flow

    run.show(
        "retraining",
        retraining_flow(
            params_path=str(run.params_path),
            batch=str(batch) if batch else None,
            eval_batch=str(eval_batch) if eval_batch else None,
            reason="manual",
            overrides=run.overrides,
        ),
    )
