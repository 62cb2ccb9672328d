"""inference, part 2: requests/s per server core of the real serving app over HTTP against in-process predictions
per core on the same bytes (issue 22's goal: >= 0.8x).

The server is `visionflow serve` in a subprocess on 127.0.0.1, in a throwaway project whose champion is the
benchmark's exported model; the load is a closed loop of visionflow.tools.loadtest's keep-alive clients. The
server (every process of it) runs on the server's CPU set and the load generator (this process) on the other,
as `visionflow loadtest` splits them (on 2 cores: server on CPU 0, generator on CPU 1). The in-process baseline
runs on ONE of the server's CPUs with one ONNX Runtime thread (the server's session has one too), decoding and
inferring one image per call: what a client that did the work itself, request by request, would get. The
server may batch waiting requests (up to serve.max_concurrency per ONNX call); the baseline does not, so that
batching counts as the server's gain, not as a stronger baseline.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil

from bench.common import REPO, Context, Measurement, compare, goal, scratch_project
from bench.process_state import silenced
from bench.sample_data import real_data_available, synthetic_classes
from visionflow.tools.loadtest import cpus
from visionflow.tools.loadtest.local import free_port, serve_command, start_server, stop_server
from visionflow.tools.loadtest.placement import Placement


@contextlib.contextmanager
def _on_cpus(these: tuple[int, ...] | None):
    """This process (every thread of it) on `these` CPUs meanwhile, then back; nothing for None."""
    if not these:
        yield
        return
    me = os.getpid()
    before = cpus.process_affinity(me)
    cpus.pin_process(me, these)
    try:
        yield
    finally:
        cpus.pin_process(me, before)


def _sample_image(image_size: int, channels: int) -> tuple[bytes, str]:
    """A real training image when the dataset is here (what clients send), else loadtest's noise PNG."""
    from visionflow.tools.loadtest.run import default_image

    if real_data_available():
        from visionflow.data.validate import read_manifest

        df = read_manifest(REPO / "data/splits/test.csv")
        path = REPO / df["path"].iloc[0]  # stored relative to the project root
        if path.is_file():
            return path.read_bytes(), f"real test image {path.name}"
    return default_image(image_size, channels), "generated noise PNG"


async def closed_loop(
    url: str, body: bytes, ctype: str, concurrency: int, max_requests: int, max_s: float
) -> dict[str, Any]:
    """`concurrency` clients, each posting the same body again as soon as it has its answer; bounded in count and
    time (visionflow.tools.loadtest's closed-loop phase). Loopback only: the URL is always the server this
    benchmark started on 127.0.0.1.

    The client is visionflow.tools.loadtest.client's KeepAliveClient (prebuilt request bytes on keep-alive
    connections, as wrk does), not httpx: on 2 shared cores httpx spent about twice the server's CPU per request
    (6.5 ms against 3.1 ms), so the load generator, not the server, set the figure."""
    from visionflow.tools.loadtest import phases
    from visionflow.tools.loadtest.client import KeepAliveClient

    assert urlsplit(url).hostname == "127.0.0.1", url
    client = KeepAliveClient(url, body, ctype, timeout_s=30)
    try:
        phase = await phases.closed_loop(phases.Target(client), concurrency, max_s, max_requests, "bench")
    finally:
        client.close()
    return {
        "ok": phase.ok,
        "requests": phase.requests,
        "seconds": phase.elapsed_s,
        "errors": phase.errors,
        "p50_ms": phase.latency_ms.get("p50", 0.0),
        "p99_ms": phase.latency_ms.get("p99", 0.0),
    }


def _register(proj: Path, p, onnx_path: Path, image_size: int, channels: int, model_name: str) -> str:
    """Register the exported model and make it champion (as tests/helpers.py's register_champion does)."""
    import mlflow

    from visionflow.registry.export import write_model_card
    from visionflow.registry.gates import Gate
    from visionflow.registry.store import apply_promotion, register_onnx
    from visionflow.registry.tracking import setup_mlflow

    card = write_model_card(
        onnx_path,
        image_size=image_size,
        channels=channels,
        classes=synthetic_classes(),
        model_name=model_name,
        data_version="bench",
    )
    with mlflow.start_run(experiment_id=setup_mlflow(p.registry.tracking_uri, proj, p.base.project)) as run:
        pass
    version = register_onnx(
        onnx_path=onnx_path,
        card=card,
        model_name=p.registry.model_name,
        mlflow_run_id=run.info.run_id,
        tags={"visionflow.data_version": "bench"},
        metrics={},
    )
    apply_promotion(p.registry.model_name, version, [Gate("bench", True, "registered by the benchmark")])
    return version


