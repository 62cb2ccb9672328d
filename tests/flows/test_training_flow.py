"""The training flow under Prefect's test harness (a real temporary Prefect server and database)."""

import json
import os
import re

import pytest

from tests.helpers import make_folder_dataset, make_project

pytestmark = [pytest.mark.slow, pytest.mark.flow]


def _flow_run_logs(flow_run_id: str) -> list[str]:
    """Every log message of a flow run and its task runs, as the Prefect API (and UI) has them."""
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()  # logs are shipped in the background
    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[UUID(flow_run_id)])))
    return [log.message for log in logs]


def test_flow_runs_every_stage_and_reports(tmp_path, harness, monkeypatch):
    from visionflow.flows.training import training_flow

    src = make_folder_dataset(tmp_path / "images", per_class=25)
    (src / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    proj = make_project(
        tmp_path / "proj",
        src,
        validate={"max_quarantine_fraction": 0.1},
        train={"image_size": 16, "max_epochs": 3, "num_workers": 1},
        evaluate={"robustness_images": 20, "severities": [2]},
    )
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(proj)
    # with an int8 variant: the flow makes, registers and judges it after the fp32 model's promotion
    summary = training_flow(params_path=str(proj / "params.yaml"), overrides=["export.quantize=int8"])
    report = json.loads((proj / "reports/pipeline.json").read_text())
    assert report["status"] == "completed"
    assert report["n_images"] == 76 and report["n_quarantined"] == 1
    assert report["data_version"] == summary["data_version"] and len(report["data_version"]) == 32
    assert set(report["stage_seconds"]) >= {
        "ingest",
        "version",
        "validate",
        "split",
        "train",
        "evaluate",
        "export",
        "register",
        "promote",
        "quantize",
    }
    assert report["variant"]["model"] == "visionflow-classifier-int8" and report["variant"]["parent_version"] == "1"
    assert (proj / "reports/quantize/int8.md").is_file()
    assert 0 <= report["test_accuracy"] <= 1 and 0 <= report["robust_accuracy"] <= 1 and report["mlflow_run_id"]
    assert report["onnx"]["top1_agreement"] == 1.0 and report["onnx"]["ort_ms_b1"] > 0
    assert report["registry"]["version"] == "1" and isinstance(report["registry"]["promoted"], bool)
    assert report["total_seconds"] >= sum(report["stage_seconds"].values())
    assert report["flow_run_id"]
    # Training progress reaches the flow run's logs (the Prefect UI), one line per epoch, with the input decision.
    messages = _flow_run_logs(report["flow_run_id"])
    assert any(m.startswith("train.channels auto -> 1 (grey)") for m in messages), messages
    epochs = [m for m in messages if re.match(r"epoch \d+/3 \(step \d+/\d+\): train loss .* images/s, .* ETA", m)]
    assert len(epochs) == 3, messages
    # dvc.lock agrees with the flow, so `dvc status` has nothing to do.
    from visionflow.data.versioning import status_clean

    assert status_clean(proj)
    assert os.listdir(proj / "remote")
