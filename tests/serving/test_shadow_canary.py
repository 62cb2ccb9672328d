"""Shadow and canary (serving.canary) against a real SQLite MLflow registry, real ONNX Runtime and the real review
queue: the champion is an 'oracle' that reads an image's grey level (each class has its own), the bad challenger
answers 'cat' whatever it sees."""

from __future__ import annotations

import io
import json
import random
import re
import sqlite3
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from tests.helpers import CLASSES, REPO, linear_onnx, make_project, use_mlflow
from visionflow.config import load_params
from visionflow.errors import ConfigError
from visionflow.registry.gates import Gate, unpaired_bootstrap_upper
from visionflow.serving.app import create_app
from visionflow.serving.canary import CANARY_TAG
from visionflow.serving.review import ReviewQueue

LEVELS = (40, 128, 215)  # the grey level of each class's images
SIZE = 16


def oracle(path: Path) -> Path:
    """Logit_k = -(mean - level_k)^2 / s without the term common to all k: right on every test image, ~0.9 sure."""
    c, s = np.array(LEVELS, dtype=np.float64), 2500.0
    w = np.zeros((6, len(c)))
    w[0] = 2 * c / s
    return linear_onnx(path, w, -(c**2) / s, SIZE)


def constant_cat(path: Path, size: int = SIZE) -> Path:
    return linear_onnx(path, np.zeros((6, 3)), np.array([1.0, 0.0, 0.0]), size)


def register(proj: Path, p, onnx_path: Path, *, promote: bool) -> str:
    """Register the model the way register_stage does; promoted to champion, or left as the challenger."""
    from visionflow.registry.export import write_model_card
    from visionflow.registry.store import apply_promotion, register_onnx

    card = write_model_card(
        onnx_path, image_size=SIZE, channels=3, classes=CLASSES, model_name="linear", data_version="dv"
    )
    with mlflow.start_run(experiment_id=use_mlflow(p, proj)) as run:
        pass
    version = register_onnx(
        onnx_path=onnx_path,
        card=card,
        model_name=p.registry.model_name,
        mlflow_run_id=run.info.run_id,
        tags={},
        metrics={},
    )
    apply_promotion(p.registry.model_name, version, [Gate("test", promote, "set up by the test")])
    return version


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """One registry for the module: the oracle as champion, then two constant-cat challengers (one each for the
    tests that mark one rolled back) and a second oracle; each test points the challenger alias at its own."""
    root = tmp_path_factory.mktemp("shadow")
    proj = make_project(root / "proj", root, registry={"tracking_uri": f"sqlite:///{root / 'mlflow.db'}"})
    p = load_params(proj / "params.yaml")
    versions = {"champion": register(proj, p, oracle(root / "oracle.onnx"), promote=True)}
    for name, build in (("cat", constant_cat), ("cat2", constant_cat), ("oracle2", oracle)):
        versions[name] = register(proj, p, build(root / f"{name}.onnx"), promote=False)
    return proj, versions


def params(registry, tmp_path: Path, challenger: str, **serve):
    """The module's params with `serve` overrides and a review queue of the test's own; the registry's challenger
    alias set to the version named `challenger`."""
    proj, versions = registry
    own = {"review_dir": tmp_path / "review", "reviewed_dir": tmp_path / "reviewed"}
    p = load_params(proj / "params.yaml", [f"serve.{k}={v}" for k, v in {**own, **serve}.items()])
    use_mlflow(p, proj)  # the registry the app's holders read
    mlflow.MlflowClient().set_registered_model_alias(p.registry.model_name, "challenger", versions[challenger])
    return proj, p, versions["champion"], versions[challenger]


