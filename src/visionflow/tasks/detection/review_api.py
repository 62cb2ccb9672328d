"""The box review API under /review/boxes: the queue, an item's image, a decision (the corrected boxes) and its
undo. The review page (serving/static/review_boxes.js) uses it when the served model is a detector; the writes
take the same-origin JSON and the token as the label writes of serving.review."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import FileResponse

from visionflow.serving.review import same_origin_json
from visionflow.tasks.detection.review import MEDIA_TYPES, BoxReviewQueue

NOT_SAVED = "the boxes could not be saved ({}); the item is still pending, retry"


def box_review_router(queue: BoxReviewQueue, classes: Callable[[], list[str]], require_token) -> APIRouter:
    """`classes()` gives the serving model's classes (503 without one)."""
    router = APIRouter()
    api = [Depends(require_token)]
    writes = [*api, Depends(same_origin_json)]

    @router.get("/review/boxes/queue", dependencies=api, summary="Images with uncertain boxes, waiting for review")
    def boxes_queue(limit: int = 50) -> dict[str, Any]:
        """The pending images, least certain box first (at most `limit`), with their predicted boxes, the model's
        classes, and how many are pending in all."""
        try:
            names = classes()
        except HTTPException:  # no model yet: the queue can still be seen
            names = []
        return {"items": queue.pending(min(max(limit, 1), 500)), "classes": names, "total": queue.count()}

    @router.get("/review/boxes/image/{item_id}", dependencies=api, include_in_schema=False)
    def boxes_image(item_id: str) -> FileResponse:
        path = queue.image_path(item_id)
        if path is None:
            raise HTTPException(404, "no such review item")
        return FileResponse(
            path, media_type=MEDIA_TYPES[path.suffix[1:]], headers={"X-Content-Type-Options": "nosniff"}
        )

    @router.post("/review/boxes/{item_id}", dependencies=writes, summary="Save an image's corrected boxes")
    async def boxes_decide(item_id: str, request: Request) -> dict[str, Any]:
        """Body: {"boxes": [{"bbox": [x, y, w, h], "label": "<class>"}, ...]} in the image's pixels (an empty
        list: nothing to find in it). The image and its boxes join data/reviewed/detection."""
        try:
            body = await request.json()
        except Exception:  # noqa: BLE001 - any malformed body is the same 422
            body = None
        sent = body.get("boxes") if isinstance(body, dict) else None
        names = classes()
        try:
            return queue.review(item_id, sent, names)
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
        except KeyError:
            raise HTTPException(404, "no such pending review item") from None
        except (OSError, sqlite3.Error) as exc:
            raise HTTPException(503, NOT_SAVED.format(type(exc).__name__), headers={"Retry-After": "5"}) from None

    @router.post("/review/boxes/{item_id}/undo", dependencies=writes, summary="Undo a box decision")
    def boxes_undo(item_id: str) -> dict[str, Any]:
        try:
            return queue.undo(item_id)
        except KeyError:
            raise HTTPException(404, "no such reviewed item") from None
        except (OSError, sqlite3.Error) as exc:
            raise HTTPException(
                503, f"the undo failed ({type(exc).__name__}); the decision stands, retry", headers={"Retry-After": "5"}
            ) from None

    return router
