"""The human review queue and the browser pages (/review, /docs) of the serving app.

- Low-confidence predictions wait in SQLite (consistent across workers) with their image; a person's label turns
  the image into labelled data under data/reviewed/<class>/, which ingest adds to the next data version.
- A label is durable before it is recorded: the image is written atomically, then the item is marked reviewed, in
  one SQLite write transaction per item, so a full disk or a crash leaves the item pending and retryable.
- The pages are static files under visionflow/serving/static/ served with a strict Content-Security-Policy (scripts and
  styles from this origin only, nothing inline), so data shown on them can never run as code. Their JSON and
  image requests send the token as a header; only the page addresses themselves take `?token=`.
- State-changing review requests must be JSON from this origin (CSRF).
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
import uuid
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse

STATIC = Path(__file__).parent / "static"
PAGE_HEADERS = {
    # Nothing inline, nothing from elsewhere: an injected tag or handler cannot run. blob: is where the page
    # puts the images it fetched with the token header; frame-ancestors stops another site framing the page.
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: "
    "data:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",  # the page address may carry ?token=
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}
PAGE_FILES = {
    "review.js": "text/javascript",
    "audit.js": "text/javascript",  # the label audit view (visionflow.serving.audit_view)
    "review.css": "text/css",
    "docs.js": "text/javascript",
    "review_boxes.js": "text/javascript",  # the box review view (visionflow.tasks.detection.review_api)
}


# A shadow disagreement's challenger prediction (NULL on every other item).
CHALLENGER_COLUMNS = {"challenger_version": "TEXT", "challenger_predicted": "TEXT", "challenger_confidence": "REAL"}


class ReviewQueue:
    """Low-confidence predictions waiting for a person; SQLite keeps it consistent across workers.

    With a budget (params review.budget per review.window_hours) the queue keeps every candidate but offers a
    person at most the budget per window, minus what was labelled in the window, chosen by the selection strategy
    (visionflow.monitoring.selection) over the window's candidates, most useful first; images labelled in the
    window count as covered for k-center. Candidates older than the window are kept but no longer offered.
    Without a budget (None) every pending item is offered, least confident first.
    """

    def __init__(
        self,
        folder: Path,
        reviewed_dir: Path,
        *,
        budget: int | None = None,
        window_hours: float = 24,
        strategy: str = "uncertainty-diversity",
        seed: int = 0,
    ):
        self.folder = Path(folder)
        self.images = self.folder / "images"
        self.images.mkdir(parents=True, exist_ok=True)
        self.reviewed_dir = Path(reviewed_dir)
        self.db = self.folder / "queue.db"
        self.budget, self.window_s, self.strategy, self.seed = budget, window_hours * 3600, strategy, seed
        with closing(self._conn()) as c, c:
            c.execute("""CREATE TABLE IF NOT EXISTS items (id TEXT PRIMARY KEY, created REAL, model_version TEXT,
                         predicted TEXT, confidence REAL, probabilities TEXT, image TEXT, status TEXT,
                         label TEXT, reviewed_at REAL, embedding BLOB)""")
            have = {r["name"] for r in c.execute("PRAGMA table_info(items)")}
            # Added later, so a queue made before them gets them here: the embedding (budgets), and the shadow
            # challenger's prediction where it disagreed with the champion's (serving.canary).
            for column, kind in (("embedding", "BLOB"), *CHALLENGER_COLUMNS.items()):
                if column not in have:
                    c.execute(f"ALTER TABLE items ADD COLUMN {column} {kind}")

    def _conn(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.db, timeout=30)
        conn.row_factory = sqlite3.Row
        return conn

    def add(
        self,
        png: bytes,
        *,
        model_version: str,
        predicted: str,
        confidence: float,
        probabilities: dict[str, float],
        embedding: np.ndarray | None = None,
        challenger: dict[str, Any] | None = None,
    ) -> str:
        """Queue one image; `challenger` (version, predicted, confidence) is a shadow challenger's other answer."""
        item_id = uuid.uuid4().hex
        (self.images / f"{item_id}.png").write_bytes(png)
        emb = None if embedding is None else np.asarray(embedding, dtype=np.float32).tobytes()
        row = {
            "id": item_id,
            "created": time.time(),
            "model_version": model_version,
            "predicted": predicted,
            "confidence": confidence,
            "probabilities": json.dumps(probabilities),
            "image": f"{item_id}.png",
            "status": "pending",
            "embedding": emb,
            **{f"challenger_{k}": v for k, v in (challenger or {}).items()},
        }
        with closing(self._conn()) as c, c:
            c.execute(f"INSERT INTO items ({','.join(row)}) VALUES ({','.join('?' * len(row))})", tuple(row.values()))
        return item_id

    def set_challenger(self, item_id: str, *, version: str, predicted: str, confidence: float) -> None:
        """Record a shadow challenger's disagreeing answer on an item the champion's answer already queued."""
        with closing(self._conn()) as c, c:
            c.execute(
                "UPDATE items SET challenger_version=?, challenger_predicted=?, challenger_confidence=? WHERE id=?",
                (version, predicted, confidence, item_id),
            )

    def reviewed(self) -> list[dict[str, Any]]:
        """Every reviewed item's predictions and human label: created, model_version, predicted, label and the
        challenger_* columns (None unless a shadow challenger disagreed)."""
        with closing(self._conn()) as c:
            rows = c.execute(
                f"SELECT created, model_version, predicted, label, {', '.join(CHALLENGER_COLUMNS)} FROM items "
                "WHERE status='reviewed'"
            ).fetchall()
        return [dict(r) for r in rows]

    def pending(self, limit: int = 50) -> list[dict[str, Any]]:
        """The first `limit` items a person is offered. Labelled items leave the set, so asking again after
        labelling a page gives the next one: that is how a client walks the whole queue (or, with a budget, the
        window's offer)."""
        if self.budget is None:
            with closing(self._conn()) as c:
                rows = c.execute(
                    "SELECT * FROM items WHERE status='pending' ORDER BY confidence, created, id LIMIT ?", (limit,)
                ).fetchall()
        else:
            rows = self._offer()[:limit]
        return [_item(r) for r in rows]

    def count(self) -> int:
        """Pending items a person is offered (with a budget: what is left of this window's offer)."""
        if self.budget is not None:
            return len(self._offer())
        with closing(self._conn()) as c:
            return c.execute("SELECT COUNT(*) FROM items WHERE status='pending'").fetchone()[0]

    def _offer(self) -> list[sqlite3.Row]:
        """This window's pick: what is left of the budget, chosen by the strategy among the window's candidates."""
        from visionflow.monitoring.selection import select

        since = time.time() - self.window_s
        with closing(self._conn()) as c:
            rows = c.execute(
                "SELECT * FROM items WHERE status='pending' AND created >= ? ORDER BY confidence, created, id",
                (since,),
            ).fetchall()
            done = c.execute("SELECT embedding FROM items WHERE status='reviewed' AND reviewed_at >= ?", (since,))
            labelled = [r["embedding"] for r in done.fetchall()]
        left = max(self.budget - len(labelled), 0)
        probs = [list(json.loads(r["probabilities"]).values()) for r in rows]
        embs = [r["embedding"] or b"" for r in rows]
        if (
            not rows
            or {len(x) for x in probs} != {len(probs[0])}
            or len(probs[0]) < 2
            or {len(e) for e in embs} != {len(embs[0])}
            or not embs[0]
        ):
            return rows[:left]  # items without probabilities or embeddings (older ones): least confident first
        emb = np.stack([np.frombuffer(e, dtype=np.float32) for e in embs])
        known = [np.frombuffer(b, dtype=np.float32) for b in labelled if b and len(b) == len(embs[0])]
        chosen = select(
            np.asarray(probs), emb, left, self.strategy, seed=self.seed, labelled=np.stack(known) if known else None
        )
        return [rows[i] for i in chosen]

    def image_path(self, item_id: str) -> Path | None:
        if not item_id.isalnum():  # ids are uuid hex; anything else is not ours
            return None
        path = self.images / f"{item_id}.png"
        return path if path.is_file() else None

    def review(self, item_id: str, label: str, classes: list[str]) -> dict[str, Any]:
        """Save the image under reviewed_dir/<label>/, then mark the item reviewed. Any failure (a full disk, the
        database) leaves the item pending and no image behind, so the same request can simply be sent again."""
        if label not in classes:
            raise ValueError(f"unknown label {label!r}; known: {classes}")
        if label in ("", ".", "..") or label.startswith(".") or "/" in label or "\\" in label or "\0" in label:
            # the label is a folder name under reviewed_dir: a class name like "../x" must not leave it
            raise ValueError(f"the class name {label!r} cannot be a folder name; rename the class")
        src = self.image_path(item_id)
        if src is None:
            raise KeyError(item_id)
        dest = self._saved_as(item_id, label)
        with closing(self._conn()) as c:
            self._lock_item(c, item_id, "pending")
            try:
                for other in classes:  # an image a crash left between its write and its mark, under any class
                    self._saved_as(item_id, other).unlink(missing_ok=True)
                write_atomically(dest, src.read_bytes())
                c.execute(
                    "UPDATE items SET status='reviewed', label=?, reviewed_at=? WHERE id=?",
                    (label, time.time(), item_id),
                )
                c.commit()
            except BaseException:
                c.rollback()
                dest.unlink(missing_ok=True)
                raise
        return {"id": item_id, "label": label, "saved_as": str(dest)}

    def undo(self, item_id: str) -> dict[str, Any]:
        """Put a reviewed item back in the queue and take its image out of the labelled data. The image is set
        aside first and only deleted once the item is pending again: a failure puts it back, label and all."""
        if not item_id.isalnum():
            raise KeyError(item_id)
        with closing(self._conn()) as c:
            label = self._lock_item(c, item_id, "reviewed")["label"]
            saved = self._saved_as(item_id, label)
            aside = saved.with_name(f".undo-{saved.name}")  # a dot file: ingest skips it
            if saved.exists():
                os.replace(saved, aside)
            try:
                c.execute("UPDATE items SET status='pending', label=NULL, reviewed_at=NULL WHERE id=?", (item_id,))
                c.commit()
            except BaseException:
                c.rollback()
                if aside.exists():
                    os.replace(aside, saved)
                raise
        aside.unlink(missing_ok=True)
        return {"id": item_id, "label": label}

    def _saved_as(self, item_id: str, label: str) -> Path:
        return self.reviewed_dir / label / f"review_{item_id}.png"

    @staticmethod
    def _lock_item(c: sqlite3.Connection, item_id: str, status: str) -> sqlite3.Row:
        """Take SQLite's write lock and check the item's status under it: two reviewers (or workers) labelling
        the same item are served one after the other, and the second finds it no longer pending."""
        c.execute("BEGIN IMMEDIATE")
        row = c.execute("SELECT status, label FROM items WHERE id=?", (item_id,)).fetchone()
        if row is None or row["status"] != status:
            c.rollback()
            raise KeyError(item_id)
        return row


