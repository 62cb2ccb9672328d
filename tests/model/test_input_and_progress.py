"""A user's RGB folder trains in colour with the repo's default params, the decision is logged and recorded with
the run's params, and every epoch writes a plain log line (visible when piped, without a terminal)."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from bench.user_folder import make_user_folder
from tests.helpers import make_project, use_mlflow
from visionflow import stages
from visionflow.config import load_params

pytestmark = pytest.mark.slow

EPOCH_LINE = re.compile(
    r"epoch (\d+)/(\d+) \(step \d+/\d+\): train loss [\d.]+ acc [\d.]+, val loss [\d.]+ "
    r"acc [\d.]+, \d+ images/s, elapsed \d+m\d\ds, ETA \d+m\d\ds"
)
TINY = {"model": "test_resnet", "image_size": 16, "batch_size": 16, "max_epochs": 2, "num_workers": 0}


def user_project(root: Path, **folder) -> Path:
    src = make_user_folder(
        root / "images", per_class=16, n_classes=3, min_side=20, max_side=48, debris=False, symlinks=False, **folder
    )
    # train.channels is not overridden: the repo's default applies
    proj = make_project(
        root / "proj", src, train=TINY, registry={"tracking_uri": f"sqlite:///{root / 'proj' / 'mlflow.db'}"}
    )
    p = load_params(proj / "params.yaml")
    stages.ingest_stage(p, proj)
    stages.validate_stage(p, proj, None)
    stages.split_stage(p, proj)
    return proj


@pytest.fixture(autouse=True)
def _no_env_tracking(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def test_rgb_folder_trains_in_colour_and_logs_every_epoch(tmp_path, caplog):
    proj = user_project(tmp_path)
    p = load_params(proj / "params.yaml")
    use_mlflow(p, proj)
    with caplog.at_level(logging.INFO, logger="visionflow.training.train"):
        res = stages.train_stage(p, proj, "dv-rgb", progress=False)
    assert res.channels == 3 and "auto -> 3" in res.input_decision
    from visionflow.training.train import load_classifier

    assert load_classifier(proj / "models/model.ckpt").hparams.channels == 3

    lines = [r.getMessage() for r in caplog.records if r.name == "visionflow.training.train"]
    assert any(line.startswith("train.channels auto -> 3 (colour)") for line in lines), lines
    epochs = [m for m in map(EPOCH_LINE.search, lines) if m]
    assert [int(m[1]) for m in epochs] == [1, 2] and all(int(m[2]) == 2 for m in epochs), lines

    mlflow.set_tracking_uri(f"sqlite:///{proj / 'mlflow.db'}")
    params = mlflow.MlflowClient().get_run(res.mlflow_run_id).data.params
    assert params["train.channels"] == "3" and "auto -> 3" in params["train.channels_decision"]


def test_piped_cli_training_prints_the_decision_and_epoch_lines(tmp_path):
    """`visionflow train 2>&1 | cat`: no terminal, and still one line per epoch (a grey folder: auto -> 1)."""
    proj = user_project(tmp_path, grey_fraction=1.0)
    exe = Path(sys.executable).with_name("visionflow")
    proc = subprocess.run(
        f"set -o pipefail; '{exe}' --set train.max_epochs=3 train 2>&1 | cat",
        shell=True,
        executable="/bin/bash",
        cwd=proj,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout
    assert "train.channels auto -> 1 (grey)" in proc.stdout, proc.stdout
    assert [int(m[1]) for m in EPOCH_LINE.finditer(proc.stdout)] == [1, 2, 3], proc.stdout
