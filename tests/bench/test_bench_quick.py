"""The benchmark suite runs end to end in --quick mode and writes well-formed JSON. No speed is asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.slow  # runs DVC and evidently for real: about a minute on 2 cores

CHEAP = ("drift", "dvc")


def test_quick_bench_writes_its_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--only", *CHEAP, "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        env=dict(os.environ, COLUMNS="200", DVC_NO_ANALYTICS="1", DO_NOT_TRACK="1"),
    )
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    assert "visionflow benchmarks" in proc.stdout and str(out) in proc.stdout

    res = json.loads(out.read_text())
    assert res["schema"] == 1 and res["quick"] is True and res["repeats"] == 2
    machine = res["machine"]
    for key in (
        "cpu_model",
        "cpu_logical_cores",
        "ram_gib",
        "gpu",
        "python",
        "git_commit",
        "versions",
        "load_average_at_start",
        "load_average_at_end",
    ):
        assert key in machine, key
    assert machine["versions"]["torch"] and machine["versions"]["onnxruntime"]
    assert machine["cpu_logical_cores"] >= 1 and machine["ram_gib"] > 0

    assert list(res["benchmarks"]) == list(CHEAP)  # --only runs those and nothing else
    for name, bench in res["benchmarks"].items():
        assert bench["status"] == "ok", (name, bench.get("traceback"))
        assert bench["seconds"] > 0 and bench["description"] and bench["rows"]
        for row in bench["rows"]:
            assert row["kind"] in ("paired", "single") and row["variant"] and row["unit"]
            if row["kind"] == "single":
                assert isinstance(row["value"], float)
                continue
            assert row["repeats"] == 2
            for side in ("a", "b", "ratio"):
                part = row[side]
                assert len(part["values"]) == 2 and all(v > 0 for v in part["values"])
                assert part["min"] <= part["median"] <= part["max"]
            assert row["a"]["label"] and row["b"]["label"] and row["ratio"]["definition"]
            if row["goal"] is not None:
                assert row["goal"]["met"] in (True, False) and row["goal"]["op"] in (">=", "<=")

    dvc_rows = {r["variant"] for r in res["benchmarks"]["dvc"]["rows"]}
    assert dvc_rows == {"dvc add, 1k files", "dvc status, 1k files", "dvc checkout, 1k files"}
    drift_rows = [r["variant"] for r in res["benchmarks"]["drift"]["rows"]]
    assert len(drift_rows) == 3 and drift_rows[-1].startswith("scaling")


def test_quick_cache_build_bench_on_generated_photos(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--only", "cache_build", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, COLUMNS="200", NO_ALBUMENTATIONS_UPDATE="1"),
    )
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    bench = json.loads(out.read_text())["benchmarks"]["cache_build"]
    assert bench["status"] == "ok", bench.get("traceback")
    rows = {r["variant"].split(",")[0]: r for r in bench["rows"]}
    assert set(rows) >= {"build", "decode 1280x960 -> 224 px"}
    for row in bench["rows"]:
        assert row["kind"] == "paired" and row["repeats"] == 2 and row["goal"]["met"] in (True, False, None)
        assert all(v > 0 for v in row["a"]["values"] + row["b"]["values"])
    assert bench["config"]["photos"] == 24 and bench["config"]["cores"] >= 1


def test_unknown_benchmark_is_refused():
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--only", "nonsense"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and "invalid choice" in proc.stderr
