"""Serving: FastAPI + ONNX Runtime on the registry's champion, with a human review queue and a prediction log.

create_app composes the pieces, each in a module of its own:
- champion: the champion, loaded, and swapped when the registry alias moves (requests keep the session they hold);
- predict, batcher, inference, workers: the predict routes, a plain ASGI handler that hands uploads to the
  batching inference threads, off the event loop, behind a concurrency limit that answers 503 when full; each
  thread feeds one inference process (serve.workers; 0: the thread does the work itself);
- http, multipart: uploads are bounded (body size and time, request-head time, multipart parts, decode pixels,
  formats) and never name a server path;
- review: low-confidence predictions wait in the review queue (SQLite + image files); a reviewed label turns the
  image into labelled data under data/reviewed/<class>/, a folder-per-class dataset the retraining flow ingests;
- audit_view: the review page's label audit view: the label audit's suspected label errors, each accepted or kept
  into the label overrides file that ingest applies;
- canary: the registry's challenger in the shadow (serve.shadow) or answering a share of requests
  (serve.canary_fraction), rolled back automatically when reviewed labels show it worse;
- predictions: every prediction is appended to a JSONL prediction log that the drift check reads;
- auth, metrics, openapi: the bearer token, /metrics, and the API document.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException
from starlette.responses import Response

from visionflow.config import Params
from visionflow.data.imageio import DecodeRules
from visionflow.paths import ProjectPaths
from visionflow.serving.audit_view import SuspectFiles, audit_router
from visionflow.serving.auth import bearer_token, token_dependencies
from visionflow.serving.batcher import Batcher
from visionflow.serving.canary import shadow_canary
from visionflow.serving.champion import ChampionHolder, LoadedModel, load_champion
from visionflow.serving.http import BodyLimit, header_deadline_protocol
from visionflow.serving.inference import batch_inference, review_queues
from visionflow.serving.metrics import ServingMetrics
from visionflow.serving.openapi import openapi_builder
from visionflow.serving.predict import PredictHandler
from visionflow.serving.predictions import PredictionLog
from visionflow.serving.review import docs_router, review_router
from visionflow.serving.workers import inference_processes
from visionflow.tasks.detection.review_api import box_review_router

logger = logging.getLogger(__name__)


def create_app(p: Params, root: Path, holder: ChampionHolder | None = None, watch: bool = True):
    """The ASGI application; `holder` may be given (tests), otherwise it follows the registry champion."""
    cfg, paths = p.serve, ProjectPaths.of(p, root)
    holder = holder or ChampionHolder(p.served_model_name, cache_dir=paths.serving_models, device=cfg.device)
    queue, boxes = review_queues(p, root)
    log = PredictionLog(paths.prediction_log)
    metrics = ServingMetrics()
    require_token, require_token_page = token_dependencies(bearer_token(cfg.auth_token_env))
    # serve.workers inference processes, each fed by a thread of its own; with none, one thread does the work
    handlers = inference_processes(p, root, log) or [batch_inference(p, root, log)]
    batcher = Batcher(
        handlers, max_jobs=cfg.max_concurrency, observe=metrics.observe_batch, observe_after=metrics.observe_shadow
    )
    canary = shadow_canary(p, paths.serving_models, holder, queue, metrics)  # None when both are off

    # /docs and /openapi.json come from docs_router (offline assets, behind the token); FastAPI's own are off.
    app = FastAPI(
        title="visionflow",
        description="Image classification or object detection with the registry's champion model.",
        version="1",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )

    _lifecycle(app, holder, log, batcher, watch=watch, reload_interval_s=cfg.reload_interval_s)
    if canary is not None:
        canary.attach(app, watch=watch, interval_s=cfg.reload_interval_s)

    def model() -> LoadedModel:
        return model_or_503(holder)

    app.openapi = openapi_builder(app, cfg.max_batch)  # the predict routes are not FastAPI routes: added there
    app.include_router(info_router(holder, metrics, require_token))

    def classes() -> list[str]:
        return model().card["classes"]

    def task() -> str:  # the loaded model's (its card's), or what the server is set to serve before one loads
        return holder.current.task if holder.current is not None else p.base.task

    app.include_router(review_router(queue, classes, require_token, require_token_page, task=task))
    app.include_router(box_review_router(boxes, classes, require_token))
    app.include_router(audit_router(SuspectFiles(paths), classes, DecodeRules.from_params(p.validation), require_token))
    app.include_router(docs_router(app.openapi, require_token, require_token_page))
    predict = PredictHandler(
        model=model,
        require_token=require_token,
        batcher=batcher,
        metrics=metrics,
        max_in_flight=cfg.max_concurrency + cfg.queue_depth,
        max_batch=cfg.max_batch,
        timeout_s=cfg.request_timeout_s,
        route=canary.route if canary is not None else None,
    )

    async def serving_app(scope, receive, send) -> None:
        if predict.handles(scope):
            return await predict(scope, receive, send)
        await app(scope, receive, send)

    # Outermost, so that an oversized body is refused before any route reads it, predict's included.
    return BodyLimit(
        serving_app, max_bytes=int(cfg.max_upload_mb * 1024 * 1024) + 64 * 1024, timeout_s=cfg.body_timeout_s
    )


def _lifecycle(
    app: FastAPI, holder: ChampionHolder, log: PredictionLog, batcher: Batcher, *, watch: bool, reload_interval_s: float
) -> None:
    """At startup the champion is loaded (unless the holder has one) and, when watched, followed as the registry
    alias moves; at shutdown the watch stops, the prediction log closes and the batcher stops."""

    @app.on_event("startup")
    def _load() -> None:
        if holder.current is None:
            holder.refresh()
        if watch:
            holder.watch(reload_interval_s)
        for h in batcher.handles:  # the inference processes started with the app: serve once they are up
            if (wait_ready := getattr(h, "wait_ready", None)) is not None:
                try:
                    wait_ready()
                except RuntimeError as exc:  # its thread starts another when the first request comes
                    logger.error("%s", exc)

    @app.on_event("shutdown")
    def _stop() -> None:
        holder.stop()
        log.close()
        batcher.stop()


def model_or_503(holder: ChampionHolder) -> LoadedModel:
    m = holder.current
    if m is None:
        raise HTTPException(503, f"no model loaded: {holder.last_error or 'starting'}")
    return m


def info_router(holder: ChampionHolder, metrics: ServingMetrics, require_token) -> APIRouter:
    """/health, /ready, /model and /metrics."""
    router = APIRouter()

    @router.get("/health", summary="Liveness")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @router.get("/ready", summary="Readiness: a champion model is loaded")
    def ready() -> dict[str, Any]:
        m = model_or_503(holder)
        return {"status": "ready", "model_version": m.version}

    @router.get("/model", dependencies=[Depends(require_token)], summary="The serving model and its lineage")
    def model_info() -> dict[str, Any]:
        m = model_or_503(holder)
        return {
            "name": holder.model_name,
            "version": m.version,
            "task": m.task,
            "classes": m.card["classes"],
            "image_size": m.card["image_size"],
            "channels": m.card.get("channels", 3),  # (a detector's card has none: it takes RGB)
            "lineage": {k: v for k, v in m.tags.items() if k.startswith("visionflow.")},
        }

    @router.get("/metrics", dependencies=[Depends(require_token)], include_in_schema=False)
    def metrics_page() -> Response:
        return Response(metrics.exposition(), media_type=metrics.content_type)

    return router


def serve_champion(p: Params, root: Path, *, host: str, port: int, say=print) -> None:
    """Run the server on the registry's champion until interrupted; `say` hears what is served, and where."""
    import uvicorn

    bearer_token(p.serve.auth_token_env)  # a missing token is refused before the registry is even read
    holder = load_champion(p, root)
    app = create_app(p, root, holder=holder)
    model = holder.current
    say(
        f"serving {holder.model_name} v{model.version} ({model.task}, {len(model.card['classes'])} classes, "
        f"{model.card['image_size']} px) at http://{host}:{port} (API docs at /docs, review page at /review)"
    )
    uvicorn.run(
        app,
        host=host,
        port=port,
        access_log=p.serve.access_log,
        http=header_deadline_protocol(p.serve.header_timeout_s),
        timeout_keep_alive=5,
        # Nothing reads the client's address, so X-Forwarded-For need not be parsed on every request.
        proxy_headers=False,
    )