def grey_png(k: int, seed: int) -> bytes:
    noise = np.random.default_rng(seed).integers(-8, 9, (SIZE, SIZE))
    buf = io.BytesIO()
    Image.fromarray((LEVELS[k] + noise).astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def predict(client, k: int, seed: int) -> dict:
    r = client.post("/predict", files={"file": ("a.png", grey_png(k, seed), "image/png")})
    assert r.status_code == 200, r.text
    return r.json()


def barrier(client) -> None:
    """A request that the inference thread refuses: once it is answered, the batches before it, their after()
    (the shadow) included, are done."""
    assert client.post("/predict", files={"file": ("a.png", b"not an image", "image/png")}).status_code == 415


def metric(client, name: str) -> float | None:
    m = re.search(rf"^{re.escape(name)} (\S+)$", client.get("/metrics").text, re.M)
    return None if m is None else float(m.group(1))


def test_shadow_review_writes_are_rate_bounded_and_the_rest_counted(registry, tmp_path):
    """A challenger that disagrees on every image adds at most serve.shadow_review_per_s new review items a second
    (ten seconds' worth at once); the others are counted as unqueued, and agreement still counts them all."""
    # One inference thread (workers 0): with n processes each holds 1/n of the bucket, and which process gets
    # which request is the scheduler's choice.
    proj, p, _, _ = params(
        registry, tmp_path, "cat", shadow="true", shadow_fraction=1.0, shadow_review_per_s=0.2, workers=0
    )
    with TestClient(create_app(p, proj, watch=False)) as client:
        for seed in range(6):
            for k in (1, 2):  # the oracle says dog or fox, the challenger cat: 12 disagreements within a second
                predict(client, k, seed)
        barrier(client)
        assert metric(client, 'visionflow_shadow_images_total{outcome="disagree"}') == 12
        assert metric(client, "visionflow_shadow_agreement") == 0
        assert metric(client, "visionflow_shadow_unqueued_total") == 10  # a bucket of 0.2/s x 10 s: 2 written
        wait_for(lambda: len(client.get("/review/queue?limit=100").json()["items"]) == 2, "the two writes")
        time.sleep(0.3)  # no more come
        assert len(client.get("/review/queue?limit=100").json()["items"]) == 2


def test_rate_limit_is_a_token_bucket():
    from visionflow.serving.inference import RateLimit

    now = [0.0]
    bucket = RateLimit(2.0, burst_s=3, clock=lambda: now[0])
    assert [bucket.take() for _ in range(7)] == [True] * 6 + [False]  # 2/s x 3 s at once
    now[0] += 0.4  # 0.8 of a token
    assert not bucket.take()
    now[0] += 0.1  # 1.0
    assert bucket.take() and not bucket.take()
    now[0] += 100  # refills to the burst, not beyond
    assert sum(bucket.take() for _ in range(10)) == 6
    slow = RateLimit(0.01, burst_s=10, clock=lambda: now[0])  # under one token a burst: still one at a time
    assert slow.take() and not slow.take()


def test_bad_values_are_one_line_config_errors():
    for bad in (
        "shadow_fraction=0",
        "shadow_fraction=1.5",
        "canary_fraction=1",
        "canary_fraction=-0.1",
        "shadow_review_per_s=0",
        "shadow_review_per_s=-1",
    ):
        with pytest.raises(ConfigError, match=f"serve.{bad.split('=')[0]}"):
            load_params(REPO / "params.yaml", [f"serve.{bad}"])
    with pytest.raises(ConfigError, match="serve.canary_min_reviewed"):
        load_params(REPO / "params.yaml", ["serve.canary_min_reviewed=0"])


def test_unpaired_bootstrap_bound():
    good, bad = np.ones(60, bool), np.arange(60) % 3 == 0
    gain, upper = unpaired_bootstrap_upper(bad, good, n_boot=2000, alpha=0.05, seed=0)
    assert gain == pytest.approx(-2 / 3) and upper < 0
    gain, upper = unpaired_bootstrap_upper(good[:30], good, n_boot=2000, alpha=0.05, seed=0)
    assert gain == 0 and upper >= 0


def test_shadow_answers_from_the_champion_and_queues_disagreements(registry, tmp_path):
    proj, p, champion, challenger = params(
        registry, tmp_path, "cat", shadow="true", shadow_fraction=1.0, reload_interval_s=0.1, shadow_review_per_s=100
    )
    with TestClient(create_app(p, proj, watch=False)) as client:
        answers = [predict(client, k, seed) for seed in range(10) for k in range(3)]
        barrier(client)
        assert {a["model_version"] for a in answers} == {champion}
        assert [a["label"] for a in answers] == [CLASSES[k] for _ in range(10) for k in range(3)]
        assert metric(client, "visionflow_shadow_requests_total") == 30
        assert metric(client, 'visionflow_shadow_images_total{outcome="agree"}') == 10
        assert metric(client, 'visionflow_shadow_images_total{outcome="disagree"}') == 20
        assert metric(client, "visionflow_shadow_agreement") == pytest.approx(1 / 3)
        assert metric(client, "visionflow_shadow_unqueued_total") == 0

        def shadowed() -> list[dict]:  # (the review-queue writes run in the background)
            items = client.get("/review/queue?limit=100").json()["items"]
            return [i for i in items if i["challenger_version"] is not None]

        wait_for(lambda: len(shadowed()) >= 20, "the disagreements' review-queue writes")
        items = shadowed()
        assert len(items) == 20
        assert {(i["model_version"], i["challenger_version"], i["challenger_predicted"]) for i in items} == {
            (champion, challenger, "cat")
        }
        assert {i["predicted"] for i in items} == {"dog", "fox"}  # the champion's (right) answers, both kept
        assert all(0 < i["challenger_confidence"] < 1 for i in items)
        for i in items:  # a person labels them: the champion was right, the challenger wrong
            assert client.post(f"/review/{i['id']}", json={"label": i["predicted"]}).status_code == 200
        wait_for(lambda: metric(client, 'visionflow_reviewed_images{role="challenger"}') == 20, "the monitor")
        assert metric(client, 'visionflow_reviewed_accuracy{role="challenger"}') == 0
        assert metric(client, 'visionflow_reviewed_images{role="champion"}') == 20
        assert metric(client, 'visionflow_reviewed_accuracy{role="champion"}') == 1


def test_canary_share_follows_the_seeded_draw(registry, tmp_path):
    proj, p, champion, challenger = params(registry, tmp_path, "cat", canary_fraction=0.3)
    with TestClient(create_app(p, proj, watch=False)) as client:
        served = [predict(client, 0, seed)["model_version"] for seed in range(100)]
    rng = random.Random(p.base.seed)  # one draw per request (the shadow is off)
    assert served == [challenger if rng.random() < 0.3 else champion for _ in range(100)]
    assert 15 <= served.count(challenger) <= 45


def review_all(client, answers: list[tuple[int, dict]]) -> None:
    for k, a in answers:
        assert a["review_id"] is not None  # review_threshold 1: every answer is queued
        r = client.post(f"/review/{a['review_id']}", json={"label": CLASSES[k]})
        assert r.status_code == 200, r.text


def wait_for(condition, what: str, timeout_s: float = 60) -> None:
    end = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_worse_canary_is_rolled_back_and_stays_back_after_restart(registry, tmp_path, caplog):
    proj, p, champion, challenger = params(
        registry,
        tmp_path,
        "cat2",
        canary_fraction=0.5,
        canary_min_reviewed=15,
        review_threshold=1.0,
        reload_interval_s=0.1,
    )
    client_ = mlflow.MlflowClient()
    with TestClient(create_app(p, proj, watch=False)) as client:
        answers = [(seed % 3, predict(client, seed % 3, seed)) for seed in range(60)]
        served = [a["model_version"] for _, a in answers]
        assert served.count(challenger) >= 15 and served.count(champion) >= 15
        review_all(client, answers)
        wait_for(lambda: metric(client, "visionflow_canary_rollbacks_total") == 1, "the rollback")
        assert {predict(client, 1, seed)["model_version"] for seed in range(20)} == {champion}  # at once
    assert client_.get_model_version(p.registry.model_name, challenger).tags[CANARY_TAG] == "rolled_back"
    assert f"rolled back challenger v{challenger}" in caplog.text
    with TestClient(create_app(p, proj, watch=False)) as client:  # a restarted server: no canary
        assert {predict(client, 1, seed)["model_version"] for seed in range(20)} == {champion}


def test_canary_no_worse_is_kept(registry, tmp_path):
    proj, p, champion, challenger = params(
        registry,
        tmp_path,
        "oracle2",
        canary_fraction=0.5,
        canary_min_reviewed=15,
        review_threshold=1.0,
        reload_interval_s=0.1,
    )
    with TestClient(create_app(p, proj, watch=False)) as client:
        answers = [(seed % 3, predict(client, seed % 3, seed)) for seed in range(60)]
        n_new = sum(a["model_version"] == challenger for _, a in answers)
        review_all(client, answers)
        # the gauges are set after the rule is judged: once they count every review, the rule saw them all
        wait_for(lambda: metric(client, 'visionflow_reviewed_images{role="challenger"}') == n_new, "the monitor")
        assert metric(client, 'visionflow_reviewed_accuracy{role="challenger"}') == 1.0
        assert metric(client, 'visionflow_reviewed_accuracy{role="champion"}') == 1.0
        assert metric(client, "visionflow_canary_rollbacks_total") == 0
        assert challenger in {predict(client, 1, seed)["model_version"] for seed in range(20)}
    assert CANARY_TAG not in mlflow.MlflowClient().get_model_version(p.registry.model_name, challenger).tags


def test_detection_server_leaves_shadow_and_canary_off(caplog):
    from visionflow.serving.canary import shadow_canary

    p = load_params(REPO / "params.yaml", ["base.task=detection", "serve.shadow=true", "serve.canary_fraction=0.2"])
    assert shadow_canary(p, Path("unused"), None, None, None) is None
    assert "serve.shadow / serve.canary_fraction ignored: shadow and canary serve classification only" in caplog.text


def test_an_old_review_queue_gains_the_challenger_columns(tmp_path):
    db = tmp_path / "review" / "queue.db"
    db.parent.mkdir()
    with sqlite3.connect(db) as c:  # the schema before budgets and the shadow
        c.execute(
            "CREATE TABLE items (id TEXT PRIMARY KEY, created REAL, model_version TEXT, predicted TEXT, "
            "confidence REAL, probabilities TEXT, image TEXT, status TEXT, label TEXT, reviewed_at REAL)"
        )
        c.execute("INSERT INTO items VALUES ('old1', 1.0, '1', 'cat', 0.4, '{}', 'old1.png', 'pending', NULL, NULL)")
    queue = ReviewQueue(tmp_path / "review", tmp_path / "reviewed", budget=None)
    new = queue.add(
        b"png",
        model_version="1",
        predicted="dog",
        confidence=0.9,
        probabilities={"cat": 0.1, "dog": 0.9},
        challenger={"version": "2", "predicted": "cat", "confidence": 0.6},
    )
    items = {i["id"]: i for i in queue.pending()}
    assert items["old1"]["challenger_version"] is None
    assert (items[new]["challenger_version"], items[new]["challenger_predicted"]) == ("2", "cat")


def test_after_runs_a_challenger_of_another_input_size_on_the_upload_again(tmp_path):
    """BatchInference on its own, as an inference process runs it: answers first, the shadow only in after()."""
    from visionflow.config import Params
    from visionflow.data.imageio import DecodeRules
    from visionflow.onnxrt import ort_session
    from visionflow.serving.champion import LoadedModel
    from visionflow.serving.inference import BatchInference, ClassifyImages, Job
    from visionflow.serving.predictions import PredictionLog
    from visionflow.tools.loadtest.run import multipart_body

    def loaded(version: str, path: Path, size: int) -> LoadedModel:
        return LoadedModel(version, ort_session(path), {"image_size": size, "channels": 3, "classes": CLASSES}, {})

    champion = loaded("1", oracle(tmp_path / "oracle.onnx"), SIZE)
    challenger = loaded("2", constant_cat(tmp_path / "cat.onnx", 24), 24)
    cfg = Params().serve
    queue = ReviewQueue(tmp_path / "review", tmp_path / "reviewed", budget=None)
    infer = BatchInference(
        cfg,
        DecodeRules.from_params(Params().validation, cfg),
        {"classification": ClassifyImages(cfg, queue)},
        PredictionLog(tmp_path / "log.jsonl"),
    )
    bodies = [multipart_body(grey_png(k, k)) for k in range(3)]
    jobs = [Job(champion, body, ctype.encode(), 1, shadow=challenger) for body, ctype in bodies]
    outcomes = infer(jobs)
    assert [json.loads(answer)["label"] for _, answer in outcomes] == CLASSES
    assert queue.count() == 0  # nothing of the shadow's yet: it waits for after()
    assert infer.after() == {"shadow_requests": 3, "agree": 1, "disagree": 2, "unqueued": 0, "failed": 0}
    assert infer.after() is None  # once per call
    wait_for(lambda: queue.count() == 2, "the background writes")
    assert {(i["predicted"], i["challenger_predicted"]) for i in queue.pending()} == {("dog", "cat"), ("fox", "cat")}
