"""Model tier: real Lightning training on tiny generated images, tracked in a real (SQLite) MLflow store."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
import yaml

from tests.helpers import tiny_project, use_mlflow
from visionflow import cli, stages
from visionflow.config import load_params
from visionflow.monitoring.label_audit import SUSPECT_COLUMNS
from visionflow.training.train import train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return tiny_project(tmp_path_factory.mktemp("train"))


@pytest.fixture(autouse=True)
def _no_env_tracking(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def _client(proj: Path) -> mlflow.MlflowClient:
    mlflow.set_tracking_uri(f"sqlite:///{proj / 'mlflow.db'}")
    return mlflow.MlflowClient()


def test_training_logs_params_metrics_tags_and_reuses(project):
    p = load_params(project / "params.yaml")
    use_mlflow(p, project)
    res = stages.train_stage(p, project, "abc123", flow_run_id="flow-1", progress=False)
    assert res.global_step == res.max_steps > 0 and not res.resumed and not res.reused
    assert (project / "models/model.ckpt").is_file()
    run = _client(project).get_run(res.mlflow_run_id)
    assert run.data.params["train.model"] == "test_resnet"
    assert run.data.tags["visionflow.data_version"] == "abc123"
    assert run.data.tags["visionflow.flow_run_id"] == "flow-1"
    assert run.data.tags["visionflow.params_hash"] == p.digest()
    assert run.data.tags["visionflow.git_commit"]
    history = _client(project).get_metric_history(res.mlflow_run_id, "val/acc")
    assert len(history) == res.epochs_completed == 3
    artifacts = {a.path for a in _client(project).list_artifacts(res.mlflow_run_id)}
    assert {"params.resolved.yaml", "run_config.json"} <= artifacts
    again = stages.train_stage(p, project, "abc123", progress=False)
    assert again.reused and again.mlflow_run_id == res.mlflow_run_id


def test_evaluate_writes_reports_and_logs_to_mlflow(project):
    p = load_params(project / "params.yaml")
    use_mlflow(p, project)
    stages.train_stage(p, project, "abc123", progress=False)
    ev = stages.evaluate_stage(p, project)
    assert 0 <= ev.test_accuracy <= 1 and 0 <= ev.robust_accuracy <= 1
    assert set(ev.robustness) == set(p.evaluate.corruptions)
    for f in ("confusion_matrix.png", "worst_errors.png", "robustness.png", "evaluation.json"):
        assert (project / "reports/evaluation" / f).stat().st_size > 0
    run = _client(project).get_run(ev.mlflow_run_id)
    assert run.data.metrics["test/accuracy"] == pytest.approx(ev.test_accuracy)
    assert "visionflow.eval.robust.noise.mean" in run.data.tags and "visionflow.eval.recall.cat" in run.data.tags
    logged = {a.path for a in _client(project).list_artifacts(ev.mlflow_run_id, "evaluation")}
    assert "evaluation/confusion_matrix.png" in logged


def test_same_params_and_seed_give_same_result(project, tmp_path):
    p = load_params(project / "params.yaml")
    use_mlflow(p, project)
    a = train(p=p, root=project, data_version="x", runs_dir=tmp_path / "a", progress=False)
    b = train(p=p, root=project, data_version="x", runs_dir=tmp_path / "b", progress=False)
    assert a.mlflow_run_id != b.mlflow_run_id
    assert a.best_val_acc == b.best_val_acc
    wa = torch.load(a.best_checkpoint, weights_only=False)["state_dict"]
    wb = torch.load(b.best_checkpoint, weights_only=False)["state_dict"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_killed_training_resumes_to_the_same_step_count(tmp_path):
    proj = tiny_project(tmp_path, max_epochs=30, batch_size=4, early_stopping_patience=1000)
    exe = Path(sys.executable).with_name("visionflow")
    proc = subprocess.Popen([str(exe), "train"], cwd=proj, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    ckpts = proj / "runs/train"
    while time.time() < deadline and proc.poll() is None:
        if list(ckpts.glob("*/checkpoints/last.ckpt")):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "training finished before it could be interrupted"
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = json.loads(next(ckpts.glob("*/state.json")).read_text())
    assert state["status"] == "running"
    killed_at = torch.load(next(ckpts.glob("*/checkpoints/last.ckpt")), weights_only=False)["global_step"]
    done = subprocess.run([str(exe), "train"], cwd=proj, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((proj / "reports/train.json").read_text())
    assert report["resumed"] is True and report["mlflow_run_id"] == state["mlflow_run_id"]
    assert 0 < killed_at < report["max_steps"]
    assert report["global_step"] == report["max_steps"] == 23 * 30  # ceil(90 train images / 4) x 30 epochs
    # the training dynamics came through the checkpoint: the margins of the killed part are in the table (a
    # mid-epoch resume sees that epoch's samples in a fresh order, so one may count once more or once less)
    seen = pd.read_csv(proj / "reports/training_dynamics.csv")["epochs"]
    assert abs(int(seen.sum()) - 90 * 30) <= 8 and seen.min() >= 28, (killed_at, seen.describe())


def test_transfer_learning_from_bundled_weights_is_one_params_change(tmp_path):
    proj = tiny_project(
        tmp_path,
        model="mobilenetv2_100",
        pretrained_weights="mobilenetv2_100.imagenet",
        image_size=32,
        channels=3,
        max_epochs=1,
    )
    p = load_params(proj / "params.yaml")
    use_mlflow(p, proj)
    res = stages.train_stage(p, proj, None, progress=False)
    assert res.global_step == res.max_steps
    # The stem came from the ImageNet file, not from random initialisation.
    from visionflow.training.weights import read_state_dict, resolve

    src = read_state_dict(resolve("mobilenetv2_100.imagenet"))
    first_conv = next(v for k, v in src.items() if v.ndim == 4)
    ckpt = torch.load(proj / "models/model.ckpt", weights_only=False)["state_dict"]
    stem = ckpt["net.backbone.conv_stem.weight"]
    assert stem.shape == first_conv.shape
    # One epoch of fine-tuning moves weights only a little from where ImageNet put them.
    assert torch.nn.functional.cosine_similarity(stem.flatten(), first_conv.flatten(), dim=0) > 0.9
    params = yaml.safe_load((proj / "params.yaml").read_text())
    assert params["train"]["pretrained_weights"] == "mobilenetv2_100.imagenet"


def test_a_moved_project_reuses_its_finished_training_run(tmp_path):
    """state.json and the train report name the run's files relative to the project: after the project folder
    moves, the same params and data find the finished run (not a resume, not a new run)."""
    proj = tiny_project(tmp_path)
    store = f"registry.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"  # outside the project: it stays put
    p = load_params(proj / "params.yaml", [store])
    use_mlflow(p, proj)
    first = stages.train_stage(p, proj, "dv", progress=False)
    assert not first.reused and not Path(first.best_checkpoint).is_absolute(), first.best_checkpoint
    moved = proj.rename(tmp_path / "moved")
    again = stages.train_stage(load_params(moved / "params.yaml", [store]), moved, "dv", progress=False)
    assert again.reused and not again.resumed, again
    assert again.mlflow_run_id == first.mlflow_run_id and again.global_step == first.global_step
    assert (moved / again.best_checkpoint).is_file() and (moved / "models/model.ckpt").is_file()


def _audit(proj: Path, capfd, *args: str) -> tuple[int, str, list[str]]:
    """`visionflow --json audit-labels ARGS`: exit code, stdout and stderr's non-empty lines."""
    rc = cli.main(["--params", str(proj / "params.yaml"), "--json", "audit-labels", *args])
    out = capfd.readouterr()
    return rc, out.out, [ln for ln in out.err.splitlines() if ln.strip()]


