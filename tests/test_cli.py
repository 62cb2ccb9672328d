"""End-to-end: the real `visionflow` command in a throwaway project with its own git and DVC repo."""

import json
from pathlib import Path

import pytest
import yaml

from tests.conftest import make_folder_dataset, make_project, run_cli
from visionflow.validate import read_manifest


def _no_traceback(proc):
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr


def test_help_lists_every_stage(tmp_path):
    proc = run_cli(tmp_path, "--help")
    for cmd in ("ingest", "version", "validate", "split", "pipeline"):
        assert cmd in proc.stdout


@pytest.mark.parametrize("args, message", [(["registry"], "No such command 'registry'"),
                                           (["train", "--bogus"], "No such option: --bogus")])
def test_a_mistyped_command_or_option_is_a_usage_error_not_a_traceback(tmp_path, args, message):
    proc = run_cli(tmp_path, *args, check=False)
    assert proc.returncode == 2 and message in proc.stderr
    _no_traceback(proc)


@pytest.mark.slow
def test_stages_end_to_end(tmp_path):
    src = make_folder_dataset(tmp_path / "images", per_class=30)
    proj = make_project(tmp_path / "proj", src)
    run_cli(proj, "ingest")
    ver = run_cli(proj, "version")
    lock = yaml.safe_load((proj / "dvc.lock").read_text())
    data_version = lock["stages"]["ingest"]["outs"][0]["md5"].removesuffix(".dir")
    assert data_version in ver.stdout
    assert any((tmp_path / "proj" / "remote").rglob("*")), "nothing pushed to the DVC remote"
    run_cli(proj, "validate")
    summary = json.loads((proj / "reports/validation/validation.json").read_text())
    assert summary["data_version"] == data_version and summary["n_accepted"] == 90
    run_cli(proj, "split")
    sizes = {s: len(read_manifest(proj / f"data/splits/{s}.csv")) for s in ("train", "val", "test")}
    assert sum(sizes.values()) == 90 and sizes["test"] > 0
    # `dvc repro` agrees: ingest and validate are recorded, so a repro after the flow-style run reruns nothing
    # that the data did not change. (Here validate/split were run by hand, so commit them first.)
    run_cli(proj, "ingest")  # unchanged source: skipped, data version unchanged
    assert "skipped" in run_cli(proj, "ingest").stdout


def test_malformed_params_is_a_clear_error(tmp_path):
    (tmp_path / "params.yaml").write_text("data:\n  source: [unclosed\n")
    proc = run_cli(tmp_path, "ingest", check=False)
    assert proc.returncode == 2 and "not valid YAML" in proc.stderr
    _no_traceback(proc)
    (tmp_path / "params.yaml").write_text("data:\n  sorce: x\n")
    proc = run_cli(tmp_path, "validate", check=False)
    assert proc.returncode == 2 and "data.sorce: unknown key" in proc.stderr and "source" in proc.stderr
    _no_traceback(proc)


def test_missing_data_folder_is_a_clear_error(tmp_path):
    proj = make_project(tmp_path / "proj", tmp_path / "does-not-exist")
    proc = run_cli(proj, "ingest", check=False)
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    _no_traceback(proc)
    proc = run_cli(proj, "validate", check=False)
    assert proc.returncode == 2 and "run `visionflow ingest` first" in proc.stderr


def test_empty_class_folder_is_a_clear_error(tmp_path):
    src = make_folder_dataset(tmp_path / "images", per_class=5)
    (src / "empty_class").mkdir()
    proj = make_project(tmp_path / "proj", src)
    proc = run_cli(proj, "ingest", check=False)
    assert proc.returncode == 2 and "empty_class" in proc.stderr
    _no_traceback(proc)
    assert not (proj / "data/raw").exists(), "a failed ingest must not leave a half-written data/raw"


def test_validation_gate_stops_with_readable_report(tmp_path):
    src = make_folder_dataset(tmp_path / "images", per_class=12)
    for i in range(5):
        (src / "dog" / f"junk{i}.jpg").write_bytes(b"not an image")
    proj = make_project(tmp_path / "proj", src, validate={"max_quarantine_fraction": 0.05})
    run_cli(proj, "ingest")
    proc = run_cli(proj, "validate", check=False)
    assert proc.returncode == 2
    assert "5 of 41 images quarantined" in proc.stderr and "max_quarantine_fraction" in proc.stderr
    _no_traceback(proc)
    assert len(read_manifest(proj / "data/quarantine/reasons.csv")) == 5
    assert "FAILED" in (proj / "reports/validation/index.html").read_text()


def test_class_expectations_fail_on_tiny_or_unbalanced_class(tmp_path):
    src = make_folder_dataset(tmp_path / "images", per_class=40)
    for f in sorted((src / "fox").iterdir())[3:]:
        f.unlink()
    proj = make_project(tmp_path / "proj", src)
    run_cli(proj, "ingest")
    proc = run_cli(proj, "validate", check=False)
    assert proc.returncode == 2
    assert "too_few_images_in_class: fox" in proc.stderr and "class_imbalance: fox" in proc.stderr


def test_unknown_label_is_quarantined(tmp_path):
    src = make_folder_dataset(tmp_path / "images", classes=("cat", "dog", "fox"), per_class=20)
    proj = make_project(tmp_path / "proj", src, data={"labels": ["cat", "dog"]},
                        validate={"max_quarantine_fraction": 0.5})
    run_cli(proj, "ingest")
    run_cli(proj, "validate")
    reasons = read_manifest(proj / "data/quarantine/reasons.csv")
    assert set(reasons["reason"]) == {"unknown_label"} and len(reasons) == 20


def test_set_override_and_check_params(tmp_path):
    proj = make_project(tmp_path / "proj", tmp_path)
    proc = run_cli(proj, "--set", "train.max_epochs=2", "check-params")
    assert json.loads(proc.stdout.split("params digest")[0])["train"]["max_epochs"] == 2
    proc = run_cli(proj, "--set", "train.optimizer=adam", "check-params", check=False)
    assert proc.returncode == 2 and "train.optimizer" in proc.stderr and "'adamw'" in proc.stderr


def test_dvc_repro_runs_the_same_stages(tmp_path):
    src = make_folder_dataset(tmp_path / "images", per_class=15)
    proj = make_project(tmp_path / "proj", src)
    import os
    import subprocess
    import sys

    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=proj, check=True, env=env)
    # The data stages only: the model stages behind them are covered by the model tier.
    first = subprocess.run([sys.executable, "-m", "dvc", "repro", "split"], cwd=proj, capture_output=True, text=True,
                           env=env)
    assert first.returncode == 0, first.stderr
    assert (proj / "data/splits/test.csv").exists()
    second = subprocess.run([sys.executable, "-m", "dvc", "repro", "split"], cwd=proj, capture_output=True, text=True,
                            env=env)
    assert second.returncode == 0 and "didn't change, skipping" in second.stdout
