"""The load test's report: its summary figures, and the tables `visionflow loadtest` prints."""

from __future__ import annotations

from typing import Any

from visionflow.tools.loadtest.phases import Phase


def summary(report: dict[str, Any], single: Phase, phases: list[Phase], overload_concurrency: int) -> dict[str, Any]:
    """The headline figures: the main phase's (the sustained rate in full mode), and the overload's in full mode."""
    main = phases[0]
    out: dict[str, Any] = {
        "single_ms_p50": single.latency_ms.get("p50"),
        "throughput_rps": main.throughput_rps,
        "ok_rps": main.ok_rps,
        "p50_ms": main.latency_ms.get("p50"),
        "p90_ms": main.latency_ms.get("p90"),
        "p99_ms": main.latency_ms.get("p99"),
        "errors": main.errors,
        "n_errors": main.n_errors,
        "healthy_after": report["healthy_after"],
    }
    if report["mode"] == "full":
        overload = phases[1]
        out = {
            "max_throughput_rps": report["max_throughput_rps"],
            "sustained_target_rps": main.target_rate_rps,
            **out,
            "overload_concurrency": overload_concurrency,
            "overload_requests": overload.requests,
            "overload_503": overload.errors.get("503", 0),
            "overload_other_errors": {k: v for k, v in overload.errors.items() if k != "503"},
            "overload_503_p50_ms": overload.error_latency_ms.get("p50"),
            "overload_ok_rps": overload.ok_rps,
        }
    if main.mode == "rate":  # did the client hold the schedule? If not, the server was not offered the rate
        out.update(
            late_starts=main.late_starts,
            dropped=main.dropped,
            kept_schedule=main.dropped == 0 and main.late_starts <= 0.01 * max(main.requests, 1),
        )
    if out.get("p99_ms") and out.get("single_ms_p50"):
        out["p99_over_single"] = round(out["p99_ms"] / out["single_ms_p50"], 2)
        # issue 22's goal for the sustained phase: p99 within 4x one lone request's latency, and no error
        out["p99_within_4x_single_no_errors"] = out["p99_over_single"] <= 4 and main.n_errors == 0
    if report["mode"] == "full":
        out["overload_only_503"] = not out["overload_other_errors"]
    out.update(_placement(report))
    if main.server:  # the server's side of the same phase: where the latency was spent
        out.update({f"server_{k}": v for k, v in main.server.items() if k != "ok_requests"})
    return out


_CORES = ("generator_cores", "server_cores")
GENERATOR_SATURATED = 0.9  # of its one core: above this the generator, not the server, may have set the maximum


def _placement(report: dict[str, Any]) -> dict[str, Any]:
    """Both CPU sets, and the CPU each side used at the maximum (full mode) or in the main phase."""
    cpus = report["cpus"]
    out: dict[str, Any] = {"server_cpus": cpus["server_cpus"], "client_cpus": cpus["client_cpus"]}
    if not cpus["pinned"]:
        out["not_pinned"] = cpus["note"]
    at = next((r for r in report.get("ramp", []) if r["concurrency"] == report.get("max_at_concurrency")), None)
    use = (at or report["phases"][0]).get("cpu") or {}
    if "generator_cores" in use:
        where = "at_max" if at else "main"
        out[f"generator_cores_{where}"] = use["generator_cores"]
        if "server_cores" in use:
            out[f"server_cores_{where}"] = use["server_cores"]
        # One generator process runs one event loop: near a full core, it may be what limited the maximum.
        out["generator_saturated"] = use["generator_cores"] >= GENERATOR_SATURATED
    return out


def render(report: dict[str, Any]):
    """A rich table of every phase, then the summary."""
    from rich.console import Group
    from rich.table import Table

    table = Table(
        title=f"load test of {report['url']}/predict (model v{report['model_version']})", title_justify="left"
    )
    cols = ("phase", "load", "requests", "req/s", "ok/s", "p50 ms", "p90 ms", "p99 ms", "gen cpu", "srv cpu", "errors")
    for col in cols:
        table.add_column(col, justify="left" if col in ("phase", "load", "errors") else "right")
    rows = [report["single"], *report.get("ramp", []), *report["phases"]]
    for ph in rows:
        load = (
            f"{ph['target_rate_rps']:g} req/s"
            if ph["mode"] == "rate"
            else "1 at a time"
            if ph["mode"] == "sequential"
            else f"{ph['concurrency']} concurrent"
        )
        lat = ph["latency_ms"]
        errors = ", ".join(f"{k}: {v}" for k, v in ph["errors"].items()) or "0"
        if ph.get("late_starts") or ph.get("dropped"):
            errors += f" (late starts {ph['late_starts']}, dropped {ph['dropped']})"
        table.add_row(
            ph["name"],
            load,
            str(ph["requests"]),
            f"{ph['throughput_rps']:.1f}",
            f"{ph['ok_rps']:.1f}",
            *(f"{lat[k]:.1f}" if k in lat else "-" for k in ("p50", "p90", "p99")),
            *(f"{(ph.get('cpu') or {})[k]:.2f}" if k in (ph.get("cpu") or {}) else "-" for k in _CORES),
            errors,
        )
    cpus = report["cpus"]
    where = (
        f"server on CPU {cpus['server_cpus']}, generator on CPU {cpus['client_cpus']} ({cpus['server']})"
        if cpus["pinned"]
        else f"not pinned: {cpus['note']}"
    )
    table.caption = f"{where}; cpu columns: cores kept busy"
    table.caption_justify = "left"
    summary = Table(title="summary", show_header=False, title_justify="left")
    for k, v in report["summary"].items():
        summary.add_row(k, str(v))
    return Group(table, summary)
