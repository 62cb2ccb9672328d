"""The CLI as scripts and pipes see it: global options before or after the command, plain uncut output when
stdout is a pipe, --json everywhere, and no stray progress bars."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.helpers import REPO, champion_project
from visionflow.cli import app, main

# Each command with the arguments it needs to get as far as reading params.yaml.
COMMANDS = [["ingest"], ["version"], ["validate"], ["split"], ["train"], ["evaluate"], ["export"], ["register"],
            ["promote"], ["rollback"], ["lineage", "m@champion"], ["serve"], ["loadtest"], ["simulate"],
            ["drift", "some-batch"], ["drift-eval"], ["check-params"]]


def _set_forms(rng: np.random.Generator, override: str) -> list[str]:
    """One of the spellings click accepts for a repeatable option with a value."""
    return [["--set", override], [f"--set={override}"], ["-s", override], [f"-s{override}"]][rng.integers(4)]


@pytest.fixture
def project(tmp_path, monkeypatch):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "alt.yaml").write_text(yaml.safe_dump({**params, "base": {**params["base"], "seed": 7}}))
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[0])
def test_set_and_params_are_accepted_after_every_command(project, capsys, command):
    """The override reaches the params every command reads: a bad key given after the command is reported as
    a params error (not "No such option"), whichever spelling is used."""
    rng = np.random.default_rng(zlib.crc32(command[0].encode()))
    for _ in range(3):
        bad = f"data.n{rng.integers(10**6)}"
        assert main([*command, *_set_forms(rng, f"{bad}=1")]) == 2
        err = capsys.readouterr().err
        assert f"{bad}: unknown key" in err and "No such option" not in err, err
    missing = project / f"missing-{rng.integers(10**6)}.yaml"
    assert main([*command, "--params", str(missing)]) == 2
    assert f"{missing}: params file not found" in capsys.readouterr().err


def test_overrides_before_and_after_the_command_combine_and_the_later_wins(project, capsys):
    def resolved(*argv: str) -> dict:
        assert main(list(argv)) == 0
        return json.loads(capsys.readouterr().out)

    got = resolved("--set", "train.max_epochs=3", "check-params", "--json", "-s", "train.max_epochs=7",
                   "--set=train.lr=0.5")
    assert got["params"]["train"]["max_epochs"] == 7 and got["params"]["train"]["lr"] == 0.5
    assert resolved("check-params", "-p", "alt.yaml", "--json")["params"]["base"]["seed"] == 7
    assert resolved("-p", "alt.yaml", "--json", "check-params")["params"]["base"]["seed"] == 7
    # a second call in the same process starts from nothing: state is not carried over
    assert resolved("check-params", "--json")["params"]["train"]["max_epochs"] != 7


def test_every_command_documents_the_global_options(project, capsys):
    from typer.main import get_command

    names = sorted(get_command(app).commands)
    assert len(names) >= 19
    for name in names:
        main([name, "--help"])
        text = capsys.readouterr().out
        for opt in ("--set", "--params", "--json"):
            assert opt in text, f"`visionflow {name} --help` does not list {opt}"


# --- piped output, through the real command with stdout a pipe ---------------------------------------------


@pytest.fixture(scope="module")
def champion(tmp_path_factory):
    return champion_project(tmp_path_factory.mktemp("piped"))


def _piped(proj: Path, *args: str) -> subprocess.CompletedProcess:
    """`visionflow ARGS` with stdout and stderr pipes and no COLUMNS: what `visionflow ... | grep` gets."""
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "MLFLOW_TRACKING_URI",
                                                             "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")}
    exe = Path(sys.executable).with_name("visionflow")
    return subprocess.run([str(exe), *args], cwd=proj, capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.slow
def test_piped_tables_are_plain_uncut_and_rounded(champion):
    proj, batch = champion
    lineage = _piped(proj, "lineage", "visionflow-classifier@champion")
    assert lineage.returncode == 0, lineage.stderr
    text = lineage.stdout
    assert "…" not in text and "│" not in text and "─" not in text, text
    rows = dict(line.split("\t", 1) for line in text.splitlines()[1:])
    assert len(rows["MLflow run"]) == 32 and rows["data version"] == "dv-test"
    assert json.loads(rows["metrics"]) == {"test_accuracy": 0.8733}, "floats rounded to 4 significant digits"

    drift = _piped(proj, "drift", batch)
    assert drift.returncode in (0, 1), drift.stderr
    lines = drift.stdout.splitlines()
    header = lines[1].split("\t")
    assert header[0] == "feature" and header[-1] == "drifted"
    features = [line.split("\t") for line in lines[2:] if line.count("\t") == len(header) - 1]
    assert len(features) >= 10 and all(len(f) == len(header) for f in features)
    assert any(len(line) > 80 for line in lines), "a long line is kept whole, not folded at 80 columns"
    assert "…" not in drift.stdout
    assert "Downloading artifacts" not in drift.stderr and "it/s" not in drift.stderr, drift.stderr


@pytest.mark.slow
def test_json_before_or_after_the_command_is_one_json_document(champion):
    proj, _ = champion
    for argv in (["lineage", "visionflow-classifier@champion", "--json"], ["--json", "check-params"]):
        proc = _piped(proj, *argv)
        assert proc.returncode == 0, proc.stderr
        data = json.loads(proc.stdout)  # the whole of stdout
        assert isinstance(data, dict) and data
    assert data["params"]["registry"]["model_name"] == "visionflow-classifier"