def _item(row: sqlite3.Row) -> dict[str, Any]:
    """A queue row as the API shows it (the embedding stays in the database)."""
    return {k: row[k] for k in row.keys() if k != "embedding"} | {"probabilities": json.loads(row["probabilities"])}


def write_atomically(dest: Path, data: bytes) -> None:
    """Write to a dot file beside dest (ingest skips dot files), fsync, then rename over dest: dest is either
    absent or whole, never empty or cut short."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".tmp-{os.getpid()}-{dest.name}")
    try:
        with tmp.open("wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


async def same_origin_json(request: Request) -> None:
    """CSRF guard for state-changing requests. A JSON content type cannot be sent cross-site without a CORS
    preflight (which this server never grants), and a browser's Sec-Fetch-Site / Origin say where a request came
    from. Clients that are not browsers (curl, scripts) send neither header and are let through."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        raise HTTPException(415, 'send JSON (Content-Type: application/json), e.g. {"label": "<class name>"}')
    site = request.headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        raise HTTPException(403, f"cross-site request refused (Sec-Fetch-Site: {site})")
    origin = request.headers.get("origin")
    if origin is not None and origin != f"{request.url.scheme}://{request.headers.get('host', '')}":
        raise HTTPException(403, f"cross-origin request refused (Origin: {origin})")


