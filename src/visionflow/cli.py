"""The `visionflow` command: one sub-command per stage, plus the whole pipeline.

Each command loads params.yaml once, calls one library function and prints what it did. Errors a user can fix
(bad params, missing data, failed validation) print a message and exit 2, never a traceback; so does an
unexpected failure (one line; VISIONFLOW_DEBUG=1 adds the traceback), because exit 1 means "refused" to
`promote` and "drifted" to `drift`.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import sys
import traceback
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text
from typer.core import TyperGroup

from visionflow import stages
from visionflow.config import Params, load_params
from visionflow.errors import DataError, VisionflowError


class _GlobalOptionsAnywhere(TyperGroup):
    """--params, --set and --json before or after the command (`visionflow train --set train.lr=0.1`).

    Each command gets a copy of the global options that adds to what they set before the command (the group's
    callback runs first); a command's own option of the same name would win, and none has one.
    """

    def __init__(self, **attrs: Any) -> None:
        super().__init__(**attrs)
        for command in self.commands.values():
            taken = {opt for param in command.params for opt in param.opts}
            command.params.extend(_after_command(param) for param in self.params if not taken & set(param.opts))


def _after_command(param: Any) -> Any:
    option = copy.copy(param)
    option.expose_value = False
    option.default = False if param.is_flag else None
    option.callback = _merge_after_command
    return option


def _merge_after_command(_ctx: Any, param: Any, value: Any) -> None:
    if value:  # given after the command: a file, more overrides (later ones win), or --json
        {"params": lambda: state.use_params_file(Path(value)), "set_": lambda: state.overrides.extend(value),
         "as_json": lambda: setattr(state, "as_json", True)}[param.name]()


app = typer.Typer(
    name="visionflow",
    cls=_GlobalOptionsAnywhere,
    help="visionflow: version, validate, split, train, export, promote, serve and monitor an image classifier.\n\n"
    "Every command reads params.yaml (override any value with --set section.key=value, before or after the "
    "command). Run `make pipeline` for the whole pipeline on the bundled Fashion-MNIST dataset.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# soft_wrap: a message is one line however narrow the terminal, or the pipe (80 columns), it goes to.
console = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)


class State:
    params_path: Path = Path("params.yaml")
    overrides: list[str] = []
    root: Path = Path(".")
    as_json: bool = False

    def params(self) -> Params:
        return load_params(self.params_path, self.overrides)

    def use_params_file(self, path: Path) -> None:
        self.params_path = Path(path)
        self.root = self.params_path.resolve().parent


state = State()


@app.callback()
def _global(
    params: Annotated[Path, typer.Option("--params", "-p", help="params file to read.")] = Path("params.yaml"),
    set_: Annotated[list[str] | None, typer.Option(
        "--set", "-s", metavar="SECTION.KEY=VALUE", help="override a param, e.g. --set train.max_epochs=3 (repeatable).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the result as JSON (for scripts and CI).")] = False,
) -> None:
    state.use_params_file(params)
    state.overrides = list(set_ or [])
    state.as_json = as_json


@contextlib.contextmanager
def progress_bar(description: str) -> Iterator[Any]:
    """A rich progress bar driven by a callback(done, total); quiet when stderr is not a terminal."""
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeRemainingColumn(), console=console, transient=False,
                  disable=not console.is_terminal) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def _fmt(value: Any) -> str:
    """A value as a person reads it: floats to 4 significant digits, nested values as compact JSON."""
    if isinstance(value, bool) or not isinstance(value, float | dict | list | tuple):
        return str(value)
    if isinstance(value, float):
        return f"{value:.0f}" if abs(value) >= 10_000 else f"{value:.4g}"
    return json.dumps(_rounded(value), default=str)


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return float(_fmt(value))
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_rounded(v) for v in value]
    return value


def _print_json(data: Any) -> None:
    """One JSON document on stdout, as json.dumps writes it: no highlighting codes, whatever stdout is."""
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def _print_rows(title: str, columns: list[str], rows: list[list[str | Text]]) -> None:
    """A table on a terminal; piped, the title and tab-separated rows, uncut (for grep, cut and awk)."""
    if out.is_terminal:
        table = Table(title=title, title_justify="left", show_header=bool(columns))
        for col in columns or ["", ""]:  # a mapping: key and value, no header
            table.add_column(col, overflow="fold")  # a long path wraps rather than losing its end to "…"
        for row in rows:
            table.add_row(*row)
        out.print(table)
        return
    lines = [title, *(["\t".join(columns)] if columns else []),
             *("\t".join(cell.plain if isinstance(cell, Text) else cell for cell in row) for row in rows)]
    sys.stdout.write("\n".join(lines) + "\n")


def _print_mapping(title: str, mapping: dict[str, Any]) -> None:
    if state.as_json:
        _print_json(mapping)
    else:
        _print_rows(title, [], [[str(k), _fmt(v)] for k, v in mapping.items()])


@app.command()
def ingest(force: Annotated[bool, typer.Option(help="rewrite data/raw even if it is up to date.")] = False) -> None:
    """Bring the dataset (data.source: 'fashion-mnist', 'fashion-mnist-photos' or a folder per class) into
    data/raw/<class>/."""
    p = state.params()
    with progress_bar("ingest") as update:
        res = stages.ingest_stage(p, state.root, force=force, progress=update)
    from visionflow.data.ingest import MARKER

    left_out = Counter(s["reason"] for s in res.skipped_files)  # each file and its reason: in the MARKER file
    _print_mapping("ingest" + (" (up to date, skipped)" if res.skipped else ""),
                   {"source": res.source, "raw_dir": res.raw_dir, "images": res.n_images, "classes": res.classes,
                    **({f"left out (see {Path(res.raw_dir).parent / MARKER})": dict(left_out)} if left_out else {})})


@app.command()
def version(push: Annotated[bool, typer.Option(help="push the data to the DVC remote.")] = True) -> None:
    """Version data/raw with DVC (init when needed), push it to the remote and print the data version."""
    _print_mapping("data version", stages.version_stage(state.params(), state.root, push=push))


def _existing_folder(folder: Path | None, what: str) -> None:
    """Checked before a flow starts: a failure inside one comes with Prefect's own traceback in the log."""
    if folder is not None and not folder.is_dir():
        raise DataError(f"{what} {folder} " + ("is not a folder" if folder.exists() else "does not exist"))