def _tree_cpu_s(pid: int) -> float:
    """CPU seconds of a process and its children (a multi-process server's workers included)."""
    return sum(cpus.cpu_seconds(cpus.process_tree([pid])).values())


def _own_cpu_s() -> float:
    """CPU seconds of this process alone (the server is its child: not counted)."""
    return sum(cpus.cpu_seconds([psutil.Process()]).values())


def _server_rate(
    url: str,
    body: bytes,
    ctype: str,
    concurrency: int,
    n_requests: int,
    max_s: float,
    placement: Placement,
    errors: dict[str, int],
) -> Measurement:
    """Predictions/s per server core of the running server under a closed loop, driven from the generator's CPUs;
    non-200 answers are added to `errors`."""
    server_pid = placement.roots[0]
    with _on_cpus(placement.client_cpus):
        placement.refresh()  # workers started or replaced since the last run
        asyncio.run(closed_loop(url, body, ctype, concurrency, concurrency * 2, 5.0))  # warm-up requests
        server_cpu, client_cpu = _tree_cpu_s(server_pid), _own_cpu_s()
        res = asyncio.run(closed_loop(url, body, ctype, concurrency, n_requests, max_s))
        server_cpu, client_cpu = _tree_cpu_s(server_pid) - server_cpu, _own_cpu_s() - client_cpu
    for k, v in res["errors"].items():
        errors[k] = errors.get(k, 0) + v
    done = max(res["requests"], 1)
    # CPU per request, so the serving path's own cost can be told apart from the load generator's: on 2
    # cores the load generator competes with the server for the same CPUs.
    server_cores = len(placement.server_cpus or cpus.usable_cpus())
    return Measurement(
        res["ok"] / res["seconds"] / server_cores,
        {
            "requests_per_s": res["ok"] / res["seconds"],
            "requests": res["requests"],
            "p50_ms": res["p50_ms"],
            "errors": sum(res["errors"].values()),
            "server_cpu_ms_per_request": 1000 * server_cpu / done,
            "client_cpu_ms_per_request": 1000 * client_cpu / done,
            # cores kept busy: the generator near 1.0 means it, not the server, may have set the rate
            "server_cores_busy": server_cpu / res["seconds"],
            "generator_cores_busy": client_cpu / res["seconds"],
        },
    )


def _local_rate(
    data: bytes, session, rules, image_size: int, channels: int, n: int, core: tuple[int, ...] | None
) -> Measurement:
    """In-process single-image predictions/s on one core (`core`): decode, the model's logits and embedding (as
    the server asks for them), softmax; one image per call."""
    from visionflow.data.imageio import decode_for_model
    from visionflow.onnxrt import ort_outputs, softmax

    def one() -> None:
        x = decode_for_model(data, image_size, channels, rules)
        logits, _emb = ort_outputs(session, x[None], ("logits", "embedding"), batch_size=None)
        softmax(logits).argmax(1)

    with _on_cpus(core):
        one()
        start, cpu = time.perf_counter(), _own_cpu_s()
        for _ in range(n):
            one()
        seconds, cpu = time.perf_counter() - start, _own_cpu_s() - cpu
    return Measurement(n / seconds, {"cpu_ms_per_prediction": 1000 * cpu / n})


