"""Several inference processes behind one real `visionflow serve`: a killed process fails only the request it held
(a 5xx, not a hang) and is replaced; every process follows the champion as it moves; the prediction log has one
writer (no torn lines) and /metrics counts every process's requests."""

from __future__ import annotations

import io
import json
import shutil
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import psutil
import pytest
from PIL import Image

from tests.helpers import CLASSES, DV, png, register_champion
from tests.serving.test_serve_attacks import Server, start_server, stop_server

pytestmark = pytest.mark.slow  # starts a server process and its inference processes

WORKERS = 2


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = start_server(
        tmp_path_factory.mktemp("workers"),
        workers=WORKERS,
        reload_interval_s=0.5,
        max_request_pixels=400_000_000,  # lets one request hold a process for seconds (the kill test)
        request_timeout_s=120,
    )
    yield srv
    stop_server(srv)


def inference_processes(server: Server) -> list[psutil.Process]:
    """The server's inference processes (multiprocessing's spawned children, not its resource tracker)."""
    kids = psutil.Process(server.proc.pid).children()
    return [k for k in kids if "spawn_main" in " ".join(k.cmdline())]


def wait_for(condition, timeout_s: float = 60, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def big_png(side: int) -> bytes:
    """A large, smooth PNG: small to send, slow to decode (about half a second per 36 MP)."""
    ramp = np.linspace(0, 255, side, dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(np.broadcast_to(ramp, (side, side)).copy()).save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def predict(server: Server, seed: int) -> httpx.Response:
    return httpx.post(f"{server.base}/predict", files={"file": ("a.png", png(seed), "image/png")}, timeout=60)


def log_lines(server: Server) -> list[dict]:
    path = server.proj / server.p.serve.prediction_log
    text = path.read_text() if path.is_file() else ""
    assert text == "" or text.endswith("\n"), "the last line is torn"
    return [json.loads(line) for line in text.splitlines()]  # every line whole


def metric(server: Server, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{server.base}/metrics", timeout=10).text
    return sum(
        s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def test_the_server_runs_the_configured_inference_processes_and_logs_every_prediction_whole(server):
    assert len(inference_processes(server)) == WORKERS
    before_lines, before_ok = len(log_lines(server)), metric(server, "visionflow_requests_total", status="200")
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: predict(server, i), range(120)))
    assert [r.status_code for r in answers] == [200] * 120
    lines = log_lines(server)
    assert len(lines) == before_lines + 120  # one writer: every prediction, each line whole
    assert metric(server, "visionflow_requests_total", status="200") - before_ok == 120  # every process's requests


def test_every_process_follows_the_champion_as_it_moves(server):
    old = httpx.get(f"{server.base}/model", timeout=10).json()["version"]
    with ThreadPoolExecutor(8) as pool:  # both processes hold a session of the old champion
        assert {r.json()["model_version"] for r in pool.map(lambda i: predict(server, i), range(40))} == {old}
    new = register_champion(server.proj, server.p, CLASSES, tags=DV, seed=7)
    assert new != old
    wait_for(lambda: httpx.get(f"{server.base}/model", timeout=10).json()["version"] == new, what="the swap")
    with ThreadPoolExecutor(8) as pool:
        versions = [r.json()["model_version"] for r in pool.map(lambda i: predict(server, i), range(40))]
    assert set(versions) == {new}, versions


def test_a_killed_inference_process_fails_its_request_with_a_5xx_and_is_replaced(server):
    before = {p.pid for p in inference_processes(server)}
    body = [("files", (f"big{i}.png", big_png(6000), "image/png")) for i in range(8)]  # seconds of decoding
    cpu = {p.pid: p.cpu_times().user for p in inference_processes(server)}
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(httpx.post, f"{server.base}/predict/batch", files=body, timeout=120)

        def busy() -> psutil.Process | None:  # the process decoding the request: its CPU time grows
            for p in inference_processes(server):
                if p.cpu_times().user - cpu.get(p.pid, 0.0) > 0.3:
                    return p
            return None

        victim = wait_for(busy, what="a busy inference process")
        victim.send_signal(signal.SIGKILL)
        answer = pending.result(timeout=60)
    assert answer.status_code == 503, answer.text
    assert "inference process stopped" in answer.json()["detail"]
    assert answer.headers["retry-after"] == "1"
    # a new process takes its place; the server answers again, and no log line is torn
    wait_for(lambda: len(inference_processes(server)) == WORKERS, what="the replacement")
    after = {p.pid for p in inference_processes(server)}
    assert victim.pid not in after and len(after - before) == 1
    assert all(predict(server, i).status_code == 200 for i in range(10))
    log_lines(server)
    assert server.proc.poll() is None
    assert "starting a new one" in server.log.read_text()


def test_an_unwritable_prediction_log_is_a_503_from_every_process_and_nothing_is_lost_after(server):
    log = server.proj / server.p.serve.prediction_log
    kept = log.with_suffix(".kept")
    shutil.move(log, kept)
    log.mkdir()  # the server's handle notices the file is gone and cannot open a directory
    try:
        codes = {predict(server, i).status_code for i in range(6)}
    finally:
        log.rmdir()
    assert codes == {503}
    assert predict(server, 99).status_code == 200
    assert len(log_lines(server)) == 1  # a new log, whole