def _data_version_or_warn(p: Params) -> str | None:
    dv = stages.current_data_version(p, state.root)
    if dv is None:
        console.print("[yellow]warning:[/] data/raw is not versioned yet (run `visionflow version`); "
                      "results will say data_version=unversioned")
    return dv


@app.command()
def validate() -> None:
    """Build the image manifest, check it with the great-expectations suite and quarantine failing files."""
    p = state.params()
    dv = _data_version_or_warn(p)
    with progress_bar("validate") as update:
        res = stages.validate_stage(p, state.root, dv, progress=update)
    _print_mapping("validation", {
        "data_version": dv, "images": res.n_images, "accepted": res.n_accepted,
        "quarantined": res.n_quarantined, "by_reason": res.quarantined_by_reason, "report": res.report_html})


@app.command()
def split() -> None:
    """Write stratified, leakage-checked train/val/test manifests to data/splits/."""
    res = stages.split_stage(state.params(), state.root)
    _print_mapping("split", {**res.counts, "leakage_free": res.leakage_free})


def _log_to_stderr(name: str) -> None:
    """Plain INFO lines from a library logger on stderr (Python's default shows only warnings)."""
    logger = logging.getLogger(name)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


@app.command()
def train() -> None:
    """Train the train.model timm classifier (resumes an interrupted run; reuses a finished identical one)."""
    p = state.params()
    _log_to_stderr("visionflow.training.train")  # the input decision and one line per epoch, piped or not
    _log_to_stderr("visionflow.data.cache")  # the cache build's progress and any image it leaves out
    res = stages.train_stage(p, state.root, _data_version_or_warn(p), progress=console.is_terminal)
    keys = ("best_val_acc", "global_step", "max_steps", "resumed", "reused", "mlflow_run_id", "model_checkpoint",
            "seconds", "runtime")
    _print_mapping("train", {k: res[k] for k in keys})


