"""Commands of the monitoring part: simulate a production batch, check drift, evaluate the drift check, audit the
training labels."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.text import Text

from visionflow.cli.options import Invocation
from visionflow.cli.output import console, fmt, out, print_json, print_rows, progress_bar
from visionflow.errors import DataError


def existing_folder(folder: Path | None, what: str) -> None:
    """Checked before a flow starts: a failure inside one comes with Prefect's own traceback in the log."""
    if folder is not None and not folder.is_dir():
        raise DataError(f"{what} {folder} " + ("is not a folder" if folder.exists() else "does not exist"))


def simulate(
    ctx: typer.Context,
    shift: Annotated[
        str | None,
        typer.Option(
            help="none, darker, brighter, blur, jpeg, noise, color_cast or resolution (default drift.default_shift)."
        ),
    ] = None,
    severity: Annotated[
        int | None, typer.Option(min=1, max=5, help="1 (barely visible) to 5 (severe); default drift.default_severity.")
    ] = None,
    n: Annotated[int | None, typer.Option("--n", help="images in the batch (default drift.batch_size).")] = None,
    seed: Annotated[int, typer.Option(help="which held-out images are drawn.")] = 0,
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="batch folder (default data/batches/<shift><sev>-<seed>).")
    ] = None,
) -> None:
    """Write a production-like batch of held-out images under a named shift; true labels go to labels.csv."""
    from visionflow.monitoring.simulate import simulate as write_batch

    run: Invocation = ctx.obj
    p = run.params()
    shift = shift or p.drift.default_shift
    severity = severity or p.drift.default_severity
    folder = out_dir or run.paths(p).batches / f"{shift}{severity}-{seed}"
    b = write_batch(p, run.root, folder, shift=shift, severity=severity, n=n or p.drift.batch_size, seed=seed)
    run.show("batch", {"folder": str(b.folder), **b.meta})


def drift(
    ctx: typer.Context,
    batch: Annotated[
        Path | None, typer.Argument(help="a folder of images: flat, images/ + labels.csv, or one sub-folder per class.")
    ] = None,
    log: Annotated[bool, typer.Option("--log", help="check the serving prediction log instead of a folder.")] = False,
    since_hours: Annotated[float | None, typer.Option(help="with --log: only predictions of the last N hours.")] = None,
    retrain: Annotated[
        str, typer.Option(help="on drift: auto (event if deployments are served, else inline), event, inline or off.")
    ] = "off",
    eval_batch: Annotated[
        Path | None, typer.Option(help="reviewed drifted batch to judge a retrained model on.")
    ] = None,
) -> None:
    """Check a production batch for drift against the champion's test split (evidently; report in reports/drift/).

    Exit code 0: no drift; 1: drifted; 2: error or too few readable images for a verdict.
    """
    if batch is None and not log:
        raise typer.BadParameter("give a batch folder, or --log for the prediction log")
    run: Invocation = ctx.obj
    p = run.params()
    existing_folder(batch, "batch folder")
    existing_folder(eval_batch, "--eval-batch")
    run.setup_mlflow(p)
    if retrain == "off":
        from visionflow.monitoring.drift import check

        since = time.time() - since_hours * 3600 if since_hours else None
        verdict = check(p, run.root, batch=batch, log_path=run.paths(p).prediction_log if log else None, since=since)
        outcome = {"drift": verdict}
    else:
        from visionflow.flows.runtime import configure_prefect

        configure_prefect(run.root)
        from visionflow.flows.monitoring import drift_check_flow

        outcome = drift_check_flow(
            params_path=str(run.params_path),
            batch=str(batch) if batch else None,
            use_prediction_log=log,
            eval_batch=str(eval_batch) if eval_batch else None,
            retrain=retrain,
            overrides=run.overrides,
        )
        verdict = outcome["drift"]
    if run.as_json:
        print_json(outcome)
    else:
        _print_drift(verdict)
        if "retrain" in outcome:
            run.show("retraining", outcome["retrain"])
    raise typer.Exit(2 if verdict.get("drifted") is None else 1 if verdict["drifted"] else 0)


