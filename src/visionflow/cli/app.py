"""The Typer app and its group class: global options anywhere on the line, and every failure one line and exit 2.

Typer's standalone mode does the rest (exit codes, help, broken pipes); a usage error is one line too, naming
the command whose --help explains it. Exit 2, never 1, for any error,
because exit 1 means "refused" to `promote` and "drifted" to `drift`.
"""

from __future__ import annotations

import os
import traceback
from typing import Any

import typer
from typer.core import TyperGroup

try:  # typer raises the exceptions of the copy of click it vendors (typer._click), not click's own
    from typer._click.exceptions import ClickException, NoArgsIsHelpError, UsageError
except ImportError:  # typer releases that use click itself
    from click.exceptions import ClickException, NoArgsIsHelpError, UsageError

from visionflow.cli.options import after_command, global_options
from visionflow.cli.output import console, error_line
from visionflow.errors import VisionflowError

DEBUG_ENV = "VISIONFLOW_DEBUG"


class VisionflowGroup(TyperGroup):
    """--params, --set and --json before or after the command (`visionflow train --set train.lr=0.1`), and the
    CLI's error policy around every command.

    Each command gets a copy of the global options that adds to what they set before the command (the group's
    callback runs first); a command's own option of the same name would win, and none has one.
    """

    def __init__(self, **attrs: Any) -> None:
        super().__init__(**attrs)
        for command in self.commands.values():
            taken = {opt for param in command.params for opt in param.opts}
            command.params.extend(after_command(param) for param in self.params if not taken & set(param.opts))

    def make_context(self, info_name: str | None, args: list[str], parent: Any = None, **extra: Any) -> Any:
        try:  # the options before the command are parsed here
            return super().make_context(info_name, args, parent=parent, **extra)
        except UsageError as exc:
            raise typer.Exit(_usage(exc)) from None

    def invoke(self, ctx: Any) -> Any:
        try:  # the command's own options are parsed in here, then it runs
            return super().invoke(ctx)
        except UsageError as exc:
            raise typer.Exit(_usage(exc)) from None
        except (typer.Exit, typer.Abort, ClickException, BrokenPipeError):
            # exit codes, Ctrl-D, other click errors, and output piped into a reader that stopped (`| head`):
            # standalone mode (click exits quietly on a broken pipe)
            raise
        except VisionflowError as exc:  # bad params, missing data, failed validation: the message says what to do
            error_line(str(exc))
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            console.print("[yellow]interrupted[/]: finished stages are kept; run the same command again to go on")
            raise typer.Exit(130) from None
        except Exception as exc:  # noqa: BLE001 - the unforeseen: one line and exit 2, never a traceback
            raise typer.Exit(_unexpected(exc)) from None


def _usage(exc: UsageError) -> int:
    """A mistyped command line: one line (click prints three, Typer a box) and click's exit code, 2. Without
    arguments a group shows its help instead (click raises that as a usage error too)."""
    if isinstance(exc, NoArgsIsHelpError):
        exc.show()
        return exc.exit_code
    command = exc.ctx.command_path if exc.ctx else "visionflow"
    error_line(f"{exc.format_message()} (see `{command} --help`)")
    return exc.exit_code


def _unexpected(exc: Exception) -> int:
    """A failure nobody anticipated: one line and exit 2 (exit 1 would read as "refused" or "drifted")."""
    if os.environ.get(DEBUG_ENV):
        traceback.print_exception(exc)
    detail = " ".join(str(exc).split())
    detail = detail if len(detail) <= 300 else detail[:297] + "..."
    error_line(
        f"unexpected {type(exc).__name__}: {detail or 'no message'} (rerun with {DEBUG_ENV}=1 for the traceback)"
    )
    return 2


app = typer.Typer(
    name="visionflow",
    cls=VisionflowGroup,
    help="visionflow: version, validate, split, train, export, promote, serve and monitor an image classifier.\n\n"
    "Every command reads params.yaml (override any value with --set section.key=value, before or after the "
    "command). Run `make pipeline` for the whole pipeline on the bundled Fashion-MNIST dataset.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.callback()(global_options)
