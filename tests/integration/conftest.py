"""Session-scoped fixtures for the integration tier: PostgreSQL, an S3 endpoint (moto), MLflow and Prefect servers.

Each server starts once per session on 127.0.0.1 with a free port, under one tmp dir (logs included) and is stopped
at the end; see tests/integration/servers.py for how. Start-up times are printed in the terminal summary.
"""

from __future__ import annotations

import time

import pytest

from tests.integration import servers

_TIMES: dict[str, float] = {}
_T0: list[float] = []


def pytest_configure(config):
    # pyproject.toml registers `integration` too; registering here keeps --strict-markers happy either way
    config.addinivalue_line("markers", "integration: runs against real PostgreSQL/S3/MLflow/Prefect servers")


def pytest_terminal_summary(terminalreporter):
    if _TIMES:
        parts = ", ".join(f"{k} {v:.1f}s" for k, v in _TIMES.items())
        total = f"; first start to end {time.monotonic() - _T0[0]:.1f}s" if _T0 else ""
        terminalreporter.write_line(f"integration servers start-up: {parts}{total}")


@pytest.fixture(scope="session")
def integration_tmp(tmp_path_factory):
    if not _T0:
        _T0.append(time.monotonic())
    return tmp_path_factory.mktemp("integration")


@pytest.fixture(scope="session")
def postgres(integration_tmp):
    try:
        pg = servers.start_postgres(integration_tmp)
    except servers.StartupError as e:
        pytest.fail(str(e), pytrace=False)
    _TIMES["postgres"] = pg.startup_s
    yield pg
    pg.stop()


@pytest.fixture(scope="session")
def s3(integration_tmp):
    try:
        srv = servers.start_s3(integration_tmp / "s3")
    except servers.StartupError as e:
        pytest.fail(str(e), pytrace=False)
    _TIMES["s3 (moto)"] = srv.startup_s
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def mlflow_server(integration_tmp, postgres, s3):
    try:
        srv = servers.start_mlflow(integration_tmp / "mlflow", postgres, s3)
    except servers.StartupError as e:
        pytest.fail(str(e), pytrace=False)
    _TIMES["mlflow"] = srv.startup_s
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def prefect_server(integration_tmp, postgres):
    try:
        srv = servers.start_prefect(integration_tmp / "prefect", postgres)
    except servers.StartupError as e:
        pytest.fail(str(e), pytrace=False)
    _TIMES["prefect"] = srv.startup_s
    yield srv
    srv.stop()