@app.command()
def evaluate() -> None:
    """Test metrics, per-class numbers, calibration, plots and the corruption-robustness suite (to MLflow too)."""
    res = stages.evaluate_stage(state.params(), state.root)
    _print_mapping("evaluate", {k: res[k] for k in ("test_accuracy", "macro_f1", "ece", "robust_accuracy",
                                                    "report_dir", "mlflow_run_id")})


@app.command()
def export() -> None:
    """Export models/model.ckpt to ONNX (preprocessing inside) and run the ONNX Runtime parity gate."""
    res = stages.export_stage(state.params(), state.root)
    _print_mapping("export", {k: res[k] for k in ("onnx_path", "passed", "max_abs_diff", "top1_agreement",
                                                  "ort_ms_b1", "torch_ms_b1", "ort_ms_b32", "torch_ms_b32")})


@app.command()
def register() -> None:
    """Register the exported ONNX model in the MLflow registry with its lineage tags and metrics."""
    _print_mapping("registered", stages.register_stage(state.params(), state.root))


@app.command()
def promote(
    version: Annotated[str | None, typer.Option(help="model version to judge (default: the challenger).")] = None,
) -> None:
    """Run every promotion gate; the version becomes champion only if all pass.

    Exit code 0: promoted. 1: refused by a gate (reasons printed). 2: error (bad input, registry unreachable).
    """
    decision = stages.promote_stage(state.params(), state.root, version)
    if state.as_json:
        _print_json(decision)
    else:
        _print_rows(f"{decision['model']} v{decision['version']}: "
                    + ("PROMOTED to champion" if decision["promoted"] else "REFUSED"), ["gate", "result", "detail"],
                    [[g["name"], Text("pass", "green") if g["passed"] else Text("FAIL", "red"), g["detail"]]
                     for g in decision["gates"]])
        out.print(f"champion before: {decision['champion_before']}  after: {decision['champion_after']}")
    if not decision["promoted"]:
        raise typer.Exit(1)


@app.command()
def rollback() -> None:
    """Point `champion` back at the `previous` version (the demoted one becomes `previous`)."""
    from visionflow.registry.store import rollback as do_rollback
    from visionflow.registry.tracking import setup_mlflow

    p = state.params()
    setup_mlflow(p.registry.tracking_uri, state.root, p.base.project, p.registry.artifact_location)
    demoted, restored = do_rollback(p.registry.model_name)
    if state.as_json:
        _print_json({"model": p.registry.model_name, "champion": restored, "previous": demoted})
    else:
        out.print(f"{p.registry.model_name}: champion v{demoted} -> v{restored} (v{demoted} is now `previous`)")


@app.command()
def lineage(ref: Annotated[str, typer.Argument(help="MODEL@ALIAS or MODEL/VERSION, e.g. "
                                                    "visionflow-classifier@champion")]) -> None:
    """Why is this model in production: data, code, params, runs, parent champion, gates and metrics."""
    from visionflow.registry.store import RegistryError, alias_version, version_info
    from visionflow.registry.tracking import setup_mlflow

    p = state.params()
    setup_mlflow(p.registry.tracking_uri, state.root, p.base.project, p.registry.artifact_location)
    if "@" in ref:
        name, alias = ref.split("@", 1)
        version = alias_version(name, alias)
        if version is None:
            raise RegistryError(f"{name} has no alias {alias!r}")
    elif "/" in ref:
        name, version = ref.rsplit("/", 1)
    else:
        raise RegistryError("give MODEL@ALIAS or MODEL/VERSION")
    info = version_info(name, version)
    t = info["tags"]
    rows = {
        "model": f"{name} v{version}", "aliases": ", ".join(info["aliases"]) or "-",
        "data version": t.get("visionflow.data_version"), "git commit": t.get("visionflow.git_commit"),
        "params hash": t.get("visionflow.params_hash"), "Prefect flow run": t.get("visionflow.flow_run_id"),
        "MLflow run": info["run_id"], "parent champion": t.get("visionflow.parent_champion", "-"),
        "promoted": t.get("visionflow.promoted", "not judged yet"),
        "gates": {k.removeprefix("visionflow.gate."): v for k, v in t.items() if k.startswith("visionflow.gate.")},
        "metrics": {k.removeprefix("visionflow.metric."): float(v) for k, v in t.items()
                    if k.startswith("visionflow.metric.")},
        "ONNX sha256": t.get("visionflow.onnx_sha256"), "parity max |diff|": t.get("visionflow.parity.max_abs_diff"),
        "ORT latency b1 (ms)": t.get("visionflow.latency.ort_ms_b1"),
    }
    _print_mapping(f"lineage of {ref}", rows)


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="bind address (default serve.host, loopback).")] = None,
    port: Annotated[int | None, typer.Option(help="port (default serve.port).")] = None,
) -> None:
    """Serve the registry's champion over HTTP (predict, batch, health, metrics, review page at /review)."""
    from visionflow.serving.app import serve_champion

    p = state.params()
    serve_champion(p, state.root, host=host or p.serve.host, port=port or p.serve.port,
                   say=lambda line: out.print(line, highlight=False, soft_wrap=True))


@app.command()
def loadtest(
    url: Annotated[str | None, typer.Option(
        help="server to load; loopback only (default http://serve.host:serve.port).")] = None,
    mode: Annotated[str, typer.Option(help="full: sequential baseline, ramp concurrency to the maximum throughput, "
                                           "--duration s at --fraction of it (constant arrival rate), then overload "
                                           "past the server's slots. concurrency / rate: one fixed phase.")] = "full",
    duration: Annotated[float, typer.Option(help="seconds of the sustained (full) or fixed phase.")] = 60,
    concurrency: Annotated[int, typer.Option(help="--mode concurrency: requests kept in flight.")] = 4,
    rate: Annotated[float | None, typer.Option(help="--mode rate: arrivals per second.")] = None,
    fraction: Annotated[float, typer.Option(help="full: sustained rate as a fraction of the maximum.")] = 0.7,
    step: Annotated[float, typer.Option(help="full: seconds per ramp step.")] = 5,
    overload_concurrency: Annotated[int | None, typer.Option(
        help="full: concurrency of the overload phase (default 3 x (serve.max_concurrency + serve.queue_depth)).")
    ] = None,
    overload_s: Annotated[float, typer.Option(help="full: seconds of the overload phase.")] = 10,
    max_requests: Annotated[int, typer.Option(
        help="cap on requests per phase (each phase also stops at its duration).")] = 100_000,
    image: Annotated[Path | None, typer.Option(
        help="image to send (default: generated noise at the model's input size).")] = None,
    out_file: Annotated[Path | None, typer.Option(
        "--out", help="JSON report (default reports/loadtest/loadtest.json).")] = None,
) -> None:
    """Load-test a running `visionflow serve` on loopback: req/s, p50/p90/p99 latency, errors by status.

    Every request is a real prediction (prediction log, review queue): serve a disposable root, or point
    serve.prediction_log and serve.review_dir elsewhere with --set, when the data there matters. A server with
    serve.auth_token_env set gets the token from that same environment variable.
    """
    from visionflow.tools.loadtest import render, run_loadtest

    p = state.params()
    slots = p.serve.max_concurrency + p.serve.queue_depth
    report = run_loadtest(url or f"http://{p.serve.host}:{p.serve.port}", mode=mode, duration_s=duration,
                          concurrency=concurrency, rate=rate, fraction=fraction, step_s=step, ramp_max=slots,
                          overload_concurrency=overload_concurrency or 3 * slots, overload_s=overload_s,
                          max_requests=max_requests, image=image,
                          token=os.environ.get(p.serve.auth_token_env) if p.serve.auth_token_env else None,
                          out=out_file or state.root / "reports/loadtest/loadtest.json",
                          progress=lambda msg: console.print(f"[dim]{msg}[/]"))
    if state.as_json:
        _print_json(report)
    else:
        out.print(render(report))
    if report["summary"].get("kept_schedule") is False:
        console.print("[yellow]warning:[/] the client fell behind its arrival schedule (late starts or dropped "
                      "arrivals): the machine is too busy, or the rate is past what the server takes")
    if not report["healthy_after"]:
        console.print("[bold red]the server was not healthy after the load test[/]")
        raise typer.Exit(1)


