"""CPU sets for the load test: parsing, the default server/generator split, and pinning whole processes.

A process is pinned thread by thread: on Linux sched_setaffinity(pid) moves only the thread whose id is `pid`,
and a running server's other threads (ONNX Runtime's, the inference thread, uvicorn's) would stay where they were.
Threads and child processes created after the pin inherit it.
"""

from __future__ import annotations

import os
from pathlib import Path

import psutil

from visionflow.tools.loadtest.client import LoadTestError


def can_pin() -> bool:
    """Whether this platform sets CPU affinity (Linux does; macOS and Windows have no sched_setaffinity)."""
    return hasattr(os, "sched_setaffinity")


def usable_cpus() -> tuple[int, ...]:
    """The CPUs this process may run on (a container or taskset may allow fewer than the machine has)."""
    if not can_pin():
        return tuple(range(os.cpu_count() or 1))
    return tuple(sorted(os.sched_getaffinity(0)))


def format_cpus(cpus) -> str:
    """(0, 1, 2, 5) -> "0-2,5": taskset's list form."""
    cpus, parts = sorted(cpus), []
    for c in cpus:
        if parts and c == parts[-1][1] + 1:
            parts[-1][1] = c
        else:
            parts.append([c, c])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in parts)


def parse_cpus(text: str, usable: tuple[int, ...], what: str = "CPU set") -> tuple[int, ...]:
    """ "0", "0-2", "0,3,5-6" -> the CPUs, sorted; LoadTestError (one line) for bad syntax or a CPU not usable."""
    cpus: set[int] = set()
    for part in str(text).replace(" ", "").split(","):
        lo, sep, hi = part.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise LoadTestError(f"{what} {text!r} is not a CPU list such as 0, 0-2 or 0,3,5-6")
        first, last = int(lo), int(hi) if sep else int(lo)
        if last < first:
            raise LoadTestError(f"{what} {text!r}: the range {part} runs backwards")
        cpus.update(range(first, last + 1))
    outside = sorted(cpus - set(usable))
    if outside:
        raise LoadTestError(
            f"{what} {text!r}: CPU {format_cpus(outside)} is not one this process may use "
            f"(usable: {format_cpus(usable)})"
        )
    return tuple(sorted(cpus))


def default_split(usable: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """(server, generator): the generator gets the last CPU, the server all the others; None on one CPU.

    One CPU for the generator because it is one process with one event loop: a second CPU would sit idle while the
    server could use it. On 2 CPUs this is the 1 + 1 split; on 4, 3 + 1.
    """
    if len(usable) < 2:
        return None
    return tuple(usable[:-1]), (usable[-1],)


def choose_sets(
    server: str | None, client: str | None, usable: tuple[int, ...]
) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """The (server, generator) CPU sets from the options: both given, one given (the other gets the rest), or
    neither (default_split). None when there is nothing to split (one CPU and no option)."""
    s = parse_cpus(server, usable, "--server-cpus") if server else None
    c = parse_cpus(client, usable, "--client-cpus") if client else None
    if s is None and c is None:
        return default_split(usable)
    if s is None or c is None:
        given = s if s is not None else c
        rest = tuple(x for x in usable if x not in given)
        if not rest:
            raise LoadTestError(
                f"CPUs {format_cpus(given)} are all the usable ones ({format_cpus(usable)}): none left for the "
                + ("generator" if c is None else "server")
            )
        s, c = (s, rest) if c is None else (rest, c)
    overlap = sorted(set(s) & set(c))
    if overlap:
        raise LoadTestError(
            f"--server-cpus {format_cpus(s)} and --client-cpus {format_cpus(c)} overlap on CPU "
            f"{format_cpus(overlap)}: they must be disjoint"
        )
    return s, c


def thread_ids(pid: int) -> list[int]:
    """The ids of a process's threads (Linux /proc), the main one included."""
    try:
        return sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    except FileNotFoundError:
        raise psutil.NoSuchProcess(pid) from None


def pin_process(pid: int, cpus) -> int:
    """Pin every thread of one process (not its children) to `cpus`; the number of threads pinned."""
    n = 0
    for tid in thread_ids(pid):
        try:
            os.sched_setaffinity(tid, set(cpus))
            n += 1
        except ProcessLookupError:  # the thread ended meanwhile
            continue
    return n


def process_affinity(pid: int) -> tuple[int, ...]:
    """The union of the CPU sets of a process's threads: what it can actually run on."""
    cpus: set[int] = set()
    for tid in thread_ids(pid):
        try:
            cpus |= os.sched_getaffinity(tid)
        except ProcessLookupError:
            continue
    return tuple(sorted(cpus))


def process_tree(pids) -> list[psutil.Process]:
    """The processes and all their descendants, each once, those that still exist."""
    seen: dict[int, psutil.Process] = {}
    for pid in pids:
        try:
            root = psutil.Process(pid)
            for p in [root, *root.children(recursive=True)]:
                seen.setdefault(p.pid, p)
        except psutil.NoSuchProcess:
            continue
    return list(seen.values())


def listening_pids(port: int) -> list[int]:
    """The processes listening on TCP `port` (any local address), outermost first: uvicorn with several workers
    has the parent and every worker on the same socket, and pinning the tree of the outermost covers them all."""
    pids = {
        c.pid
        for c in psutil.net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid
    }
    return sorted(pid for pid in pids if _parent(pid) not in pids)


def _parent(pid: int) -> int | None:
    try:
        return psutil.Process(pid).ppid()
    except psutil.NoSuchProcess:
        return None


def cpu_seconds(procs: list[psutil.Process]) -> dict[int, float]:
    """User + system CPU seconds of each process that still exists, by pid."""
    out = {}
    for p in procs:
        try:
            t = p.cpu_times()
            out[p.pid] = t.user + t.system
        except psutil.NoSuchProcess:
            continue
    return out


def linux_only() -> None:
    if not can_pin() or not Path("/proc/self/task").is_dir():
        raise LoadTestError("CPU pinning needs Linux (sched_setaffinity and /proc); run with --no-pin here")
