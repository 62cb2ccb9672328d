"""The load-test tool's guards and arithmetic (the run against a real server is in test_serve_attacks.py)."""

from __future__ import annotations

import pytest

from tests.helpers import REPO, run_cli
from visionflow.tools.loadtest import LoadTestError, run_loadtest
from visionflow.tools.loadtest.client import require_loopback
from visionflow.tools.loadtest.phases import percentiles


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:8000", "http://127.9.9.9:1/", "http://[::1]:8000", "http://localhost:8000"]
)
def test_loopback_targets_are_accepted(url):
    assert require_loopback(url) == url.rstrip("/")


@pytest.mark.parametrize(
    "url",
    [
        "http://8.8.8.8:8000",
        "http://0.0.0.0:8000",
        "http://10.0.0.1",
        "http://[2001:db8::1]:80",
        "ftp://127.0.0.1",
        "127.0.0.1:8000",
        "http://no-such-host.invalid",
    ],
)
def test_anything_else_is_refused(url):
    with pytest.raises(LoadTestError):
        require_loopback(url)


def test_bad_settings_are_refused_before_any_request():
    with pytest.raises(LoadTestError, match="mode"):
        run_loadtest("http://127.0.0.1:9", mode="flood")
    with pytest.raises(LoadTestError, match="duration"):
        run_loadtest("http://127.0.0.1:9", duration_s=0)
    with pytest.raises(LoadTestError, match="no server answers"):  # nothing listens on the discard port
        run_loadtest("http://127.0.0.1:9", duration_s=1)


def test_percentiles_in_milliseconds():
    p = percentiles([i / 1000 for i in range(1, 101)])  # 1..100 ms
    assert p["p50"] == pytest.approx(50.5) and p["p99"] == pytest.approx(99.01) and p["max"] == 100
    assert percentiles([]) == {}


def test_cli_refuses_a_remote_target(tmp_path):
    proc = run_cli(
        tmp_path, "--params", str(REPO / "params.yaml"), "loadtest", "--url", "http://8.8.8.8:8000", check=False
    )
    assert proc.returncode == 2 and "loopback" in proc.stderr and "Traceback" not in proc.stderr


def test_server_view_reads_the_phase_from_metric_differences():
    from visionflow.tools.loadtest.server import server_view

    def snap(counts: list[float], busy_s: float, batches: float, reqs: float) -> dict:
        bounds = ["0.002", "0.005", "0.01", "+Inf"]
        out = {
            ("visionflow_request_seconds_bucket", (("endpoint", "predict"), ("le", le))): c
            for le, c in zip(bounds, counts)
        }
        out[("visionflow_requests_total", (("endpoint", "predict"), ("status", "200")))] = counts[-1]
        out[("visionflow_inference_seconds_sum", ())] = busy_s
        out[("visionflow_inference_seconds_count", ())] = batches
        out[("visionflow_inference_batch_requests_sum", ())] = reqs
        return out

    before = snap([10, 10, 10, 10], busy_s=1.0, batches=10, reqs=10)
    # 1,000 requests in the phase: 900 within 2 ms, 985 within 5 ms, 995 within 10 ms, 5 beyond
    after = snap([910, 995, 1005, 1010], busy_s=1.5, batches=510, reqs=1010)
    view = server_view(before, after, elapsed_s=2.0)
    assert view["ok_requests"] == 1000
    assert view["p50_ms_at_most"] == 2.0 and view["p99_ms_at_most"] == 10.0
    assert view["inference_busy"] == 0.25 and view["batches"] == 500 and view["requests_per_batch"] == 2.0
    assert view["inference_ms_per_batch"] == 1.0
    assert server_view(None, after, 2.0) is None  # a server without /metrics: no view, no crash