@app.command()
def pipeline(
    loop: Annotated[bool, typer.Option(help="after the first champion, demonstrate the closed loop: a drifted "
                                            "batch, drift detected, retraining, a new champion.")] = True,
) -> None:
    """Run the whole pipeline as Prefect flows (a temporary local Prefect server starts when none is set)."""
    from visionflow.flows.runtime import configure_prefect

    configure_prefect(state.root)
    from visionflow.flows.training import training_flow

    p = state.params()  # fail on bad params before Prefect starts its server
    del p
    summary = training_flow(params_path=str(state.params_path), overrides=state.overrides)
    _print_mapping("pipeline", summary)
    if loop:
        from visionflow.flows.monitoring import closed_loop_flow

        _print_mapping("closed loop", closed_loop_flow(params_path=str(state.params_path), overrides=state.overrides))


@app.command()
def simulate(
    shift: Annotated[str | None, typer.Option(help="none, darker, brighter, blur, jpeg, noise, color_cast or "
                                                   "resolution (default drift.default_shift).")] = None,
    severity: Annotated[int | None, typer.Option(min=1, max=5, help="1 (barely visible) to 5 (severe); default "
                                                                   "drift.default_severity.")] = None,
    n: Annotated[int | None, typer.Option("--n", help="images in the batch (default drift.batch_size).")] = None,
    seed: Annotated[int, typer.Option(help="which held-out images are drawn.")] = 0,
    out_dir: Annotated[Path | None, typer.Option("--out", help="batch folder (default data/batches/<shift><sev>-<seed>).")] = None,
) -> None:
    """Write a production-like batch of held-out images under a named shift; true labels go to labels.csv."""
    from visionflow.monitoring.simulate import simulate as run

    p = state.params()
    shift = shift or p.drift.default_shift
    severity = severity or p.drift.default_severity
    folder = out_dir or state.root / p.drift.batches_dir / f"{shift}{severity}-{seed}"
    b = run(p, state.root, folder, shift=shift, severity=severity, n=n or p.drift.batch_size, seed=seed)
    _print_mapping("batch", {"folder": str(b.folder), **b.meta})


@app.command()
def drift(
    batch: Annotated[Path | None, typer.Argument(
        help="a folder of images: flat, images/ + labels.csv, or one sub-folder per class.")] = None,
    log: Annotated[bool, typer.Option("--log", help="check the serving prediction log instead of a folder.")] = False,
    since_hours: Annotated[float | None, typer.Option(help="with --log: only predictions of the last N hours.")] = None,
    retrain: Annotated[str, typer.Option(help="on drift: auto (event if deployments are served, else inline), "
                                              "event, inline or off.")] = "off",
    eval_batch: Annotated[Path | None, typer.Option(help="reviewed drifted batch to judge a retrained model on.")] = None,
) -> None:
    """Check a production batch for drift against the champion's test split (evidently; report in reports/drift/).

    Exit code 0: no drift; 1: drifted; 2: error or too few readable images for a verdict.
    """
    import time as _time

    if batch is None and not log:
        raise typer.BadParameter("give a batch folder, or --log for the prediction log")
    p = state.params()
    _existing_folder(batch, "batch folder")
    _existing_folder(eval_batch, "--eval-batch")
    if retrain == "off":
        from visionflow.monitoring.drift import check

        since = _time.time() - since_hours * 3600 if since_hours else None
        verdict = check(p, state.root, batch=batch, log_path=state.root / p.serve.prediction_log if log else None,
                        since=since)
        outcome = {"drift": verdict}
    else:
        from visionflow.flows.runtime import configure_prefect

        configure_prefect(state.root)
        from visionflow.flows.monitoring import drift_check_flow

        outcome = drift_check_flow(params_path=str(state.params_path), batch=str(batch) if batch else None,
                                   use_prediction_log=log, eval_batch=str(eval_batch) if eval_batch else None,
                                   retrain=retrain, overrides=state.overrides)
        verdict = outcome["drift"]
    if state.as_json:
        _print_json(outcome)
    else:
        _print_drift(verdict)
        if "retrain" in outcome:
            _print_mapping("retraining", outcome["retrain"])
    raise typer.Exit(2 if verdict.get("drifted") is None else 1 if verdict["drifted"] else 0)


