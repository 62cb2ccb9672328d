"""Fixtures of the flow tier."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def harness():
    """A temporary Prefect server for one test module (each module's flows see only their own runs)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield
