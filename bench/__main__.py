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

from bench import BENCHMARKS, MODULES, OPT_IN
from bench.common import REPO, Context, write_json
from bench.machine import machine_info
from bench.process_state import quiet
from bench.table import duration, render


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
        choices=BENCHMARKS + OPT_IN,
        metavar="NAME",
        help=f"run only these benchmarks ({', '.join(BENCHMARKS)}; and {', '.join(OPT_IN)}, which runs only when "
        "named here)",
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
        "--shard-images",
        type=int,
        nargs="+",
        metavar="N",
        help="shards benchmark sizes in images (default 20000 100000 300000; --quick 300)",
    )
    ap.add_argument(
        "--loose-max",
        type=int,
        metavar="N",
        help="shards benchmark: the largest size the loose layout runs at (default 100000)",
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
    if args.shard_images is not None and min(args.shard_images) < 1:
        ap.error("--shard-images sizes must be at least 1")
    return args


def _context(args: argparse.Namespace, console) -> Context:
    return Context(
        quick=args.quick,
        repeats=args.repeats or (2 if args.quick else 5),
        workdir=Path(tempfile.mkdtemp(prefix="visionflow-bench-")),
        compile=args.compile,
        peak_tflops=args.peak_tflops,
        console=console,
        dvc_files=tuple(args.dvc_files) if args.dvc_files else None,
        shard_images=tuple(args.shard_images) if args.shard_images else None,
        loose_max=args.loose_max,
    )


def _run_one(ctx: Context, name: str, console) -> dict[str, Any]:
    """One benchmark's entry in the results: its rows, or the error that stopped it; with its seconds."""
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
    ctx.log(
        f"[bold]{name}[/bold] {entry['status']} in {duration(entry['seconds'])} (load average {os.getloadavg()[0]:.2f})"
    )
    return entry


def _print_summary(results: dict[str, Any], out: Path, console) -> None:
    render(results, console)
    times = ", ".join(f"{n} {duration(b['seconds'])}" for n, b in results["benchmarks"].items())
    console.print(f"wall time: {times}; total {duration(results['seconds'])}", highlight=False)
    console.print(f"results: {out} ({results['seconds']:.0f} s)", highlight=False)


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
    ctx = _context(args, console)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = args.out or REPO / "bench/results" / f"{stamp}{'-quick' if args.quick else ''}.json"
    ctx.out = out
    results: dict[str, Any] = {
        "schema": 1,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": ["python", "-m", "bench", *sys.argv[1:]],
        "quick": args.quick,
        "repeats": ctx.repeats,
        "machine": machine_info(),
        "benchmarks": {},
    }
    ctx.log(
        f"benchmarks: {', '.join(names)}; {ctx.repeats} interleaved A/B pair(s) each"
        f"{' (quick: tiny sizes, not a measurement)' if args.quick else ''}; work folder {ctx.workdir}"
    )
    start = time.perf_counter()
    try:
        for name in names:
            results["benchmarks"][name] = _run_one(ctx, name, console)
            write_json(out, results)  # what has run so far survives a later crash or Ctrl-C
    finally:
        if not args.keep_workdir:
            shutil.rmtree(ctx.workdir, ignore_errors=True)
    results["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    results["seconds"] = round(time.perf_counter() - start, 2)
    results["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    write_json(out, results)
    _print_summary(results, out, out_console)
    return 1 if any(b["status"] == "error" for b in results["benchmarks"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