def page(name: str) -> FileResponse:
    return FileResponse(STATIC / name, media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)


def page_file(name: str) -> FileResponse:
    """A page's own script or style sheet (code, no data: served without the token)."""
    if name not in PAGE_FILES:
        raise HTTPException(404, "no such file")
    return FileResponse(STATIC / name, media_type=PAGE_FILES[name], headers={"X-Content-Type-Options": "nosniff"})


def review_router(
    queue: ReviewQueue,
    classes: Callable[[], list[str]],
    require_token,
    require_token_page,
    task: Callable[[], str] = lambda: "classification",
) -> APIRouter:
    """/review (the page) and its API, the label writes included. `classes()` gives the serving model's classes,
    or raises 503 without one; `require_token` checks the Authorization header, `require_token_page` also takes
    ?token= (page addresses). `task()` is the served model's task: the page shows the box review for detection."""
    router = APIRouter()
    api = [Depends(require_token)]

    @router.get("/review", include_in_schema=False, dependencies=[Depends(require_token_page)])
    def review_page() -> FileResponse:
        return page("review.html")

    @router.get("/review/static/{name}", include_in_schema=False)
    def review_static(name: str) -> FileResponse:
        return page_file(name)

    @router.get("/review/queue", dependencies=api, summary="Predictions waiting for review")
    def review_queue(limit: int = 50) -> dict[str, Any]:
        """The least confident pending items (at most `limit`), the model's classes, and how many are pending
        in all. Label them and ask again for the next ones."""
        try:
            names = classes()
        except HTTPException:  # no model yet: the queue can still be seen
            names = []
        return {
            "items": queue.pending(min(max(limit, 1), 500)),
            "classes": names,
            "total": queue.count(),
            "task": task(),
        }

    @router.get("/review/image/{item_id}", dependencies=api, include_in_schema=False)
    def review_image(item_id: str) -> FileResponse:
        path = queue.image_path(item_id)
        if path is None:
            raise HTTPException(404, "no such review item")
        return FileResponse(path, media_type="image/png")

    router.include_router(_label_router(queue, classes, api))
    return router


