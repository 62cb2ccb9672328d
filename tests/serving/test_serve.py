"""Serving against a real champion in a real (SQLite) MLflow registry, through real ONNX Runtime."""

from __future__ import annotations

import io
import json
import shutil

import mlflow
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from tests.helpers import (
    CLASSES,
    DV,
    corrupt_exif_jpegs,
    exif_jpeg,
    make_project,
    png,
    png_header_only,
    register_champion,
)
from visionflow.config import load_params
from visionflow.registry.store import CHAMPION
from visionflow.registry.tracking import setup_mlflow
from visionflow.serving.app import create_app
from visionflow.serving.champion import ChampionHolder
from visionflow.serving.predictions import PredictionLog


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    proj = make_project(
        root / "proj",
        root,
        registry={"tracking_uri": f"sqlite:///{root / 'mlflow.db'}"},
        serve={"max_upload_mb": 1, "max_form_fields": 8, "max_batch": 4},
    )
    p = load_params(proj / "params.yaml")
    version = register_champion(proj, p, CLASSES, tags=DV, seed=0)
    holder = ChampionHolder(p.registry.model_name, cache_dir=proj / "models/serving")
    app = create_app(p, proj, holder=holder, watch=False)
    with TestClient(app) as client:
        yield proj, p, client, holder, version


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
    for name in (
        "visionflow_inference_queue_seconds",
        "visionflow_inference_seconds",
        "visionflow_inference_batch_requests",
    ):
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


@pytest.mark.parametrize(
    "name,data,status",
    [
        ("random.png", np.random.default_rng(0).bytes(3000), 415),
        ("bomb.png", png_header_only(50_000, 50_000), 422),
        ("empty.png", b"", 422),
        ("../../../etc/passwd", png(3), 200),
        ("nul\x00name.png", png(4), 200),
    ],
)
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
    assert client.post(
        "/predict", content=b"not multipart", headers={"content-type": "multipart/form-data; boundary=zzz"}
    ).status_code in (400, 422)
    healthy(client)


def test_champion_swap_without_restart(served):
    proj, p, client, holder, version = served
    newer = register_champion(proj, p, CLASSES, tags=DV, seed=1)
    assert holder.refresh() is True
    assert client.get("/ready").json()["model_version"] == newer != version
    assert str(mlflow.MlflowClient().get_model_version_by_alias(p.registry.model_name, CHAMPION).version) == newer


def test_token_auth_when_configured(tmp_path, monkeypatch):
    monkeypatch.setenv("VF_TOKEN", "s3cret")
    proj = make_project(
        tmp_path / "proj",
        tmp_path,
        registry={"tracking_uri": f"sqlite:///{tmp_path / 'db'}"},
        serve={"auth_token_env": "VF_TOKEN"},
    )
    p = load_params(proj / "params.yaml")
    register_champion(proj, p, CLASSES, tags=DV, seed=2)
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
    register_champion(proj, p, CLASSES, tags=DV, seed=3)
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

    from visionflow.serving.batcher import Batcher

    release, calls, seen = threading.Event(), [], []

    def handle(jobs):
        calls.append(list(jobs))
        if jobs == ["first"]:
            release.wait(10)  # hold the thread until the others have queued
        return [ValueError(j) if j.startswith("bad") else j.upper() for j in jobs]

    async def main():
        batcher = Batcher([handle], max_jobs=3, observe=lambda waits, seconds: seen.append((waits, seconds)))
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

    proj = make_project(
        tmp_path / "proj",
        tmp_path,
        registry={"tracking_uri": f"sqlite:///{tmp_path / 'db'}"},
        serve={"request_timeout_s": 0.0001, "workers": 0},
    )  # shorter than any inference (in the server's own thread: test_serve_workers has the processes' case)
    p = load_params(proj / "params.yaml")
    register_champion(proj, p, CLASSES, tags=DV, seed=3)
    log = proj / p.serve.prediction_log
    log.parent.mkdir(parents=True, exist_ok=True)
    log.mkdir()  # every prediction's work fails when it writes the log
    with caplog.at_level(logging.ERROR), TestClient(create_app(p, proj, watch=False)) as client:
        codes = [client.post("/predict", files={"file": ("a.png", png(1), "image/png")}).status_code for _ in range(3)]
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


# --- one bad upload among good ones, expensive images, auth that must not fail open, start-up -----------------


