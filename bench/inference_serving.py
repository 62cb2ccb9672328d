"""inference, part 2: requests/s of the real serving app over HTTP against in-process predictions on the same bytes.

The server is `visionflow serve` in a subprocess on 127.0.0.1, in a throwaway project whose champion is the
benchmark's exported model; the load is a closed loop of visionflow.tools.loadtest's keep-alive clients.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def _start_server(proj: Path, port: int, log: Path) -> tuple[subprocess.Popen, float]:
    import httpx

    exe = Path(sys.executable).with_name("visionflow")
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "visionflow.cli"]
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            [*cmd, "--params", str(proj / "params.yaml"), "serve", "--port", str(port)],
            cwd=proj,
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
    start = time.perf_counter()
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"`visionflow serve` exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2, trust_env=False).status_code == 200:
                return proc, time.perf_counter() - start
        except httpx.HTTPError:
            pass
        if time.perf_counter() - start > 180:
            proc.kill()
            raise RuntimeError(f"`visionflow serve` not ready in 180 s:\n{log.read_text()[-3000:]}")
        time.sleep(0.25)


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def _cpu_s(process: psutil.Process) -> float:
    t = process.cpu_times()
    return t.user + t.system


def _server_rate(
    url: str,
    body: bytes,
    ctype: str,
    concurrency: int,
    n_requests: int,
    max_s: float,
    server: psutil.Process,
    errors: dict[str, int],
) -> Measurement:
    """Predictions/s of the running server under a closed loop; non-200 answers are added to `errors`."""
    asyncio.run(closed_loop(url, body, ctype, concurrency, concurrency * 2, 5.0))  # warm-up requests
    server_cpu, client_cpu = _cpu_s(server), _cpu_s(psutil.Process())
    res = asyncio.run(closed_loop(url, body, ctype, concurrency, n_requests, max_s))
    server_cpu, client_cpu = _cpu_s(server) - server_cpu, _cpu_s(psutil.Process()) - client_cpu
    for k, v in res["errors"].items():
        errors[k] = errors.get(k, 0) + v
    done = max(res["requests"], 1)
    # CPU per request, so the serving path's own cost can be told apart from the load generator's: on 2
    # cores the load generator competes with the server for the same CPUs.
    return Measurement(
        res["ok"] / res["seconds"],
        {
            "requests": res["requests"],
            "p50_ms": res["p50_ms"],
            "errors": sum(res["errors"].values()),
            "server_cpu_ms_per_request": 1000 * server_cpu / done,
            "client_cpu_ms_per_request": 1000 * client_cpu / done,
        },
    )


def _local_rate(data: bytes, session, rules, image_size: int, channels: int, n: int) -> Measurement:
    """In-process single-image predictions/s: decode, the model's logits and embedding (as the server asks for
    them), softmax."""
    from visionflow.data.imageio import decode_for_model
    from visionflow.onnxrt import ort_outputs, softmax

    def one() -> None:
        x = decode_for_model(data, image_size, channels, rules)
        logits, _emb = ort_outputs(session, x[None], ("logits", "embedding"), batch_size=None)
        softmax(logits).argmax(1)

    one()
    start, cpu = time.perf_counter(), _cpu_s(psutil.Process())
    for _ in range(n):
        one()
    seconds, cpu = time.perf_counter() - start, _cpu_s(psutil.Process()) - cpu
    return Measurement(n / seconds, {"cpu_ms_per_prediction": 1000 * cpu / n})


def _add_cpu_figures(row: dict[str, Any], errors: dict[str, int], ready_s: float) -> None:
    if errors:
        row["notes"].append(f"non-200 answers during the timed runs: {errors}")
    # The serving path's cost per request in CPU time (server process only) against in-process decode + ONNX
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


def serving(ctx: Context, onnx_path: Path, image_size: int, channels: int, model_name: str) -> dict[str, Any]:
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
    port = _free_port()
    ctx.log(f"[inference] starting `visionflow serve` on 127.0.0.1:{port} (champion v{version})")
    proc, ready_s = _start_server(proj, port, proj / "server.log")
    concurrency = p.serve.max_concurrency
    n_requests = 40 if ctx.quick else 2000
    max_s = 15.0 if ctx.quick else 6.0
    rules = DecodeRules.from_params(p.validation, p.serve)
    errors: dict[str, int] = {}
    server_rate = partial(
        _server_rate,
        f"http://127.0.0.1:{port}/predict",
        body,
        ctype,
        concurrency,
        n_requests,
        max_s,
        psutil.Process(proc.pid),
        errors,
    )
    local_rate = partial(
        _local_rate, data, ort_session(served), rules, image_size, channels, 100 if ctx.quick else 2000
    )
    try:
        row = compare(
            ctx,
            "serving vs in-process",
            server_rate,
            local_rate,
            unit="predictions/s",
            a_label=f"visionflow serve over HTTP ({concurrency} in flight)",
            b_label="in-process decode + ONNX Runtime",
            higher_is_better=True,
            the_goal=goal(">= 0.8x", ">=", 0.8),
            notes=[
                f"image: {image_source}, {len(data)} bytes; up to {n_requests} requests or {max_s:g} s "
                f"per timed run; server ready {ready_s:.1f} s after start; review queue off "
                "(serve.review_threshold=0), prediction log on; client and server share this machine"
            ],
        )
    finally:
        _stop(proc)
    _add_cpu_figures(row, errors, ready_s)
    return row
