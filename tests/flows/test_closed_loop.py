"""The closed loop on real Fashion-MNIST (small): a champion, simulated batches, drift checks through the CLI and
the Prefect flow, the cool-down (three alarms, one retraining), and bad batches losing nothing."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest

from tests.helpers import make_project, run_cli

pytestmark = [pytest.mark.slow, pytest.mark.flow]


@pytest.fixture(scope="module")
def loop_project(tmp_path_factory, harness):
    import os

    root = tmp_path_factory.mktemp("loop")
    proj = make_project(
        root / "proj",
        root / "unused",
        data={"source": "fashion-mnist", "max_images": 4000},
        train={"max_epochs": 2, "num_workers": 0},
        evaluate={"robustness_images": 100, "severities": [3]},
        export={"parity_images": 100},
        registry={"tracking_uri": f"sqlite:///{root / 'mlflow.db'}", "accuracy_floor": 0.3, "bootstrap_samples": 200},
        # batch and reference as large as this small test split allows: the distance
        # thresholds are set for the default 500 vs 5,000, tiny samples are noisier
        drift={"batch_size": 300, "reference_size": 600, "warm_start_epochs": 1, "attribution_images": 100},
    )
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    from visionflow.flows.training import training_flow

    first = training_flow(params_path=str(proj / "params.yaml"))
    assert first["registry"]["promoted"], first["registry"]
    return proj, first


def _versions(proj: Path) -> list[str]:
    mlflow.set_tracking_uri(f"sqlite:///{proj.parent / 'mlflow.db'}")
    return sorted(v.version for v in mlflow.MlflowClient().search_model_versions("name='visionflow-classifier'"))


def test_drift_cli_verdicts_and_bad_batches(loop_project):
    proj, _ = loop_project
    run_cli(proj, "simulate", "--shift", "none", "--seed", "3", "--out", "data/batches/ref")
    run_cli(proj, "simulate", "--shift", "noise", "--severity", "5", "--seed", "4", "--out", "data/batches/noisy")
    clean = run_cli(proj, "drift", "data/batches/ref", "--json", check=False)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    noisy = run_cli(proj, "drift", "data/batches/noisy", "--json", check=False)
    assert noisy.returncode == 1, noisy.stdout + noisy.stderr
    verdict = json.loads((proj / "reports/drift/noisy/verdict.json").read_text())
    assert verdict["drifted"] and verdict["drift_share"] >= verdict["threshold"]
    assert set(verdict["views"]) == {"properties", "embedding", "prediction"}
    assert "blur" in verdict["moved"], verdict["moved"]  # noise raises high-frequency energy
    assert verdict["features"]["blur"]["current_mean"] > verdict["features"]["blur"]["reference_mean"]
    assert (proj / verdict["report_html"]).stat().st_size > 10_000 and verdict["mlflow_run_id"]
    assert 0 <= verdict["accuracy"] <= 1  # labels.csv travelled with the batch
    assert verdict["attribution"]["cause"] == "noise", verdict["attribution"]["summary"]
    assert 0 <= verdict["attribution"]["predicted_accuracy"] <= 1

    # Unreadable images: listed in the verdict, left where they were.
    bad = proj / "data/batches/noisy/images"
    (bad / "zero.png").write_bytes(b"")
    (bad / "junk.jpg").write_bytes(b"\x00garbage" * 10)
    mixed = run_cli(proj, "drift", "data/batches/noisy", "--json", check=False)
    assert mixed.returncode == 1
    verdict = json.loads((proj / "reports/drift/noisy/verdict.json").read_text())
    assert verdict["n_unreadable"] == 2 and verdict["n_checked"] == 300
    assert {Path(u["file"]).name for u in verdict["unreadable"]} == {"zero.png", "junk.jpg"}
    assert (bad / "zero.png").exists() and (bad / "junk.jpg").exists()

    # An empty batch and a missing folder: a clear error, exit 2.
    (proj / "data/batches/empty").mkdir()
    empty = run_cli(proj, "drift", "data/batches/empty", check=False)
    assert empty.returncode == 2 and "holds no files" in empty.stderr
    missing = run_cli(proj, "drift", "data/batches/nope", check=False)
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    # A batch of only unreadable images: no verdict, exit 2, files kept.
    only_bad = proj / "data/batches/only-bad"
    only_bad.mkdir()
    (only_bad / "a.png").write_bytes(b"not an image")
    res = run_cli(proj, "drift", str(only_bad), check=False)
    assert res.returncode == 2 and "no verdict" in res.stderr + res.stdout
    assert (only_bad / "a.png").exists()


def test_three_alarms_in_the_cooldown_start_one_retraining(loop_project):
    from visionflow.config import load_params
    from visionflow.flows.monitoring import drift_check_flow
    from visionflow.monitoring import ledger as monitor
    from visionflow.monitoring.simulate import simulate
    from visionflow.paths import ProjectPaths

    proj, first = loop_project
    p = load_params(proj / "params.yaml")
    batch = simulate(p, proj, proj / "data/batches/prod", shift="noise", severity=5, n=150, seed=11).folder
    holdout = simulate(p, proj, proj / "data/batches/holdout", shift="noise", severity=5, n=150, seed=12).folder
    before = _versions(proj)
    outcomes = [
        drift_check_flow(
            params_path=str(proj / "params.yaml"), batch=str(batch), eval_batch=str(holdout), retrain="inline"
        )
        for _ in range(3)
    ]
    assert all(o["drift"]["drifted"] for o in outcomes)
    assert [o["retrain"]["triggered"] for o in outcomes] == [True, False, False]
    assert all(o["retrain"]["event_id"] for o in outcomes)  # every alarm is an event, suppressed or not
    assert len(_versions(proj)) == len(before) + 1  # exactly one retraining registered a model

    ledger = monitor.read_ledger(ProjectPaths.of(p, proj).retrain_ledger)
    granted = [e for e in ledger if e["granted"]]
    assert len(granted) == 1 and len(ledger) == 3 and granted[0]["new_version"] == outcomes[0]["retrain"]["new_version"]

    r = outcomes[0]["retrain"]
    assert r["warm_start"] and r["new_data_version"] != first["data_version"]
    assert r["augment_override"].startswith("train.augment.noise=")  # the attribution's choice reached the retrain
    assert sum(r["reviewed_images_added"].values()) == 150
    assert len(list((proj / "data/raw").glob("*/reviewed__prod__*"))) == 150
    assert r["eval_batch_accuracy"]["n_images"] == 150
    assert r["eval_batch_accuracy"]["champion"] is not None and r["clean_accuracy"]["champion"] is not None
    # The old test split stayed put: champion and challenger were compared on the champion's test images.
    import pandas as pd

    test = pd.read_csv(proj / "data/splits/test.csv", dtype=str)
    assert test["path"].str.contains("reviewed__").sum() > 0
    assert (~test["path"].str.contains("reviewed__")).sum() == first["splits"]["test"]


def test_drift_check_reads_the_serving_prediction_log(loop_project):
    from fastapi.testclient import TestClient

    from visionflow.config import load_params
    from visionflow.monitoring.simulate import simulate
    from visionflow.serving.app import create_app
    from visionflow.serving.predictions import decode_embedding

    proj, _ = loop_project
    p = load_params(proj / "params.yaml")
    batch = simulate(p, proj, proj / "data/batches/served", shift="noise", severity=5, n=60, seed=21)
    log = proj / p.serve.prediction_log
    log.unlink(missing_ok=True)
    with TestClient(create_app(p, proj, watch=False)) as client:
        for f in batch.images:
            r = client.post("/predict", files={"file": (f.name, f.read_bytes(), "image/png")})
            assert r.status_code == 200, r.text
    last = json.loads(log.read_text().splitlines()[-1])
    assert isinstance(last["embedding"], str)  # base64 float32 (serving.predictions.encode_embedding)
    older = {**last, "embedding": decode_embedding(last["embedding"]).tolist()}  # an older server's list: read
    with log.open("a") as fh:
        fh.write(json.dumps(older) + "\n")
        fh.write(json.dumps({**last, "embedding": "not base64!"}) + "\n")  # skipped
        fh.write('{"cut short by a cra')  # a torn last line must not break the check
    res = run_cli(proj, "drift", "--log", "--json", check=False)
    assert res.returncode == 1, res.stdout + res.stderr
    verdict = json.loads(res.stdout)["drift"]
    assert verdict["n_checked"] == 61 and verdict["source"]["kind"] == "prediction_log"
    assert verdict["source"]["skipped_malformed_lines"] == 2
    assert "blur" in verdict["moved"]


def test_closed_loop_reports_drift_and_retraining(loop_project):
    from visionflow.flows.monitoring import closed_loop_flow

    proj, _ = loop_project
    # The previous test's retraining holds the cool-down; a zero window lets this loop retrain again.
    result = closed_loop_flow(params_path=str(proj / "params.yaml"), overrides=["drift.cooldown_hours=0"])
    report = json.loads((proj / "reports/pipeline.json").read_text())
    assert report["drift"]["drifted"] is True and report["drift"]["drift_share"] >= 0.3
    assert "blur" in report["drift"]["features"]
    assert report["drift"]["attribution"]["cause"] == "noise"
    assert report["drift"]["predicted_accuracy"] == report["drift"]["attribution"]["predicted_accuracy"]
    r = report["retrain"]
    assert r["triggered"] and r["new_version"] and isinstance(r["promoted"], bool)
    assert 0 <= r["drifted_accuracy_before"] <= 1 and 0 <= r["drifted_accuracy_after"] <= 1
    if r["promoted"]:
        assert r["drifted_accuracy_after"] == r["eval_batch_accuracy"]["challenger"]
    assert result["retrain"]["holdout_batch"].endswith("holdout-noise5")
    # the simulated reviewer labelled only the budget the default strategy chose (review.budget 200 of 300)
    assert r["review_selection"]["chosen"] == 200 and r["review_selection"]["strategy"] == "uncertainty-diversity"
    assert sum(r["reviewed_images_added"].values()) == 200
