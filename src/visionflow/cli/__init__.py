"""The `visionflow` command: one sub-command per stage, plus the whole pipeline.

Each command loads params.yaml once, calls one library function and prints what it did. Errors a user can fix
(bad params, missing data, failed validation) print a message and exit 2, never a traceback; so does an
unexpected failure (one line; VISIONFLOW_DEBUG=1 adds the traceback), because exit 1 means "refused" to
`promote` and "drifted" to `drift`.

Layout: app (the Typer app, its error policy), options (global options and the per-command-line context),
output (tables, JSON, plain lines), commands_* (the commands, by part of the pipeline).
"""

from __future__ import annotations

import sys

from visionflow.cli import (
    commands_data,
    commands_flows,
    commands_model,
    commands_monitoring,
    commands_select,
    commands_serving,
)
from visionflow.cli.app import app

# In the order `visionflow --help` lists them: the pipeline's order, then the tools.
for _command in (
    commands_data.ingest,
    commands_data.version,
    commands_data.validate,
    commands_data.split,
    commands_model.train,
    commands_model.evaluate,
    commands_model.export,
    commands_model.register,
    commands_model.promote,
    commands_model.quantize,
    commands_model.rollback,
    commands_model.lineage,
    commands_serving.serve,
    commands_serving.loadtest,
    commands_flows.pipeline,
    commands_monitoring.simulate,
    commands_monitoring.drift,
    commands_monitoring.drift_eval,
    commands_select.select,
    commands_monitoring.audit_labels,
    commands_flows.retrain,
    commands_data.export_data,
    commands_data.check_params,
):
    app.command()(_command)  # named after the function, underscores as dashes (drift-eval, check-params)


def main(argv: list[str] | None = None) -> int:
    """Run one command line (default sys.argv) and return its exit code instead of exiting."""
    from visionflow.flows.runtime import offline_env

    offline_env()  # before any command imports albumentations (here and in loader workers)
    try:
        app(
            args=argv, prog_name="visionflow"
        )  # standalone mode: prints usage errors, and ends every run with SystemExit
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def entrypoint() -> None:
    sys.exit(main())


__all__ = ["app", "entrypoint", "main"]
