"""Serving: FastAPI + ONNX Runtime on the registry's champion, with a human review queue and a prediction log.

- The champion is loaded from `models:/<name>@champion`; a background thread polls the alias and swaps in a new
  session when it moves. Requests hold a reference to the session they started with, so none is dropped.
- Inference runs on one batching thread, off the event loop, behind a concurrency limit that answers 503 when
  full; the predict routes are plain ASGI handlers (the rest of the API is FastAPI).
- Uploads are bounded (body size, multipart parts, decode pixels, formats, time) and never name a server path.
- Low-confidence predictions go to the review queue (SQLite + image files); a reviewed label turns the image into
  labelled data under data/reviewed/<class>/, a folder-per-class dataset the retraining flow can ingest.
- Every prediction is appended to a JSONL prediction log that the drift check reads.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import queue as queues
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from visionflow.config import Params
from visionflow.errors import ConfigError, VisionflowError
from visionflow.data.imageio import DecodeRules, RejectedImage
from visionflow.serving.review import ReviewQueue, docs_router, review_router

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedModel:
    version: str
    session: Any
    card: dict[str, Any]
    tags: dict[str, str]


class ChampionHolder:
    """Holds the current champion; `refresh()` reloads when the alias points at a different version."""

    def __init__(self, model_name: str, alias: str = "champion", *, cache_dir: Path):
        self.model_name = model_name
        self.alias = alias
        self.cache_dir = cache_dir
        self.current: LoadedModel | None = None
        self.last_error: str | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def refresh(self) -> bool:
        from visionflow.onnxrt import ort_session
        from visionflow.registry.store import alias_version, download_onnx, version_info

        try:
            version = alias_version(self.model_name, self.alias)
            if version is None:
                self.last_error = f"{self.model_name} has no {self.alias!r} alias yet"
                return False
            if self.current is not None and self.current.version == version:
                return False
            path, card = download_onnx(self.model_name, version, self.cache_dir / version)
            # One ONNX Runtime thread: the batcher's thread and the event loop already keep two cores busy, and
            # threads on top of that oversubscribe the cores and stretch the latency tail.
            loaded = LoadedModel(version, ort_session(path, threads=1), card,
                                 version_info(self.model_name, version)["tags"])
            with self._lock:
                self.current = loaded  # one reference swap: in-flight requests keep the session they hold
            self.last_error = None
            return True
        except Exception as exc:  # registry unreachable: keep serving the model we have
            self.last_error = f"{type(exc).__name__}: {exc}"
            return False

    def watch(self, interval_s: float) -> threading.Thread:
        def loop() -> None:
            while not self._stop.wait(interval_s):
                self.refresh()

        t = threading.Thread(target=loop, name="champion-watch", daemon=True)
        t.start()
        return t

    def stop(self) -> None:
        self._stop.set()


class PredictionLog:
    """Append-only JSON lines. One handle stays open (opening per line cost the event loop); it is reopened when
    the file (or its folder) was rotated or removed, and every batch of lines is written and flushed whole under a
    lock (the batcher writes one batch per model call, so the check is shared by every request in it)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._fh: Any = None
        self._inode: int | None = None

    def append(self, *records: dict[str, Any]) -> None:
        text = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records)
        with self._lock:
            try:
                inode = os.stat(self.path).st_ino
            except FileNotFoundError:
                inode = None
            if self._fh is None or inode != self._inode:
                self._close_unlocked()
                self.path.parent.mkdir(parents=True, exist_ok=True)  # its folder may have gone with it
                self._fh = self.path.open("a", encoding="utf-8")
                self._inode = os.fstat(self._fh.fileno()).st_ino
            self._fh.write(text)
            self._fh.flush()

    def _close_unlocked(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def close(self) -> None:
        with self._lock:
            self._close_unlocked()


class Batcher:
    """One inference thread that takes every request waiting when it comes round and runs them as one batch.

    Nothing waits for a batch to fill: on an idle server a lone request runs at once; on a busy one the thread
    hand-offs, the ONNX Runtime call and the prediction-log write are shared by everything that queued meanwhile,
    so the more requests wait, the less each costs. One thread, not a pool: the Python part of inference holds
    the GIL, and a pool of four threads plus the event loop fought over it (stalls of 30-80 ms under load).
    `handle` gets a list of jobs and returns one outcome per job: a result, or the exception to raise for it.
    `observe(waits_s, seconds)`, when given, hears of every batch: how long each of its jobs waited for the thread
    and how long the batch took (the /metrics histograms that tell a busy inference thread from a slow model).
    """

    def __init__(self, handle, max_jobs: int, observe=None):
        self.handle, self.max_jobs, self.observe = handle, max_jobs, observe
        self._jobs: queues.SimpleQueue = queues.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="infer", daemon=True)
        self._thread.start()

    def submit(self, job: Any) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._jobs.put((job, future, loop, time.perf_counter()))
        return future

    def stop(self) -> None:
        self._jobs.put(None)

    def _run(self) -> None:
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
                outcomes = self.handle([job for job, _, _, _ in batch])
            except Exception as exc:  # noqa: BLE001 - every waiting request gets the failure, the thread lives on
                outcomes = [exc] * len(batch)
            if self.observe is not None:
                try:
                    self.observe([start - queued for _, _, _, queued in batch], time.perf_counter() - start)
                except Exception:  # noqa: BLE001 - a metrics failure must not stop the thread every request needs
                    logger.exception("batcher: observe failed")
            by_loop: dict[Any, list] = {}
            for (_, future, loop, _), outcome in zip(batch, outcomes):
                by_loop.setdefault(loop, []).append((future, outcome))
            for loop, settled in by_loop.items():  # one wake-up of the event loop per batch
                loop.call_soon_threadsafe(_settle, settled)


