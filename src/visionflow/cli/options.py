"""The global options (--params, --set, --json) and what they choose for one command line: an `Invocation`, made
by the root callback and handed to the command as Typer's context object (`ctx.obj`), so nothing is carried from
one command line to the next (tests run many in one process)."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer

from visionflow.cli.output import print_mapping
from visionflow.config import Params, load_params
from visionflow.paths import ProjectPaths


@dataclass
class Invocation:
    params_path: Path = Path("params.yaml")
    overrides: list[str] = field(default_factory=list)
    as_json: bool = False
    mlflow_ready: bool = field(default=False, init=False, repr=False)

    @property
    def root(self) -> Path:
        """The project root: the folder of the params file."""
        return self.params_path.resolve().parent

    def params(self) -> Params:
        return load_params(self.params_path, self.overrides)

    def paths(self, p: Params) -> ProjectPaths:
        return ProjectPaths.of(p, self.root)

    def setup_mlflow(self, p: Params) -> None:
        """Point MLflow (process-global) at the project's store, once per command line: library code assumes it.

        Called only by commands that log runs or read the registry, and only after their own input checks, so a
        mistyped argument does not create an empty store first."""
        if self.mlflow_ready:
            return
        from visionflow.registry.tracking import setup_mlflow

        setup_mlflow(p.registry.tracking_uri, self.root, p.base.project, p.registry.artifact_location)
        self.mlflow_ready = True

    def show(self, title: str, result: Any) -> None:
        """A result (mapping or dataclass) as a key/value table, or as JSON with --json."""
        print_mapping(title, result, as_json=self.as_json)


def global_options(
    ctx: typer.Context,
    params: Annotated[Path, typer.Option("--params", "-p", help="params file to read.")] = Path("params.yaml"),
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            "-s",
            metavar="SECTION.KEY=VALUE",
            help="override a param, e.g. --set train.max_epochs=3 (repeatable).",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the result as JSON (for scripts and CI).")] = False,
) -> None:
    # The root callback (no docstring: it would replace the app's help): runs before the command's own options,
    # and its copies of these, are parsed.
    ctx.obj = Invocation(params_path=Path(params), overrides=list(set_ or []), as_json=as_json)


def after_command(param: Any) -> Any:
    """A copy of a global option for a command's own option list, so it may follow the command too
    (`visionflow train --set train.lr=0.1`); it adds to what was given before the command."""
    option = copy.copy(param)
    option.expose_value = False
    option.default = False if param.is_flag else None
    option.callback = _merge_after_command
    return option


def _merge_after_command(ctx: Any, param: Any, value: Any) -> None:
    if not value:
        return
    run: Invocation = ctx.obj  # the root callback's, inherited by the command's context
    if param.name == "params":  # a file given after the command wins
        run.params_path = Path(value)
    elif param.name == "set_":  # more overrides; later ones win
        run.overrides.extend(value)
    elif param.name == "as_json":
        run.as_json = True