def _add_cpu_figures(row: dict[str, Any], errors: dict[str, int], ready_s: float) -> None:
    if errors:
        row["notes"].append(f"non-200 answers during the timed runs: {errors}")
    # The serving path's cost per request in CPU time (server processes only) against in-process decode + ONNX
    # Runtime: the ratio a server with cores of its own would approach, the load generator's CPU left out.
    server_ms = row["extra"]["a_server_cpu_ms_per_request"]["median"]
    local_ms = row["extra"]["b_cpu_ms_per_prediction"]["median"]
    cpu_ratio = round(local_ms / server_ms, 3) if server_ms else None
    row["extra"]["cpu_ratio_local_over_server"] = cpu_ratio
    client_ms = row["extra"]["a_client_cpu_ms_per_request"]["median"]
    row["notes"].append(
        f"CPU per request: server {server_ms:.2f} ms, client {client_ms:.2f} ms; "
        f"in-process {local_ms:.2f} ms per prediction (CPU ratio {cpu_ratio})"
    )
    row["extra"]["server_ready_s"] = round(ready_s, 2)
    gen = row["extra"]["a_generator_cores_busy"]["median"]
    srv = row["extra"]["a_server_cores_busy"]["median"]
    row["notes"].append(
        f"cores kept busy during the serving runs: server {srv:.2f}, load generator {gen:.2f}"
        + (" (the generator near its core's limit: it, not the server, may have set the rate)" if gen >= 0.9 else "")
    )


def _placement(proc_pid: int, sets) -> tuple[Placement, tuple[int, ...] | None, str]:
    """(where the server and the generator run, the one core of the baseline, a note), from visionflow loadtest's
    default split `sets`; None (one CPU, or no CPU affinity here): nothing pinned, all three share the CPUs."""
    if sets is None:
        why = "one usable CPU (or no CPU affinity here): server, generator and baseline share it"
        return Placement.unpinned(why, [proc_pid]), None, why
    placement = Placement(*sets, [proc_pid], "started by the benchmark")
    placement.refresh()
    server, client = (cpus.format_cpus(x) for x in sets)
    return (
        placement,
        sets[0][:1],
        (
            f"server on CPU {server} ({len(sets[0])} core(s), every process pinned), load generator on CPU {client}, "
            f"in-process baseline on CPU {sets[0][0]} (one core, one ONNX Runtime thread, one image per call)"
        ),
    )


