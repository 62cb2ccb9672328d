"""The server the load test runs against on this machine: started by it (`visionflow serve` in a subprocess, pinned
from its first instruction) or found running by its listening port; either way placed on its CPU set."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

from visionflow.tools.loadtest import cpus as cpu
from visionflow.tools.loadtest.client import LoadTestError, require_loopback
from visionflow.tools.loadtest.placement import Placement

READY_TIMEOUT_S = 180  # a cold `visionflow serve` on one busy core imports for tens of seconds


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def visionflow_command() -> list[str]:
    """This Python's `visionflow`: its console script beside the interpreter, else `python -m visionflow.cli`."""
    exe = Path(sys.executable).with_name("visionflow")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "visionflow.cli"]


def serve_command(params: Path, overrides: list[str], port: int) -> list[str]:
    """`visionflow --params ... [--set ...] serve` on 127.0.0.1:port, with this Python's visionflow."""
    sets = [arg for o in overrides for arg in ("--set", o)]
    return [*visionflow_command(), "--params", str(params), *sets, "serve", "--host", "127.0.0.1", "--port", str(port)]


def start_server(
    cmd: list[str], cwd: Path, port: int, log: Path, cpus: tuple[int, ...] | None = None
) -> subprocess.Popen:
    """Start the server and wait for its /ready; pinned to `cpus` before it runs a line of Python (so every thread
    and worker process it makes inherits the set). LoadTestError when it exits or is not ready in time."""
    import httpx

    log.parent.mkdir(parents=True, exist_ok=True)
    # The child inherits the affinity of the thread that forks it: this thread goes onto the server's CPUs for the
    # fork, and back (no preexec_fn, which is unsafe in a process with threads).
    mine = os.sched_getaffinity(0) if cpus else None
    try:
        if cpus:
            os.sched_setaffinity(0, set(cpus))  # pid 0: this thread only (Linux)
        with log.open("wb") as fh:
            proc = subprocess.Popen(
                cmd, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1")
            )
    finally:
        if mine:
            os.sched_setaffinity(0, mine)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            raise LoadTestError(f"`visionflow serve` exited with {proc.returncode}; its output is in {log}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2, trust_env=False).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            stop_server(proc)
            raise LoadTestError(f"`visionflow serve` was not ready in {READY_TIMEOUT_S} s; its output is in {log}")
        time.sleep(0.25)


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def find_server(url: str, sets: tuple[tuple[int, ...], tuple[int, ...]] | None) -> Placement:
    """The placement of a server already running at `url`: its process found by the listening port."""
    port = urlsplit(url).port or (443 if url.startswith("https") else 80)
    roots = cpu.listening_pids(port)
    if not roots:
        return Placement.unpinned(
            f"no process on this machine that we may see listens on port {port} (a tunnel, a container, another "
            "user's server?): the server is not pinned, nor is the generator"
        )
    if sets is None:
        return Placement.unpinned(_why_not(), roots)
    return Placement(*sets, roots, f"found listening on port {port}", restore_server=True)


def _why_not() -> str:
    n = len(cpu.usable_cpus())
    return f"{n} usable CPU: no disjoint sets; server and generator share it" if n < 2 else "--no-pin"


@contextlib.contextmanager
def placed_server(
    url: str | None,
    *,
    start: tuple[Path, list[str]] | None,
    server_cpus: str | None = None,
    client_cpus: str | None = None,
    pin: bool = True,
    log: Path,
    say=lambda _msg: None,
) -> Iterator[tuple[str, Placement]]:
    """(base URL, placement) of the server to load: started when `start` is (params file, --set overrides), on
    `url`'s port or a free one, and stopped afterwards; else the one running at `url`. The generator (this
    process) is pinned meanwhile, and put back on its own CPUs afterwards."""
    base = require_loopback(url) if url else None
    if pin:
        cpu.linux_only()
    sets = cpu.choose_sets(server_cpus, client_cpus, cpu.usable_cpus()) if pin else None
    proc = None
    if start is not None:
        port = urlsplit(base).port if base else free_port()
        base = base or f"http://127.0.0.1:{port}"
        say(f"starting `visionflow serve` on {base}" + (f", CPUs {cpu.format_cpus(sets[0])}" if sets else ""))
        proc = start_server(serve_command(start[0], start[1], port), start[0].parent, port, log, sets and sets[0])
        placement = (
            Placement(*sets, [proc.pid], f"started by the load test (pid {proc.pid}, output in {log})")
            if sets
            else Placement.unpinned(_why_not(), [proc.pid])
        )
    else:
        placement = find_server(base, sets)
    try:
        placement.apply()
        yield base, placement
    finally:
        placement.restore()
        if proc is not None:
            stop_server(proc)
