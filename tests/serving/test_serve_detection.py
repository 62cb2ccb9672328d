"""Serving a detector: a real FCOS champion (its head set to answer known boxes) in a real SQLite MLflow registry,
through real ONNX Runtime; the box review queue and its decisions, hostile ones included."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from tests.helpers import DETECTOR_CLASSES as CLASSES
from tests.helpers import DETECTOR_SCORES as SCORES
from tests.helpers import exif_jpeg, make_project, png_header_only, register_detector
from visionflow.config import load_params
from visionflow.serving.app import create_app
from visionflow.serving.champion import ChampionHolder


def rgb(width: int, height: int, seed: int = 0, fmt: str = "PNG") -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt)
    return buf.getvalue()


def whole(width: int, height: int) -> list[dict]:
    return [{"bbox": [0, 0, width, height], "label": c, "score": s} for c, s in zip(CLASSES[:2], SCORES[:2])]


def _client(p, proj):
    holder = ChampionHolder(p.detection.model_name, cache_dir=proj / "models/serving")
    return TestClient(create_app(p, proj, holder=holder, watch=False))


@pytest.fixture(scope="module")
def served(tmp_path_factory, detector):
    root = tmp_path_factory.mktemp("serve-det")
    proj = make_project(
        root / "proj",
        root,
        base={"task": "detection"},
        registry={"tracking_uri": f"sqlite:///{root / 'mlflow.db'}"},
        serve={"max_upload_mb": 1, "max_batch": 4},
    )
    p = load_params(proj / "params.yaml")
    version = register_detector(proj, p, detector[0], CLASSES)
    with _client(p, proj) as client:
        yield proj, p, client, version


def _post(client, data: bytes, name: str = "x.png"):
    r = client.post("/predict", files={"file": (name, data, "application/octet-stream")})
    assert r.status_code == 200, r.text
    return r.json()


def test_predict_answers_coco_boxes_above_the_score_threshold_and_logs_them(served):
    proj, p, client, version = served
    body = _post(client, rgb(80, 60))
    assert body["model_version"] == version and body["review_id"]
    assert [b["label"] for b in body["boxes"]] == ["cat", "dog"]  # fox (0.1) is under score_threshold 0.3
    for got, want in zip(body["boxes"], whole(80, 60)):
        assert got["bbox"] == pytest.approx(want["bbox"], abs=0.01) and got["score"] == pytest.approx(want["score"])
    line = json.loads((proj / p.serve.prediction_log).read_text().splitlines()[-1])
    assert line["n_boxes"] == 2 and line["scores"] == pytest.approx(SCORES[:2]) and line["labels"] == ["cat", "dog"]
    assert line["box_areas"] == pytest.approx([1, 1]) and line["box_centres"] == [[0.5, 0.5]] * 2
    assert (line["width"], line["height"], line["review_id"]) == (80, 60, body["review_id"])
    assert {"brightness", "contrast", "blur", "colorfulness"} <= set(line) and len(line["embedding"]) > 0
    info = client.get("/model").json()
    assert info["task"] == "detection" and info["classes"] == CLASSES
    assert "bbox" in json.dumps(client.get("/openapi.json").json()["paths"]["/predict"])


def test_boxes_are_in_the_uploads_own_pixels(served):
    _, _, client, _ = served
    # 400 x 300 is decoded reduced (at least twice the model's 64 px), a JPEG at a DCT scale; EXIF orientation 6
    # turns a stored 24 x 20 JPEG upright: 20 x 24.
    for data, (w, h) in [(rgb(400, 300, fmt="PNG"), (400, 300)), (rgb(333, 201, fmt="JPEG"), (333, 201)),
                         (exif_jpeg(), (20, 24))]:  # fmt: skip
        boxes = _post(client, data)["boxes"]
        assert [b["bbox"] for b in boxes] == [pytest.approx([0, 0, w, h], abs=0.01)] * 2, (w, h)
    files = [("files", (f"{i}.png", rgb(30 + 10 * i, 40, seed=i), "image/png")) for i in range(3)]
    r = client.post("/predict/batch", files=files)
    assert r.status_code == 200
    assert [a["boxes"][0]["bbox"] for a in r.json()["predictions"]] == [[0, 0, 30, 40], [0, 0, 40, 40], [0, 0, 50, 40]]
    metrics = client.get("/metrics").text
    assert 'visionflow_predictions_total{label="dog"}' in metrics


@pytest.mark.parametrize(
    "data,status",
    [(np.random.default_rng(0).bytes(3000), 415), (png_header_only(50_000, 50_000), 422), (b"", 422)],
)
def test_the_upload_guards_hold_for_a_detector(served, data, status):
    _, _, client, _ = served
    r = client.post("/predict", files={"file": ("x.png", data, "image/png")})
    assert r.status_code == status, r.text
    assert client.post("/predict", files={"file": ("big.png", b"\0" * (2 << 20), "image/png")}).status_code == 413
    assert client.get("/health").json() == {"status": "ok"}


def test_only_images_with_an_uncertain_box_are_queued(served):
    proj, p, client, _ = served
    queued = _post(client, rgb(50, 40, seed=5))["review_id"]
    listed = client.get("/review/boxes/queue").json()
    item = next(i for i in listed["items"] if i["id"] == queued)
    assert (item["width"], item["height"], item["min_score"]) == (50, 40, pytest.approx(0.4))
    assert [b["label"] for b in item["boxes"]] == ["cat", "dog"] and listed["classes"] == CLASSES
    assert client.get("/review/queue").json()["task"] == "detection"
    image = client.get(f"/review/boxes/image/{queued}")
    assert image.headers["content-type"] == "image/png" and image.content == rgb(50, 40, seed=5)
    # With review_threshold under every served score, nothing is queued.
    sure = p.model_copy(update={"detection": p.detection.model_copy(update={"review_threshold": 0.35})})
    with _client(sure, proj) as other:
        before = other.get("/review/boxes/queue").json()["total"]
        assert _post(other, rgb(50, 40, seed=6))["review_id"] is None
        assert other.get("/review/boxes/queue").json()["total"] == before


HOSTILE = [
    ({"boxes": "cat"}, "send JSON"),
    ({"boxes": None}, "send JSON"),
    ([1, 2], "send JSON"),
    ({"boxes": [[0, 0, 10, 10, "cat"]]}, "bbox must be"),
    ({"boxes": [{"bbox": [0, 0, 10], "label": "cat"}]}, "bbox must be"),
    ({"boxes": [{"bbox": [0, 0, "10", 10], "label": "cat"}]}, "finite numbers"),
    ({"boxes": [{"bbox": [0, 0, True, 10], "label": "cat"}]}, "finite numbers"),
    ({"boxes": [{"bbox": [0, 0, 1e999, 10], "label": "cat"}]}, "finite numbers"),
    ({"boxes": [{"bbox": [0, 0, 10**400, 10], "label": "cat"}]}, "finite numbers"),
    ({"boxes": [{"bbox": [0, 0, None, 10], "label": "cat"}]}, "finite numbers"),
    ({"boxes": [{"bbox": [-1, 0, 10, 10], "label": "cat"}]}, "leaves the 50 x 40 image"),
    ({"boxes": [{"bbox": [45, 0, 10, 10], "label": "cat"}]}, "leaves the 50 x 40 image"),
    ({"boxes": [{"bbox": [0, 0, 0.5, 10], "label": "cat"}]}, "too small"),
    ({"boxes": [{"bbox": [0, 0, 10, 10], "label": "wolf"}]}, "unknown class 'wolf'"),
    ({"boxes": [{"bbox": [0, 0, 10, 10], "label": ["cat"]}]}, "unknown class"),
    ({"boxes": [{"bbox": [0, 0, 10, 10], "label": "../../x"}]}, "unknown class"),
    ({"boxes": [{"bbox": [0, 0, 10, 10], "label": "cat"}] * 501}, "at most 500"),
]


def test_a_decision_is_validated_then_written_for_ingest(served):
    proj, p, client, _ = served
    upload = rgb(50, 40, seed=7)
    item = _post(client, upload)["review_id"]
    url = f"/review/boxes/{item}"
    for body, reason in HOSTILE:
        r = client.post(url, content=json.dumps(body), headers={"Content-Type": "application/json"})
        assert r.status_code == 422 and reason in r.json()["detail"], (body, r.text)
    for raw in (b"{", b"NaN", b'{"boxes": [{"bbox": [0, 0, NaN, 1], "label": "cat"}]}'):
        r = client.post(url, content=raw, headers={"Content-Type": "application/json"})
        assert r.status_code == 422, (raw, r.text)
    assert client.post(url, content="{}", headers={"Content-Type": "text/plain"}).status_code == 415
    assert client.post(url, json={"boxes": []}, headers={"Origin": "http://evil.example"}).status_code == 403
    assert client.post("/review/boxes/..%2F..%2Fetc", json={"boxes": []}).status_code == 404
    reviewed = proj / p.serve.reviewed_dir / "detection"
    assert not list(reviewed.glob("*")), "a refused decision wrote something"

    fixed = [{"bbox": [1.5, 2, 20, 30.25], "label": "fox"}, {"bbox": [30, 0, 20, 40], "label": "cat"}]
    r = client.post(url, json={"boxes": fixed})
    assert r.status_code == 200, r.text
    sha = __import__("hashlib").sha256(upload).hexdigest()
    doc = json.loads((reviewed / f"{sha}.json").read_text())
    assert doc["file"] == f"{sha}.png" and (doc["width"], doc["height"]) == (50, 40)
    assert doc["boxes"] == [[1.5, 2, 20, 30.25, "fox"], [30, 0, 20, 40, "cat"]] and doc["reviewed_at"].endswith(
        "+00:00"
    )
    assert (reviewed / f"{sha}.png").read_bytes() == upload
    assert sorted(f.name for f in reviewed.iterdir()) == [f"{sha}.json", f"{sha}.png"]  # no temporary files left
    assert item not in [i["id"] for i in client.get("/review/boxes/queue").json()["items"]]
    assert client.post(url, json={"boxes": fixed}).status_code == 404
    # Undo: the files leave the labelled data and the item is pending again.
    assert client.post(f"{url}/undo", json={}).status_code == 200
    assert not list(reviewed.glob("*")) and item in [i["id"] for i in client.get("/review/boxes/queue").json()["items"]]
    assert client.post(url, json={"boxes": []}).status_code == 200  # a negative: nothing to find in it
    assert json.loads((reviewed / f"{sha}.json").read_text())["boxes"] == []


def test_an_image_without_boxes_is_answered_logged_and_not_queued():
    """No box at or above the score threshold (the graph's floor lets weaker ones out): an empty answer, a log line
    with n_boxes 0, nothing queued."""
    from visionflow.tasks.detection.serving import Upload, drift_view, served_boxes

    upload = Upload(np.zeros((32, 48, 3), np.uint8), b"", 96, 64)  # decoded at half size
    weak = [np.array([[0, 0, 10, 10]], np.float32), np.array([0.2], np.float32), np.array([1]), np.zeros((1, 4))]
    assert served_boxes(weak, upload, CLASSES, 0.3) == []
    assert drift_view([], 96, 64) == {"n_boxes": 0, "scores": [], "labels": [], "box_areas": [], "box_centres": []}
    strong = [weak[0], np.array([0.8], np.float32), np.array([2]), weak[3]]
    (box,) = served_boxes(strong, upload, CLASSES, 0.3)
    assert box == {"bbox": [0, 0, 20, 20], "label": "dog", "score": pytest.approx(0.8)}
    view = drift_view([box], 96, 64)
    assert view["box_areas"] == [round(400 / (96 * 64), 6)] and view["box_centres"] == [[round(10 / 96, 6), 10 / 64]]
