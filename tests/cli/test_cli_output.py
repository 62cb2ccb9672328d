"""The CLI as scripts and pipes see it: global options before or after the command, plain uncut output when
stdout is a pipe, --json everywhere, and no stray progress bars."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.helpers import REPO, champion_project
from visionflow.cli import app, main

# Each command with the arguments it needs to get as far as reading params.yaml.
COMMANDS = [
    ["ingest"],
    ["version"],
    ["validate"],
    ["split"],
    ["train"],
    ["evaluate"],
    ["export"],
    ["register"],
    ["promote"],
    ["rollback"],
    ["quantize"],
    ["lineage", "m@champion"],
    ["serve"],
    ["loadtest"],
    ["simulate"],
    ["drift", "some-batch"],
    ["drift-eval"],
    ["select", "some-batch"],
    ["check-params"],
]


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

    got = resolved(
        "--set", "train.max_epochs=3", "check-params", "--json", "-s", "train.max_epochs=7", "--set=train.lr=0.5"
    )
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


# --- stage results: a mapping or a frozen dataclass prints the same; MLflow set up by the command --------------


@dataclass(frozen=True)
class _Exported:  # the shape of a stage's typed result
    onnx_path: str
    passed: bool
    max_abs_diff: float
    top1_agreement: float
    ort_ms_b1: float
    torch_ms_b1: float
    ort_ms_b32: float
    torch_ms_b32: float
    card: dict


def test_a_stage_result_prints_the_same_as_a_mapping_or_a_dataclass(project, capsys, monkeypatch):
    from visionflow import stages
    from visionflow.config import load_params
    from visionflow.registry import tracking

    calls = []
    monkeypatch.setattr(tracking, "setup_mlflow", lambda *args: calls.append(args))
    fields = dict(
        onnx_path="models/onnx/model.onnx",
        passed=True,
        max_abs_diff=1.234567e-06,
        top1_agreement=1.0,
        ort_ms_b1=0.51234,
        torch_ms_b1=2.0,
        ort_ms_b32=3.0,
        torch_ms_b32=40.0,
        card={"classes": ["a"]},
    )
    printed = {}
    for kind, result in (("mapping", fields), ("dataclass", _Exported(**fields))):
        monkeypatch.setattr(stages, "export_stage", lambda p, root, result=result: result)
        for argv in (["export"], ["export", "--json"]):
            assert main(argv) == 0, capsys.readouterr().err
            printed[kind, argv[-1]] = capsys.readouterr().out
    assert printed["mapping", "export"] == printed["dataclass", "export"]
    assert "1.235e-06" in printed["dataclass", "export"] and "card" not in printed["dataclass", "export"]
    assert printed["mapping", "--json"] == printed["dataclass", "--json"]
    assert json.loads(printed["dataclass", "--json"])["onnx_path"] == fields["onnx_path"]
    # each command line sets MLflow up once, with the arguments the library used
    p = load_params(project / "params.yaml")
    assert calls == [(p.registry.tracking_uri, project.resolve(), p.base.project, p.registry.artifact_location)] * 4


def test_a_promotion_decision_dataclass_prints_its_gates_and_exits_1_when_refused(project, capsys, monkeypatch):
    from visionflow import stages
    from visionflow.registry import tracking
    from visionflow.registry.gates import Decision, Gate

    monkeypatch.setattr(tracking, "setup_mlflow", lambda *args: None)
    decision = Decision(
        model="m",
        version="2",
        promoted=False,
        champion_before="1",
        champion_after="1",
        gates=[Gate("parity", True, "max |diff| 1e-06"), Gate("accuracy", False, "0.80 < 0.85")],
    )
    monkeypatch.setattr(stages, "promote_stage", lambda p, root, version: decision)
    assert main(["promote"]) == 1
    text = capsys.readouterr().out
    assert "m v2: REFUSED" in text and "accuracy\tFAIL\t0.80 < 0.85" in text and "champion before: 1" in text
    assert main(["promote", "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["reasons"] == ["accuracy: 0.80 < 0.85"]  # Decision.as_dict's


def test_an_interrupted_command_exits_130_with_a_hint(project, capsys, monkeypatch):
    from visionflow import stages

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(stages, "split_stage", interrupted)
    assert main(["split"]) == 130
    assert "interrupted" in capsys.readouterr().err


def test_python_dash_m_runs_the_cli(project):
    proc = subprocess.run(
        [sys.executable, "-m", "visionflow.cli", "--help"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and "check-params" in proc.stdout, proc.stderr


# --- piped output, through the real command with stdout a pipe ---------------------------------------------


@pytest.mark.skipif(not hasattr(fcntl, "F_SETPIPE_SZ"), reason="needs Linux's pipe sizes")
@pytest.mark.parametrize("args", [["--help"], ["loadtest", "--help"]])  # (a command's help: printed in invoke)
def test_a_reader_that_stops_early_is_not_an_error(project, args):
    """`visionflow ... | head -1`: the reader leaves while the command still writes. The pipe holds 4 KiB (its
    smallest) and the help is larger, so the command is still writing when the reader has taken 80 bytes and
    closed its end: the next write fails (EPIPE), and the command exits as click does on a broken pipe (1) with
    nothing on stderr, not as an unexpected error (2)."""
    read, write = os.pipe()
    fcntl.fcntl(write, fcntl.F_SETPIPE_SZ, 4096)
    proc = subprocess.Popen(
        [sys.executable, "-m", "visionflow.cli", *args], cwd=project, stdout=write, stderr=subprocess.PIPE, text=True
    )
    os.close(write)
    try:
        assert os.read(read, 80)  # the start of the output (a blocking read: the command has begun writing)
        time.sleep(0.5)  # (as head does: it goes after its line; meanwhile the command fills the pipe and waits)
    finally:
        os.close(read)  # the reader is gone; the command still has more than the pipe holds to write
    stderr = proc.stderr.read()
    assert proc.wait(timeout=120) == 1 and stderr == "", stderr


@pytest.fixture(scope="module")
def champion(tmp_path_factory):
    return champion_project(tmp_path_factory.mktemp("piped"))


def _piped(proj: Path, *args: str) -> subprocess.CompletedProcess:
    """`visionflow ARGS` with stdout and stderr pipes and no COLUMNS: what `visionflow ... | grep` gets."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("COLUMNS", "LINES", "MLFLOW_TRACKING_URI", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    }
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


