"""The load test's open loop (constant arrival rate) paced from a thread, against a target that answers at once:
every arrival becomes a request, in order, and a cancelled phase stops its pacer."""

from __future__ import annotations

import asyncio
import threading
import time

from visionflow.tools.loadtest.phases import open_loop


class Instant:
    """A Target that records when each request started and answers 200 at once."""

    def __init__(self) -> None:
        self.starts: list[float] = []

    async def hit(self, rec) -> None:
        self.starts.append(time.perf_counter())
        rec.ok.append(0.0)


def test_every_arrival_is_a_request_none_before_its_instant():
    target = Instant()
    t0 = time.perf_counter()
    phase = asyncio.run(open_loop(target, rate=400, duration_s=0.25, max_requests=10_000, max_in_flight=8, name="x"))
    assert phase.requests == phase.ok == 100 and phase.dropped == 0
    # request i is never sent before i/rate (the pacer waits for each instant; the start has 5 ms of slack)
    assert all(s - t0 >= i / 400 for i, s in enumerate(target.starts))


def test_a_cancelled_phase_stops_its_pacer():
    target = Instant()

    async def main() -> None:
        phase = asyncio.ensure_future(open_loop(target, 100, 60, 10_000, 8, "x"))
        await asyncio.sleep(0.2)
        phase.cancel()
        try:
            await phase
        except asyncio.CancelledError:
            pass

    before = threading.active_count()
    asyncio.run(main())
    sent = len(target.starts)
    assert 5 <= sent <= 40
    time.sleep(0.1)  # (a pacer still running would have posted ~10 more by now, onto a closed loop)
    assert len(target.starts) == sent
    deadline = time.monotonic() + 5
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert threading.active_count() <= before
