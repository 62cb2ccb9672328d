"""The `visionflow` command: one sub-command per stage, plus the whole pipeline.

Each command loads params.yaml once, calls one library function and prints what it did. Errors a user can fix
(bad params, missing data, failed validation) print a message and exit 2, never a traceback.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from visionflow.config import Params, load_params
from visionflow.errors import VersioningError, VisionflowError

app = typer.Typer(
    name="visionflow",
    help="visionflow: version, validate, split, train, export, promote, serve and monitor an image classifier.\n\n"
    "Every command reads params.yaml (override any value with --set section.key=value). "
    "Run `make pipeline` for the whole pipeline on the bundled Fashion-MNIST dataset.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
out = Console()


class State:
    params_path: Path = Path("params.yaml")
    overrides: list[str] = []
    root: Path = Path(".")

    def params(self) -> Params:
        return load_params(self.params_path, self.overrides)


state = State()


@app.callback()
def _global(
    params: Annotated[Path, typer.Option("--params", "-p", help="params file to read.")] = Path("params.yaml"),
    set_: Annotated[list[str] | None, typer.Option(
        "--set", "-s", metavar="SECTION.KEY=VALUE", help="override a param, e.g. --set train.max_epochs=3 (repeatable).")] = None,
) -> None:
    state.params_path = params
    state.overrides = list(set_ or [])
    state.root = params.resolve().parent


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


def _print_mapping(title: str, mapping: dict[str, Any]) -> None:
    table = Table(title=title, show_header=False, title_justify="left")
    for k, v in mapping.items():
        table.add_row(str(k), json.dumps(v) if isinstance(v, dict | list) else str(v))
    out.print(table)


@app.command()
def ingest(force: Annotated[bool, typer.Option(help="rewrite data/raw even if it is up to date.")] = False) -> None:
    """Bring the dataset (data.source: 'fashion-mnist' or a folder per class) into data/raw/<class>/."""
    from visionflow.ingest import ingest as run_ingest

    p = state.params()
    with progress_bar("ingest") as update:
        res = run_ingest(source=p.data.source, raw_dir=p.data.raw_dir, max_images=p.data.max_images,
                         seed=p.base.seed, cache_dir=Path("data/external"), force=force, progress=update)
    _print_mapping("ingest" + (" (up to date, skipped)" if res.skipped else ""),
                   {"source": res.source, "raw_dir": res.raw_dir, "images": res.n_images, "classes": res.classes})


@app.command()
def version(push: Annotated[bool, typer.Option(help="push the data to the DVC remote.")] = True) -> None:
    """Version data/raw with DVC (init when needed), push it to the remote and print the data version."""
    from visionflow import versioning

    p = state.params()
    url = versioning.ensure_repo(state.root, p.data.remote_name, p.data.remote_url)
    versioning.commit(state.root, [versioning.INGEST_STAGE])
    if push:
        versioning.push(state.root, p.data.remote_name)
    dv = versioning.data_version(state.root, p.data.raw_dir)
    _print_mapping("data version", {"data_version": dv, "remote": url, "pushed": push})


def _data_version_or_none(p: Params) -> str | None:
    from visionflow import versioning

    try:
        return versioning.data_version(state.root, p.data.raw_dir)
    except VersioningError as exc:
        console.print(f"[yellow]warning:[/] {exc}")
        return None


@app.command()
def validate() -> None:
    """Build the image manifest, check it with the great-expectations suite and quarantine failing files."""
    from visionflow.validate import validate as run_validate

    p = state.params()
    dv = _data_version_or_none(p)
    with progress_bar("validate") as update:
        res = run_validate(raw_dir=p.data.raw_dir, cfg=p.validation, manifest_path=p.data.manifest_path,
                           labels=p.data.labels, data_version=dv, progress=update)
    _print_mapping("validation", {
        "data_version": dv, "images": res.n_images, "accepted": res.n_accepted,
        "quarantined": res.n_quarantined, "by_reason": res.quarantined_by_reason, "report": res.report_html})


@app.command()
def split() -> None:
    """Write stratified, leakage-checked train/val/test manifests to data/splits/."""
    from visionflow.split import split as run_split

    p = state.params()
    res = run_split(manifest_path=p.data.manifest_path, out_dir=p.data.splits_dir,
                    val_fraction=p.data.val_fraction, test_fraction=p.data.test_fraction, seed=p.base.seed)
    _print_mapping("split", {**res.counts, "leakage_free": res.leakage_free})


@app.command()
def pipeline() -> None:
    """Run the whole pipeline as a Prefect flow (a temporary local Prefect server starts when none is set)."""
    from flows.runtime import configure_prefect

    configure_prefect(state.root)
    from flows.training import training_flow

    p = state.params()  # fail on bad params before Prefect starts its server
    del p
    summary = training_flow(params_path=str(state.params_path), overrides=state.overrides)
    _print_mapping("pipeline", summary)


@app.command("check-params")
def check_params() -> None:
    """Validate params.yaml (and --set overrides) and print the resolved values."""
    p = state.params()
    out.print_json(data=p.as_dict())
    out.print(f"params digest {p.digest()}")


def main(argv: list[str] | None = None) -> int:
    try:
        app(args=argv, standalone_mode=False)
    except VisionflowError as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False)
        return 2
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: finished stages are kept; run the same command again to go on")
        return 130
    except (typer.Abort,):
        return 1
    except Exception as exc:  # click usage errors carry their own exit code and message
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            return exc.exit_code
        if isinstance(exc, click.exceptions.Exit):
            return exc.exit_code
        raise
    return 0


def entrypoint() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entrypoint()
