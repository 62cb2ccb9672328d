"""How the CLI prints: a table on a terminal, plain tab-separated lines into a pipe, one JSON document with --json;
messages, warnings and progress on stderr."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import sys
from collections.abc import Iterator, Mapping
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

# soft_wrap: a message is one line however narrow the terminal, or the pipe (80 columns), it goes to.
console = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)


def as_mapping(result: Any) -> dict[str, Any]:
    """A stage's result as a dict, whether the stage returns a mapping or a (frozen) dataclass, so both print the
    same; a result with its own as_dict (extra derived fields, e.g. a promotion decision's reasons) uses it."""
    if isinstance(result, Mapping):
        return dict(result)
    if callable(getattr(result, "as_dict", None)):
        return result.as_dict()
    if dataclasses.is_dataclass(result) and not isinstance(result, type):
        return dataclasses.asdict(result)
    raise TypeError(f"cannot print a {type(result).__name__} as a mapping")


@contextlib.contextmanager
def progress_bar(description: str) -> Iterator[Any]:
    """A rich progress bar driven by a callback(done, total); quiet when stderr is not a terminal."""
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
        disable=not console.is_terminal,
    ) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def fmt(value: Any) -> str:
    """A value as a person reads it: floats to 4 significant digits, nested values as compact JSON."""
    if isinstance(value, bool) or not isinstance(value, float | dict | list | tuple):
        return str(value)
    if isinstance(value, float):
        return f"{value:.0f}" if abs(value) >= 10_000 else f"{value:.4g}"
    return json.dumps(_rounded(value), default=str)


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return float(fmt(value))
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_rounded(v) for v in value]
    return value


def print_json(data: Any) -> None:
    """One JSON document on stdout, as json.dumps writes it: no highlighting codes, whatever stdout is."""
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def print_rows(title: str, columns: list[str], rows: list[list[str | Text]]) -> None:
    """A table on a terminal; piped, the title and tab-separated rows, uncut (for grep, cut and awk)."""
    if out.is_terminal:
        table = Table(title=title, title_justify="left", show_header=bool(columns))
        for col in columns or ["", ""]:  # a mapping: key and value, no header
            table.add_column(col, overflow="fold")  # a long path wraps rather than losing its end to "…"
        for row in rows:
            table.add_row(*row)
        out.print(table)
        return
    lines = [
        title,
        *(["\t".join(columns)] if columns else []),
        *("\t".join(cell.plain if isinstance(cell, Text) else cell for cell in row) for row in rows),
    ]
    sys.stdout.write("\n".join(lines) + "\n")


def print_mapping(title: str, result: Any, *, as_json: bool) -> None:
    """A result (a mapping or a dataclass) as a key/value table, or as JSON."""
    mapping = as_mapping(result)
    if as_json:
        print_json(mapping)
    else:
        print_rows(title, [], [[str(k), fmt(v)] for k, v in mapping.items()])


def error_line(message: str) -> None:
    # soft_wrap: one line however long, so logs and CI show the whole message as one record
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)


def log_to_stderr(name: str) -> None:
    """Plain INFO lines from a library logger on stderr (Python's default shows only warnings)."""
    logger = logging.getLogger(name)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