def _label_router(queue: ReviewQueue, classes: Callable[[], list[str]], api: list) -> APIRouter:
    """The review API's writes: a label (confirmed or corrected), and its undo. Each maps the queue's failures to
    HTTP (404 for an unknown item, 503 to retry when the disk or database failed and nothing changed)."""
    router = APIRouter()

    @router.post(
        "/review/{item_id}", dependencies=[*api, Depends(same_origin_json)], summary="Confirm or correct a label"
    )
    async def review_submit(item_id: str, request: Request) -> dict[str, Any]:
        label = await _label_sent(request)
        names = classes()
        try:
            return queue.review(item_id, label, names)
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
        except KeyError:
            raise HTTPException(404, "no such pending review item") from None
        except (OSError, sqlite3.Error) as exc:  # the item is still pending: the same request can be retried
            raise HTTPException(
                503,
                f"the label could not be saved ({type(exc).__name__}: {exc}); the item is still pending, retry",
                headers={"Retry-After": "5"},
            ) from None

    @router.post(
        "/review/{item_id}/undo",
        dependencies=[*api, Depends(same_origin_json)],
        summary="Undo a label: the item goes back to the queue and its image leaves data/reviewed",
    )
    def review_undo(item_id: str) -> dict[str, Any]:
        try:
            return queue.undo(item_id)
        except KeyError:
            raise HTTPException(404, "no such reviewed item") from None
        except (OSError, sqlite3.Error) as exc:
            raise HTTPException(
                503,
                f"the undo failed ({type(exc).__name__}: {exc}); the label stands, retry",
                headers={"Retry-After": "5"},
            ) from None

    return router


async def _label_sent(request: Request) -> str:
    """The label of a review request's JSON body {"label": "<class name>"} (422 for anything else)."""
    try:
        body = await request.json()
        label = body["label"]
        if not isinstance(label, str):
            raise TypeError(label)
    except Exception:  # noqa: BLE001 - any malformed body is the same 422
        raise HTTPException(422, 'send JSON {"label": "<class name>"}') from None
    return label


def docs_router(openapi: Callable[[], dict[str, Any]], require_token, require_token_page) -> APIRouter:
    """/docs (Swagger UI 5 from the swagger-ui-bundle-v2 package, so it works offline) and /openapi.json, both
    behind the token when auth is on. The page sends the token it was opened with as a header on its requests."""
    from swagger_ui_bundle import swagger_ui_path

    router = APIRouter()
    vendor = {"swagger-ui-bundle.js": "text/javascript", "swagger-ui.css": "text/css"}

    @router.get("/docs", include_in_schema=False, dependencies=[Depends(require_token_page)])
    def docs_page() -> FileResponse:
        return page("docs.html")

    @router.get("/docs/static/{name}", include_in_schema=False)
    def docs_static(name: str) -> FileResponse:
        if name in vendor:
            return FileResponse(Path(swagger_ui_path) / name, media_type=vendor[name])
        return page_file(name)

    @router.get("/openapi.json", include_in_schema=False, dependencies=[Depends(require_token)])
    def openapi_json() -> JSONResponse:
        return JSONResponse(openapi())

    return router
