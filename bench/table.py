"""How a run's results print: the rich table of rows, their notes, and figures and durations as text."""

from __future__ import annotations

from typing import Any

COLUMNS = (
    ("benchmark", "left"),
    ("variant", "left"),
    ("A", "left"),
    ("B", "left"),
    ("unit", "left"),
    ("A median", "right"),
    ("B median", "right"),
    ("ratio median [min, max]", "right"),
    ("goal", "left"),
    ("met", "center"),
)


def fmt(v: Any, unit: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if unit == "fraction":
            return f"{v:.2%}"
        a = abs(v)
        return f"{v:.3g}" if a < 100 else f"{v:,.0f}"
    return str(v)


def duration(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    return f"{m} min {s:02d} s" if m else f"{seconds:.1f} s"


def _ratio(v: float) -> str:
    a = abs(v)
    return f"{v:,.0f}" if a >= 100 else f"{v:.1f}" if a >= 10 else f"{v:.3f}"


def _goal_text(g: dict[str, Any] | None) -> str:
    """The goal as printed; goals on an extra name their figure in their own text."""
    if not g:
        return ""
    return g["text"] + {"a": " on A", "b": " on B"}.get(g["on"], "")


def _cells(name: str, row: dict[str, Any]) -> list[str]:
    """One row's cells, in COLUMNS' order."""
    g = row.get("goal")
    met = "" if not g or g["met"] is None else ("[green]yes[/green]" if g["met"] else "[red]no[/red]")
    if row["kind"] != "paired":
        value = fmt(row["value"], row["unit"])
        return [name, row["variant"], row["label"], "", row["unit"], value, "", "", _goal_text(g), met]
    r = row["ratio"]
    ratio = f"{_ratio(r['median'])} [{_ratio(r['min'])}, {_ratio(r['max'])}]" if r["median"] is not None else "-"
    a, b = row["a"], row["b"]
    return [
        name,
        row["variant"],
        a["label"],
        b["label"],
        row["unit"],
        fmt(a["median"]),
        fmt(b["median"]),
        ratio,
        _goal_text(g),
        met,
    ]


def render(results: dict[str, Any], console) -> None:
    """The table of every benchmark's rows (a failed benchmark as one red row), then the notes."""
    from rich.table import Table

    table = Table(
        title="visionflow benchmarks (A = visionflow, B = baseline; ratio per interleaved pair)",
        title_justify="left",
        show_lines=False,
    )
    for col, just in COLUMNS:
        table.add_column(col, justify=just, overflow="fold")
    for name, bench in results["benchmarks"].items():
        if bench["status"] != "ok":
            table.add_row(
                name, f"[red]{bench['status']}[/red]", bench.get("error", "")[:120], "", "", "", "", "", "", ""
            )
            continue
        for row in bench["rows"]:
            table.add_row(*_cells(name, row))
    console.print(table)
    for name, bench in results["benchmarks"].items():
        for note in bench.get("notes", []):
            console.print(f"[dim]note[/dim] {name}: {note}", highlight=False)
        for row in bench.get("rows", []):
            for note in row.get("notes", []):
                console.print(f"[dim]note[/dim] {name} / {row['variant']}: {note}", highlight=False)