@pytest.fixture
def select_batch(champion, tmp_path, monkeypatch):
    """A copy of the champion project's 42-image batch, MLflow pointed at the project's store."""
    import shutil

    import mlflow

    proj, src = champion
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{proj / 'mlflow.db'}")
    mlflow.set_tracking_uri(f"sqlite:///{proj / 'mlflow.db'}")
    shutil.copytree(src, tmp_path / "batch")
    return proj, tmp_path / "batch"


@pytest.mark.slow
def test_select_writes_the_ranked_budget_and_lists_unreadable_images(select_batch, capfd):
    import pandas as pd

    proj, folder = select_batch
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    images = sorted(f.name for f in folder.iterdir())
    assert main(["--params", str(proj / "params.yaml"), "select", str(folder), "--budget", "5"]) == 0
    out = capfd.readouterr().out
    table = pd.read_csv(folder / "selection.csv")
    assert list(table["rank"]) == [1, 2, 3, 4, 5] and set(table["file"]) <= set(images)
    assert "broken.png" not in set(table["file"]) and "broken.png" in out and "1 unreadable" in out
    assert table["margin"].between(0, 1).all()
    assert sorted(f.name for f in folder.iterdir()) == sorted([*images, "selection.csv"])  # nothing lost
    # uncertainty alone: the smallest margins in order (the file is replaced); a budget of 0 chooses nothing
    assert (
        main(["--params", str(proj / "params.yaml"), "select", str(folder), "--budget=40", "--strategy=uncertainty"])
        == 0
    )
    table = pd.read_csv(folder / "selection.csv")
    assert len(table) == 40 and table["margin"].is_monotonic_increasing
    assert main(["--params", str(proj / "params.yaml"), "select", str(folder), "--budget", "0"]) == 0
    assert "nothing chosen" in capfd.readouterr().out and pd.read_csv(folder / "selection.csv").empty
