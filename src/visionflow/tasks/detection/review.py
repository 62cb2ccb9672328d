"""The box review queue: served images with an uncertain box wait here with their boxes, and a person's corrected
boxes turn them into labelled data for the next data version.

A decision writes, under data/reviewed/detection/, the image's bytes as uploaded as <sha256>.<ext> and its boxes
as <sha256>.json = {"file", "width", "height", "boxes": [[x, y, w, h, "class"], ...], "reviewed_at"} (COCO
pixels of the upright image), which ingest reads into data/raw. Both files are written atomically before the item
is marked reviewed, in one SQLite write transaction (as serving.review does for labels): a failure leaves the
item pending and retryable.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import sqlite3
import time
import uuid
from contextlib import closing
from pathlib import Path
from typing import Any

from visionflow.data.imageio import sha256_bytes
from visionflow.serving.review import write_atomically

MAX_BOXES = 500  # boxes one decision may carry: far more than a person draws, small enough to check at once
# The formats serving accepts, by their magic bytes: the reviewed image keeps the upload's own format.
_MAGIC = ((b"\x89PNG", "png"), (b"\xff\xd8", "jpg"), (b"BM", "bmp"), (b"RIFF", "webp"))
MEDIA_TYPES = {"png": "image/png", "jpg": "image/jpeg", "bmp": "image/bmp", "webp": "image/webp"}


class BoxReviewQueue:
    """Images with uncertain boxes, least certain first, in SQLite (consistent across workers) with their bytes."""

    def __init__(self, folder: Path, reviewed_dir: Path):
        self.folder = Path(folder)
        self.images = self.folder / "images"
        self.reviewed_dir = Path(reviewed_dir)
        self.db = self.folder / "queue.db"
        self._ready = False

    def _conn(self) -> sqlite3.Connection:
        if not self._ready:  # made on first use: a classification server never creates the folder
            self.images.mkdir(parents=True, exist_ok=True)
            with closing(sqlite3.connect(self.db, timeout=30)) as c, c:
                c.execute("""CREATE TABLE IF NOT EXISTS items (id TEXT PRIMARY KEY, created REAL,
                             model_version TEXT, boxes TEXT, min_score REAL, image TEXT, width INTEGER,
                             height INTEGER, sha256 TEXT, status TEXT, reviewed TEXT, reviewed_at REAL)""")
            self._ready = True
        conn = sqlite3.connect(self.db, timeout=30)
        conn.row_factory = sqlite3.Row
        return conn

    def add(self, data: bytes, *, width: int, height: int, model_version: str, boxes: list[dict[str, Any]]) -> str:
        conn = self._conn()
        item_id = uuid.uuid4().hex
        name = f"{item_id}.{extension(data)}"
        (self.images / name).write_bytes(data)
        with closing(conn) as c, c:
            c.execute(
                "INSERT INTO items VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (item_id, time.time(), model_version, json.dumps(boxes), min(b["score"] for b in boxes), name,
                 width, height, sha256_bytes(data), "pending", None, None),
            )  # fmt: skip
        return item_id

    def pending(self, limit: int = 50) -> list[dict[str, Any]]:
        """The first `limit` pending items, least certain box first (reviewed items leave the set: ask again)."""
        with closing(self._conn()) as c:
            rows = c.execute(
                "SELECT * FROM items WHERE status='pending' ORDER BY min_score, created, id LIMIT ?", (limit,)
            ).fetchall()
        keep = ("id", "created", "model_version", "min_score", "width", "height")
        return [{k: r[k] for k in keep} | {"boxes": json.loads(r["boxes"])} for r in rows]

    def count(self) -> int:
        with closing(self._conn()) as c:
            return c.execute("SELECT COUNT(*) FROM items WHERE status='pending'").fetchone()[0]

    def image_path(self, item_id: str) -> Path | None:
        if not item_id.isalnum():  # ids are uuid hex; anything else is not ours
            return None
        with closing(self._conn()) as c:
            row = c.execute("SELECT image FROM items WHERE id=?", (item_id,)).fetchone()
        path = None if row is None else self.images / row["image"]
        return path if path is not None and path.is_file() else None

    def review(self, item_id: str, sent: Any, classes: list[str]) -> dict[str, Any]:
        """Save the image and its corrected boxes under reviewed_dir, then mark the item reviewed. Raises
        ValueError (the boxes are refused, with the reason), KeyError (no such pending item), OSError or
        sqlite3.Error (nothing changed: retry)."""
        src = self.image_path(item_id)
        if src is None:
            raise KeyError(item_id)
        with closing(self._conn()) as c:
            row = _lock_item(c, item_id, "pending")
            try:
                boxes = checked_boxes(sent, row["width"], row["height"], classes)
                image, label = self._saved_as(row)
                existed = image.exists()  # the same bytes reviewed before: keep them if this write fails
                write_atomically(image, src.read_bytes())
                now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
                doc = {"file": image.name, "width": row["width"], "height": row["height"], "boxes": boxes,
                       "reviewed_at": now}  # fmt: skip
                try:
                    write_atomically(label, json.dumps(doc, indent=1).encode())
                    c.execute(
                        "UPDATE items SET status='reviewed', reviewed=?, reviewed_at=? WHERE id=?",
                        (json.dumps(boxes), time.time(), item_id),
                    )
                    c.commit()
                except BaseException:
                    label.unlink(missing_ok=True)
                    if not existed:
                        image.unlink(missing_ok=True)
                    raise
            except BaseException:
                c.rollback()
                raise
        return {"id": item_id, "boxes": boxes, "saved_as": str(label)}

    def undo(self, item_id: str) -> dict[str, Any]:
        """Put a reviewed item back in the queue; its files leave the labelled data (set aside first, deleted once
        the item is pending again; a failure puts them back)."""
        if not item_id.isalnum():
            raise KeyError(item_id)
        with closing(self._conn()) as c:
            row = _lock_item(c, item_id, "reviewed")
            files = [f for f in self._saved_as(row) if f.exists()]
            aside = [f.with_name(f".undo-{f.name}") for f in files]  # dot files: ingest skips them
            for f, a in zip(files, aside):
                os.replace(f, a)
            try:
                c.execute("UPDATE items SET status='pending', reviewed=NULL, reviewed_at=NULL WHERE id=?", (item_id,))
                c.commit()
            except BaseException:
                c.rollback()
                for f, a in zip(files, aside):
                    os.replace(a, f)
                raise
        for a in aside:
            a.unlink(missing_ok=True)
        return {"id": item_id, "boxes": json.loads(row["reviewed"])}

    def _saved_as(self, row: sqlite3.Row) -> tuple[Path, Path]:
        ext = row["image"].rsplit(".", 1)[1]
        return self.reviewed_dir / f"{row['sha256']}.{ext}", self.reviewed_dir / f"{row['sha256']}.json"


def _lock_item(c: sqlite3.Connection, item_id: str, status: str) -> sqlite3.Row:
    """SQLite's write lock, and the item's row if it has `status` (two reviewers of one item: the second finds it
    no longer pending)."""
    c.execute("BEGIN IMMEDIATE")
    row = c.execute("SELECT * FROM items WHERE id=?", (item_id,)).fetchone()
    if row is None or row["status"] != status:
        c.rollback()
        raise KeyError(item_id)
    return row


def extension(data: bytes) -> str:
    for magic, ext in _MAGIC:
        if data.startswith(magic):
            return ext
    raise ValueError("not an image format serving accepts")  # (decoding refused such bytes before they got here)


def checked_boxes(sent: Any, width: int, height: int, classes: list[str]) -> list[list[Any]]:
    """A decision's boxes, [{"bbox": [x, y, w, h], "label": "<class>"}, ...] in the image's pixels, as the
    reviewed file's [[x, y, w, h, "class"], ...]; ValueError says what is wrong with the first bad one."""
    if not isinstance(sent, list):
        raise ValueError('send JSON {"boxes": [{"bbox": [x, y, w, h], "label": "<class>"}, ...]}')
    if len(sent) > MAX_BOXES:
        raise ValueError(f"{len(sent)} boxes: at most {MAX_BOXES} per image")
    out = []
    for i, box in enumerate(sent):
        bbox = box.get("bbox") if isinstance(box, dict) else None
        label = box.get("label") if isinstance(box, dict) else None
        if not (isinstance(bbox, list) and len(bbox) == 4):
            raise ValueError(f"box {i}: bbox must be [x, y, w, h]")
        if not all(_finite(v) for v in bbox):
            raise ValueError(f"box {i}: bbox values must be finite numbers")
        x, y, w, h = (float(v) for v in bbox)
        if w < 1 or h < 1:
            raise ValueError(f"box {i}: {w:g} x {h:g} px is too small (at least 1 x 1)")
        if x < 0 or y < 0 or x + w > width + 1e-6 or y + h > height + 1e-6:
            raise ValueError(f"box {i}: [{x:g}, {y:g}, {w:g}, {h:g}] leaves the {width} x {height} image")
        if not isinstance(label, str) or label not in classes:
            raise ValueError(f"box {i}: unknown class {str(label)[:80]!r}; known: {classes}")
        x, y = round(x, 2), round(y, 2)
        # rounded down to the hundredth, so that the rounded box still ends inside the image
        w, h = math.floor(min(w, width - x) * 100) / 100, math.floor(min(h, height - y) * 100) / 100
        out.append([x, y, w, h, label])
    return out


def _finite(v: Any) -> bool:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:  # an integer too large for a float (JSON allows any number of digits)
        return False