def _print_drift(v: dict[str, Any]) -> None:
    if v.get("drifted") is None:
        console.print(f"[yellow]no verdict[/]: {v['message']}")
        return
    _print_rows(f"drift check of {v['batch']} ({v['n_checked']} images, champion v{v['champion_version']})",
                ["feature", "view", "method", "score", "threshold", "reference mean", "current mean", "drifted"],
                [[name, f["view"], f["method"], f"{f['score']:.4f}", _fmt(f["threshold"]),
                  _fmt(f.get("reference_mean", "")), _fmt(f.get("current_mean", f.get("largest_class_shift", ""))),
                  Text("yes", "red") if f["drifted"] else "no"] for name, f in v["features"].items()])
    verdict = "[bold red]DRIFTED[/]" if v["drifted"] else "[green]no drift[/]"
    out.print(f"{verdict}: {v['n_drifted_features']}/{v['n_features']} features drifted (share {v['drift_share']:.2f}, "
              f"threshold {v['threshold']}); report {v['report_html']}")
    if v.get("accuracy") is not None:
        out.print(f"champion accuracy on this batch (reviewed labels): {v['accuracy']:.4f}")
    if v["n_unreadable"]:
        out.print(f"[yellow]{v['n_unreadable']} unreadable image(s)[/] listed in the verdict, left in place")


@app.command("drift-eval")
def drift_eval(
    batches: Annotated[int, typer.Option(min=1, help="batches per condition.")] = 20,
    shift: Annotated[str | None, typer.Option(help="shift for the drifted batches (default drift.default_shift).")] = None,
    severity: Annotated[int | None, typer.Option(min=1, max=5, help="default drift.default_severity.")] = None,
) -> None:
    """False alarms and detections: N batches from the reference distribution and N under the shift, at the
    default batch size. Writes reports/drift/evaluation.json."""
    from visionflow.monitoring.drift import check, load_champion
    from visionflow.report import write_json_atomic
    from visionflow.monitoring.simulate import simulate as run

    p = state.params()
    shift = shift or p.drift.default_shift
    severity = severity or p.drift.default_severity
    champion = load_champion(p, state.root)
    rows = []
    with progress_bar("drift checks") as update:
        for k, (cond, sh) in enumerate([(c, s) for c, s in (("reference", "none"), ("shifted", shift))
                                        for _ in range(batches)]):
            seed = 1000 + k
            folder = state.root / p.drift.batches_dir / "eval" / f"{cond}-{seed}"
            run(p, state.root, folder, shift=sh, severity=severity, n=p.drift.batch_size, seed=seed)
            v = check(p, state.root, batch=folder, champion=champion, log_to_mlflow=False, html=False,
                      name=f"eval/{cond}-{seed}")
            rows.append({"condition": cond, "seed": seed, "drifted": v["drifted"], "drift_share": v["drift_share"],
                         "moved": v["moved"], "accuracy": v["accuracy"]})
            update(k + 1, 2 * batches)
    alarms = sum(r["drifted"] for r in rows if r["condition"] == "reference")
    hits = sum(r["drifted"] for r in rows if r["condition"] == "shifted")
    summary = {"batch_size": p.drift.batch_size, "batches": batches, "shift": shift, "severity": severity,
               "false_alarms": alarms, "detections": hits, "drift_share_threshold": p.drift.drift_share,
               "reference_shares": [r["drift_share"] for r in rows if r["condition"] == "reference"],
               "shifted_shares": [r["drift_share"] for r in rows if r["condition"] == "shifted"], "runs": rows}
    write_json_atomic(state.root / "reports/drift/evaluation.json", summary)
    if state.as_json:
        _print_json(summary)
        return
    out.print(f"reference batches: {alarms}/{batches} false alarms (max share "
              f"{max(summary['reference_shares']):.3f}); {shift} severity {severity}: {hits}/{batches} detected "
              f"(min share {min(summary['shifted_shares']):.3f}); threshold {p.drift.drift_share}, "
              f"{p.drift.batch_size} images per batch")


