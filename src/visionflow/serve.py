"""Serving: FastAPI + ONNX Runtime on the registry's champion, with a human review queue and a prediction log.

- The champion is loaded from `models:/<name>@champion`; a background thread polls the alias and swaps in a new
  session when it moves. Requests hold a reference to the session they started with, so none is dropped.
- Inference runs in a thread pool, off the event loop, behind a concurrency limit that answers 503 when full.
- Uploads are bounded (body size, multipart parts, decode pixels, formats, time) and never name a server path.
- Low-confidence predictions go to the review queue (SQLite + image files); a reviewed label turns the image into
  labelled data under data/reviewed/<class>/, a folder-per-class dataset the retraining flow can ingest.
- Every prediction is appended to a JSONL prediction log that the drift check reads.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import sqlite3
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from starlette.responses import Response

from visionflow.config import Params
from visionflow.imageio import DecodeRules, RejectedImage


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
        from visionflow.registry import alias_version, download_onnx, version_info

        try:
            version = alias_version(self.model_name, self.alias)
            if version is None:
                self.last_error = f"{self.model_name} has no {self.alias!r} alias yet"
                return False
            if self.current is not None and self.current.version == version:
                return False
            path, card = download_onnx(self.model_name, version, self.cache_dir / version)
            # One ONNX Runtime thread per request: requests run in parallel on the thread pool, and intra-op
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


class ReviewQueue:
    """Low-confidence predictions waiting for a person; SQLite keeps it consistent across workers."""

    def __init__(self, folder: Path, reviewed_dir: Path):
        self.folder = Path(folder)
        self.images = self.folder / "images"
        self.images.mkdir(parents=True, exist_ok=True)
        self.reviewed_dir = Path(reviewed_dir)
        self.db = self.folder / "queue.db"
        with self._conn() as c:
            c.execute("""CREATE TABLE IF NOT EXISTS items (id TEXT PRIMARY KEY, created REAL, model_version TEXT,
                         predicted TEXT, confidence REAL, probabilities TEXT, image TEXT, status TEXT,
                         label TEXT, reviewed_at REAL)""")

    def _conn(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.db, timeout=30)
        conn.row_factory = sqlite3.Row
        return conn

    def add(self, png: bytes, *, model_version: str, predicted: str, confidence: float,
            probabilities: dict[str, float]) -> str:
        item_id = uuid.uuid4().hex
        (self.images / f"{item_id}.png").write_bytes(png)
        with self._conn() as c:
            c.execute("INSERT INTO items VALUES (?,?,?,?,?,?,?,?,?,?)",
                      (item_id, time.time(), model_version, predicted, confidence, json.dumps(probabilities),
                       f"{item_id}.png", "pending", None, None))
        return item_id

    def pending(self, limit: int = 50) -> list[dict[str, Any]]:
        with self._conn() as c:
            rows = c.execute("SELECT * FROM items WHERE status='pending' ORDER BY confidence ASC LIMIT ?",
                             (limit,)).fetchall()
        return [dict(r) | {"probabilities": json.loads(r["probabilities"])} for r in rows]

    def image_path(self, item_id: str) -> Path | None:
        if not item_id.isalnum():  # ids are uuid hex; anything else is not ours
            return None
        path = self.images / f"{item_id}.png"
        return path if path.is_file() else None

    def review(self, item_id: str, label: str, classes: list[str]) -> dict[str, Any]:
        if label not in classes:
            raise ValueError(f"unknown label {label!r}; known: {classes}")
        src = self.image_path(item_id)
        if src is None:
            raise KeyError(item_id)
        dest = self.reviewed_dir / label / f"review_{item_id}.png"
        dest.parent.mkdir(parents=True, exist_ok=True)
        with self._conn() as c:
            updated = c.execute("UPDATE items SET status='reviewed', label=?, reviewed_at=? "
                                "WHERE id=? AND status='pending'", (label, time.time(), item_id)).rowcount
        if not updated:
            raise KeyError(item_id)
        dest.write_bytes(src.read_bytes())
        return {"id": item_id, "label": label, "saved_as": str(dest)}


class PredictionLog:
    """Append-only JSON lines. One handle stays open (opening per line cost the event loop); it is reopened when
    the file (or its folder) was rotated or removed, and every batch of lines is written and flushed whole under a
    lock."""

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


class BodyLimit:
    """ASGI middleware: refuse bodies over max_bytes early (Content-Length) or as soon as the stream passes it."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await _plain(send, 413, b"request body too large")
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge()
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await _plain(send, 413, b"request body too large")


