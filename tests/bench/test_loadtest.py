"""The load-test tool's guards and arithmetic, and its CPU pinning on real processes (the runs against a real
server are in test_serve_attacks.py)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import psutil
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


@pytest.mark.parametrize(
    "args, says",
    [
        (["--mode", "rate", "--rate", "-5"], "--rate must be a positive number"),
        (["--mode", "rate", "--rate", "0"], "--rate must be a positive number"),
        (["--mode", "rate", "--rate", "nan"], "--rate must be a positive number"),
        (["--mode", "rate", "--rate", "inf"], "--rate must be a positive number"),
        (["--mode", "rate"], "--mode rate needs --rate"),
        (["--duration", "0"], "--duration must be a positive number of seconds"),
        (["--duration", "-1"], "--duration must be a positive number of seconds"),
        (["--duration", "nan"], "--duration must be a positive number of seconds"),
        (["--step", "inf"], "--step must be a positive number of seconds"),
        (["--overload-s", "0"], "--overload-s must be a positive number of seconds"),
        (["--fraction", "1.5"], "--fraction must be in (0, 1]"),
        (["--mode", "flood"], "unknown mode 'flood'"),
        (["--image", "no-such.png"], "--image no-such.png does not exist"),
        (["--image", "."], "--image . is a folder"),
        (["--out", "params.yaml/report.json"], "part of"),
    ],
)
def test_cli_refuses_bad_options_before_starting_a_server(tmp_path, args, says):
    """Each bad option is one line and exit 2, and no server was started for it (--start-server asked for one)."""
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    proc = run_cli(tmp_path, "loadtest", "--start-server", *args, check=False)
    assert proc.returncode == 2 and says in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert "starting `visionflow serve`" not in proc.stdout + proc.stderr
    assert not list(tmp_path.rglob("*.server.log"))


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


# ---------------------------------------------------------------------------------------------------------------
# CPU sets and pinning (issue 22: the server and the load generator on disjoint CPUs)


@pytest.mark.parametrize(
    "text, cpus", [("0", (0,)), ("0-2", (0, 1, 2)), ("3,0-1", (0, 1, 3)), (" 1 , 2 ", (1, 2)), ("2-2", (2,))]
)
def test_cpu_lists_are_parsed_as_taskset_writes_them(text, cpus):
    from visionflow.tools.loadtest.cpus import format_cpus, parse_cpus

    assert parse_cpus(text, (0, 1, 2, 3)) == cpus
    assert parse_cpus(format_cpus(cpus), (0, 1, 2, 3)) == cpus


@pytest.mark.parametrize(
    "usable, split", [((0,), None), ((0, 1), ((0,), (1,))), ((0, 1, 2, 3), ((0, 1, 2), (3,))), ((2, 5), ((2,), (5,)))]
)
def test_the_default_split_gives_the_generator_one_cpu(usable, split):
    from visionflow.tools.loadtest.cpus import choose_sets, default_split

    assert default_split(usable) == split
    assert choose_sets(None, None, usable) == split


def test_one_given_set_leaves_the_rest_to_the_other_side():
    from visionflow.tools.loadtest.cpus import choose_sets

    assert choose_sets("0", None, (0, 1, 2, 3)) == ((0,), (1, 2, 3))
    assert choose_sets(None, "0", (0, 1, 2, 3)) == ((1, 2, 3), (0,))
    assert choose_sets("0-1", "3", (0, 1, 2, 3)) == ((0, 1), (3,))


@pytest.mark.parametrize(
    "server, client, message",
    [
        ("5", None, "--server-cpus '5': CPU 5 is not one this process may use (usable: 0-1)"),
        (None, "0,7", "CPU 7 is not one"),
        ("0", "0-1", "overlap on CPU 0: they must be disjoint"),
        ("0-1", None, "none left for the generator"),
        ("one", None, "is not a CPU list"),
        ("1-0", None, "runs backwards"),
        ("", "x", "--client-cpus 'x' is not a CPU list"),
    ],
)
def test_bad_cpu_sets_get_one_line_errors(server, client, message):
    from visionflow.tools.loadtest.cpus import choose_sets

    with pytest.raises(LoadTestError, match=re.escape(message)) as err:
        choose_sets(server, client, (0, 1))
    assert "\n" not in str(err.value)


def test_cli_refuses_a_cpu_the_machine_lacks(tmp_path):
    proc = run_cli(
        tmp_path,
        "--params",
        str(REPO / "params.yaml"),
        "loadtest",
        "--url",
        "http://127.0.0.1:9",
        "--server-cpus",
        "4096",
        check=False,
    )
    assert proc.returncode == 2 and "CPU 4096 is not one" in proc.stderr and "Traceback" not in proc.stderr


PARENT = """
import os, subprocess, sys, threading, time
for _ in range(3):
    threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