def multipart_body(content: bytes, boundary: bytes = b"vfboundary") -> tuple[bytes, str]:
    body = (
        b"--" + boundary + b'\r\nContent-Disposition: form-data; name="file"; filename="x.jpg"\r\n'
        b"Content-Type: image/jpeg\r\n\r\n" + content + b"\r\n--" + boundary + b"--\r\n"
    )
    return body, "multipart/form-data; boundary=" + boundary.decode()


def test_corrupt_exif_variants_are_a_real_class_of_input():
    variants = corrupt_exif_jpegs()
    assert len(set(variants)) == 5 and all(len(v) == len(exif_jpeg()) for v in variants)


def test_a_bad_upload_fails_only_its_own_request_in_a_batch(served):
    """Requests that wait together run as one batch; a corrupt-EXIF image or an over-long multipart boundary
    among them is that request's problem alone. The inference thread is held, deterministically, by an exclusive
    lock on the review queue's SQLite file (an uncertain prediction waits there to be queued), while the others
    are submitted; then the lock is released and they run as one batch."""
    import asyncio
    import sqlite3

    import httpx

    proj, p, _, holder, _ = served
    # one inference process, held by the lock; its start (spawn + imports) must not time the first request out
    p = p.model_copy(update={"serve": p.serve.model_copy(update={"workers": 1, "request_timeout_s": 120})})
    app = create_app(p, proj, holder=holder, watch=False)
    images = proj / p.serve.review_dir / "images"
    exif_a, exif_b = corrupt_exif_jpegs(2, seed=1)
    mates = {
        "good": multipart_body(png(11)),
        "exif a": multipart_body(exif_a),
        "long boundary": multipart_body(png(12), boundary=b"b" * 300),
        "exif b": multipart_body(exif_b),
    }
    assert len(mates) == p.serve.max_concurrency  # one batch holds them all

    async def main() -> dict[str, httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:

            def post(body_and_type):
                body, ctype = body_and_type
                return asyncio.ensure_future(client.post("/predict", content=body, headers={"content-type": ctype}))

            before = set(images.iterdir())
            gate = sqlite3.connect(proj / p.serve.review_dir / "queue.db", isolation_level=None)
            gate.execute("BEGIN EXCLUSIVE")
            try:
                first = post(multipart_body(png(10)))
                for _ in range(2000):  # the first request's image is written just before its blocked INSERT
                    if set(images.iterdir()) - before:
                        break
                    await asyncio.sleep(0.01)
                waiting = {name: post(m) for name, m in mates.items()}
                await asyncio.sleep(0.5)  # (nothing else runs on this loop: they reach the batcher meanwhile)
            finally:
                gate.execute("ROLLBACK")
                gate.close()
            answers = {"first": await first, **{name: await t for name, t in waiting.items()}}
            answers["metrics"] = await client.get("/metrics")
            return answers

    answers = asyncio.run(main())
    assert answers["first"].status_code == 200, answers["first"].text
    assert answers["good"].status_code == 200, answers["good"].text
    for name in ("exif a", "exif b"):  # decoded without the EXIF it could not read
        assert answers[name].status_code == 200, (name, answers[name].text)
    assert answers["long boundary"].status_code == 400, answers["long boundary"].text
    assert "boundary" in answers["long boundary"].json()["detail"]
    # ...and they really were one batch of four
    buckets = {
        line.split('le="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
        for line in answers["metrics"].text.splitlines()
        if line.startswith("visionflow_inference_batch_requests_bucket")
    }
    assert buckets["4.0"] - buckets["2.0"] == 1, buckets


def _with_serve(p, **serve):
    return p.model_copy(update={"serve": p.serve.model_copy(update=serve)})


def jpeg(width: int, height: int, seed: int = 0) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (height // 8, width // 8, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).resize((width, height), Image.NEAREST).save(buf, "JPEG", quality=60)
    return buf.getvalue()


def test_decoded_pixels_are_bounded_per_request(served):
    """serve.max_request_pixels bounds what one request may decode (all of a batch's images together), checked
    before an image's pixels are decoded; a JPEG counts at the reduced size it is decoded at (DCT scaling)."""
    proj, p, _, holder, _ = served
    small = _with_serve(p, max_request_pixels=100_000)
    with TestClient(create_app(small, proj, holder=holder, watch=False)) as client:
        one = [("files", ("a.png", png(1, 300), "image/png"))]  # 90,000 pixels
        assert client.post("/predict/batch", files=one).status_code == 200
        two = one + [("files", ("b.png", png(2, 300), "image/png"))]
        r = client.post("/predict/batch", files=two)
        assert r.status_code == 422 and "over_pixel_budget" in r.json()["detail"], r.text
        # 2,400 x 2,000 = 4.8 MP in the header, decoded at 1/8 scale: 300 x 250 = 75,000 pixels
        r = client.post("/predict", files={"file": ("big.jpg", jpeg(2400, 2000), "image/jpeg")})
        assert r.status_code == 200, r.text
        healthy(client)


@pytest.mark.parametrize("value", [None, "", "   "], ids=["unset", "empty", "blank"])
def test_auth_env_set_but_empty_refuses_to_start(tmp_path, monkeypatch, value):
    from visionflow.errors import ConfigError

    if value is None:
        monkeypatch.delenv("VF_TOKEN_UNSET", raising=False)
    else:
        monkeypatch.setenv("VF_TOKEN_UNSET", value)
    proj = make_project(tmp_path / "proj", tmp_path, serve={"auth_token_env": "VF_TOKEN_UNSET"})
    p = load_params(proj / "params.yaml")
    with pytest.raises(ConfigError, match="VF_TOKEN_UNSET"):
        create_app(p, proj, holder=ChampionHolder("m", cache_dir=tmp_path), watch=False)


def test_the_token_is_a_header_everywhere_but_on_pages(served, monkeypatch):
    """?token= lands in access logs: only the page dependency takes it; every API route wants the header, and
    /metrics and /model (git commit, data version, run ids) are behind the token too."""
    from fastapi import Depends, FastAPI

    from visionflow.serving.auth import token_dependencies

    proj, p, _, holder, _ = served
    monkeypatch.setenv("VF_TOKEN", "s3cret")
    guarded = _with_serve(p, auth_token_env="VF_TOKEN")
    header = {"Authorization": "Bearer s3cret"}
    with TestClient(create_app(guarded, proj, holder=holder, watch=False)) as client:
        for path in ("/metrics", "/model", "/review/queue"):
            assert client.get(path).status_code == 401, path
            assert client.get(f"{path}?token=s3cret").status_code == 401, path
            assert client.get(path, headers=header).status_code == 200, path
        files = {"file": ("a.png", png(1), "image/png")}
        assert client.post("/predict?token=s3cret", files=files).status_code == 401
        assert client.post("/predict", files=files, headers=header).status_code == 200
        assert client.get("/health").status_code == 200

    require_token, require_token_page = token_dependencies("s3cret")
    pages = FastAPI()
    pages.get("/api", dependencies=[Depends(require_token)])(lambda: "ok")
    pages.get("/page", dependencies=[Depends(require_token_page)])(lambda: "ok")
    with TestClient(pages) as client:
        assert client.get("/api?token=s3cret").status_code == 401
        assert client.get("/page?token=s3cret").status_code == 200
        assert client.get("/page?token=wrong").status_code == 401
        assert client.get("/page").status_code == 401
        assert client.get("/api", headers=header).status_code == 200
        assert client.get("/page", headers=header).status_code == 200
    open_api, open_page = token_dependencies(None)
    assert open_api is not None and open_page is not None


def test_serve_without_a_champion_says_so_and_creates_no_registry(tmp_path):
    from tests.helpers import run_cli

    store = tmp_path / "store" / "mlflow.db"
    proj = make_project(tmp_path / "proj", tmp_path, registry={"tracking_uri": f"sqlite:///{store}"})
    r = run_cli(proj, "serve", check=False, timeout=60)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "no model registry" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not store.parent.exists()  # nothing created as a side effect
    setup_mlflow(f"sqlite:///{store}", proj, "visionflow")  # a store, but nothing promoted in it
    r = run_cli(proj, "serve", check=False, timeout=60)
    assert r.returncode == 2 and "no champion" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_serving_on_a_gpu_this_onnx_runtime_cannot_use_is_refused_in_one_line(tmp_path):
    """serve.device: cuda without onnxruntime-gpu (or without a GPU) must not quietly serve on CPU."""
    import onnxruntime as ort

    from tests.helpers import run_cli

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this ONNX Runtime has the CUDA provider")
    proj = make_project(
        tmp_path / "proj", tmp_path, registry={"tracking_uri": f"sqlite:///{tmp_path / 'db'}"}, serve={"device": "cuda"}
    )
    register_champion(proj, load_params(proj / "params.yaml"), CLASSES, tags=DV)
    r = run_cli(proj, "serve", check=False, timeout=60)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "no CUDA provider" in r.stderr and "serve.device: cpu" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    bad = make_project(tmp_path / "bad", tmp_path, serve={"device": "tpu"})
    r = run_cli(bad, "serve", check=False, timeout=60)
    assert r.returncode == 2 and "serve.device" in r.stderr and "Traceback" not in r.stderr, r.stderr