def _settle(settled: list[tuple[asyncio.Future, Any]]) -> None:
    for future, outcome in settled:
        if future.done():  # cancelled meanwhile
            continue
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)


class BodyLimit:
    """ASGI middleware: refuse bodies over max_bytes early (Content-Length) or as soon as the stream passes it
    (413), and bodies still arriving timeout_s after the app began to read them (408): a client that trickles
    its upload would otherwise hold the request, and a predict slot, for as long as it likes."""

    def __init__(self, app, max_bytes: int, timeout_s: float):
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await _plain(send, 413, b"request body too large")
        seen, deadline, complete, started = 0, None, False, False

        async def limited():
            nonlocal seen, deadline, complete
            if complete:  # after the body: waiting for a disconnect has no deadline
                return await receive()
            loop = asyncio.get_running_loop()
            deadline = deadline or loop.time() + self.timeout_s
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0))
            except TimeoutError:
                raise _Refused(408, b"request body not received in time") from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _Refused(413, b"request body too large")
                complete = not message.get("more_body", False)
            return message

        async def tracked(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited, tracked)
        except _Refused as exc:
            if not started:  # (a FastAPI route's error handler may have answered already)
                await _plain(send, exc.status, exc.body)


class _Refused(Exception):
    """A request body BodyLimit refuses: the status and the text to answer with."""

    def __init__(self, status: int, body: bytes):
        super().__init__(body.decode())
        self.status, self.body = status, body


