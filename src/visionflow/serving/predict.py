"""POST /predict and /predict/batch as a plain ASGI handler. FastAPI's routing, dependency solving, form parsing
into spooled files and response encoding cost about 3x the model's own time per request on the event loop
(py-spy, 2 cores), and under load that queueing set the latency tail.

Inference runs on the Batcher's thread, off the event loop, behind a concurrency limit that answers 503 when full
(before the body is read: shedding load must be cheap)."""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import time
from collections.abc import Callable
from typing import Any

from fastapi import HTTPException, Request
from starlette.requests import ClientDisconnect

from visionflow.data.imageio import RejectedImage
from visionflow.serving.batcher import Batcher
from visionflow.serving.champion import LoadedModel
from visionflow.serving.http import Refused
from visionflow.serving.inference import Job
from visionflow.serving.metrics import ServingMetrics

logger = logging.getLogger(__name__)


class PredictHandler:
    """Serves the predict paths (`handles(scope)` says which requests are its own)."""

    def __init__(
        self,
        *,
        model: Callable[[], LoadedModel],
        require_token,
        batcher: Batcher,
        metrics: ServingMetrics,
        max_in_flight: int,
        max_batch: int,
        timeout_s: float,
        route: Callable[[LoadedModel], tuple[LoadedModel, LoadedModel | None]] | None = None,
    ):
        # route(champion) -> (the model that answers, a challenger to shadow it or None): serving.canary's
        self.route = route
        self.model, self.require_token, self.batcher, self.metrics = model, require_token, batcher, metrics
        self.slots = asyncio.Semaphore(max_in_flight)
        self.timeout_s = timeout_s
        self.routes = {"/predict": ("predict", 1), "/predict/batch": ("predict_batch", max_batch)}

    def handles(self, scope) -> bool:
        return scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in self.routes

    async def __call__(self, scope, receive, send) -> None:
        endpoint, max_files = self.routes[scope["path"]]
        start = time.perf_counter()
        status, answer, headers, results = 200, b"", {}, []
        try:
            results, answer = await self._predict(Request(scope, receive), max_files)
        except Refused:  # BodyLimit answers for a body too large or too slow
            raise
        except ClientDisconnect:
            self.metrics.requests.labels(endpoint, "disconnected").inc()
            return
        except Exception as exc:  # noqa: BLE001 - every failure is answered; _failure logs the unforeseen
            status, answer, headers = _failure(exc)
        self.metrics.answered(endpoint, status, time.perf_counter() - start, results)
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(answer)).encode()),
                    *((k.lower().encode(), v.encode()) for k, v in headers.items()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": answer})

    async def _predict(self, request: Request, max_files: int) -> tuple[list[dict[str, Any]], bytes]:
        await self.require_token(request)
        self._shed_if_full()  # before reading the body: shedding load must be cheap
        body = await request.body()  # (BodyLimit, around this app, stops a body over the limit)
        model, shadow = self.route(self.model()) if self.route is not None else (self.model(), None)
        self._shed_if_full()  # (others may have taken the last slot while this body arrived)
        await self.slots.acquire()
        job = self.batcher.submit(
            Job(model, body, request.headers.get("content-type", "").encode("latin-1"), max_files, shadow)
        )
        # The slot is freed when the work really ends: a timed-out request cannot leave work piling up.
        job.add_done_callback(self._work_ended)
        try:
            async with asyncio.timeout(self.timeout_s):  # the shield: a timeout cancels the wait, not the work
                return await asyncio.shield(job)
        except TimeoutError:
            job.add_done_callback(_late_failure)  # the work goes on; if it fails, nobody else will say so
            raise

    def _shed_if_full(self) -> None:
        if self.slots.locked():
            raise HTTPException(
                503, "server busy: too many requests in flight, retry shortly", headers={"Retry-After": "1"}
            )

    def _work_ended(self, job: asyncio.Future) -> None:
        self.slots.release()
        if not job.cancelled():
            job.exception()  # retrieved: after a 504 nobody awaits it, and asyncio would log it as never retrieved


def _late_failure(job: asyncio.Future) -> None:
    if not job.cancelled() and (exc := job.exception()) is not None:
        logger.error("predict: a request answered 504 failed afterwards: %s: %s", type(exc).__name__, exc)


class Answered(Exception):
    """A failure already turned into its answer (an inference process sends these: they survive pickling)."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None):
        super().__init__(status, detail, headers)
        self.status, self.detail, self.headers = status, detail, headers or {}

    def __str__(self) -> str:
        return f"{self.status} {self.detail}"


def failure_answer(exc: BaseException) -> Answered:
    """`exc` as the answer its request gets (logs an unforeseen one, with its traceback, where it happened)."""
    try:
        raise exc
    except Exception as e:  # noqa: BLE001 - re-raised so that _failure's log has the traceback
        status, body, headers = _failure(e)
    return Answered(status, json.loads(body)["detail"], headers)


def _failure(exc: Exception) -> tuple[int, bytes, dict[str, str]]:
    """(status, JSON body, headers) for a predict request that failed with `exc` (called in its except block)."""
    if isinstance(exc, Answered):
        return exc.status, json.dumps({"detail": exc.detail}).encode(), exc.headers
    if isinstance(exc, HTTPException):
        return exc.status_code, json.dumps({"detail": exc.detail}).encode(), exc.headers or {}
    if isinstance(exc, RejectedImage):
        status = 415 if exc.reason in ("not_an_image", "format_not_allowed") else 422
        return status, json.dumps({"detail": f"{exc.reason}: {exc.detail}"}).encode(), {}
    if isinstance(exc, TimeoutError):  # (before OSError, of which it is a subclass)
        return 504, b'{"detail":"inference timed out"}', {}
    if isinstance(exc, (OSError, sqlite3.Error)):  # the prediction log or review queue cannot be written
        logger.error("predict: cannot record the prediction: %s: %s", type(exc).__name__, exc)
        detail = (
            f"the server cannot record predictions (prediction log or review queue): {type(exc).__name__}; "
            "see the server log"
        )
        return 503, json.dumps({"detail": detail}).encode(), {"Retry-After": "5"}
    logger.exception("predict failed")
    return 500, b'{"detail":"internal server error; see the server log"}', {}
