"""The inference thread: requests that wait together run together, as one batch."""

from __future__ import annotations

import asyncio
import logging
import queue as queues
import threading
import time
from typing import Any

logger = logging.getLogger(__name__)


class Batcher:
    """Inference threads, one per handler, each taking every request waiting when it comes round and running
    them as one batch. A handler is the batch work itself (the server's own thread) or the proxy of an
    inference process (visionflow.serving.workers), whose thread only waits on a pipe.

    Nothing waits for a batch to fill: on an idle server a lone request runs at once; on a busy one the thread
    hand-offs, the ONNX Runtime call and the prediction-log write are shared by everything that queued meanwhile,
    so the more requests wait, the less each costs. One thread per handler, not a pool on one: the Python part of
    inference holds the GIL, and a pool of four threads plus the event loop fought over it (stalls of 30-80 ms).
    A handler gets a list of jobs and returns one outcome per job: a result, or the exception to raise for it;
    one with a `close()` has it called when its thread stops.
    `observe(waits_s, seconds)`, when given, hears of every batch: how long each of its jobs waited for the thread
    and how long the batch took (the /metrics histograms that tell a busy inference thread from a slow model).
    A `handle` with an `after()` method has it called once each batch's answers are settled (work off the response
    path: the shadow challenger); `observe_after`, when given, hears what it returns when that is not None.
    """

    def __init__(self, handles: list, max_jobs: int, observe=None, observe_after=None):
        self.handles = handles
        self.max_jobs, self.observe, self.observe_after = max_jobs, observe, observe_after
        self._jobs: queues.SimpleQueue = queues.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._run, args=(h,), name=f"infer-{i}", daemon=True)
            for i, h in enumerate(self.handles)
        ]
        for t in self._threads:
            t.start()

    def submit(self, job: Any) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._jobs.put((job, future, loop, time.perf_counter()))
        return future

    def stop(self) -> None:
        for _ in self._threads:  # one stop for each thread
            self._jobs.put(None)

    def _run(self, handle) -> None:
        try:
            self._serve(handle)
        finally:
            if (close := getattr(handle, "close", None)) is not None:
                close()

    def _serve(self, handle) -> None:
        while (first := self._jobs.get()) is not None:
            batch = [first]
            while len(batch) < self.max_jobs:
                try:
                    nxt = self._jobs.get_nowait()
                except queues.Empty:
                    break
                if nxt is None:  # stop after this batch
                    self._jobs.put(None)
                    break
                batch.append(nxt)
            start = time.perf_counter()
            try:
                outcomes = handle([job for job, _, _, _ in batch])
            except Exception as exc:  # noqa: BLE001 - every waiting request gets the failure, the thread lives on
                outcomes = [exc] * len(batch)
            if self.observe is not None:
                try:
                    self.observe([start - queued for _, _, _, queued in batch], time.perf_counter() - start)
                except Exception:  # a metrics failure must not stop the thread every request needs
                    logger.exception("batcher: observe failed")
            by_loop: dict[Any, list] = {}
            for (_, future, loop, _), outcome in zip(batch, outcomes):
                by_loop.setdefault(loop, []).append((future, outcome))
            for loop, settled in by_loop.items():  # one wake-up of the event loop per batch
                loop.call_soon_threadsafe(_settle, settled)
            self._after(handle)

    def _after(self, handle) -> None:
        after = getattr(handle, "after", None)
        if after is None:
            return
        try:
            stats = after()
            if stats is not None and self.observe_after is not None:
                self.observe_after(stats)
        except Exception:  # work after the answers must not stop the thread every request needs
            logger.exception("batcher: after() failed")


def _settle(settled: list[tuple[asyncio.Future, Any]]) -> None:
    for future, outcome in settled:
        if future.done():  # cancelled meanwhile
            continue
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)