async def _plain(send, status: int, body: bytes) -> None:
    # Connection: close, or uvicorn keeps the connection alive and reads (and drops) the rest of a 1 GiB body.
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def header_deadline_protocol(header_timeout_s: float):
    """uvicorn's httptools protocol with a deadline on request headers: a connection that has not sent a whole
    request head within header_timeout_s of opening, or of its previous response, gets a 408 and is closed.
    uvicorn itself has no such timer (its keep-alive timer stops at the first byte), so idle and slowloris
    connections would stay open for ever; with uvicorn's limit_concurrency they made every request, /health
    included, a 503."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class HeaderDeadline(HttpToolsProtocol):
        _timer: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            self._disarm()
            self._timer = self.loop.call_later(header_timeout_s, self._expired)

        def _disarm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _expired(self) -> None:
            if not self.transport.is_closing():
                self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\n"
                                     b"connection: close\r\n\r\n")
                self.transport.close()

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def on_response_complete(self) -> None:
            idle_next = not self.pipeline  # a queued pipelined request has its head already
            super().on_response_complete()
            if idle_next and not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return HeaderDeadline


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


NO_FILE = "send the image as a multipart file field (e.g. -F file=@image.png)"
MAX_FIELD_BYTES = 64 * 1024  # a form field that is not a file: nothing we read, so it stays small


def multipart_files(body: bytes, content_type: bytes, *, max_files: int, max_fields: int,
                    max_file_bytes: int) -> list[bytes]:
    """The file parts of a multipart/form-data body, in order, with every limit checked as the parser goes (the
    5,000th part is never reached: parsing stops at the first part over a limit). Fields without a file name are
    counted and dropped; file names are never read."""
    from python_multipart.exceptions import FormParserError
    from python_multipart.multipart import MultipartParser, parse_options_header

    kind, options = parse_options_header(content_type)
    if kind != b"multipart/form-data":
        raise HTTPException(422, NO_FILE)
    boundary = options.get(b"boundary")
    if not boundary:
        raise HTTPException(400, "malformed multipart body: no boundary in the Content-Type")
    files: list[bytes] = []
    part: dict[str, Any] = {}
    counts = {"files": 0, "fields": 0}
    header: list[bytes] = [b"", b""]

    def on_part_begin() -> None:
        part.clear()
        part.update(disposition=b"", chunks=[], size=0, is_file=False)

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header[0] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header[1] += data[start:end]

    def on_header_end() -> None:
        if header[0].lower() == b"content-disposition":
            part["disposition"] = header[1]
        header[0] = header[1] = b""

    def on_headers_finished() -> None:
        disposition, params = parse_options_header(part["disposition"])
        if disposition != b"form-data" or b"name" not in params:
            raise HTTPException(400, "malformed multipart body: a part without a form-data name")
        part["is_file"] = b"filename" in params
        key, limit = ("files", max_files) if part["is_file"] else ("fields", max_fields)
        counts[key] += 1
        if counts[key] > limit:
            raise HTTPException(400, f"too many {key} in the form: at most {limit}")

    def on_part_data(data: bytes, start: int, end: int) -> None:
        part["size"] += end - start
        if part["is_file"] and part["size"] > max_file_bytes:
            raise HTTPException(413, f"image over {max_file_bytes} bytes")
        if not part["is_file"] and part["size"] > MAX_FIELD_BYTES:
            raise HTTPException(400, f"a form field over {MAX_FIELD_BYTES} bytes")
        if part["is_file"]:
            part["chunks"].append(data[start:end])

    def on_part_end() -> None:
        if part.get("is_file"):
            files.append(b"".join(part["chunks"]))

    callbacks = {"on_part_begin": on_part_begin, "on_header_field": on_header_field,
                 "on_header_value": on_header_value, "on_header_end": on_header_end,
                 "on_headers_finished": on_headers_finished, "on_part_data": on_part_data, "on_part_end": on_part_end}
    try:
        parser = MultipartParser(boundary, callbacks)  # refuses a boundary over 256 characters
        parser.write(body)
        parser.finalize()
    except FormParserError as exc:  # (the base of the parser's errors: boundary, framing, headers)
        raise HTTPException(400, f"malformed multipart body or boundary: {exc}") from None
    if not files:
        raise HTTPException(422, NO_FILE)
    return files


def bearer_token(env_name: str | None) -> str | None:
    """The token named by serve.auth_token_env; None when auth is off. A name whose variable is missing or blank
    is refused: serving open while the operator believes it is protected is the one outcome not allowed."""
    if env_name is None:
        return None
    token = os.environ.get(env_name, "").strip()
    if not token:
        raise ConfigError(f"serve.auth_token_env is {env_name!r}, but ${env_name} is unset or empty: export the "
                          "token (or set serve.auth_token_env to null to serve without auth)")
    return token


def token_dependencies(token: str | None):
    """(require_token, require_token_page): FastAPI dependencies that check the bearer token when `token` is set.
    require_token takes only the Authorization header, so the token stays out of URLs and access logs;
    require_token_page also takes ?token= for HTML pages a browser navigates to, where no header can be set."""

    def check(given: str) -> None:
        if token is not None and not hmac.compare_digest(given.encode(), token.encode()):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    def header(request: Request) -> str:
        return request.headers.get("authorization", "").removeprefix("Bearer ").strip()

    async def require_token(request: Request) -> None:  # async: a sync dependency costs a thread hop
        check(header(request))

    async def require_token_page(request: Request) -> None:
        check(header(request) or request.query_params.get("token", ""))

    return require_token, require_token_page


def create_app(p: Params, root: Path, holder: ChampionHolder | None = None, watch: bool = True):
    """The FastAPI application; `holder` may be given (tests), otherwise it follows the registry champion."""
    cfg = p.serve
    root = Path(root)
    holder = holder or ChampionHolder(p.registry.model_name, cache_dir=root / "models/serving")
    queue = ReviewQueue(root / cfg.review_dir, root / cfg.reviewed_dir)
    log = PredictionLog(root / cfg.prediction_log)
    rules = DecodeRules.from_params(p.validation, cfg)
    slots = asyncio.Semaphore(cfg.max_concurrency + cfg.queue_depth)
    registry = CollectorRegistry()
    latency = Histogram("visionflow_request_seconds", "request latency from the handler start (upload read included)", ["endpoint"], registry=registry,
                        buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
    requests_total = Counter("visionflow_requests_total", "requests", ["endpoint", "status"], registry=registry)
    predictions = Counter("visionflow_predictions_total", "predictions per class", ["label"], registry=registry)
    low_conf = Counter("visionflow_low_confidence_total", "predictions sent to review", registry=registry)
    # The inference thread's side: a queue wait that grows while batches stay small means the thread is the
    # bottleneck (it is busy for the sum of inference_seconds); batches that grow mean load is being shared.
    fine = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)
    queue_wait = Histogram("visionflow_inference_queue_seconds", "time a request waited for the inference thread",
                           registry=registry, buckets=fine)
    batch_seconds = Histogram("visionflow_inference_seconds", "time the inference thread spent on one batch "
                              "(parse, decode, model, log, answers)", registry=registry, buckets=fine)
    batch_size = Histogram("visionflow_inference_batch_requests", "requests run together in one batch",
                           registry=registry, buckets=(1, 2, 4, 8, 16, 32, 64))
    token = bearer_token(cfg.auth_token_env)
    require_token, require_token_page = token_dependencies(token)

    # /docs and /openapi.json come from docs_router (offline assets, behind the token); FastAPI's own are off.
    app = FastAPI(title="visionflow", description="Image classification with the registry's champion model.",
                  version="1", docs_url=None, redoc_url=None, openapi_url=None)

    @app.on_event("startup")
    def _load() -> None:
        if holder.current is None:
            holder.refresh()
        if watch:
            holder.watch(cfg.reload_interval_s)

    @app.on_event("shutdown")
    def _stop() -> None:
        holder.stop()
        log.close()
        batcher.stop()

    def model_or_503() -> LoadedModel:
        m = holder.current
        if m is None:
            raise HTTPException(503, f"no model loaded: {holder.last_error or 'starting'}")
        return m

    def prepare(job: tuple[LoadedModel, bytes, bytes, int]) -> tuple[list[np.ndarray], list[dict[str, float]]]:
        """Parse one request's form and decode its images (raises HTTPException / RejectedImage for that one)."""
        from visionflow.data.imageio import PixelBudget, decode_with_properties

        model, body, content_type, max_files = job
        files = multipart_files(body, content_type, max_files=max_files, max_fields=cfg.max_form_fields,
                                max_file_bytes=rules.max_bytes)
        size, channels = model.card["image_size"], model.card["channels"]
        budget = PixelBudget(cfg.max_request_pixels)  # one request's images together
        decoded = [decode_with_properties(data, size, channels, rules, budget) for data in files]
        # properties are measured on the image as received, like the drift check's reference
        return [a for a, _ in decoded], [props for _, props in decoded]

    def infer(jobs: list[tuple[LoadedModel, bytes, bytes, int]]) -> list[Any]:
        """The batcher's thread: parse and decode every waiting request, run each model once on all their images,
        queue uncertain predictions and log every one, and encode each answer; the event loop only sends them.
        One outcome per request: (results, answer bytes), or the exception that request gets."""
        outcomes: list[Any] = [None] * len(jobs)
        prepared: dict[int, tuple[list[np.ndarray], list[dict[str, float]]]] = {}
        for i, job in enumerate(jobs):
            try:
                prepared[i] = prepare(job)
            except (HTTPException, RejectedImage) as exc:
                outcomes[i] = exc
            except Exception as exc:  # noqa: BLE001 - an unforeseen failure is this request's alone (its 500,
                outcomes[i] = exc  # logged with its traceback by the handler), never its batch-mates'
        records: list[dict[str, Any]] = []
        for model in {id(jobs[i][0]): jobs[i][0] for i in prepared}.values():  # one group per model (a swap)
            mine = [i for i in prepared if jobs[i][0] is model]
            arrays = [a for i in mine for a in prepared[i][0]]
            batch = np.stack(arrays).transpose(0, 3, 1, 2).copy()
            try:
                logits, embedding = model.session.run(["logits", "embedding"], {"image": batch})
            except Exception as exc:  # noqa: BLE001 - fails this model's group; another group may still run
                for i in mine:
                    outcomes[i] = exc
                continue
            probs, classes, now, k = _softmax(logits), model.card["classes"], time.time(), 0
            for i in mine:
                results = []
                try:
                    for props in prepared[i][1]:
                        results.append(_result(model, classes, probs[k], arrays[k], props, embedding[k], now,
                                               records))
                        k += 1
                except (OSError, sqlite3.Error) as exc:  # the review queue cannot be written
                    outcomes[i] = exc
                    continue
                answer = results[0] if jobs[i][3] == 1 else {"predictions": results}
                outcomes[i] = (results, json.dumps(answer, separators=(",", ":")).encode())
        try:
            # A request that timed out (504) still lands here: the model did see that image, so it is logged.
            log.append(*records)
        except OSError as exc:
            outcomes = [exc if isinstance(o, tuple) else o for o in outcomes]
        return outcomes

    def _result(model: LoadedModel, classes: list[str], probs: np.ndarray, array: np.ndarray,
                props: dict[str, float], embedding: np.ndarray, now: float, records: list[dict]) -> dict[str, Any]:
        k = int(probs.argmax())
        label, confidence = classes[k], float(probs[k])
        probabilities = {c: round(float(v), 6) for c, v in zip(classes, probs)}
        review_id = None
        if confidence < cfg.review_threshold:  # encoded as PNG only when it goes to the review queue
            review_id = queue.add(_png(array), model_version=model.version, predicted=label,
                                  confidence=confidence, probabilities=probabilities)
        records.append({"time": now, "model_version": model.version, "label": label,
                        "confidence": round(confidence, 6), "review_id": review_id, **props,
                        "embedding": np.round(embedding.astype(np.float64), 4).tolist()})
        return {"label": label, "confidence": confidence, "probabilities": probabilities,
                "model_version": model.version, "review_id": review_id}

    def observe_batch(waits_s: list[float], seconds: float) -> None:
        batch_size.observe(len(waits_s))
        batch_seconds.observe(seconds)
        for w in waits_s:
            queue_wait.observe(w)

    batcher = Batcher(infer, max_jobs=cfg.max_concurrency, observe=observe_batch)
    routes = {"/predict": ("predict", 1), "/predict/batch": ("predict_batch", cfg.max_batch)}

    async def predict(scope, receive, send, endpoint: str, max_files: int) -> None:
        """POST /predict and /predict/batch as a plain ASGI handler. FastAPI's routing, dependency solving,
        form parsing into spooled files and response encoding cost about 3x the model's own time per request on
        the event loop (py-spy, 2 cores), and under load that queueing set the latency tail."""
        start = time.perf_counter()
        request = Request(scope, receive)
        status, answer, headers, results = 200, b"", {}, []
        try:
            await require_token(request)
            shed_if_full()  # before reading the body: shedding load must be cheap
            body = await request.body()  # (BodyLimit, around this app, stops a body over the limit)
            model = model_or_503()
            shed_if_full()  # (others may have taken the last slot while this body arrived)
            await slots.acquire()
            job = batcher.submit((model, body, request.headers.get("content-type", "").encode("latin-1"),
                                  max_files))
            # The slot is freed when the work really ends: a timed-out request cannot leave work piling up.
            job.add_done_callback(_work_ended)
            results, answer = await asyncio.wait_for(asyncio.shield(job), timeout=cfg.request_timeout_s)
        except HTTPException as exc:
            status, headers = exc.status_code, exc.headers or {}
            answer = json.dumps({"detail": exc.detail}).encode()
        except RejectedImage as exc:
            status = 415 if exc.reason in ("not_an_image", "format_not_allowed") else 422
            answer = json.dumps({"detail": f"{exc.reason}: {exc.detail}"}).encode()
        except TimeoutError:
            status, answer = 504, b'{"detail":"inference timed out"}'
            job.add_done_callback(_late_failure)  # the work goes on; if it fails, nobody else will say so
        except _Refused:  # BodyLimit answers for a body too large or too slow
            raise
        except ClientDisconnect:
            requests_total.labels(endpoint, "disconnected").inc()
            return
        except (OSError, sqlite3.Error) as exc:  # the prediction log or review queue cannot be written
            logger.error("predict: cannot record the prediction: %s: %s", type(exc).__name__, exc)
            status, headers = 503, {"Retry-After": "5"}
            answer = json.dumps({"detail": "the server cannot record predictions (prediction log or review "
                                           f"queue): {type(exc).__name__}; see the server log"}).encode()
        except Exception:
            logger.exception("predict failed")
            status, answer = 500, b'{"detail":"internal server error; see the server log"}'
        requests_total.labels(endpoint, str(status)).inc()
        if status == 200:
            latency.labels(endpoint).observe(time.perf_counter() - start)
            for r in results:
                predictions.labels(r["label"]).inc()
                if r["review_id"] is not None:
                    low_conf.inc()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(answer)).encode()),
                                *((k.lower().encode(), v.encode()) for k, v in headers.items())]})
        await send({"type": "http.response.body", "body": answer})

    def _work_ended(job: asyncio.Future) -> None:
        slots.release()
        if not job.cancelled():
            job.exception()  # retrieved: after a 504 nobody awaits it, and asyncio would log it as never retrieved

    def _late_failure(job: asyncio.Future) -> None:
        if not job.cancelled() and (exc := job.exception()) is not None:
            logger.error("predict: a request answered 504 failed afterwards: %s: %s", type(exc).__name__, exc)

    def shed_if_full() -> None:
        if slots.locked():
            raise HTTPException(503, "server busy: too many requests in flight, retry shortly",
                                headers={"Retry-After": "1"})

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            schema["paths"] = {**_predict_openapi(cfg.max_batch), **schema["paths"]}
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # the predict routes are not FastAPI routes; their documentation is added here

    @app.get("/health", summary="Liveness")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", summary="Readiness: a champion model is loaded")
    def ready() -> dict[str, Any]:
        m = model_or_503()
        return {"status": "ready", "model_version": m.version}

    @app.get("/model", dependencies=[Depends(require_token)], summary="The serving model and its lineage")
    def model_info() -> dict[str, Any]:
        m = model_or_503()
        return {"name": holder.model_name, "version": m.version, "classes": m.card["classes"],
                "image_size": m.card["image_size"], "channels": m.card["channels"],
                "lineage": {k: v for k, v in m.tags.items() if k.startswith("visionflow.")}}

    @app.get("/metrics", dependencies=[Depends(require_token)], include_in_schema=False)
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    app.include_router(review_router(queue, lambda: model_or_503().card["classes"], require_token,
                                     require_token_page))
    app.include_router(docs_router(openapi, require_token, require_token_page))

    async def serving_app(scope, receive, send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in routes:
            return await predict(scope, receive, send, *routes[scope["path"]])
        await app(scope, receive, send)

    # Outermost, so that an oversized body is refused before any route reads it, predict's included.
    return BodyLimit(serving_app, max_bytes=int(cfg.max_upload_mb * 1024 * 1024) + 64 * 1024,
                     timeout_s=cfg.body_timeout_s)


def load_champion(p: Params, root: Path) -> ChampionHolder:
    """The registry's champion, loaded, for `visionflow serve`. A server without one would answer /health and
    refuse every prediction, so no registry, or nothing promoted in it, is an error; the store is only read, never
    created (setup_mlflow would create an empty one)."""
    import mlflow

    from visionflow.registry.tracking import tracking_uri

    uri = tracking_uri(p.registry.tracking_uri, root)
    if uri.startswith("sqlite:///") and not (store := Path(uri.removeprefix("sqlite:///"))).is_file():
        raise VisionflowError(f"no model registry at {store}: nothing to serve; train and promote a model first "
                              "(`make pipeline`), or point registry.tracking_uri at the registry")
    mlflow.set_tracking_uri(uri)
    holder = ChampionHolder(p.registry.model_name, cache_dir=Path(root) / "models/serving")
    if not holder.refresh():
        raise VisionflowError(f"no champion to serve from {uri}: {holder.last_error}; train and promote a model "
                              "first (`make pipeline`)")
    return holder


def serve_champion(p: Params, root: Path, *, host: str, port: int, say=print) -> None:
    """Run the server on the registry's champion until interrupted; `say` hears what is served, and where."""
    import uvicorn

    bearer_token(p.serve.auth_token_env)  # a missing token is refused before the registry is even read
    holder = load_champion(p, root)
    app = create_app(p, root, holder=holder)
    model = holder.current
    say(f"serving {p.registry.model_name} v{model.version} ({len(model.card['classes'])} classes, "
        f"{model.card['image_size']} px) at http://{host}:{port} (API docs at /docs, review page at /review)")
    uvicorn.run(app, host=host, port=port, access_log=p.serve.access_log,
                http=header_deadline_protocol(p.serve.header_timeout_s), timeout_keep_alive=5)


def _predict_openapi(max_batch: int) -> dict[str, Any]:
    """OpenAPI entries for the two predict routes (served by a plain ASGI handler, see create_app)."""
    prediction = {"type": "object", "required": ["label", "confidence", "probabilities", "model_version"],
                  "properties": {"label": {"type": "string"}, "confidence": {"type": "number"},
                                 "probabilities": {"type": "object", "additionalProperties": {"type": "number"}},
                                 "model_version": {"type": "string"},
                                 "review_id": {"type": ["string", "null"],
                                               "description": "set when the prediction went to the review queue"}}}
    errors = {"401": "missing or wrong bearer token (when serve.auth_token_env is set)",
              "413": "body or image over serve.max_upload_mb", "415": "not an image, or a format not allowed",
              "422": "no file part, or an image that cannot be used (too many pixels, corrupt, too small)",
              "400": "malformed multipart body, or too many parts",
              "503": "server busy (retry after the Retry-After seconds), no model loaded, or predictions "
                     "cannot be recorded", "504": "inference took longer than serve.request_timeout_s"}

    def operation(summary: str, form: dict, answer: dict) -> dict[str, Any]:
        return {"post": {"summary": summary, "requestBody": {"required": True, "content": {
            "multipart/form-data": {"schema": {"type": "object", "properties": form}}}},
            "responses": {"200": {"description": "the prediction", "content": {"application/json": {
                "schema": answer}}}, **{k: {"description": v} for k, v in errors.items()}}}}

    binary = {"type": "string", "format": "binary"}
    return {"/predict": operation("Classify one uploaded image", {"file": binary}, prediction),
            "/predict/batch": operation(f"Classify up to {max_batch} images in one request",
                                        {"files": {"type": "array", "items": binary}},
                                        {"type": "object", "properties": {"predictions": {
                                            "type": "array", "items": prediction}}})}


def _png(arr: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(buf, "PNG")
    return buf.getvalue()
