"""Server mode end to end: the training flow registered as a deployment on a process work pool, run by a real
worker against a Prefect server and an MLflow server (basic auth), both on PostgreSQL, artifacts and DVC data on an
S3 endpoint; four runs at once, a run killed mid-way, and eight concurrent registrations and promotions."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.helpers import REPO, make_folder_dataset, make_project, prefect_pointed_at
from tests.integration.servers import start_worker, stop

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(1500)]

POOL = "visionflow-it"
MODEL = "visionflow-server-it"
DEPLOYMENT = "visionflow-training/train"
PROJECTS: dict[str, Path] = {}  # filled by the first test, reused by the promotion test


def _project(base: Path, name: str, source: Path, epochs: int = 2, patience: int = 3) -> Path:
    return make_project(
        base / name,
        source,
        train={
            "image_size": 16,
            "max_epochs": epochs,
            "num_workers": 0,
            "batch_size": 16,
            "early_stopping_patience": patience,
        },
        evaluate={"robustness_images": 20, "severities": [2]},
        export={"parity_images": 20},
        # every challenger passes (min_gain -1): each promotion moves the champion, so a race would show
        registry={
            "tracking_uri": None,
            "model_name": MODEL,
            "accuracy_floor": 0.0,
            "min_gain": -1.0,
            "max_class_drop": 1.0,
            "bootstrap_samples": 200,
            "latency_budget_ms": 1000,
        },
    )


@pytest.fixture(scope="module")
def stack(tmp_path_factory, s3, mlflow_server, prefect_server):
    """Client environment for the whole stack, the deployments registered on POOL, and a worker polling it."""
    base = tmp_path_factory.mktemp("server-mode")
    env = {
        **os.environ,
        **mlflow_server.env(),
        **prefect_server.env(),
        "AWS_ACCESS_KEY_ID": s3.access_key,
        "AWS_SECRET_ACCESS_KEY": s3.secret_key,
        "AWS_ENDPOINT_URL": s3.endpoint_url,
        "AWS_DEFAULT_REGION": "us-east-1",
        "VISIONFLOW_DVC_REMOTE_URL": "s3://dvc/visionflow",
        "PYTHONPATH": str(REPO),
    }
    env.pop("MLFLOW_S3_ENDPOINT_URL", None)  # clients reach artifacts through the MLflow server only
    subprocess.run(
        [sys.executable, "-m", "prefect", "work-pool", "create", POOL, "--type", "process"],
        env=env,
        check=True,
        capture_output=True,
        cwd=REPO,
    )
    # the training deployment, registered the documented way; only it: the hourly drift check's schedule would
    # otherwise fire mid-test and run against the repository's own params.yaml
    deploy = subprocess.run(
        [sys.executable, "-m", "flows.deployments", "deploy", "--work-pool", POOL, "--only", "train"],
        env=env,
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert deploy.returncode == 0, deploy.stdout + deploy.stderr
    worker = start_worker(POOL, env, base / "worker.log", limit=4)
    try:
        yield {
            "env": env,
            "base": base,
            "worker": worker,
            "log": base / "worker.log",
            "source": make_folder_dataset(base / "images", per_class=40, size=16),
        }
    finally:
        stop(worker)


@contextmanager
def _on_server(stack):
    """This process's Prefect client pointed at the stack's server (see prefect_pointed_at)."""
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL

    with prefect_pointed_at(
        {
            PREFECT_API_URL: stack["env"]["PREFECT_API_URL"],
            PREFECT_API_AUTH_STRING: stack["env"]["PREFECT_API_AUTH_STRING"],
        }
    ):
        yield


def _submit(stack, params: Path) -> str:
    from prefect.deployments import run_deployment

    with _on_server(stack):
        run = run_deployment(DEPLOYMENT, parameters={"params_path": str(params)}, timeout=0)
    return str(run.id)


def _read(stack, run_id: str):
    from prefect import get_client

    with _on_server(stack), get_client(sync_client=True) as client:
        return client.read_flow_run(run_id)


def _wait_final(run_ids: list[str], stack, timeout: float) -> dict[str, object]:
    deadline = time.time() + timeout
    while True:
        runs = {r: _read(stack, r) for r in run_ids}
        if all(run.state and run.state.is_final() for run in runs.values()):
            return runs
        if time.time() > deadline:
            raise AssertionError(
                f"{[(r.name, r.state_name) for r in runs.values()]}\n" + stack["log"].read_text()[-4000:]
            )
        time.sleep(2)


def _registry(stack, monkeypatch):
    """An MLflow client of the stack's server; the URI given explicitly (an earlier test may have set MLflow's
    process-wide one), the basic-auth credentials through the environment, where MLflow reads them per request."""
    from mlflow import MlflowClient

    for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(k, stack["env"][k])
    uri = stack["env"]["MLFLOW_TRACKING_URI"]
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def test_four_training_runs_through_the_worker_all_complete(stack, monkeypatch):
    projects = [_project(stack["base"], f"p{i}", stack["source"]) for i in range(4)]
    ids = [_submit(stack, pr / "params.yaml") for pr in projects]
    runs = _wait_final(ids, stack, timeout=900)
    assert [r.state_name for r in runs.values()] == ["Completed"] * 4, stack["log"].read_text()[-4000:]

    reports = [json.loads((pr / "reports/pipeline.json").read_text()) for pr in projects]
    assert {r["flow_run_id"] for r in reports} == set(ids)  # each ran in its own workspace, none lost
    versions = sorted(int(r["registry"]["version"]) for r in reports)
    assert versions == [1, 2, 3, 4]
    client = _registry(stack, monkeypatch)
    # metadata in Postgres behind the MLflow server; the artifacts went through it to the S3 bucket
    assert sorted(int(v.version) for v in client.search_model_versions(f"name='{MODEL}'")) == versions
    champion = client.get_model_version_by_alias(MODEL, "champion").version
    assert champion in {str(v) for v in versions}
    import boto3

    s3 = boto3.client(
        "s3",
        endpoint_url=stack["env"]["AWS_ENDPOINT_URL"],
        region_name="us-east-1",
        aws_access_key_id=stack["env"]["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=stack["env"]["AWS_SECRET_ACCESS_KEY"],
    )
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="mlflow", MaxKeys=1000).get("Contents", [])]
    assert any(k.endswith(".onnx") for k in keys), keys[:20]
    # the data versions were pushed to the shared DVC remote on S3
    dvc_objects = s3.list_objects_v2(Bucket="dvc", Prefix="visionflow/").get("KeyCount", 0)
    assert dvc_objects >= 40 * 3, dvc_objects
    assert len({r["data_version"] for r in reports}) == 1  # same images: the same version, stored once
    PROJECTS.update({pr.name: pr for pr in projects})


def _flow_run_pid(worker: subprocess.Popen, run_id: str) -> int | None:
    import psutil

    for child in psutil.Process(worker.pid).children(recursive=True):
        try:
            if child.environ().get("PREFECT__FLOW_RUN_ID") == run_id:
                return child.pid
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None


def test_a_run_killed_mid_training_is_marked_crashed_and_a_rerun_finishes(stack):
    # no early stopping: the re-run must finish the whole step budget the killed run started
    proj = _project(stack["base"], "crash", stack["source"], epochs=20, patience=1000)
    run_id = _submit(stack, proj / "params.yaml")
    deadline = time.time() + 600
    while not list(proj.glob("runs/train/*/checkpoints/last.ckpt")):  # well into training
        assert time.time() < deadline, stack["log"].read_text()[-4000:]
        state = _read(stack, run_id).state
        assert not (state and state.is_final()), "finished before it could be killed"
        time.sleep(0.5)
    pid = _flow_run_pid(stack["worker"], run_id)
    assert pid is not None, "no process of the worker runs this flow run"
    os.kill(pid, signal.SIGKILL)
    crashed = _wait_final([run_id], stack, timeout=180)[run_id]
    assert crashed.state_name == "Crashed", crashed.state

    rerun = _submit(stack, proj / "params.yaml")
    done = _wait_final([rerun], stack, timeout=900)[rerun]
    assert done.state_name == "Completed", stack["log"].read_text()[-4000:]
    report = json.loads((proj / "reports/pipeline.json").read_text())
    assert report["status"] == "completed" and report["flow_run_id"] == rerun
    assert report["train"]["resumed"] is True  # from the checkpoint the killed run left
    assert report["train"]["global_step"] == report["train"]["max_steps"]  # the whole budget, counted across both runs


PROMOTER = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from visionflow.config import load_params
    from visionflow.registry.tracking import setup_mlflow
    from visionflow.stages import promote_stage, register_stage
    root = Path(sys.argv[1])
    p = load_params(root / "params.yaml")
    setup_mlflow(p.registry.tracking_uri, root, p.base.project, p.registry.artifact_location)
    registered = register_stage(p, root)
    decision = promote_stage(p, root, registered.version)
    print(json.dumps({"version": registered.version, "before": decision.champion_before,
                      "after": decision.champion_after, "promoted": decision.promoted,
                      "reasons": decision.reasons}))
""")