def _print_drift(v: dict[str, Any]) -> None:
    if v.get("drifted") is None:
        console.print(f"[yellow]no verdict[/]: {v['message']}")
        return
    print_rows(
        f"drift check of {v['batch']} ({v['n_checked']} images, champion v{v['champion_version']})",
        ["feature", "view", "method", "score", "threshold", "reference mean", "current mean", "drifted"],
        [
            [
                name,
                f["view"],
                f["method"],
                f"{f['score']:.4f}",
                fmt(f["threshold"]),
                fmt(f.get("reference_mean", "")),
                fmt(f.get("current_mean", f.get("largest_class_shift", ""))),
                Text("yes", "red") if f["drifted"] else "no",
            ]
            for name, f in v["features"].items()
        ],
    )
    verdict = "[bold red]DRIFTED[/]" if v["drifted"] else "[green]no drift[/]"
    out.print(
        f"{verdict}: {v['n_drifted_features']}/{v['n_features']} features drifted (share {v['drift_share']:.2f}, "
        f"threshold {v['threshold']}); report {v['report_html']}"
    )
    if v["drifted"] and v.get("attribution"):
        out.print(f"attribution: {v['attribution']['summary']}", highlight=False)
    if v.get("accuracy") is not None:
        out.print(f"champion accuracy on this batch (reviewed labels): {v['accuracy']:.4f}")
    if v["n_unreadable"]:
        out.print(f"[yellow]{v['n_unreadable']} unreadable image(s)[/] listed in the verdict, left in place")


def drift_eval(
    ctx: typer.Context,
    batches: Annotated[int, typer.Option(min=1, help="batches per condition.")] = 20,
    shift: Annotated[
        str | None, typer.Option(help="shift for the drifted batches (default drift.default_shift).")
    ] = None,
    severity: Annotated[int | None, typer.Option(min=1, max=5, help="default drift.default_severity.")] = None,
) -> None:
    """False alarms and detections: N batches from the reference distribution and N under the shift, at the
    default batch size. Writes reports/drift/evaluation.json."""
    from visionflow.monitoring.evaluation import evaluate_detector

    run: Invocation = ctx.obj
    p = run.params()
    shift = shift or p.drift.default_shift
    severity = severity or p.drift.default_severity
    run.setup_mlflow(p)
    with progress_bar("drift checks") as update:
        res = evaluate_detector(p, run.root, batches=batches, shift=shift, severity=severity, progress=update)
    if run.as_json:
        print_json(asdict(res))
        return
    out.print(
        f"reference batches: {res.false_alarms}/{batches} false alarms (max share "
        f"{max(res.reference_shares):.3f}); {shift} severity {severity}: {res.detections}/{batches} detected "
        f"(min share {min(res.shifted_shares):.3f}); threshold {p.drift.drift_share}, "
        f"{p.drift.batch_size} images per batch"
    )


def audit_labels(
    ctx: typer.Context,
    threshold: Annotated[
        float | None,
        typer.Option(
            help="flag training samples whose area under the margin is below this (default -2: on average "
            "another class beat the given label by more than 2 logits; chosen in BENCHMARKS.md, label_audit)."
        ),
    ] = None,
) -> None:
    """Audit the training split's labels from the published model's training dynamics (area under the margin).

    Writes reports/label_audit/suspects-train.csv (lowest AUM first), summary-train.json and grid-train.png (the
    top 25), and logs them to the model's training run in MLflow.
    """
    from visionflow.monitoring.audit import audit_train, log_audit

    run: Invocation = ctx.obj
    p = run.params()
    res = audit_train(p, run.root, threshold)
    run.setup_mlflow(p)
    log_audit(res, run.root)
    run.show("label audit (train)", res)