def test_training_records_dynamics_that_audit_labels_ranks_and_logs(project, capfd):
    p = load_params(project / "params.yaml")
    use_mlflow(p, project)
    res = stages.train_stage(p, project, "abc123", progress=False)
    table = pd.read_csv(project / "reports/training_dynamics.csv")
    train = pd.read_csv(project / "data/splits/train.csv").set_index("path")
    assert list(table.columns) == ["path", "sha256", "label", "aum", "suggested", "epochs"]
    assert sorted(table["path"]) == sorted(train.index) and (table["epochs"] == res.epochs_completed).all()
    assert (table.set_index("path")["sha256"] == train["sha256"]).all()
    logged = {a.path for a in _client(project).list_artifacts(res.mlflow_run_id, "training_dynamics")}
    assert "training_dynamics/training_dynamics.csv" in logged

    rc, out, err = _audit(project, capfd, "--threshold", "1000")  # every sample flagged: the whole ranking
    assert rc == 0, err
    summary = json.loads(out)
    suspects = pd.read_csv(project / "reports/label_audit/suspects-train.csv")
    assert list(suspects.columns) == list(SUSPECT_COLUMNS) and summary["flagged"] == len(suspects) == len(table)
    assert suspects["score"].is_monotonic_increasing and suspects["rank"].tolist() == list(range(1, len(table) + 1))
    assert set(suspects["method"]) == {"aum"} and set(suspects["scope"]) == {"train"}
    assert sum(summary["per_class"].values()) == summary["flagged"] and summary["share_flagged"] == 1.0
    assert (project / "reports/label_audit/grid-train.png").stat().st_size > 0
    logged = {a.path for a in _client(project).list_artifacts(res.mlflow_run_id, "label_audit")}
    assert {"label_audit/suspects-train.csv", "label_audit/grid-train.png"} <= logged
    rc, out, err = _audit(project, capfd)
    assert rc == 0 and json.loads(out)["threshold"] == -2.0, err  # the default (monitoring.audit)
    rc, out, err = _audit(project, capfd, "--threshold", "-1000")  # nothing that low: an empty suspects file
    assert rc == 0 and json.loads(out)["flagged"] == 0, err
    assert pd.read_csv(project / "reports/label_audit/suspects-train.csv").empty


def test_audit_labels_refuses_a_table_of_another_split_or_none(project, capfd, tmp_path):
    p = load_params(project / "params.yaml")
    use_mlflow(p, project)
    stages.train_stage(p, project, "abc123", progress=False)
    split, table = project / "data/splits/train.csv", project / "reports/training_dynamics.csv"
    kept = {f: f.read_bytes() for f in (split, table)}
    try:
        split.write_bytes(kept[split] + b"\n")  # another version of the split (relabelled, re-split, ...)
        rc, _, err = _audit(project, capfd)
        assert rc == 2 and len(err) == 1 and "another version of data/splits/train.csv" in err[0], err
        split.write_bytes(kept[split])
        table.unlink()
        rc, _, err = _audit(project, capfd)
        assert rc == 2 and len(err) == 1 and "run `visionflow train` first" in err[0], err
    finally:
        for f, data in kept.items():
            f.write_bytes(data)
