"""End-to-end: the real `visionflow` command in a throwaway project with its own git and DVC repo."""

import json
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO, make_folder_dataset, make_project, run_cli
from visionflow.data.validate import read_manifest


def _no_traceback(proc):
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr


def test_help_lists_every_stage(tmp_path):
    proc = run_cli(tmp_path, "--help")
    for cmd in ("ingest", "version", "validate", "split", "pipeline"):
        assert cmd in proc.stdout


@pytest.mark.parametrize(
    "args, message", [(["registry"], "No such command 'registry'"), (["train", "--bogus"], "No such option: --bogus")]
)
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
    proj = make_project(
        tmp_path / "proj", src, data={"labels": ["cat", "dog"]}, validate={"max_quarantine_fraction": 0.5}
    )
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
    first = subprocess.run(
        [sys.executable, "-m", "dvc", "repro", "split"], cwd=proj, capture_output=True, text=True, env=env
    )
    assert first.returncode == 0, first.stderr
    assert (proj / "data/splits/test.csv").exists()
    second = subprocess.run(
        [sys.executable, "-m", "dvc", "repro", "split"], cwd=proj, capture_output=True, text=True, env=env
    )
    assert second.returncode == 0 and "didn't change, skipping" in second.stdout


# --- every error path of the registry and drift commands: exit 2 and one line (exit 1 means refused/drifted) ---


@pytest.fixture(scope="module")
def _registry_template(tmp_path_factory):
    """A local SQLite store with v1 as champion and previous, v2 as challenger, and their model files gone from
    the artifact store, as after a lost disk or a pruned bucket."""
    import mlflow

    root = tmp_path_factory.mktemp("registry")
    db = root / "mlflow.db"
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}", registry_uri=f"sqlite:///{db}")
    name = yaml.safe_load((REPO / "params.yaml").read_text())["registry"]["model_name"]
    client.create_registered_model(name)
    card = json.dumps({"classes": ["a", "b"], "image_size": 16, "channels": 1})
    for v in ("1", "2"):
        client.create_model_version(name, source=str(root / "lost" / v))
        client.set_model_version_tag(name, v, "visionflow.card", card)
    client.set_registered_model_alias(name, "champion", "1")
    client.set_registered_model_alias(name, "previous", "1")
    client.set_registered_model_alias(name, "challenger", "2")
    return db, name


@pytest.fixture
def registry_project(_registry_template, tmp_path, monkeypatch):
    """A project using a fresh copy of that store as its local registry."""
    import shutil

    template, name = _registry_template
    proj = make_project(tmp_path / "proj", tmp_path / "images")
    (proj / "mlruns").mkdir()
    shutil.copy(template, proj / "mlruns/mlflow.db")
    import mlflow

    uri = f"sqlite:///{proj / 'mlruns/mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # restored afterwards
    mlflow.set_tracking_uri(uri)  # an earlier in-process command may have pointed MLflow's global elsewhere
    (proj / "batch").mkdir()
    return proj, name


def _fails_with_one_line(capfd, proj, *args, needle):
    from visionflow import cli

    rc = cli.main(["--params", str(proj / "params.yaml"), *args])
    err = capfd.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, (rc, err)
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], err


@pytest.mark.parametrize(
    "args, needle",
    [
        (["promote", "--version", "99"], "has no version '99'"),
        (["promote", "--version", "abc"], "has no version 'abc'"),
        (["promote", "--version", "1"], "could not be fetched"),  # the champion's files are gone
        (["promote"], "could not be fetched"),  # the challenger's too
        (["rollback"], "nothing"),  # champion and previous are the same version
        (["lineage", "visionflow-classifier/99"], "has no version"),
        (["lineage", "nosuchmodel@champion"], "no alias"),
        (["lineage", "garbage"], "MODEL@ALIAS"),
        (["drift", "batch"], "could not be fetched"),
        (["drift", "no-such-folder"], "no-such-folder"),
        (["drift-eval", "--batches", "2"], "could not be fetched"),
        (["retrain", "--batch", "no-such-folder"], "no-such-folder"),
        (["retrain", "--eval-batch", "no-such-folder"], "no-such-folder"),
        (["drift", "no-such-folder", "--retrain", "inline"], "no-such-folder"),
    ],
)
def test_registry_and_drift_errors_exit_2_with_one_line(registry_project, capfd, monkeypatch, args, needle):
    proj, _ = registry_project
    monkeypatch.chdir(proj)
    _fails_with_one_line(capfd, proj, *args, needle=needle)


def test_a_usage_error_exits_2(registry_project, capfd, monkeypatch):
    from visionflow import cli

    proj, _ = registry_project
    monkeypatch.chdir(proj)
    assert cli.main(["drift-eval", "--batches", "0"]) == 2
    err = capfd.readouterr().err
    assert "--batches" in err and "Traceback" not in err


def test_a_read_only_or_empty_registry_exits_2(registry_project, capfd, monkeypatch):
    from tests.helpers import make_read_only

    proj, name = registry_project
    monkeypatch.chdir(proj)
    import mlflow

    mlflow.MlflowClient().delete_registered_model_alias(name, "previous")  # the fixture's store
    _fails_with_one_line(capfd, proj, "rollback", needle="no previous alias")
    mlflow.MlflowClient().set_registered_model_alias(name, "previous", "2")
    make_read_only(proj / "mlruns/mlflow.db")
    _fails_with_one_line(capfd, proj, "rollback", needle="readonly database")
    _fails_with_one_line(capfd, proj, "--set", "registry.model_name=other", "promote", needle="no challenger")


def test_an_unexpected_failure_is_one_line_and_exit_2_not_1(registry_project, capfd, monkeypatch):
    """The safety net: a failure no code anticipated (here a tag that is not a number) must not exit 1."""
    import mlflow

    proj, name = registry_project
    monkeypatch.chdir(proj)
    mlflow.MlflowClient().set_model_version_tag(name, "1", "visionflow.metric.test_accuracy", "not-a-number")
    _fails_with_one_line(capfd, proj, "lineage", f"{name}@champion", needle="VISIONFLOW_DEBUG")
    monkeypatch.setenv("VISIONFLOW_DEBUG", "1")
    from visionflow import cli

    assert cli.main(["--params", str(proj / "params.yaml"), "lineage", f"{name}@champion"]) == 2
    assert "Traceback" in capfd.readouterr().err


@pytest.mark.parametrize(
    "args, needle, command",
    [
        (["--bogus"], "No such option: --bogus", "visionflow"),
        (["train", "--nope"], "No such option: --nope", "visionflow train"),
        (["nosuchcmd"], "No such command 'nosuchcmd'", "visionflow"),
        (["lineage"], "Missing argument", "visionflow lineage"),
        (["--set"], "requires an argument", "visionflow"),
        (["drift", "--batch", "x"], "No such option: --batch", "visionflow drift"),
        (["serve", "--port", "eighty"], "Invalid value for '--port'", "visionflow serve"),
        (["--params"], "requires an argument", "visionflow"),
    ],
)
def test_a_mistyped_command_line_is_one_line_naming_the_help_to_read(capfd, args, needle, command):
    from visionflow import cli

    rc = cli.main(args)
    err = capfd.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, (rc, err)
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], err
    assert f"`{command} --help`" in lines[0], err