def serving(ctx: Context, onnx_path: Path, image_size: int, channels: int, model_name: str) -> list[dict[str, Any]]:
    """The serving row (visionflow serve against the in-process baseline, issue 22's goal), then the lean server's
    two reference rows (_lean_rows)."""
    from visionflow.data.imageio import DecodeRules
    from visionflow.onnxrt import ort_session
    from visionflow.tools.loadtest.run import multipart_body

    # An untrained model is unsure of everything, so every request would be queued for review; a trained
    # champion queues few. The review queue is off here so that the figure is the serving path's.
    proj, p = scratch_project(ctx, "inference/project", {"serve.review_threshold": 0.0})
    served = proj / "model" / "model.onnx"
    served.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(onnx_path, served)
    with silenced(logs=True):  # MLflow's store creation and "registered model" chatter
        version = _register(proj, p, served, image_size, channels, model_name)
    data, image_source = _sample_image(image_size, channels)
    body, ctype = multipart_body(data, "bench.png")
    port = free_port()
    sets = cpus.default_split(cpus.usable_cpus()) if cpus.can_pin() else None
    ctx.log(f"[inference] starting `visionflow serve` on 127.0.0.1:{port} (champion v{version})")
    started = time.perf_counter()
    proc = start_server(
        serve_command(proj / "params.yaml", [], port), proj, port, proj / "server.log", sets and sets[0]
    )
    ready_s = time.perf_counter() - started
    placement, core, where = _placement(proc.pid, sets)
    # Enough in flight to keep the server's CPUs busy (at serve.max_concurrency, 4, one core idled ~30% between
    # round trips, 0.71 cores busy), and within its slots (max_concurrency + queue_depth), so no 503.
    n_server = len(sets[0]) if sets else len(cpus.usable_cpus())
    concurrency = min(4 * p.serve.max_concurrency * n_server, p.serve.max_concurrency + p.serve.queue_depth)
    n_requests = 40 if ctx.quick else 2000
    max_s = 15.0 if ctx.quick else 6.0
    rules = DecodeRules.from_params(p.validation, p.serve)
    errors: dict[str, int] = {}
    url = f"http://127.0.0.1:{port}/predict"
    server_rate = partial(_server_rate, url, body, ctype, concurrency, n_requests, max_s, placement, errors)
    # One ONNX Runtime thread, as the server's session (serving/champion.py) and the one core it runs on.
    session = ort_session(served, threads=1)
    local_rate = partial(_local_rate, data, session, rules, image_size, channels, 100 if ctx.quick else 2000, core)
    try:
        row = compare(
            ctx,
            "serving vs in-process, per core",
            server_rate,
            local_rate,
            unit="predictions/s per core",
            a_label=f"visionflow serve over HTTP ({concurrency} in flight), per server core",
            b_label="in-process decode + ONNX Runtime on one core, one image per call",
            higher_is_better=True,
            ratio_definition="(A requests/s / server cores) / (B predictions/s on one core)",
            the_goal=goal(">= 0.8x", ">=", 0.8),
            notes=[
                where,
                f"image: {image_source}, {len(data)} bytes; up to {n_requests} requests or {max_s:g} s "
                f"per timed run; server ready {ready_s:.1f} s after start; review queue off "
                "(serve.review_threshold=0), prediction log on",
            ],
        )
    finally:
        stop_server(proc)
    _add_cpu_figures(row, errors, ready_s)
    # The lean server is one process with one thread: on one server core (the baseline's), with the serving row's
    # load per server core.
    lean_sets = (sets[0][:1], sets[1]) if sets else None
    load = (body, ctype, max(1, concurrency // n_server), n_requests, max_s)
    return [row, *_lean_rows(ctx, proj, served, (image_size, channels), load, lean_sets, local_rate)]


def _lean_rows(
    ctx: Context, proj: Path, model: Path, shape: tuple[int, int], load: tuple, sets, local_rate
) -> list[dict[str, Any]]:
    """What the serving row's ratio is made of: bench.lean_server, the leanest server (one process, one thread),
    on the baseline's core with the serving row's load per server core. Its echo mode is HTTP alone (uvicorn with
    visionflow's protocol); its inline mode does the in-process baseline's work on the event loop, request by
    request, with nothing around it. The inline row against the same baseline says how far below 1.0 any server
    doing that work behind HTTP on this machine falls; visionflow serve's own row is judged against it. `shape`:
    the model's (image size, channels); `load`: (body, content type, requests in flight, requests and seconds per
    timed run)."""
    (image_size, channels), (body, ctype, in_flight, n_requests, max_s) = shape, load
    rows = []
    for mode, variant, label in (
        ("echo", "HTTP alone (bare uvicorn app, fixed answer) vs in-process", "bare app echoing a fixed answer"),
        ("inline", "leanest server (the baseline's work inline) vs in-process", "bare app doing the baseline's work"),
    ):
        port = free_port()
        cmd = [sys.executable, "-m", "bench.lean_server", "--port", str(port), "--mode", mode, "--model", str(model)]
        cmd += ["--size", str(image_size), "--channels", str(channels), "--params", str(proj / "params.yaml")]
        ctx.log(f"[inference] starting bench.lean_server --mode {mode} on 127.0.0.1:{port}")
        proc = start_server(cmd, REPO, port, proj / f"lean-{mode}.log", sets and sets[0])
        placement, _, where = _placement(proc.pid, sets)
        errors: dict[str, int] = {}
        url = f"http://127.0.0.1:{port}/predict"
        rate = partial(_server_rate, url, body, ctype, in_flight, n_requests, max_s, placement, errors)
        try:
            row = compare(
                ctx,
                variant,
                rate,
                local_rate,
                unit="predictions/s per core",
                a_label=f"bench.lean_server --mode {mode}: {label} ({in_flight} in flight), one core",
                b_label="in-process decode + ONNX Runtime on one core, one image per call",
                higher_is_better=True,
                ratio_definition="(A requests/s / server cores) / (B predictions/s on one core)",
                notes=[where, "a reference for the serving row, not a goal"],
            )
        finally:
            stop_server(proc)
        server_ms = row["extra"]["a_server_cpu_ms_per_request"]["median"]
        row["notes"].append(f"server CPU per request {server_ms:.3f} ms")
        if errors:
            row["notes"].append(f"non-200 answers during the timed runs: {errors}")
        rows.append(row)
    return rows
