"""Commands of the model part of the pipeline: train, evaluate, export, register, promote, rollback, lineage.

Each reaches MLflow (runs or the registry), so each sets it up once (`Invocation.setup_mlflow`) before the stage.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.text import Text

from visionflow import stages
from visionflow.cli.commands_data import data_version_or_warn
from visionflow.cli.options import Invocation
from visionflow.cli.output import as_mapping, console, log_to_stderr, out, print_json, print_rows
from visionflow.errors import ConfigError


def _picked(result: Any, keys: tuple[str, ...]) -> dict[str, Any]:
    mapping = as_mapping(result)
    return {k: mapping[k] for k in keys}


def train(ctx: typer.Context) -> None:
    """Train the train.model timm classifier (resumes an interrupted run; reuses a finished identical one)."""
    run: Invocation = ctx.obj
    p = run.params()
    log_to_stderr("visionflow.training.train")  # the input decision and one line per epoch, piped or not
    log_to_stderr("visionflow.data.cache")  # the cache build's progress and any image it leaves out
    dv = data_version_or_warn(p, run.root)
    run.setup_mlflow(p)
    res = stages.train_stage(p, run.root, dv, progress=console.is_terminal)
    run.show(
        "train",
        _picked(
            res,
            (
                "best_val_acc",
                "global_step",
                "max_steps",
                "resumed",
                "reused",
                "mlflow_run_id",
                "model_checkpoint",
                "seconds",
                "runtime",
            ),
        ),
    )


def evaluate(ctx: typer.Context) -> None:
    """Test metrics, per-class numbers, calibration, plots and the corruption-robustness suite (to MLflow too)."""
    run: Invocation = ctx.obj
    p = run.params()
    run.setup_mlflow(p)
    res = stages.evaluate_stage(p, run.root)
    run.show(
        "evaluate", _picked(res, ("test_accuracy", "macro_f1", "ece", "robust_accuracy", "report_dir", "mlflow_run_id"))
    )


def export(ctx: typer.Context) -> None:
    """Export models/model.ckpt to ONNX (preprocessing inside) and run the ONNX Runtime parity gate."""
    run: Invocation = ctx.obj
    p = run.params()
    run.setup_mlflow(p)  # the parity and latency figures go to the training run as tags
    res = stages.export_stage(p, run.root)
    run.show(
        "export",
        _picked(
            res,
            (
                "onnx_path",
                "passed",
                "max_abs_diff",
                "top1_agreement",
                "ort_ms_b1",
                "torch_ms_b1",
                "ort_ms_b32",
                "torch_ms_b32",
            ),
        ),
    )


def register(ctx: typer.Context) -> None:
    """Register the exported ONNX model in the MLflow registry with its lineage tags and metrics."""
    run: Invocation = ctx.obj
    p = run.params()
    run.setup_mlflow(p)
    run.show("registered", stages.register_stage(p, run.root))


def promote(
    ctx: typer.Context,
    version: Annotated[str | None, typer.Option(help="model version to judge (default: the challenger).")] = None,
) -> None:
    """Run every promotion gate; the version becomes champion only if all pass.

    Exit code 0: promoted. 1: refused by a gate (reasons printed). 2: error (bad input, registry unreachable).
    """
    run: Invocation = ctx.obj
    p = run.params()
    run.setup_mlflow(p)
    decision = as_mapping(stages.promote_stage(p, run.root, version))
    if run.as_json:
        print_json(decision)
    else:
        print_rows(
            f"{decision['model']} v{decision['version']}: "
            + ("PROMOTED to champion" if decision["promoted"] else "REFUSED"),
            ["gate", "result", "detail"],
            [
                [g["name"], Text("pass", "green") if g["passed"] else Text("FAIL", "red"), g["detail"]]
                for g in decision["gates"]
            ],
        )
        out.print(f"champion before: {decision['champion_before']}  after: {decision['champion_after']}")
    if not decision["promoted"]:
        raise typer.Exit(1)


def quantize(
    ctx: typer.Context,
    version: Annotated[str | None, typer.Option(help="fp32 version to derive from (default: the champion).")] = None,
) -> None:
    """Make the export.quantize variant (int8, fp16) of the classifier, register it as <model>-<precision> and
    judge it against its fp32 parent (report in reports/quantize/).

    Exit code 0: the variant is its model's champion. 1: refused by a gate. 2: error.
    """
    run: Invocation = ctx.obj
    p = run.params()
    if p.export.quantize == "none":
        raise ConfigError("export.quantize is none: pass --set export.quantize=int8 (or fp16)")
    run.setup_mlflow(p)
    res = as_mapping(stages.quantize_stage(p, run.root, version))
    if run.as_json:
        print_json(res)
    else:
        print_rows(
            f"{res['model']} v{res['version']} ({res['precision']} of {res['parent_model']} "
            f"v{res['parent_version']}): " + ("champion" if res["promoted"] else "REFUSED"),
            ["gate", "result", "detail"],
            [
                [g["name"], Text("pass", "green") if g["passed"] else Text("FAIL", "red"), g["detail"]]
                for g in res["gates"]
            ],
        )
        out.print(f"report: {res['report']}")
    if not res["promoted"]:
        raise typer.Exit(1)


def rollback(ctx: typer.Context) -> None:
    """Point `champion` back at the `previous` version (the demoted one becomes `previous`)."""
    from visionflow.registry.store import rollback as do_rollback

    run: Invocation = ctx.obj
    p = run.params()
    run.setup_mlflow(p)
    demoted, restored = do_rollback(p.model_name)
    if run.as_json:
        print_json({"model": p.model_name, "champion": restored, "previous": demoted})
    else:
        out.print(f"{p.model_name}: champion v{demoted} -> v{restored} (v{demoted} is now `previous`)")


def lineage(
    ctx: typer.Context,
    ref: Annotated[str, typer.Argument(help="MODEL@ALIAS or MODEL/VERSION, e.g. visionflow-classifier@champion")],
) -> None:
    """Why is this model in production: data, code, params, runs, parent champion, gates and metrics."""
    from visionflow.registry.lineage import lineage as read_lineage

    run: Invocation = ctx.obj
    run.setup_mlflow(run.params())
    li = read_lineage(ref)
    run.show(
        f"lineage of {ref}",
        {
            "model": f"{li.model} v{li.version}",
            "aliases": ", ".join(li.aliases) or "-",
            "data version": li.data_version,
            "git commit": li.git_commit,
            "params hash": li.params_hash,
            "Prefect flow run": li.flow_run_id,
            "MLflow run": li.mlflow_run_id,
            "parent champion": "-" if li.parent_champion is None else li.parent_champion,
            "promoted": "not judged yet" if li.promoted is None else li.promoted,
            "gates": li.gates,
            "metrics": li.metrics,
            "ONNX sha256": li.onnx_sha256,
            "parity max |diff|": li.parity_max_abs_diff,
            "ORT latency b1 (ms)": li.ort_latency_ms_b1,
            **({"derived from": li.derived_from} if li.derived_from else {}),
        },
    )
