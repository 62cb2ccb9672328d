"""The pipeline's demo loop on a user's small folder (issue 21, item 14): its batches shrink to fit the held-out
images, or it is skipped with a note; it never asks for more images than there are.

Cheap on purpose: a 120-image folder through the real ingest, validate and split stages, an untrained champion
registered directly (training is tested elsewhere), and the cool-down already claimed so that the drift alarm
does not start a retraining. The flow, the simulated batches and the drift check are the real ones.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from bench.user_folder import make_user_folder
from tests.helpers import make_project, register_champion
from visionflow import stages
from visionflow.config import load_params
from visionflow.monitoring import ledger as monitor
from visionflow.paths import ProjectPaths

pytestmark = [pytest.mark.slow, pytest.mark.flow]


@pytest.fixture(scope="module")
def small_project(tmp_path_factory, harness):
    import os

    os.environ.pop("MLFLOW_TRACKING_URI", None)
    root = tmp_path_factory.mktemp("small")
    src = make_user_folder(root / "images", per_class=30, n_classes=4, min_side=20, max_side=40, symlinks=False)
    proj = make_project(
        root / "proj",
        src,
        data={"test_fraction": 0.3},
        train={"image_size": 16},
        drift={"reference_size": 200},
        registry={"tracking_uri": f"sqlite:///{root / 'mlflow.db'}"},
    )
    p = load_params(proj / "params.yaml")
    stages.ingest_stage(p, proj)
    stages.validate_stage(p, proj, None)
    stages.split_stage(p, proj)
    register_champion(proj, p, sorted(pd.read_csv(proj / "data/splits/train.csv")["label"].unique()), channels=3)
    # a retraining already ran within the cool-down: the loop's alarm is recorded, not acted on
    monitor.claim_retraining(
        ProjectPaths.of(p, proj).retrain_ledger, cooldown_s=p.drift.cooldown_hours * 3600, trigger="test"
    )
    return proj, len(pd.read_csv(proj / "data/splits/test.csv"))


def test_the_loop_sizes_its_batches_to_a_small_test_split(small_project):
    from visionflow.flows.monitoring import closed_loop_flow

    proj, n_test = small_project
    assert load_params(proj / "params.yaml").drift.batch_size > n_test  # the default 500 cannot be met
    result = closed_loop_flow(params_path=str(proj / "params.yaml"), overrides=["drift.min_batch_size=5"])
    n = n_test // 2
    assert result["closed_loop"] == {"skipped": False, "batch_size": n, "note": result["closed_loop"]["note"]}
    assert "more than half" in result["closed_loop"]["note"]
    production, holdout = (
        pd.read_csv(Path(b) / "labels.csv") for b in (result["drift"]["batch"], result["retrain"]["holdout_batch"])
    )
    assert len(production) == len(holdout) == n
    assert result["drift"]["drifted"] is not None  # a verdict on the sized batch
    assert result["retrain"]["triggered"] is False
    report = json.loads((proj / "reports/pipeline.json").read_text())
    assert report["closed_loop"]["batch_size"] == n


def test_a_test_split_too_small_for_a_verdict_skips_the_loop_with_a_note(small_project):
    import shutil

    from visionflow.flows.monitoring import closed_loop_flow

    proj, n_test = small_project
    shutil.rmtree(proj / "data/batches", ignore_errors=True)
    result = closed_loop_flow(
        params_path=str(proj / "params.yaml"), overrides=[f"drift.min_batch_size={n_test // 2 + 1}"]
    )
    loop = result["closed_loop"]
    assert loop["skipped"] and "min_batch_size" in loop["note"] and str(n_test) in loop["note"]
    assert not (proj / "data/batches").exists()
    report = json.loads((proj / "reports/pipeline.json").read_text())
    assert report["closed_loop"]["skipped"] is True