@app.command()
def retrain(
    batch: Annotated[Path | None, typer.Option(help="reviewed batch (images + labels.csv) to add as training data.")] = None,
    eval_batch: Annotated[Path | None, typer.Option(help="reviewed batch to judge challenger and champion on.")] = None,
) -> None:
    """Run the retraining flow now: reviewed data in (new data version), warm start, gates, promotion."""
    from visionflow.flows.runtime import configure_prefect

    state.params()  # bad params fail here, not inside the flow
    _existing_folder(batch, "--batch")
    _existing_folder(eval_batch, "--eval-batch")

    configure_prefect(state.root)
    from visionflow.flows.monitoring import retraining_flow

    _print_mapping("retraining", retraining_flow(params_path=str(state.params_path),
                                                 batch=str(batch) if batch else None,
                                                 eval_batch=str(eval_batch) if eval_batch else None,
                                                 reason="manual", overrides=state.overrides))


@app.command("check-params")
def check_params() -> None:
    """Validate params.yaml (and --set overrides) and print the resolved values."""
    p = state.params()
    if state.as_json:
        _print_json({"params": p.as_dict(), "digest": p.digest()})
        return
    out.print_json(data=p.as_dict())
    out.print(f"params digest {p.digest()}")


DEBUG_ENV = "VISIONFLOW_DEBUG"


def _error(message: str) -> None:
    # soft_wrap: one line however long, so logs and CI show the whole message as one record
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)


def main(argv: list[str] | None = None) -> int:
    from visionflow.flows.runtime import offline_env

    offline_env()  # before any command imports albumentations (here and in loader workers)
    try:
        # Without standalone mode click returns the code of a typer.Exit instead of exiting.
        rc = app(args=argv, standalone_mode=False)
    except VisionflowError as exc:
        _error(str(exc))
        return 2
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: finished stages are kept; run the same command again to go on")
        return 130
    except (typer.Abort,):
        return 1
    except Exception as exc:  # click usage errors carry their own exit code and message
        usage, exits = _click_exceptions()
        if isinstance(exc, usage):
            exc.show()
            return exc.exit_code
        if isinstance(exc, exits):
            return exc.exit_code
        return _unexpected(exc)
    return rc if isinstance(rc, int) else 0


def _unexpected(exc: Exception) -> int:
    """A failure nobody anticipated: one line and exit 2 (exit 1 would read as "refused" or "drifted")."""
    if os.environ.get(DEBUG_ENV):
        traceback.print_exception(exc)
    detail = " ".join(str(exc).split())
    detail = detail if len(detail) <= 300 else detail[:297] + "..."
    _error(f"unexpected {type(exc).__name__}: {detail or 'no message'} (rerun with {DEBUG_ENV}=1 for the "
           "traceback)")
    return 2


def _click_exceptions() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """(usage-error classes, exit classes) of click and of the copy of click that newer typer releases vendor
    (typer._click), whichever are installed: typer raises its own copy's, which are not click's."""
    usage: list[type] = []
    exits: list[type] = []
    for name in ("click.exceptions", "typer._click.exceptions"):
        try:
            mod = __import__(name, fromlist=["ClickException"])
        except ImportError:
            continue
        usage.append(mod.ClickException)
        exits += [e for e in (getattr(mod, "Exit", None),) if e is not None]
    exits.append(typer.Exit)
    return tuple(usage), tuple(exits)


def entrypoint() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entrypoint()
