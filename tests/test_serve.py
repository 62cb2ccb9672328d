"""Serving against a real champion in a real (SQLite) MLflow registry, through real ONNX Runtime."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from tests.conftest import make_project, png_header_only
from visionflow.config import load_params
from visionflow.export import export_onnx, write_model_card
from visionflow.model import build_net
from visionflow.registry import CHAMPION, Gate, apply_promotion, register_onnx
from visionflow.serve import ChampionHolder, PredictionLog, create_app
from visionflow.tracking import setup_mlflow

CLASSES = ["cat", "dog", "fox"]


def _register(proj: Path, p, seed: int) -> str:
    import torch

    torch.manual_seed(seed)
    net = build_net("test_resnet", len(CLASSES), 1).eval()
    onnx_path = export_onnx(net, image_size=16, channels=1, path=proj / f"m{seed}" / "model.onnx")
    card = write_model_card(onnx_path, image_size=16, channels=1, classes=CLASSES, model_name="test_resnet",
                            data_version="dv")
    with mlflow.start_run(experiment_id=setup_mlflow(p.registry.tracking_uri, proj, p.base.project)) as run:
        pass
    version = register_onnx(onnx_path=onnx_path, card=card, model_name=p.registry.model_name,
                            mlflow_run_id=run.info.run_id, tags={"visionflow.data_version": "dv"}, metrics={})
    apply_promotion(p.registry.model_name, version, [Gate("test", True, "set up by the test")])
    return version


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    proj = make_project(root / "proj", root, registry={"tracking_uri": f"sqlite:///{root / 'mlflow.db'}"},
                        serve={"max_upload_mb": 1, "max_form_fields": 8, "max_batch": 4})
    p = load_params(proj / "params.yaml")
    version = _register(proj, p, seed=0)
    holder = ChampionHolder(p.registry.model_name, cache_dir=proj / "models/serving")
    app = create_app(p, proj, holder=holder, watch=False)
    with TestClient(app) as client:
        yield proj, p, client, holder, version


def png(seed: int = 0, size: int = 20) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (size, size), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def healthy(client) -> None:
    assert client.get("/health").json() == {"status": "ok"}


def test_predict_one_image_and_log_it(served):
    proj, p, client, _, version = served
    r = client.post("/predict", files={"file": ("a.png", png(1), "image/png")})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["label"] in CLASSES and body["model_version"] == version
    assert sum(body["probabilities"].values()) == pytest.approx(1, abs=1e-4)
    last = json.loads((proj / p.serve.prediction_log).read_text().splitlines()[-1])
    assert last["label"] == body["label"] and len(last["embedding"]) > 0
    assert {"brightness", "contrast", "blur"} <= set(last)


def test_batch_and_info_endpoints(served):
    _, _, client, _, version = served
    files = [("files", (f"{i}.png", png(i), "image/png")) for i in range(3)]
    r = client.post("/predict/batch", files=files)
    assert r.status_code == 200 and len(r.json()["predictions"]) == 3
    assert client.get("/ready").json()["model_version"] == version
    info = client.get("/model").json()
    assert info["classes"] == CLASSES and info["lineage"]["visionflow.data_version"] == "dv"
    metrics = client.get("/metrics").text
    assert "visionflow_requests_total" in metrics and "visionflow_request_seconds_bucket" in metrics
    for name in ("visionflow_inference_queue_seconds", "visionflow_inference_seconds",
                 "visionflow_inference_batch_requests"):
        assert f"{name}_count " in metrics and f"{name}_count 0.0" not in metrics, name
    assert "/predict" in client.get("/openapi.json").json()["paths"]


def test_low_confidence_goes_to_review_and_becomes_labelled_data(served):
    proj, p, client, _, _ = served
    r = client.post("/predict", files={"file": ("x.png", png(7), "image/png")})
    review_id = r.json()["review_id"]
    assert review_id, "an untrained 3-class model is never 60% sure: the prediction must be queued"
    queued = client.get("/review/queue").json()
    assert any(item["id"] == review_id for item in queued["items"]) and queued["classes"] == CLASSES
    assert client.get(f"/review/image/{review_id}").headers["content-type"] == "image/png"
    assert client.post(f"/review/{review_id}", json={"label": "wolf"}).status_code == 422
    ok = client.post(f"/review/{review_id}", json={"label": "fox"})
    assert ok.status_code == 200
    saved = proj / p.serve.reviewed_dir / "fox" / f"review_{review_id}.png"
    assert saved.is_file() and Image.open(saved).size == (16, 16)
    assert client.post(f"/review/{review_id}", json={"label": "fox"}).status_code == 404
    assert client.get("/review").status_code == 200


@pytest.mark.parametrize("name,data,status", [
    ("random.png", np.random.default_rng(0).bytes(3000), 415),
    ("bomb.png", png_header_only(50_000, 50_000), 422),
    ("empty.png", b"", 422),
    ("../../../etc/passwd", png(3), 200),
    ("nul\x00name.png", png(4), 200),
])
def test_bad_uploads_get_clear_4xx_and_the_server_stays_up(served, name, data, status):
    _, _, client, _, _ = served
    r = client.post("/predict", files={"file": (name, data, "image/png")})
    assert r.status_code == status, r.text
    healthy(client)


def test_oversized_body_and_too_many_parts_are_refused(served):
    _, _, client, _, _ = served
    big = b"\x00" * (3 * 1024 * 1024)
    assert client.post("/predict", files={"file": ("big.png", big, "image/png")}).status_code == 413
    healthy(client)
    many = [("f", (None, "x")) for _ in range(2000)]
    assert client.post("/predict", files=many).status_code == 400
    healthy(client)
    assert client.post("/predict", content=b"not multipart",
                       headers={"content-type": "multipart/form-data; boundary=zzz"}).status_code in (400, 422)
    healthy(client)


def test_champion_swap_without_restart(served):
    proj, p, client, holder, version = served
    newer = _register(proj, p, seed=1)
    assert holder.refresh() is True
    assert client.get("/ready").json()["model_version"] == newer != version
    assert str(mlflow.MlflowClient().get_model_version_by_alias(p.registry.model_name, CHAMPION).version) == newer


def test_token_auth_when_configured(tmp_path, monkeypatch):
    monkeypatch.setenv("VF_TOKEN", "s3cret")
    proj = make_project(tmp_path / "proj", tmp_path, registry={"tracking_uri": f"sqlite:///{tmp_path / 'db'}"},
                        serve={"auth_token_env": "VF_TOKEN"})
    p = load_params(proj / "params.yaml")
    _register(proj, p, seed=2)
    with TestClient(create_app(p, proj, watch=False)) as client:
        files = {"file": ("a.png", png(1), "image/png")}
        assert client.post("/predict", files=files).status_code == 401
        ok = client.post("/predict", files=files, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        assert client.get("/health").status_code == 200


def test_prediction_log_survives_rotation_and_removal(tmp_path):
    """The log keeps one handle open; a rotated (renamed) or deleted file is noticed and a new one started, so no
    line goes to a file nobody reads."""
    path = tmp_path / "log" / "predictions.jsonl"
    log = PredictionLog(path)
    log.append({"n": 1})
    path.rename(tmp_path / "log" / "predictions.jsonl.1")  # logrotate's default: rename, then a new file
    log.append({"n": 2}, {"n": 3})
    assert [json.loads(x)["n"] for x in (tmp_path / "log/predictions.jsonl.1").read_text().splitlines()] == [1]
    assert [json.loads(x)["n"] for x in path.read_text().splitlines()] == [2, 3]
    path.unlink()
    log.append({"n": 4})
    assert [json.loads(x)["n"] for x in path.read_text().splitlines()] == [4]
    shutil.rmtree(path.parent)  # the whole folder removed while serving: recreated, the line kept
    log.append({"n": 4})
    log.close()
    assert [json.loads(x)["n"] for x in path.read_text().splitlines()] == [4]
    log.append({"n": 5})  # a closed log reopens rather than failing a request
    log.close()
    assert path.read_text().count("\n") == 2


def test_an_unwritable_prediction_log_answers_503_and_is_counted(tmp_path):
    """A prediction that cannot be recorded is refused with a 503 that says why (not a bare 500), the failure is
    counted on /metrics, and serving recovers once the log can be written again."""
    proj = make_project(tmp_path / "proj", tmp_path, registry={"tracking_uri": f"sqlite:///{tmp_path / 'db'}"})
    p = load_params(proj / "params.yaml")
    _register(proj, p, seed=3)
    log = proj / p.serve.prediction_log
    with TestClient(create_app(p, proj, watch=False)) as client:
        files = {"file": ("a.png", png(1), "image/png")}
        assert client.post("/predict", files=files).status_code == 200
        log.unlink()
        log.mkdir()  # the log's path is now a folder: every append fails with an OSError
        r = client.post("/predict", files=files)
        assert r.status_code == 503, r.text
        assert "cannot record predictions" in r.json()["detail"] and "see the server log" in r.json()["detail"]
        assert 'visionflow_requests_total{endpoint="predict",status="503"} 1.0' in client.get("/metrics").text
        log.rmdir()
        assert client.post("/predict", files=files).status_code == 200
    assert len(log.read_text().splitlines()) == 1


def test_the_batcher_runs_waiting_requests_together_and_keeps_their_outcomes_apart():
    """Requests that queue while the thread is busy run as one batch; each gets its own result or its own error."""
    import asyncio
    import threading

    from visionflow.serve import Batcher

    release, calls, seen = threading.Event(), [], []

    def handle(jobs):
        calls.append(list(jobs))
        if jobs == ["first"]:
            release.wait(10)  # hold the thread until the others have queued
        return [ValueError(j) if j.startswith("bad") else j.upper() for j in jobs]

    async def main():
        batcher = Batcher(handle, max_jobs=3, observe=lambda waits, seconds: seen.append((waits, seconds)))
        first = batcher.submit("first")
        while not calls:
            await asyncio.sleep(0.001)
        rest = [batcher.submit(j) for j in ("a", "bad-b", "c", "d")]
        release.set()
        outcomes = await asyncio.gather(first, *rest, return_exceptions=True)
        batcher.stop()
        return outcomes

    outcomes = asyncio.run(main())
    assert calls == [["first"], ["a", "bad-b", "c"], ["d"]]  # at most max_jobs per batch, in arrival order
    assert outcomes[:2] == ["FIRST", "A"] and outcomes[3:] == ["C", "D"]
    assert isinstance(outcomes[2], ValueError) and str(outcomes[2]) == "bad-b"
    # what /metrics hears of each batch: one queue wait per request, and the batch's time
    assert [len(waits) for waits, _ in seen] == [1, 3, 1]
    assert seen[0][1] >= 0 and all(w >= 0 for waits, _ in seen for w in waits)
    assert min(seen[1][0]) > 0  # the second batch's requests queued while the first was held


def test_work_that_fails_after_its_504_is_logged_once_as_such(tmp_path, caplog):
    """A timed-out request gets its 504 at once; its work still runs, and when that work fails the server log says
    so in a line of ours, not asyncio's 'Future exception was never retrieved'."""
    import gc
    import logging
    import time

    proj = make_project(tmp_path / "proj", tmp_path, registry={"tracking_uri": f"sqlite:///{tmp_path / 'db'}"},
                        serve={"request_timeout_s": 0.0001})  # shorter than any inference
    p = load_params(proj / "params.yaml")
    _register(proj, p, seed=3)
    log = proj / p.serve.prediction_log
    log.parent.mkdir(parents=True, exist_ok=True)
    log.mkdir()  # every prediction's work fails when it writes the log
    with caplog.at_level(logging.ERROR), TestClient(create_app(p, proj, watch=False)) as client:
        codes = [client.post("/predict", files={"file": ("a.png", png(1), "image/png")}).status_code
                 for _ in range(3)]
        deadline = time.monotonic() + 10
        while sum("failed afterwards" in r.getMessage() for r in caplog.records) < 3 and time.monotonic() < deadline:
            client.get("/health")  # lets the event loop run the work's callbacks
            time.sleep(0.05)
        gc.collect()
        client.get("/health")
    messages = [r.getMessage() for r in caplog.records]
    assert codes == [504, 504, 504]
    assert sum("a request answered 504 failed afterwards: IsADirectoryError" in m for m in messages) == 3, messages
    assert not any("never retrieved" in m for m in messages), messages
