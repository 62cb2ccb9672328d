"""Detection through the same flows as classification: the training flow (ingest -> ... -> promote) on a few
bundled scenes, then the closed loop (a shifted batch, drift, retraining on the reviewed boxes, the gate), each
under a real temporary Prefect server, MLflow store and DVC repository. Tiny sizes: this proves the wiring, the
figures at the default size are in the issue note and README."""

import json

import pytest

from tests.helpers import make_project

pytestmark = [pytest.mark.slow, pytest.mark.flow]


def _project(tmp_path):
    return make_project(
        tmp_path / "proj",
        tmp_path / "unused",  # data.source is classification's; detection reads detection.source
        base={"task": "detection"},
        validate={"min_images_per_class": 1, "min_class_balance": 0.0},
        detection={
            "scenes": 48,
            "scene_size": 64,
            "image_size": 64,
            "max_objects": 2,
            "max_epochs": 1,
            "batch_size": 8,
            "map_floor": 0.0,  # one epoch on 34 scenes finds little; the floor gate is tested in tests/model
            "robustness_images": 10,
            "latency_budget_ms": 60000,
        },
        train={"num_workers": 0},
        evaluate={"severities": [3], "corruptions": ["noise"]},
        export={"parity_images": 8},
        drift={
            "batch_size": 24,
            "min_batch_size": 10,
            "warm_start_epochs": 1,
            "numeric_method": "ks",
            "numeric_threshold": 0.05,
        },
        registry={"bootstrap_samples": 200},
    )


def test_detection_pipeline_and_closed_loop(tmp_path, harness, monkeypatch):
    from visionflow.flows.monitoring import closed_loop_flow
    from visionflow.flows.training import training_flow

    proj = _project(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(proj)
    training_flow(params_path=str(proj / "params.yaml"))
    report = json.loads((proj / "reports/pipeline.json").read_text())
    assert report["status"] == "completed" and report["n_images"] == 48
    assert sum(report["splits"].values()) == 48
    assert 0 <= report["test_map_50"] <= 1 and 0 <= report["robust_map_50"] <= 1
    assert set(report["per_class_ap_50"]) and report["train"]["monitor"] == "val mAP@0.5"
    assert report["onnx"]["n_images"] == 8 and report["onnx"]["worst_iou"] >= 0.99
    reg = report["registry"]
    assert (reg["model"], reg["version"], reg["promoted"], reg["metric"]) == (
        "visionflow-detector",
        "1",
        True,
        "mAP@0.5",
    )
    assert (proj / "reports/evaluation/pr_curves.png").is_file()
    assert (proj / "reports/evaluation/worst_detections.png").is_file()
    card = json.loads((proj / "models/onnx/model_card.json").read_text())
    assert card["task"] == "detection"

    loop = closed_loop_flow(params_path=str(proj / "params.yaml"))
    drift, retrain = loop["drift"], loop["retrain"]
    assert drift["drifted"] is True and drift["features"]  # sensor noise at severity 5 moves the image properties
    assert retrain["triggered"] and retrain["new_version"] == "2"
    # a quarter of detection.scenes (12), within drift.min_batch_size and drift.batch_size
    assert loop["closed_loop"]["batch_size"] == 12 and retrain["reviewed_images_added"] == {"images": 12}
    assert retrain["new_data_version"] != report["data_version"]
    assert retrain["metric"] == "mAP@0.5" and isinstance(retrain["drifted_metric_before"], float)
    reviewed = sorted((proj / "data/reviewed/detection").glob("*.json"))
    assert len(reviewed) == 12
    doc = json.loads((proj / "data/raw/annotations.json").read_text())
    assert len(doc["images"]) == 48 + 12  # the reviewed batch joined the next data version with its boxes
