"""Commands of the serving part: serve the champion, and load-test a running server."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from visionflow.cli.options import Invocation
from visionflow.cli.output import console, out, print_json


def serve(
    ctx: typer.Context,
    host: Annotated[str | None, typer.Option(help="bind address (default serve.host, loopback).")] = None,
    port: Annotated[int | None, typer.Option(help="port (default serve.port).")] = None,
) -> None:
    """Serve the registry's champion over HTTP (predict, batch, health, metrics, review page at /review)."""
    from visionflow.serving.app import serve_champion

    # No Invocation.setup_mlflow: serving only reads the registry, and refuses a missing one rather than create it
    run: Invocation = ctx.obj
    p = run.params()
    serve_champion(
        p,
        run.root,
        host=host or p.serve.host,
        port=port or p.serve.port,
        say=lambda line: out.print(line, highlight=False, soft_wrap=True),
    )


# Over 60 lines for its 16 Typer option declarations; the body is one run_loadtest call and its report.
def loadtest(
    ctx: typer.Context,
    url: Annotated[
        str | None, typer.Option(help="server to load; loopback only (default http://serve.host:serve.port).")
    ] = None,
    mode: Annotated[
        str,
        typer.Option(
            help="full: sequential baseline, ramp concurrency to the maximum throughput, "
            "--duration s at --fraction of it (constant arrival rate), then overload "
            "past the server's slots. concurrency / rate: one fixed phase."
        ),
    ] = "full",
    duration: Annotated[float, typer.Option(help="seconds of the sustained (full) or fixed phase.")] = 60,
    concurrency: Annotated[int, typer.Option(help="--mode concurrency: requests kept in flight.")] = 4,
    rate: Annotated[float | None, typer.Option(help="--mode rate: arrivals per second.")] = None,
    fraction: Annotated[float, typer.Option(help="full: sustained rate as a fraction of the maximum.")] = 0.7,
    step: Annotated[float, typer.Option(help="full: seconds per ramp step.")] = 5,
    overload_concurrency: Annotated[
        int | None,
        typer.Option(
            help="full: concurrency of the overload phase (default 3 x (serve.max_concurrency + serve.queue_depth))."
        ),
    ] = None,
    overload_s: Annotated[float, typer.Option(help="full: seconds of the overload phase.")] = 10,
    max_requests: Annotated[
        int, typer.Option(help="cap on requests per phase (each phase also stops at its duration).")
    ] = 100_000,
    image: Annotated[
        Path | None, typer.Option(help="image to send (default: generated noise at the model's input size).")
    ] = None,
    out_file: Annotated[
        Path | None, typer.Option("--out", help="JSON report (default reports/loadtest/loadtest.json).")
    ] = None,
    start_server: Annotated[
        bool,
        typer.Option(
            help="start `visionflow serve` with these params (on --url's port, else a free one) on the server's "
            "CPUs, wait for /ready, stop it afterwards."
        ),
    ] = False,
    server_cpus: Annotated[
        str | None,
        typer.Option(help="CPUs for every server process, e.g. 0 or 0-2 (default: all usable but the last)."),
    ] = None,
    client_cpus: Annotated[
        str | None, typer.Option(help="CPUs for the load generator (default: the last usable one).")
    ] = None,
    pin: Annotated[bool, typer.Option(help="pin the server and the generator to disjoint CPU sets (Linux).")] = True,
) -> None:
    """Load-test `visionflow serve` on loopback: req/s, p50/p90/p99 latency, errors by status.

    The server (every process of it, found by its listening port or started with --start-server) and the load
    generator run on disjoint CPU sets, reported with the CPU each used: on 2 CPUs, 1 + 1.

    Every request is a real prediction (prediction log, review queue): serve a disposable root, or point
    serve.prediction_log and serve.review_dir elsewhere with --set, when the data there matters. A server with
    serve.auth_token_env set gets the token from that same environment variable.
    """
    from visionflow.tools.loadtest import render, run_loadtest
    from visionflow.tools.loadtest.local import placed_server
    from visionflow.tools.loadtest.run import preflight

    run: Invocation = ctx.obj
    p = run.params()
    slots = p.serve.max_concurrency + p.serve.queue_depth
    report_path = out_file or run.paths(p).loadtest_report
    settings = {
        "mode": mode,
        "duration_s": duration,
        "concurrency": concurrency,
        "rate": rate,
        "fraction": fraction,
        "step_s": step,
        "ramp_max": slots,
        "overload_concurrency": overload_concurrency or 3 * slots,
        "overload_s": overload_s,
        "max_requests": max_requests,
    }
    preflight(image, report_path, **settings)  # a bad option is refused before a server is started
    with placed_server(
        url or (None if start_server else f"http://{p.serve.host}:{p.serve.port}"),
        start=(run.params_path.resolve(), run.overrides) if start_server else None,
        server_cpus=server_cpus,
        client_cpus=client_cpus,
        pin=pin,
        log=Path(report_path).with_suffix(".server.log"),
        say=lambda msg: console.print(f"[dim]{msg}[/]"),
    ) as (base, placement):
        report = run_loadtest(
            base,
            **settings,
            image=image,
            token=os.environ.get(p.serve.auth_token_env) if p.serve.auth_token_env else None,
            out=report_path,
            progress=lambda msg: console.print(f"[dim]{msg}[/]"),
            placement=placement,
        )
    if run.as_json:
        print_json(report)
    else:
        out.print(render(report))
    if report["summary"].get("kept_schedule") is False:
        console.print(
            "[yellow]warning:[/] the client fell behind its arrival schedule (late starts or dropped "
            "arrivals): the machine is too busy, or the rate is past what the server takes"
        )
    if report["summary"].get("generator_saturated"):
        console.print(
            "[yellow]warning:[/] the load generator kept its CPU busy at the maximum: the maximum may be the "
            "generator's, not the server's (give it a faster core, or the server fewer)"
        )
    if not report["healthy_after"]:
        console.print("[bold red]the server was not healthy after the load test[/]")
        raise typer.Exit(1)
