"""Event-driven retraining against a real Prefect server: the deployments from flows/deployments.py are served by
a real process, three drift checks raise three alarms, and the trigger starts exactly one retraining run."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import REPO, free_port, make_folder_dataset, make_project, prefect_pointed_at

pytestmark = [pytest.mark.slow, pytest.mark.flow]


def _wait(url: str, timeout: float) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.5)


@pytest.fixture
def prefect_server(tmp_path, monkeypatch):
    port = free_port()
    env = dict(
        os.environ,
        PREFECT_HOME=str(tmp_path / "prefect-home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
        PREFECT_API_URL=f"http://127.0.0.1:{port}/api",
        PREFECT_SERVER_API_HOST="127.0.0.1",
        PREFECT_SERVER_API_PORT=str(port),
    )
    env.pop("MLFLOW_TRACKING_URI", None)
    subprocess.run(
        [sys.executable, "-m", "prefect", "server", "database", "upgrade", "-y"],
        env=env,
        check=True,
        capture_output=True,
    )
    log = (tmp_path / "server.log").open("w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "prefect",
            "server",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--no-ui",
            "--analytics-off",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        _wait(f"http://127.0.0.1:{port}/api/health", 120)
        for k in ("PREFECT_HOME", "PREFECT_API_URL", "PREFECT_SERVER_ANALYTICS_ENABLED", "DO_NOT_TRACK"):
            monkeypatch.setenv(k, env[k])
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
        from prefect.settings import PREFECT_API_URL

        with prefect_pointed_at({PREFECT_API_URL: env["PREFECT_API_URL"]}):
            yield env
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _runs_of(deployment: str) -> list:
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterDeploymentId
    from prefect.client.schemas.sorting import FlowRunSort

    async def read():
        async with get_client() as client:
            dep = await client.read_deployment_by_name(deployment)
            # limit and sort given explicitly: this server version rejects nulls for them
            return await client.read_flow_runs(
                flow_run_filter=FlowRunFilter(deployment_id=FlowRunFilterDeploymentId(any_=[dep.id])),
                limit=50,
                sort=FlowRunSort.EXPECTED_START_TIME_ASC,
            )

    return asyncio.run(read())


def test_three_alarms_trigger_one_retraining_run_through_the_served_deployment(tmp_path, prefect_server):
    from visionflow.config import load_params
    from visionflow.flows.monitoring import RETRAIN_DEPLOYMENT, drift_check_flow
    from visionflow.flows.training import training_flow
    from visionflow.monitoring.simulate import simulate

    src = make_folder_dataset(tmp_path / "images", per_class=60, size=16)
    proj = make_project(
        tmp_path / "proj",
        src,
        train={"image_size": 16, "max_epochs": 2, "num_workers": 0},
        evaluate={"robustness_images": 20, "severities": [2]},
        export={"parity_images": 20},
        registry={
            "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
            "accuracy_floor": 0.0,
            "bootstrap_samples": 200,
        },
        drift={"min_batch_size": 10, "warm_start_epochs": 1},
    )
    params = str(proj / "params.yaml")
    assert training_flow(params_path=params)["registry"]["promoted"]
    p = load_params(params)
    batch = simulate(p, proj, proj / "data/batches/prod", shift="noise", severity=5, n=20, seed=1).folder

    served = subprocess.Popen(
        [sys.executable, "-m", "flows.deployments", "serve", "--params", params],
        cwd=REPO,
        env={**prefect_server, "PYTHONPATH": str(REPO)},
        stdout=(tmp_path / "serve.log").open("w"),
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.time() + 120
        while True:  # the served process registers the deployments and their trigger
            try:
                _runs_of(RETRAIN_DEPLOYMENT)
                break
            except Exception:  # noqa: BLE001 - the server is not up yet: poll until the deadline
                if time.time() > deadline or served.poll() is not None:
                    raise AssertionError((tmp_path / "serve.log").read_text()[-3000:]) from None
                time.sleep(1)
        outcomes = [drift_check_flow(params_path=params, batch=str(batch), retrain="auto") for _ in range(3)]
        assert all(o["drift"]["drifted"] for o in outcomes), [o["drift"]["drift_share"] for o in outcomes]
        assert [o["retrain"]["mode"] for o in outcomes] == ["event"] * 3
        assert [o["retrain"]["triggered"] for o in outcomes] == [True, False, False]

        deadline = time.time() + 300
        while True:
            runs = _runs_of(RETRAIN_DEPLOYMENT)
            if runs and all(r.state and r.state.is_final() for r in runs):
                break
            if time.time() > deadline:
                raise AssertionError(
                    f"runs: {[(r.name, r.state_name) for r in runs]}\n" + (tmp_path / "serve.log").read_text()[-3000:]
                )
            time.sleep(2)
        time.sleep(10)  # any late duplicate would show up by now
        runs = _runs_of(RETRAIN_DEPLOYMENT)
        assert len(runs) == 1, [(r.name, r.state_name) for r in runs]
        assert runs[0].state_name == "Completed", (tmp_path / "serve.log").read_text()[-3000:]
        assert runs[0].parameters["claim_id"] == outcomes[0]["retrain"]["claim_id"]
        assert Path(runs[0].parameters["batch"]) == batch
    finally:
        served.terminate()
        served.wait(timeout=30)
