"""What an analyst sees in MLflow: meaningful run names, curves not buried under one-off figures, a model
signature, the model card as the version description, and drift checks that do not fill the artifact store.
Everything runs against a real SQLite MLflow store under tmp."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest

from tests.helpers import champion_project, make_folder_dataset, make_project, use_mlflow
from visionflow import stages
from visionflow.config import load_params
from visionflow.paths import ProjectPaths

pytestmark = pytest.mark.slow  # a registry with a champion takes a while to build; training takes longer

CLASSES = ("cat", "dog", "fox")


def _client(proj: Path) -> mlflow.MlflowClient:
    mlflow.set_tracking_uri(f"sqlite:///{proj / 'mlflow.db'}")
    return mlflow.MlflowClient()


@pytest.fixture(scope="module")
def champion(tmp_path_factory):
    return champion_project(tmp_path_factory.mktemp("readable"))


@pytest.fixture(autouse=True)
def _no_env_tracking(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def test_registered_model_has_a_signature_and_the_card_as_its_description(champion):
    proj, _ = champion
    p = load_params(proj / "params.yaml")
    client = _client(proj)
    mv = client.get_model_version(p.registry.model_name, "1")
    info = mlflow.models.get_model_info(f"models:/{p.registry.model_name}/1")
    sig = info.signature
    assert sig is not None, "no signature: the registry shows 0 inputs/outputs"
    (image,) = sig.inputs.inputs
    assert image.name == "image" and str(image.type) == "uint8" and image.shape == (-1, 1, 16, 16)
    outs = {o.name: o for o in sig.outputs.inputs}
    assert set(outs) == {"logits", "embedding"}
    assert outs["logits"].shape == (-1, len(CLASSES)) and str(outs["logits"].type) == "float32"
    # The card is the human-readable description, not a JSON blob in a tag.
    assert "visionflow.card" not in mv.tags
    for text in ("test_resnet", "dv-test", *CLASSES, "uint8", "16"):
        assert text in mv.description
    # Readers get the card from the model's own metadata (serve and drift load it this way).
    from visionflow.registry.store import download_onnx

    onnx_file, card = download_onnx(p.registry.model_name, "1", proj / "dl")
    assert onnx_file.is_file() and card["classes"] == list(CLASSES) and card["image_size"] == 16


def test_a_drift_check_keeps_its_html_report_local(champion):
    from visionflow.monitoring.drift import check

    proj, batch = champion
    p = load_params(proj / "params.yaml")
    use_mlflow(p, proj)
    verdict = check(p, proj, batch=Path(batch))
    html = proj / verdict["report_html"]
    assert html.stat().st_size > 1_000_000, "evidently's report is the multi-MB file this is about"
    client = _client(proj)
    sizes = {}

    def walk(path=None):
        for a in client.list_artifacts(verdict["mlflow_run_id"], path):
            walk(a.path) if a.is_dir else sizes.__setitem__(a.path, a.file_size)

    walk()
    assert any(path.endswith("verdict.json") for path in sizes), sizes
    assert sum(sizes.values()) < 100_000, f"{sum(sizes.values())} bytes logged per check: {sizes}"
    run = client.get_run(verdict["mlflow_run_id"])
    assert run.data.tags["visionflow.report_html"] == verdict["report_html"]


# --- training runs: names and metric layout (trains a tiny model) ------------------------------------------

TINY_TRAIN = {
    "model": "test_resnet",
    "image_size": 16,
    "channels": 1,
    "batch_size": 16,
    "max_epochs": 2,
    "num_workers": 0,
    "lr": 0.01,
    "early_stopping_patience": 10,
}


def test_training_runs_have_meaningful_names_and_curves_are_not_buried(tmp_path):
    src = make_folder_dataset(tmp_path / "images", classes=CLASSES, per_class=20)
    proj = make_project(
        tmp_path / "proj",
        src,
        train=TINY_TRAIN,
        registry={"tracking_uri": f"sqlite:///{tmp_path / 'proj' / 'mlflow.db'}"},
        evaluate={"robustness_images": 15, "severities": [1, 5]},
    )
    p = load_params(proj / "params.yaml")
    stages.ingest_stage(p, proj)
    stages.validate_stage(p, proj, None)
    stages.split_stage(p, proj)
    use_mlflow(p, proj)
    runs = {}
    # Same seed, different params and data versions: MLflow's seeded random names used to repeat.
    for data_version, lr in (("a1b2c3d4e5f6", 0.01), ("a1b2c3d4e5f6", 0.02), ("0f9e8d7c6b5a", 0.01)):
        q = load_params(proj / "params.yaml", [f"train.lr={lr}"])
        res = stages.train_stage(q, proj, data_version, progress=False)
        runs[res.mlflow_run_id] = (q, data_version)
    client = _client(proj)
    names = {client.get_run(r).info.run_name for r in runs}
    assert len(names) == len(runs), names
    for run_id, (q, data_version) in runs.items():
        name = client.get_run(run_id).info.run_name
        assert name.startswith("test_resnet-") and data_version[:8] in name and q.digest()[:8] in name, name

    stages.evaluate_stage(q, proj)
    stages.export_stage(q, proj)
    run_id = json.loads(ProjectPaths.of(q, proj).train_report.read_text())["mlflow_run_id"]
    run = client.get_run(run_id)
    # system/ metrics are sampled every train.system_metrics_interval_s: a run this short has one sample of each
    single = sorted(
        k for k in run.data.metrics if not k.startswith("system/") and len(client.get_metric_history(run_id, k)) == 1
    )
    curves = sorted(k for k in run.data.metrics if len(client.get_metric_history(run_id, k)) > 1)
    assert {"train/loss_epoch", "val/acc", "val/loss"} <= set(curves), curves
    # A handful of headline figures (comparable across runs in the table view), not dozens of one-point charts.
    assert set(single) <= {
        "test/accuracy",
        "test/macro_f1",
        "test/ece",
        "robust/accuracy",
        "perf/images_per_s",
        "perf/busy_fraction",
        "perf/time_to_first_step_s",
        "perf/time_to_first_step_after_cache_s",
        "perf/cache_s",
    }, single
    assert run.data.metrics["test/accuracy"] >= 0
    # The detail moved, it was not dropped: per-class, per-corruption and ONNX figures are in params and tags.
    assert "evaluation/evaluation.json" in {a.path for a in client.list_artifacts(run_id, "evaluation")}
    for c in CLASSES:
        assert f"visionflow.eval.recall.{c}" in run.data.tags
    assert any(k.startswith("visionflow.eval.robust.noise") for k in run.data.tags)
    assert "visionflow.onnx.ort_ms_b1" in run.data.tags
