"""Smoke tests that the integration stack works: auth is enforced, clients with only the env() of a fixture can
use each server, and the data lands in PostgreSQL and the S3 bucket."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request

import pytest

from tests.helpers import REPO
from tests.integration.servers import PG_MAX_CONNECTIONS, server_env, start_worker, stop

pytestmark = [pytest.mark.slow, pytest.mark.integration]


@pytest.fixture(scope="module", autouse=True)
def _smoke_timer():
    t0 = time.monotonic()
    yield
    print(f"\nintegration smoke tests took {time.monotonic() - t0:.1f}s (server start-up included)")


def _status(url: str, headers: dict | None = None, data: bytes | None = None) -> int:
    req = urllib.request.Request(url, headers={"Content-Type": "application/json", **(headers or {})}, data=data)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def _run_client(script: str, env: dict, timeout: float = 180) -> dict:
    """Run `script` in a fresh interpreter with exactly `env`; it prints one JSON line last."""
    r = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert r.returncode == 0, f"client failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_postgres_refuses_a_wrong_password(postgres):
    import psycopg2

    with postgres.connect("mlflow") as conn, conn.cursor() as cur:
        cur.execute("select current_user")
        assert cur.fetchone()[0] == postgres.user
    conn.close()
    with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
        psycopg2.connect(
            host=postgres.host,
            port=postgres.port,
            user=postgres.user,
            password="wrong" + "x" * 8,
            dbname="postgres",
            connect_timeout=10,
        )
    with pytest.raises(psycopg2.OperationalError):  # no password at all: scram, not trust
        psycopg2.connect(
            host=postgres.host, port=postgres.port, user=postgres.user, dbname="postgres", connect_timeout=10
        )


def test_mlflow_requires_auth_and_proxies_artifacts_to_s3(mlflow_server, postgres, s3):
    search = f"{mlflow_server.uri}/api/2.0/mlflow/experiments/search"
    body = json.dumps({"max_results": 1}).encode()
    assert _status(search, data=body) == 401
    assert _status(search, headers={"Authorization": "Basic YWRtaW46d3Jvbmc="}, data=body) == 401  # admin:wrong
    assert _status(search, headers=mlflow_server.auth_header(), data=body) == 200

    env = server_env(mlflow_server)
    assert not any(k.startswith("AWS_") or k == "MLFLOW_S3_ENDPOINT_URL" for k in env)  # artifacts are proxied
    out = _run_client(
        """
        import json, os, tempfile
        import mlflow
        mlflow.set_experiment("smoke")
        with mlflow.start_run() as run:
            mlflow.log_metric("acc", 0.5)
            with tempfile.TemporaryDirectory() as d:
                with open(os.path.join(d, "hello.txt"), "w") as f:
                    f.write("hello s3")
                mlflow.log_artifact(os.path.join(d, "hello.txt"), artifact_path="smoke")
        client = mlflow.MlflowClient()
        files = [f.path for f in client.list_artifacts(run.info.run_id, "smoke")]
        with tempfile.TemporaryDirectory() as d:
            local = client.download_artifacts(run.info.run_id, "smoke/hello.txt", d)
            text = open(local).read()
        print(json.dumps({"run_id": run.info.run_id, "experiment_id": run.info.experiment_id,
                          "artifact_uri": run.info.artifact_uri, "files": files, "text": text}))
    """,
        env,
    )
    assert out["artifact_uri"].startswith("mlflow-artifacts:"), out
    assert out["files"] == ["smoke/hello.txt"] and out["text"] == "hello s3"

    keys = s3.keys("mlflow", "artifacts/")
    mine = [k for k in keys if out["run_id"] in k and k.endswith("smoke/hello.txt")]
    assert mine, keys
    body = s3.client().get_object(Bucket="mlflow", Key=mine[0])["Body"].read()
    assert body == b"hello s3"

    conn = postgres.connect("mlflow")
    with conn.cursor() as cur:
        cur.execute("select count(*) from experiments")
        assert cur.fetchone()[0] >= 2  # Default + smoke
        cur.execute("select value from metrics where run_uuid = %s and key = 'acc'", (out["run_id"],))
        assert [r[0] for r in cur.fetchall()] == [0.5]
    conn.close()
    conn = postgres.connect("mlflow_auth")
    with conn.cursor() as cur:
        cur.execute("select username from users")
        assert "admin" in [r[0] for r in cur.fetchall()]
    conn.close()


def test_prefect_requires_auth_and_runs_flows_on_postgres(prefect_server, postgres, integration_tmp):
    api = prefect_server.api_url
    assert _status(f"{api}/health") == 200  # health probes are exempt
    assert _status(f"{api}/flow_runs/filter", data=b"{}") == 401
    assert _status(f"{api}/flow_runs/filter", headers={"Authorization": "Basic YWRtaW46d3Jvbmc="}, data=b"{}") == 401
    assert _status(f"{api}/flow_runs/filter", headers=prefect_server.auth_header(), data=b"{}") == 200

    env = server_env(prefect_server)
    pool = "smoke-pool"
    r = subprocess.run(
        [sys.executable, "-m", "prefect", "work-pool", "create", pool, "--type", "process"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr

    out = _run_client(
        """
        import json
        from prefect import flow, task

        @task
        def double(x):
            return 2 * x

        @flow(name="smoke-flow")
        def smoke(x: int = 21):
            return double(x)

        state = smoke(return_state=True)
        print(json.dumps({"result": state.result(), "completed": state.is_completed()}))
    """,
        env,
    )
    assert out == {"result": 42, "completed": True}

    # a worker started with the helper polls the pool and runs a deployment from it
    flows_dir = integration_tmp / "smoke-flows"
    flows_dir.mkdir(exist_ok=True)
    (flows_dir / "smoke_flow.py").write_text(
        textwrap.dedent("""
        from prefect import flow

        @flow(name="smoke-deployed")
        def deployed(x: int = 1):
            return x + 1
    """)
    )
    worker = start_worker(pool, env, integration_tmp / "worker.log", limit=2)
    try:
        out = _run_client(
            f"""
            import json, time
            from prefect import flow
            from prefect.deployments import run_deployment
            flow.from_source({str(flows_dir)!r}, entrypoint="smoke_flow.py:deployed").deploy(
                name="smoke", work_pool_name={pool!r})
            run = run_deployment("smoke-deployed/smoke", parameters={{"x": 41}}, timeout=180)
            print(json.dumps({{"state": run.state_name}}))
        """,
            env,
            timeout=300,
        )
        assert out == {"state": "Completed"}, (integration_tmp / "worker.log").read_text()[-3000:]
        assert worker.poll() is None, (integration_tmp / "worker.log").read_text()[-3000:]
    finally:
        stop(worker)

    conn = postgres.connect("prefect")
    with conn.cursor() as cur:
        cur.execute("select count(*) from flow_run")
        assert cur.fetchone()[0] >= 2
        cur.execute("select count(*) from flow_run where state_type = 'COMPLETED'")
        assert cur.fetchone()[0] >= 2
        cur.execute("select count(*) from work_pool where name = %s", (pool,))
        assert cur.fetchone()[0] == 1
        cur.execute("select count(*) from pg_stat_activity")
        print(f"\npostgres connections in use: {cur.fetchone()[0]} of {PG_MAX_CONNECTIONS}")
    conn.close()
