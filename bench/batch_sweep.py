"""The latency/throughput trade of serve.max_concurrency (the requests one batch may hold): `visionflow loadtest
--start-server` once per value, on the project's champion, and the figures side by side (a table and a plot).

    python -m bench.batch_sweep --project DIR [--values 1,2,4,8,16] [--rate 1000] [--image FILE] [--out-dir DIR]

For each value: the maximum (closed-loop ramp), the single-request latency, p50/p99 over --duration s at 70% of
that value's own maximum (issue 22's "p99 <= 4x single" figure), and with --rate, p99 at one fixed arrival rate for
every value (the same load, so the values compare on it directly). Each run is the real CLI in a subprocess, on
the loadtest's default CPU split (on 2 cores: server 1 + generator 1). Writes sweep.json, sweep.md and sweep.png
under --out-dir (default DIR/reports/batch-sweep)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from visionflow.tools.loadtest.local import visionflow_command

GOAL_X = 4.0  # issue 22: p99 <= 4x the single-request latency at 70% of the maximum


def _loadtest(project: Path, value: int, out: Path, extra: list[str], image: Path | None) -> dict[str, Any]:
    cmd = [
        *visionflow_command(),
        "--set",
        f"serve.max_concurrency={value}",
        "loadtest",
        "--start-server",
        "--out",
        str(out),
    ]
    cmd += [*extra, *(["--image", str(image)] if image else [])]
    print(f"$ {' '.join(cmd)}", flush=True)
    proc = subprocess.run(cmd, cwd=project, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        print(
            f"batch_sweep: loadtest with max_concurrency={value} exited {proc.returncode}: {tail[0]}", file=sys.stderr
        )
        raise SystemExit(2)
    return json.loads(out.read_text())


def sweep(
    project: Path, values: list[int], out_dir: Path, rate: float | None, phases: dict[str, float], image
) -> list[dict]:
    """One full load test per value (and one at `rate`, when given); `phases`: loadtest's --duration, --step and
    --overload-s."""
    duration = ["--duration", str(phases["duration"])]
    steps = ["--step", str(phases["step"]), "--overload-s", str(phases["overload_s"])]
    rows = []
    for v in values:
        full = _loadtest(project, v, out_dir / f"mc-{v}.json", [*duration, *steps], image)["summary"]
        row = {
            "max_concurrency": v,
            "max_rps": full["max_throughput_rps"],
            "single_ms": full["single_ms_p50"],
            "sustained_rps": full["sustained_target_rps"],
            "p50_ms": full["p50_ms"],
            "p99_ms": full["p99_ms"],
            "p99_over_single": full["p99_over_single"],
            "errors": full["n_errors"],
            "requests_per_batch": full.get("server_requests_per_batch"),
            "overload_only_503": full["overload_only_503"],
        }
        if rate:
            fixed = _loadtest(
                project, v, out_dir / f"mc-{v}-at-{rate:g}.json",
                ["--mode", "rate", "--rate", str(rate), *duration], image,
            )["summary"]  # fmt: skip
            row |= {"rate_p50_ms": fixed["p50_ms"], "rate_p99_ms": fixed["p99_ms"], "rate_errors": fixed["n_errors"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def table(rows: list[dict], rate: float | None) -> str:
    head = "| max_concurrency | max req/s | single ms | 70% rate | p50 / p99 ms at 70% | p99 / single | errors |"
    sep = "|---|---|---|---|---|---|---|"
    if rate:
        head += f" p50 / p99 ms at {rate:g} req/s |"
        sep += "---|"
    lines = [head, sep]
    for r in rows:
        line = (
            f"| {r['max_concurrency']} | {r['max_rps']:,.0f} | {r['single_ms']:.2f} | {r['sustained_rps']:,.0f} | "
            f"{r['p50_ms']:.2f} / {r['p99_ms']:.2f} | {r['p99_over_single']:.2f}x | {r['errors']} |"
        )
        if rate:
            line += f" {r['rate_p50_ms']:.2f} / {r['rate_p99_ms']:.2f} ({r['rate_errors']} errors) |"
        lines.append(line)
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], rate: float | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r["max_concurrency"] for r in rows]
    fig, axes = plt.subplots(1, 3 if rate else 2, figsize=(13 if rate else 9, 3.8))
    axes[0].plot(xs, [r["max_rps"] for r in rows], "o-")
    axes[0].set(title="maximum (closed-loop ramp)", ylabel="req/s")
    axes[1].plot(xs, [r["p99_over_single"] for r in rows], "o-", color="C1")
    axes[1].axhline(GOAL_X, color="grey", linestyle="--", label=f"goal: {GOAL_X:g}x")
    axes[1].set(title="p99 / single at 70% of its own maximum", ylabel="x single-request latency")
    axes[1].legend()
    if rate:
        axes[2].plot(xs, [r["rate_p99_ms"] for r in rows], "o-", color="C2", label="p99")
        axes[2].plot(xs, [r["rate_p50_ms"] for r in rows], "o--", color="C2", alpha=0.6, label="p50")
        axes[2].set(title=f"latency at a fixed {rate:g} req/s", ylabel="ms")
        axes[2].legend()
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_xlabel("serve.max_concurrency (requests per batch)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m bench.batch_sweep",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("--project", type=Path, required=True, help="a project folder whose registry has a champion")
    ap.add_argument("--values", default="1,2,4,8,16", help="serve.max_concurrency values, comma-separated")
    ap.add_argument("--rate", type=float, help="also measure every value at this fixed arrival rate (req/s)")
    ap.add_argument("--duration", type=float, default=60, help="seconds of each sustained / fixed-rate phase")
    ap.add_argument("--step", type=float, default=5, help="seconds per ramp step (loadtest's --step)")
    ap.add_argument("--overload-s", type=float, default=10, help="seconds of each overload phase")
    ap.add_argument("--image", type=Path, help="image to send (default: loadtest's generated one)")
    ap.add_argument("--out-dir", type=Path, help="where the reports go (default PROJECT/reports/batch-sweep)")
    args = ap.parse_args(argv)
    try:
        values = [int(v) for v in args.values.split(",")]
    except ValueError:
        ap.error(f"--values takes whole numbers separated by commas, not {args.values!r}")
    if not values or min(values) < 1:
        ap.error("--values must name at least one value, each at least 1")
    if not (args.project / "params.yaml").is_file():
        ap.error(f"{args.project}: no params.yaml there (--project is a visionflow project folder)")
    out_dir = (args.out_dir or args.project / "reports" / "batch-sweep").resolve()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file in the way, a read-only or pseudo file system
        ap.error(f"cannot make the report folder {out_dir}: {exc.strerror or exc}")
    image = args.image.resolve() if args.image else None
    phases = {"duration": args.duration, "step": args.step, "overload_s": args.overload_s}
    rows = sweep(args.project, values, out_dir, args.rate, phases, image)
    (out_dir / "sweep.json").write_text(json.dumps({"rate": args.rate, "rows": rows}, indent=1) + "\n")
    (out_dir / "sweep.md").write_text(table(rows, args.rate))
    plot(rows, args.rate, out_dir / "sweep.png")
    print(table(rows, args.rate), end="")
    print(f"wrote {out_dir / 'sweep.json'}, sweep.md and sweep.png")


if __name__ == "__main__":
    main()
