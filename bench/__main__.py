"""`python -m bench [--quick] [--only NAME ...] [--out FILE]`: run the benchmarks, print a table, write JSON.

Exit status: 0 when every selected benchmark ran (skipped variants included), 1 when one of them raised.
No speed is asserted anywhere: goals are reported, never enforced.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from bench import BENCHMARKS, MODULES
from bench.common import REPO, Context, machine_info, quiet, write_json


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes and 2 repeats: checks that everything runs (minutes), not a measurement",
    )
    ap.add_argument(
        "--only",
        nargs="+",
        choices=BENCHMARKS,
        metavar="NAME",
        help=f"run only these benchmarks ({', '.join(BENCHMARKS)})",
    )
    ap.add_argument("--out", type=Path, help="JSON results file (default bench/results/<timestamp>.json)")
    ap.add_argument(
        "--repeats",
        type=int,
        help="A/B pairs per comparison (default 5, --quick 2); the suite's figures want at least 5",
    )
    ap.add_argument("--compile", action="store_true", help="train_step on GPU: torch.compile both loops' nets")
    ap.add_argument(
        "--peak-tflops", type=float, default=989.0, help="GPU peak for MFU, TFLOP/s (default 989: H100 SXM bf16 dense)"
    )
    ap.add_argument(
        "--dvc-files",
        type=int,
        nargs="+",
        metavar="N",
        help="dvc benchmark sizes in files (default 20000; --quick 1000); the whole Fashion-MNIST is "
        "--dvc-files 20000 70000, which about doubles the full suite's time",
    )
    ap.add_argument(
        "--gpu-check",
        action="store_true",
        help="the prepared GPU check instead (bench/gpu_check.py; `python -m bench --gpu-check -h`)",
    )
    ap.add_argument("--keep-workdir", action="store_true", help="keep the temporary work folder (for debugging)")
    args = ap.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        ap.error("--repeats must be at least 1")
    if args.dvc_files is not None and min(args.dvc_files) < 1:
        ap.error("--dvc-files sizes must be at least 1")
    return args


def fmt(v: Any, unit: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if unit == "fraction":
            return f"{v:.2%}"
        a = abs(v)
        return f"{v:.3g}" if a < 100 else f"{v:,.0f}"
    return str(v)


def _duration(seconds: float) -> str:
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


def render(results: dict[str, Any], console) -> None:
    from rich.table import Table

    table = Table(
        title="visionflow benchmarks (A = visionflow, B = baseline; ratio per interleaved pair)",
        title_justify="left",
        show_lines=False,
    )
    for col, just in (
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
    ):
        table.add_column(col, justify=just, overflow="fold")
    for name, bench in results["benchmarks"].items():
        if bench["status"] != "ok":
            table.add_row(
                name, f"[red]{bench['status']}[/red]", bench.get("error", "")[:120], "", "", "", "", "", "", ""
            )
            continue
        for row in bench["rows"]:
            g = row.get("goal")
            met = "" if not g or g["met"] is None else ("[green]yes[/green]" if g["met"] else "[red]no[/red]")
            if row["kind"] == "paired":
                r = row["ratio"]
                ratio = (
                    f"{_ratio(r['median'])} [{_ratio(r['min'])}, {_ratio(r['max'])}]"
                    if r["median"] is not None
                    else "-"
                )
                table.add_row(
                    name,
                    row["variant"],
                    row["a"]["label"],
                    row["b"]["label"],
                    row["unit"],
                    fmt(row["a"]["median"]),
                    fmt(row["b"]["median"]),
                    ratio,
                    _goal_text(g),
                    met,
                )
            else:
                table.add_row(
                    name,
                    row["variant"],
                    row["label"],
                    "",
                    row["unit"],
                    fmt(row["value"], row["unit"]),
                    "",
                    "",
                    _goal_text(g),
                    met,
                )
    console.print(table)
    for name, bench in results["benchmarks"].items():
        for note in bench.get("notes", []):
            console.print(f"[dim]note[/dim] {name}: {note}", highlight=False)
        for row in bench.get("rows", []):
            for note in row.get("notes", []):
                console.print(f"[dim]note[/dim] {name} / {row['variant']}: {note}", highlight=False)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--gpu-check" in argv:
        from bench.gpu_check import main as gpu_check

        return gpu_check(argv)
    args = parse_args(argv)
    quiet()
    from rich.console import Console

    console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)
    out_console = Console(width=None if sys.stdout.isatty() else 200)
    names = list(args.only or BENCHMARKS)
    repeats = args.repeats or (2 if args.quick else 5)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = args.out or REPO / "bench/results" / f"{stamp}{'-quick' if args.quick else ''}.json"
    workdir = Path(tempfile.mkdtemp(prefix="visionflow-bench-"))
    ctx = Context(
        quick=args.quick,
        repeats=repeats,
        workdir=workdir,
        compile=args.compile,
        peak_tflops=args.peak_tflops,
        console=console,
        dvc_files=tuple(args.dvc_files) if args.dvc_files else None,
    )
    results: dict[str, Any] = {
        "schema": 1,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": ["python", "-m", "bench", *sys.argv[1:]],
        "quick": args.quick,
        "repeats": repeats,
        "machine": machine_info(),
        "benchmarks": {},
    }
    ctx.log(
        f"benchmarks: {', '.join(names)}; {repeats} interleaved A/B pair(s) each"
        f"{' (quick: tiny sizes, not a measurement)' if args.quick else ''}; work folder {workdir}"
    )
    start = time.perf_counter()
    try:
        for name in names:
            ctx.log(f"[bold]{name}[/bold]")
            t0 = time.perf_counter()
            entry: dict[str, Any]
            try:
                mod = importlib.import_module(MODULES[name])
                entry = {"status": "ok", "description": (mod.__doc__ or "").strip(), **mod.run(ctx)}
            except Exception as exc:  # noqa: BLE001 - one benchmark's failure is reported in its entry; the others still run
                entry = {
                    "status": "error",
                    "error": f"{type(exc).__name__}: {exc}",
                    "traceback": traceback.format_exc(),
                    "rows": [],
                    "notes": [],
                }
                console.print(f"[red]{name} failed[/red]: {entry['traceback']}", highlight=False)
            entry["seconds"] = round(time.perf_counter() - t0, 2)
            results["benchmarks"][name] = entry
            ctx.log(
                f"[bold]{name}[/bold] {entry['status']} in {_duration(entry['seconds'])} "
                f"(load average {os.getloadavg()[0]:.2f})"
            )
            write_json(out, results)  # what has run so far survives a later crash or Ctrl-C
    finally:
        if not args.keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    results["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    results["seconds"] = round(time.perf_counter() - start, 2)
    results["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    write_json(out, results)
    render(results, out_console)
    times = ", ".join(f"{n} {_duration(b['seconds'])}" for n, b in results["benchmarks"].items())
    out_console.print(f"wall time: {times}; total {_duration(results['seconds'])}", highlight=False)
    out_console.print(f"results: {out} ({results['seconds']:.0f} s)", highlight=False)
    return 1 if any(b["status"] == "error" for b in results["benchmarks"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