class _TooLarge(Exception):
    pass


async def _plain(send, status: int, body: bytes) -> None:
    # Connection: close, or uvicorn keeps the connection alive and reads (and drops) the rest of a 1 GiB body.
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def create_app(p: Params, root: Path, holder: ChampionHolder | None = None, watch: bool = True):
    """The FastAPI application; `holder` may be given (tests), otherwise it follows the registry champion."""
    cfg = p.serve
    root = Path(root)
    holder = holder or ChampionHolder(p.registry.model_name, cache_dir=root / "models/serving")
    queue = ReviewQueue(root / cfg.review_dir, root / cfg.reviewed_dir)
    log = PredictionLog(root / cfg.prediction_log)
    rules = DecodeRules(allowed_formats=tuple(p.validation.allowed_formats), max_pixels=cfg.max_pixels,
                        max_bytes=int(cfg.max_upload_mb * 1024 * 1024), timeout_s=cfg.request_timeout_s)
    pool = ThreadPoolExecutor(max_workers=cfg.max_concurrency, thread_name_prefix="infer")
    slots = asyncio.Semaphore(cfg.max_concurrency + cfg.queue_depth)
    registry = CollectorRegistry()
    latency = Histogram("visionflow_request_seconds", "request latency from the handler start (upload read included)", ["endpoint"], registry=registry,
                        buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
    requests_total = Counter("visionflow_requests_total", "requests", ["endpoint", "status"], registry=registry)
    predictions = Counter("visionflow_predictions_total", "predictions per class", ["label"], registry=registry)
    low_conf = Counter("visionflow_low_confidence_total", "predictions sent to review", registry=registry)
    token = os.environ.get(cfg.auth_token_env) if cfg.auth_token_env else None

    app = FastAPI(title="visionflow", description="Image classification with the registry's champion model.",
                  version="1")
    app.add_middleware(BodyLimit, max_bytes=int(cfg.max_upload_mb * 1024 * 1024) + 64 * 1024)

    async def require_token(request: Request) -> None:  # async: a sync dependency costs a thread hop
        if token is None:
            return
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip() \
            or request.query_params.get("token", "")  # <img> tags on the review page cannot send headers
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

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
        pool.shutdown(wait=False, cancel_futures=True)

    def model_or_503() -> LoadedModel:
        m = holder.current
        if m is None:
            raise HTTPException(503, f"no model loaded: {holder.last_error or 'starting'}")
        return m

    def infer(model: LoadedModel, payloads: list[bytes]) -> list[dict[str, Any]]:
        """Decode, run the model, queue uncertain predictions and log every one: all of it on a worker thread,
        so the event loop only parses requests and writes answers."""
        size, channels = model.card["image_size"], model.card["channels"]
        arrays, props = [], []
        from visionflow.imageio import decode_with_properties

        for data in payloads:
            arr, properties = decode_with_properties(data, size, channels, rules)
            arrays.append(arr)
            props.append(properties)  # measured on the image as received, like the drift check's reference
        batch = np.stack(arrays).transpose(0, 3, 1, 2).copy()
        logits, embedding = model.session.run(["logits", "embedding"], {"image": batch})
        probs = _softmax(logits)
        classes = model.card["classes"]
        now = time.time()
        out, records = [], []
        for i in range(len(payloads)):
            k = int(probs[i].argmax())
            label, confidence = classes[k], float(probs[i, k])
            probabilities = {c: round(float(v), 6) for c, v in zip(classes, probs[i])}
            review_id = None
            if confidence < cfg.review_threshold:  # encoded as PNG only when it goes to the review queue
                review_id = queue.add(_png(arrays[i]), model_version=model.version, predicted=label,
                                      confidence=confidence, probabilities=probabilities)
            records.append({"time": now, "model_version": model.version, "label": label,
                            "confidence": round(confidence, 6), "review_id": review_id, **props[i],
                            "embedding": np.round(embedding[i].astype(np.float64), 4).tolist()})
            out.append({"label": label, "confidence": confidence, "probabilities": probabilities,
                        "model_version": model.version, "review_id": review_id})
        # A request that timed out (504) still lands here: the model did see that image, so it is logged.
        log.append(*records)
        return out

    def shed_if_full(endpoint: str) -> None:
        if slots.locked():
            requests_total.labels(endpoint, "503").inc()
            raise HTTPException(503, "server busy: too many requests in flight, retry shortly",
                                headers={"Retry-After": "1"})

    async def run_inference(payloads: list[bytes], endpoint: str, start: float) -> list[dict[str, Any]]:
        shed_if_full(endpoint)
        model = model_or_503()
        await slots.acquire()
        loop = asyncio.get_running_loop()
        work = loop.run_in_executor(pool, infer, model, payloads)
        # The slot is freed when the work really ends: a timed-out request cannot leave work piling up unbounded.
        work.add_done_callback(lambda _: slots.release())
        try:
            results = await asyncio.wait_for(asyncio.shield(work), timeout=cfg.request_timeout_s)
        except RejectedImage as exc:
            status = 415 if exc.reason in ("not_an_image", "format_not_allowed") else 422
            requests_total.labels(endpoint, str(status)).inc()
            raise HTTPException(status, f"{exc.reason}: {exc.detail}") from None
        except TimeoutError:
            requests_total.labels(endpoint, "504").inc()
            raise HTTPException(504, "inference timed out") from None
        elapsed = time.perf_counter() - start
        latency.labels(endpoint).observe(elapsed)
        requests_total.labels(endpoint, "200").inc()
        for r in results:
            predictions.labels(r["label"]).inc()
            if r["review_id"] is not None:
                low_conf.inc()
        return results

    async def read_files(request: Request, max_files: int) -> list[bytes]:
        try:
            form = await request.form(max_files=max_files, max_fields=cfg.max_form_fields)
        except (HTTPException, _TooLarge):  # _TooLarge: BodyLimit answers 413 for a stream that grew too long
            raise
        except Exception as exc:  # malformed multipart bodies
            raise HTTPException(400, f"malformed multipart body: {type(exc).__name__}") from None
        files = [v for _, v in form.multi_items() if hasattr(v, "read")]
        if not files:
            raise HTTPException(422, "send the image as a multipart file field (e.g. -F file=@image.png)")
        limit = rules.max_bytes
        out = []
        for f in files:
            data = await f.read(limit + 1)
            if len(data) > limit:
                raise HTTPException(413, f"image over {cfg.max_upload_mb} MB")
            out.append(data)
        return out

    @app.post("/predict", dependencies=[Depends(require_token)], summary="Classify one uploaded image")
    async def predict(request: Request) -> dict[str, Any]:
        start = time.perf_counter()
        shed_if_full("predict")  # before reading the body: shedding load must be cheap
        files = await read_files(request, max_files=1)
        return (await run_inference(files[:1], "predict", start))[0]

    @app.post("/predict/batch", dependencies=[Depends(require_token)], summary="Classify several images")
    async def predict_batch(request: Request) -> dict[str, Any]:
        start = time.perf_counter()
        shed_if_full("predict_batch")
        files = await read_files(request, max_files=cfg.max_batch)
        return {"predictions": await run_inference(files, "predict_batch", start)}

    @app.get("/health", summary="Liveness")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", summary="Readiness: a champion model is loaded")
    def ready() -> dict[str, Any]:
        m = model_or_503()
        return {"status": "ready", "model_version": m.version}

    @app.get("/model", summary="The serving model and its lineage")
    def model_info() -> dict[str, Any]:
        m = model_or_503()
        return {"name": holder.model_name, "version": m.version, "classes": m.card["classes"],
                "image_size": m.card["image_size"], "channels": m.card["channels"],
                "lineage": {k: v for k, v in m.tags.items() if k.startswith("visionflow.") and k != "visionflow.card"}}

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/review/queue", dependencies=[Depends(require_token)], summary="Predictions waiting for review")
    def review_queue(limit: int = 50) -> dict[str, Any]:
        m = holder.current
        return {"items": queue.pending(min(max(limit, 1), 500)), "classes": m.card["classes"] if m else []}

    @app.get("/review/image/{item_id}", dependencies=[Depends(require_token)], include_in_schema=False)
    def review_image(item_id: str) -> FileResponse:
        path = queue.image_path(item_id)
        if path is None:
            raise HTTPException(404, "no such review item")
        return FileResponse(path, media_type="image/png")

    @app.post("/review/{item_id}", dependencies=[Depends(require_token)], summary="Confirm or correct a label")
    async def review_submit(item_id: str, request: Request) -> dict[str, Any]:
        try:
            body = await request.json()
            label = str(body["label"])
        except Exception:
            raise HTTPException(422, 'send JSON {"label": "<class name>"}') from None
        m = model_or_503()
        try:
            return queue.review(item_id, label, m.card["classes"])
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
        except KeyError:
            raise HTTPException(404, "no such pending review item") from None

    @app.get("/review", response_class=HTMLResponse, include_in_schema=False)
    def review_page() -> str:
        return REVIEW_PAGE

    return app


def _png(arr: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(buf, "PNG")
    return buf.getvalue()


REVIEW_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>visionflow review</title>
<style>body{font-family:sans-serif;margin:2em;max-width:900px} img{width:224px;image-rendering:pixelated;
border:1px solid #ccc} button{margin:3px;padding:6px 10px} #empty{color:#666} .guess{font-weight:bold}</style>
</head><body><h1>Review uncertain predictions</h1>
<p>Click the right class, or press its number key. The model's guess is highlighted.</p>
<div id="item"></div><p id="empty" hidden>Nothing to review.</p><p id="status"></p>
<script>
const token = new URLSearchParams(location.search).get("token");
const headers = token ? {"Authorization": "Bearer " + token} : {};
let items = [], classes = [];
async function load() {
  const r = await fetch("/review/queue", {headers}); const d = await r.json();
  items = d.items; classes = d.classes; show();
}
function show() {
  const box = document.getElementById("item");
  if (!items.length) { box.innerHTML = ""; document.getElementById("empty").hidden = false; return; }
  const it = items[0];
  box.innerHTML = `<img id="img" alt="image to review" src="/review/image/${it.id}${token ? "?token=" + token : ""}">
    <p>model v${it.model_version} guessed <span class="guess">${it.predicted}</span>
    (${(100 * it.confidence).toFixed(1)}%)</p>` + classes.map((c, i) =>
    `<button data-label="${c}" class="${c === it.predicted ? "guess" : ""}">${i + 1}. ${c}</button>`).join("");
  box.querySelectorAll("button").forEach(b => b.onclick = () => submit(b.dataset.label));
}
async function submit(label) {
  const it = items.shift();
  const r = await fetch(`/review/${it.id}`, {method: "POST", headers: {...headers, "Content-Type": "application/json"},
                                             body: JSON.stringify({label})});
  document.getElementById("status").textContent = r.ok ? `saved ${label}` : `error ${r.status}`;
  show();
}
document.addEventListener("keydown", e => { const k = parseInt(e.key, 10);
  if (items.length && k >= 1 && k <= classes.length) submit(classes[k - 1]); });
load();
</script></body></html>"""