kids = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])]
print(kids[0].pid, flush=True)
for line in sys.stdin:  # each line: one more child, which puts itself back on every CPU (as a worker might)
    kids.append(subprocess.Popen([sys.executable, "-c",
        "import os, time; os.sched_setaffinity(0, os.sched_getaffinity(1)); print(1, flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE))
    kids[-1].stdout.readline()
    print(kids[-1].pid, flush=True)
"""


@pytest.fixture
def process_tree():
    """A real process with 3 extra threads and a child; write a line to its stdin for one more child."""
    proc = subprocess.Popen([sys.executable, "-c", PARENT], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    child = int(proc.stdout.readline())
    yield proc, child
    for p in psutil.Process(proc.pid).children(recursive=True):
        p.kill()
    proc.kill()
    proc.wait()


needs_two = pytest.mark.skipif(
    not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
    reason="pinning to a strict subset needs 2 usable CPUs (Linux)",
)


@needs_two
def test_pinning_moves_every_thread_and_every_process_of_the_tree(process_tree):
    from visionflow.tools.loadtest import cpus
    from visionflow.tools.loadtest.placement import Placement

    proc, child = process_tree
    first = min(os.sched_getaffinity(0))
    before = cpus.process_affinity(proc.pid)
    placement = Placement(
        (first,), tuple(sorted(os.sched_getaffinity(0) - {first})), [proc.pid], "test", restore_server=True
    )
    assert placement.refresh() == 2  # the parent and its child
    assert len(cpus.thread_ids(proc.pid)) >= 4
    for pid in (proc.pid, child):  # read back, thread by thread
        assert all(os.sched_getaffinity(tid) == {first} for tid in cpus.thread_ids(pid))
    # a worker started later that puts itself on every CPU is found and pinned by the next check
    proc.stdin.write("more\n")
    proc.stdin.flush()
    late = int(proc.stdout.readline())
    assert cpus.process_affinity(late) == before
    assert placement.refresh() == 1 and cpus.process_affinity(late) == (first,)
    assert placement.refresh() == 0
    seen = placement.reported()
    assert {p["pid"] for p in seen["server_processes"]} == {proc.pid, child, late}
    assert all(p["cpus"] == str(first) for p in seen["server_processes"])
    placement.restore()  # a server found running goes back where it was
    assert cpus.process_affinity(proc.pid) == before and cpus.process_affinity(late) == before


def test_a_server_is_found_by_its_listening_port():
    from visionflow.tools.loadtest.cpus import listening_pids

    listener = subprocess.Popen([sys.executable, "-c", LISTENER], stdout=subprocess.PIPE, text=True)
    try:
        port = int(listener.stdout.readline())
        assert listening_pids(port) == [listener.pid]
    finally:
        listener.kill()
        listener.wait()
    assert listening_pids(port) == []


LISTENER = """
import socket, time
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen()
print(s.getsockname()[1], flush=True); time.sleep(60)
"""


def test_a_phase_too_short_for_cpu_accounting_gets_a_note_not_a_figure():
    from visionflow.tools.loadtest.placement import MIN_CPU_S, Placement

    placement = Placement.unpinned("test", [os.getpid()])
    before = placement.cpu_snapshot()
    assert "too short" in placement.cpu_used(before, MIN_CPU_S / 2)["note"]
    used = placement.cpu_used(before, MIN_CPU_S)
    assert set(used) == {"generator_cores", "server_cores", "server_processes"} and used["server_processes"] >= 1
