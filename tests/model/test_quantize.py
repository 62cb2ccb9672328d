"""Reduced-precision variants through their gates: a real tiny trained classifier, real ONNX Runtime
quantization, a real MLflow registry (SQLite)."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest

from tests.helpers import tiny_project, use_mlflow
from tests.model.test_registry_promotion import full_cycle
from visionflow import stages
from visionflow.config import load_params
from visionflow.registry.lineage import lineage
from visionflow.registry.store import CHAMPION, alias_version, download_onnx, version_info
from visionflow.registry.variants import quantize_variant

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    proj = tiny_project(tmp_path_factory.mktemp("quantize"), max_epochs=6)
    cycle = full_cycle(proj)
    assert cycle["decision"].promoted
    return proj, cycle["registered"].version


@pytest.fixture(autouse=True)
def _tracking(parent):
    proj, _ = parent
    use_mlflow(load_params(proj / "params.yaml"), proj)


def _params(proj: Path, precision: str):
    return load_params(proj / "params.yaml", [f"export.quantize={precision}"])


def test_int8_variant_passes_its_gates_with_lineage_and_report(parent):
    proj, version = parent
    p = _params(proj, "int8")
    res = quantize_variant(p, proj, version)
    assert res.promoted, res.reasons
    name = f"{p.registry.model_name}-int8"
    assert (res.model, res.parent_version) == (name, version)
    assert alias_version(name, CHAMPION) == res.version
    assert {g.name for g in res.gates} == {
        "sanity",
        "accuracy_drop",
        "no_class_regression",
        "latency",
        "parent_champion",
    }
    assert res.lower_bound >= -p.export.quantize_max_drop
    tags = version_info(name, res.version)["tags"]
    parent_tags = version_info(p.registry.model_name, version)["tags"]
    assert tags["visionflow.parent_model"] == p.registry.model_name
    assert tags["visionflow.parent_version"] == version
    assert tags["visionflow.precision"] == "int8"
    for k in ("data_version", "git_commit", "params_hash"):
        assert tags[f"visionflow.{k}"] == parent_tags[f"visionflow.{k}"]
    assert lineage(f"{name}@champion").derived_from == f"{p.registry.model_name}/{version} (int8)"
    mv = mlflow.MlflowClient().get_model_version(name, res.version)
    assert "| precision | int8 |" in mv.description
    # the side-by-side report: fp32 and the variant, in reports/ and on the variant's run
    rows = json.loads((proj / "reports/quantize/int8.json").read_text())["rows"]
    assert [r["precision"] for r in rows] == ["fp32", "int8"]
    assert rows[1]["size_bytes"] < rows[0]["size_bytes"]
    md = (proj / res.report).read_text()
    assert "| int8 |" in md and "lower bound" in md
    logged = {a.path for a in mlflow.MlflowClient().list_artifacts(res.mlflow_run_id, "quantize")}
    assert logged == {"quantize/int8.md", "quantize/int8.json"}


def test_fp16_variant_is_its_own_model(parent):
    proj, version = parent
    p = _params(proj, "fp16")
    res = quantize_variant(p, proj, version)
    assert res.promoted, res.reasons
    assert res.model == f"{p.registry.model_name}-fp16"
    assert res.rows[1]["top1_agreement"] == 1.0  # half precision moves logits by ~1e-3, not predictions


def test_planted_bad_calibration_is_refused_and_gets_no_alias(parent, tmp_path):
    """Calibrated on constant images, every activation range is a point: the variant's outputs collapse."""
    proj, version = parent
    p = _params(proj, "int8")
    name = f"{p.registry.model_name}-int8"
    champion_before = alias_version(name, CHAMPION)
    card = download_onnx(p.registry.model_name, version, tmp_path)[1]
    constant = np.full((32, card["image_size"], card["image_size"], card["channels"]), 128, dtype=np.uint8)
    res = quantize_variant(p, proj, version, calibration=constant)
    assert not res.promoted
    assert any(r.startswith("accuracy_drop: ") for r in res.reasons), res.reasons
    assert res.lower_bound < -p.export.quantize_max_drop
    assert alias_version(name, CHAMPION) == champion_before != res.version
    tags = version_info(name, res.version)["tags"]
    assert tags["visionflow.promoted"] == "false" and tags["visionflow.gate.accuracy_drop"] == "failed"


def test_variant_of_a_parent_that_is_not_champion_is_refused(parent):
    """A variant serves only a model that passed its own gates: a registered fp32 version that is not its
    model's champion gives a variant that is refused, however good."""
    proj, _ = parent
    p = _params(proj, "fp16")
    unjudged = stages.register_stage(p, proj).version  # registered, never promoted
    res = quantize_variant(p, proj, unjudged)
    assert not res.promoted
    assert [r.split(":")[0] for r in res.reasons] == ["parent_champion"]
