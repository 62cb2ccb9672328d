"""The load test's phases: sequential, closed loop (fixed concurrency) and open loop (constant arrival rate), each
bounded by a duration and a request count, and what each measured."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from visionflow.tools.loadtest.client import KeepAliveClient, LoadTestError


@dataclass
class Phase:
    """One phase of the load test; latencies in milliseconds, measured from the moment a request was sent."""

    name: str
    mode: str  # "sequential", "concurrency" (closed loop) or "rate" (open loop, constant arrival rate)
    concurrency: int | None
    target_rate_rps: float | None
    planned_s: float
    elapsed_s: float
    requests: int
    ok: int
    errors: dict[str, int]  # HTTP status or exception name -> count, for every answer that is not a 200
    throughput_rps: float  # answers (any status) per second
    ok_rps: float  # 200s per second
    latency_ms: dict[str, float]  # of the 200s: p50, p90, p99, mean, min, max
    error_latency_ms: dict[str, float]  # of the other answers (how fast a 503 is)
    late_starts: int = 0  # rate mode: requests the client started >50 ms behind schedule (client overloaded)
    dropped: int = 0  # rate mode: arrivals skipped because max_in_flight requests were already open
    server: dict[str, Any] | None = None  # rate mode: the server's own view of the phase (see server_view)
    cpu: dict[str, Any] | None = None  # cores the generator and the server kept busy (Placement.cpu_used)

    @property
    def n_errors(self) -> int:
        return sum(self.errors.values())


def percentiles(values_s: list[float]) -> dict[str, float]:
    if not values_s:
        return {}
    ms = np.asarray(values_s) * 1000
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {
        "p50": round(float(p50), 3),
        "p90": round(float(p90), 3),
        "p99": round(float(p99), 3),
        "mean": round(float(ms.mean()), 3),
        "min": round(float(ms.min()), 3),
        "max": round(float(ms.max()), 3),
    }


@dataclass
class _Recorder:
    ok: list[float] = field(default_factory=list)
    failed: list[float] = field(default_factory=list)
    errors: Counter = field(default_factory=Counter)

    def phase(
        self,
        name: str,
        mode: str,
        *,
        concurrency: int | None,
        rate: float | None,
        planned_s: float,
        elapsed_s: float,
        late: int = 0,
        dropped: int = 0,
    ) -> Phase:
        n = len(self.ok) + len(self.failed)
        elapsed_s = max(elapsed_s, 1e-9)
        return Phase(
            name,
            mode,
            concurrency,
            rate,
            round(planned_s, 3),
            round(elapsed_s, 3),
            n,
            len(self.ok),
            dict(sorted(self.errors.items())),
            round(n / elapsed_s, 2),
            round(len(self.ok) / elapsed_s, 2),
            percentiles(self.ok),
            percentiles(self.failed),
            late,
            dropped,
        )


class Target:
    """The endpoint under test and the one request every load request sends."""

    def __init__(self, client: KeepAliveClient):
        self.client = client

    async def hit(self, rec: _Recorder) -> None:
        start = time.perf_counter()
        status = await self.client.post()
        elapsed = time.perf_counter() - start
        if status == "200":
            rec.ok.append(elapsed)
        else:
            rec.failed.append(elapsed)
            rec.errors[status] += 1


async def sequential(target: Target, n: int, max_s: float, name: str = "single") -> Phase:
    rec = _Recorder()
    start = time.perf_counter()
    for _ in range(n):
        if time.perf_counter() - start > max_s:
            break
        await target.hit(rec)
    return rec.phase(
        name, "sequential", concurrency=1, rate=None, planned_s=max_s, elapsed_s=time.perf_counter() - start
    )


async def closed_loop(target: Target, concurrency: int, duration_s: float, max_requests: int, name: str) -> Phase:
    """`concurrency` workers, each sending its next request as soon as the last one is answered."""
    rec = _Recorder()
    start = time.perf_counter()
    deadline = start + duration_s
    issued = 0

    async def worker() -> None:
        nonlocal issued
        while time.perf_counter() < deadline and issued < max_requests:
            issued += 1
            await target.hit(rec)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return rec.phase(
        name,
        "concurrency",
        concurrency=concurrency,
        rate=None,
        planned_s=duration_s,
        elapsed_s=time.perf_counter() - start,
    )


async def open_loop(
    target: Target, rate: float, duration_s: float, max_requests: int, max_in_flight: int, name: str
) -> Phase:
    """Constant arrival rate: request i starts at i/rate seconds whatever happened to the earlier ones.

    The arrivals are paced by a thread of their own, not by the event loop's timers: those wake on whole
    milliseconds (asyncio's and uvloop's alike), so at 1,300 req/s a third of the requests went out back to back,
    in pairs, every 1.1 ms, and the phase measured bursts, not a constant rate. A thread's timed wait keeps
    each start within ~0.1 ms of its instant, for a few percent of a core."""
    if rate <= 0:
        raise LoadTestError(f"the arrival rate must be positive, not {rate}")
    rec = _Recorder()
    n = max(1, min(max_requests, int(rate * duration_s)))
    in_flight: set[asyncio.Task] = set()
    counts = {"late": 0, "dropped": 0}
    loop = asyncio.get_running_loop()
    start = time.perf_counter() + 0.005  # (the pacer thread starting)

    def arrive(due: float) -> None:  # on the event loop
        if time.perf_counter() - due > 0.05:
            counts["late"] += 1
        if len(in_flight) >= max_in_flight:
            counts["dropped"] += 1
            return
        task = asyncio.create_task(target.hit(rec))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)

    stop = threading.Event()  # the phase was cancelled (Ctrl-C): the pacer stops too

    def pace() -> None:  # on the pacer thread
        for i in range(n):
            due = start + i / rate
            if stop.wait(max(due - time.perf_counter(), 0)):
                return
            loop.call_soon_threadsafe(arrive, due)

    try:
        await asyncio.to_thread(pace)  # (its result is posted after the last arrival: every task exists by now)
    finally:
        stop.set()
    if in_flight:
        await asyncio.gather(*in_flight)
    late, dropped = counts["late"], counts["dropped"]
    return rec.phase(
        name,
        "rate",
        concurrency=None,
        rate=round(rate, 3),
        planned_s=duration_s,
        elapsed_s=time.perf_counter() - start,
        late=late,
        dropped=dropped,
    )
