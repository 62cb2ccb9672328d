"""The parts of a reduced-precision variant that need no registry: params, calibration sample, sanity check."""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers import REPO, run_cli
from visionflow.config import load_params
from visionflow.errors import ConfigError, DataError
from visionflow.registry.quantize import calibration_sample, make_variant, sanity_reasons


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        (["export.quantize=int4"], "export.quantize: got 'int4'; allowed: 'none', 'int8' or 'fp16'"),
        (["export.quantize_max_drop=-0.1"], "export.quantize_max_drop"),
        (["export.quantize_max_drop=2"], "export.quantize_max_drop"),
        (["export.calibration_images=0"], "export.calibration_images"),
        (["base.task=detection", "export.quantize=int8"], "export.quantize is for the classifier only"),
        (["serve.precision=int4"], "serve.precision"),
        (["base.task=detection", "serve.precision=int8"], "serve.precision is for the classifier only"),
    ],
)
def test_bad_quantize_params_are_one_line_config_errors(overrides, says):
    with pytest.raises(ConfigError) as err:
        load_params("params.yaml", overrides)
    assert says in str(err.value) and "\n" not in str(err.value)


def test_default_makes_no_variant():
    assert load_params("params.yaml").export.quantize == "none"


def test_the_server_follows_the_variant_serve_precision_names():
    p = load_params("params.yaml")
    assert p.served_model_name == p.registry.model_name
    assert load_params("params.yaml", ["serve.precision=int8"]).served_model_name == f"{p.registry.model_name}-int8"
    detector = load_params("params.yaml", ["base.task=detection"])
    assert detector.served_model_name == detector.detection.model_name


def test_calibration_sample_spreads_over_classes():
    labels = np.repeat(np.arange(4), [100, 10, 50, 3])
    images = np.arange(len(labels), dtype=np.uint8).reshape(-1, 1, 1, 1)
    picked = calibration_sample(images, labels, 12, seed=0)
    assert len(picked) == 12
    assert np.bincount(labels[picked.ravel()], minlength=4).tolist() == [3, 3, 3, 3]
    assert len(calibration_sample(images, labels, 10_000, seed=0)) == len(labels)


def test_sanity_names_what_is_wrong():
    ok = [np.zeros((4, 3), np.float32), np.zeros((4, 6), np.float32)]
    assert sanity_reasons(ok, ok) == []
    nan = [ok[0].copy(), ok[1]]
    nan[0][1, 2] = np.nan
    assert sanity_reasons(ok, nan) == ["logits: 1 values not finite"]
    assert sanity_reasons(ok, [ok[0][:, :2], ok[1]]) == ["logits shape (4, 2) != fp32 (4, 3)"]


def test_int8_without_calibration_images_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="needs calibration images"):
        make_variant("int8", tmp_path / "missing.onnx", tmp_path / "out.onnx", np.empty((0, 8, 8, 3), np.uint8))


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["quantize"], "export.quantize is none"),
        (["--set", "export.quantize=int8", "--set", "base.task=detection", "quantize"], "classifier only"),
    ],
)
def test_quantize_command_refuses_in_one_line_before_touching_the_registry(args, says):
    proc = run_cli(REPO, *args, check=False)
    assert proc.returncode == 2, proc.stderr
    assert says in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
