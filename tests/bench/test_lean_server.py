"""bench.lean_server, the inference benchmark's reference server: its inline mode answers what the in-process
baseline computes on the same upload, and its echo mode answers its fixed reply without touching the body."""

from __future__ import annotations

import json
import sys

import httpx
import numpy as np
import pytest

from bench.lean_server import ECHO
from tests.helpers import REPO, free_port, linear_onnx, png
from visionflow.tools.loadtest.local import start_server, stop_server
from visionflow.tools.loadtest.run import multipart_body


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    w = np.random.default_rng(1).normal(size=(6, 4))
    return linear_onnx(tmp_path_factory.mktemp("lean") / "model.onnx", w, np.zeros(4), 16)


def _serve(tmp_path, *args: str):
    port = free_port()
    cmd = [sys.executable, "-m", "bench.lean_server", "--port", str(port), *args]
    return start_server(cmd, REPO, port, tmp_path / "server.log"), f"http://127.0.0.1:{port}/predict"


def _baseline_label(model, data: bytes) -> int:
    from visionflow.config import load_params
    from visionflow.data.imageio import DecodeRules, decode_for_model
    from visionflow.onnxrt import ort_outputs, ort_session

    p = load_params(REPO / "params.yaml")
    x = decode_for_model(data, 16, 3, DecodeRules.from_params(p.validation, p.serve))
    logits, _ = ort_outputs(ort_session(model, threads=1), x[None], ("logits", "embedding"), batch_size=None)
    return int(logits[0].argmax())


def test_inline_mode_answers_the_baselines_prediction_and_refuses_a_bad_upload(tmp_path, model):
    args = ["--mode", "inline", "--model", str(model), "--size", "16", "--channels", "3"]
    proc, url = _serve(tmp_path, *args, "--params", str(REPO / "params.yaml"))
    try:
        for seed in range(6):
            data = png(seed, size=24)
            body, ctype = multipart_body(data)
            r = httpx.post(url, content=body, headers={"content-type": ctype})
            assert r.status_code == 200, r.text
            assert r.json()["label"] == _baseline_label(model, data)
        body, ctype = multipart_body(b"not an image at all")
        bad = httpx.post(url, content=body, headers={"content-type": ctype})
        assert bad.status_code == 400 and "RejectedImage" in bad.json()["detail"]
    finally:
        stop_server(proc)


def test_echo_mode_answers_its_fixed_reply(tmp_path):
    proc, url = _serve(tmp_path, "--mode", "echo")
    try:
        r = httpx.post(url, content=b"anything", headers={"content-type": "text/plain"})
        assert r.status_code == 200 and r.content == ECHO
        assert json.loads(ECHO)["label"]
    finally:
        stop_server(proc)


def test_inline_mode_without_a_model_is_refused():
    import subprocess

    proc = subprocess.run(
        [sys.executable, "-m", "bench.lean_server", "--port", "1", "--mode", "inline"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "--mode inline needs --model" in proc.stderr