def test_eight_concurrent_registrations_and_promotions_leave_one_champion(stack, monkeypatch):
    assert len(PROJECTS) == 4, "needs the four trained projects of the first test"
    client_env = stack["env"]
    registry = _registry(stack, monkeypatch)
    before = {int(v.version) for v in registry.search_model_versions(f"name='{MODEL}'")}
    champion_at_start = registry.get_model_version_by_alias(MODEL, "champion").version
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", PROMOTER, str(pr)],
            env=client_env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for pr in list(PROJECTS.values()) * 2
    ]
    outs = [p.communicate(timeout=900) for p in procs]
    assert [p.returncode for p in procs] == [0] * 8, [err[-2000:] for _, err in outs]
    decisions = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]

    versions = [int(d["version"]) for d in decisions]
    assert len(set(versions)) == 8  # no duplicate versions
    after = {int(v.version) for v in registry.search_model_versions(f"name='{MODEL}'")}
    assert after == before | set(versions) and after == set(range(1, max(after) + 1))  # no gaps either
    assert all(d["promoted"] for d in decisions), [d["reasons"] for d in decisions if not d["promoted"]]
    # Promotions were serialised by the lock on the Prefect server: each one judged against the champion of that
    # moment, so the (before -> after) pairs form one chain from the starting champion, with no shared "before".
    befores = [d["before"] for d in decisions]
    assert len(set(befores)) == 8, befores
    chain, current = [], champion_at_start
    by_before = {d["before"]: d["after"] for d in decisions}
    while current in by_before:
        current = by_before[current]
        chain.append(current)
    assert len(chain) == 8
    assert registry.get_model_version_by_alias(MODEL, "champion").version == current
