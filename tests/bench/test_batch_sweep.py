"""bench.batch_sweep: a real (short) sweep over serve.max_concurrency with the real `visionflow loadtest`, its table
and plot, and the arguments it refuses."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bench.batch_sweep import table
from tests.helpers import REPO, champion_project


def _sweep(*args: str) -> subprocess.CompletedProcess:
    # Without the MLFLOW_TRACKING_URI an earlier test's mlflow.set_tracking_uri left in this process's environment:
    # the sweep's servers must find the registry their own project names.
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return subprocess.run(
        [sys.executable, "-m", "bench.batch_sweep", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )


@pytest.mark.slow
def test_a_short_sweep_writes_its_table_json_and_plot(tmp_path):
    from visionflow.config import load_params

    proj, _ = champion_project(tmp_path)
    queue_depth = load_params(proj / "params.yaml").serve.queue_depth
    out = tmp_path / "sweep"
    phases = ["--duration", "1", "--step", "0.5", "--overload-s", "0.5"]
    proc = _sweep("--project", str(proj), "--values", "1,3", "--rate", "20", *phases, "--out-dir", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((out / "sweep.json").read_text())["rows"]
    assert [r["max_concurrency"] for r in rows] == [1, 3]
    for r in rows:
        assert r["max_rps"] > 0 and r["single_ms"] > 0 and r["p99_ms"] >= r["p50_ms"] > 0
        assert r["errors"] == 0 and r["rate_errors"] == 0 and r["overload_only_503"] is True
        # each value ran against a server of its own with that max_concurrency (its slots: + queue_depth)
        report = json.loads((out / f"mc-{r['max_concurrency']}.json").read_text())
        assert report["settings"]["ramp_max"] == r["max_concurrency"] + queue_depth
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "sweep.md").read_text()
    assert md.count("\n") == 4 and "p50 / p99 ms at 20 req/s" in md
    assert md in proc.stdout


def test_table_has_one_line_per_value_and_the_fixed_rate_column_only_with_a_rate():
    row = {
        "max_concurrency": 4,
        "max_rps": 2080.4,
        "single_ms": 1.006,
        "sustained_rps": 1456.3,
        "p50_ms": 2.78,
        "p99_ms": 4.48,
        "p99_over_single": 4.45,
        "errors": 0,
        "rate_p50_ms": 1.88,
        "rate_p99_ms": 3.54,
        "rate_errors": 0,
    }
    without = table([row], None).splitlines()
    assert len(without) == 3 and "req/s |" not in without[0].split("errors")[1]
    assert without[2] == "| 4 | 2,080 | 1.01 | 1,456 | 2.78 / 4.48 | 4.45x | 0 |"
    with_rate = table([row, row | {"max_concurrency": 8}], 1055).splitlines()
    assert len(with_rate) == 4 and with_rate[0].endswith("p50 / p99 ms at 1055 req/s |")
    assert with_rate[3].startswith("| 8 |") and with_rate[3].endswith("1.88 / 3.54 (0 errors) |")


@pytest.mark.parametrize(
    "args, says",
    [
        (["--values", "1,x"], "--values takes whole numbers"),
        (["--values", "0,2"], "each at least 1"),
        (["--values", ""], "--values takes whole numbers"),
    ],
)
def test_bad_values_are_refused_in_one_line(tmp_path, args, says):
    (tmp_path / "params.yaml").write_text("{}\n")
    proc = _sweep("--project", str(tmp_path), *args)
    assert proc.returncode == 2 and says in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("where", ["a-file", "a-file/below"])
def test_a_report_folder_that_cannot_be_made_is_refused_in_one_line(tmp_path, where):
    (tmp_path / "params.yaml").write_text("{}\n")
    (tmp_path / "a-file").write_text("in the way\n")
    proc = _sweep("--project", str(tmp_path), "--out-dir", str(tmp_path / where))
    assert proc.returncode == 2 and "cannot make the report folder" in proc.stderr and "Traceback" not in proc.stderr


def test_a_folder_without_params_is_refused(tmp_path):
    proc = _sweep("--project", str(tmp_path / "nowhere"))
    assert proc.returncode == 2 and "no params.yaml there" in proc.stderr


def test_a_project_without_a_champion_is_refused_in_one_line_with_loadtests_reason(tmp_path):
    from tests.helpers import make_folder_dataset, make_project

    proj = make_project(tmp_path / "proj", make_folder_dataset(tmp_path / "images", classes=("a", "b"), per_class=2))
    proc = _sweep("--project", str(proj), "--values", "2", "--out-dir", str(tmp_path / "out"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("batch_sweep: loadtest with max_concurrency=2 exited 2: ")
    assert "`visionflow serve` exited with 2" in lines[0] and "mc-2.server.log" in lines[0]  # where to look
