"""The review page's "label audit" view: the suspected label errors the label audit found, for a person to decide.

The audit (visionflow.monitoring.label_audit) writes one table per scope, review.audit_dir/suspects-<scope>.csv
(the training split by training dynamics, each reviewed batch by confident learning). This module reads them all
and serves, one suspect after another: the image, its label, the suggested label, and the decision a person makes:
accept the suggestion, keep the label, or pick another class.

- A decision is a row of the label overrides file (visionflow.data.overrides), which ingest applies to the next
  data version; an image with any row there is decided and leaves the list. The check and the append run under one
  lock, so two people deciding the same image at once make one decision (the other gets 409), never two.
- The image endpoint looks a suspect up by its sha256 and never takes a path from the request: it serves only a
  file (or shard member) a suspects file names, only while its bytes still have that sha256, and only when they
  open as an image of an allowed format.
- A missing or malformed suspects file, a malformed row, or an unreadable overrides file is reported in the
  list's `problems`; the other suspects (and the rest of the page) still work.
- The routes have the review API's guards: the bearer token, and JSON from this origin for the decision (CSRF).
"""

from __future__ import annotations

import csv
import functools
import io
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from visionflow.data import overrides
from visionflow.data.imageio import DecodeRules, RejectedImage, open_checked, read_limited, sha256_bytes
from visionflow.errors import DataError
from visionflow.locks import file_lock
from visionflow.monitoring.label_audit import SUSPECT_COLUMNS
from visionflow.paths import ProjectPaths
from visionflow.serving.review import _label_sent, same_origin_json

SOURCE = "review-page"  # the overrides file's `source` for decisions made here
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_REQUIRED = ("path", "sha256", "label", "suggested")  # without these a row cannot be shown or decided


@dataclass(frozen=True)
class Suspect:
    sha256: str
    scope: str
    rank: int
    path: str  # as the suspects file has it: project-relative, absolute, or a shard locator
    label: str
    suggested: str
    score: float | None
    method: str

    def public(self) -> dict[str, Any]:
        return {
            "id": self.sha256,
            "scope": self.scope,
            "rank": self.rank,
            "path": self.path,
            "label": self.label,
            "suggested": self.suggested,
            "score": self.score,
            "method": self.method,
        }


class AlreadyDecided(Exception):
    def __init__(self, existing: overrides.Override):
        super().__init__(existing.sha256)
        self.existing = existing


class SuspectFiles:
    """The suspects files of a project, the label overrides file, and the decisions between them."""

    def __init__(self, paths: ProjectPaths):
        self.paths = paths
        self.folder = paths.label_audit
        self.overrides = paths.label_overrides
        # Our own lock around read-check-append (append_overrides takes the overrides file's lock itself, and
        # flock is not reentrant); kept with the server's review state, not beside the DVC-tracked file.
        self.lock = paths.review / "label_audit_decisions.lock"

    def suspects(self) -> tuple[list[Suspect], list[str]]:
        """Every suspect of every suspects file (files by name, rows by rank; an image named twice is listed
        once, where it comes first), and what could not be read."""
        files = sorted(self.folder.glob("suspects-*.csv")) if self.folder.is_dir() else []
        problems = [] if files else [f"no suspects files in {self.paths.relative(self.folder)}: run the label audit"]
        seen: dict[str, Suspect] = {}
        for f in files:
            try:
                st = f.stat()
                rows, bad = _read_file(str(f), st.st_mtime_ns, st.st_size)
            except OSError as exc:
                rows, bad = [], [f"cannot be read ({exc.strerror or exc})"]
            problems += [f"{self.paths.relative(f)}: {b}" for b in bad]
            for s in rows:
                seen.setdefault(s.sha256, s)
        return list(seen.values()), problems

    def decided(self) -> dict[str, overrides.Override]:
        return overrides.read_overrides(self.overrides)

    def find(self, sha256: str) -> Suspect:
        """The suspect with this sha256 (KeyError when no suspects file names it)."""
        if not _SHA256.match(sha256):
            raise KeyError(sha256)
        found = next((s for s in self.suspects()[0] if s.sha256 == sha256), None)
        if found is None:
            raise KeyError(sha256)
        return found

    def image(self, s: Suspect, rules: DecodeRules) -> tuple[bytes, str]:
        """The suspect's image bytes and media type. OSError when it is gone, RejectedImage when it is not an
        allowed image, ValueError when its bytes no longer have the suspect's sha256."""
        data = read_limited(self.paths.resolve(s.path), rules.max_bytes)
        if sha256_bytes(data) != s.sha256:
            raise ValueError(f"{s.path} changed since the audit (its sha256 is no longer {s.sha256[:12]}...)")
        fmt = (open_checked(data, rules).format or "").lower()
        return data, f"image/{fmt}"

    def decide(self, sha256: str, label: str, classes: Callable[[], list[str]]) -> overrides.Override:
        """Record `label` for the suspect: its own label (keep) is always allowed, any other must be one of
        `classes()`. KeyError: not a suspect; ValueError: not a class; AlreadyDecided: someone was first;
        DataError: the overrides file is malformed (nothing is appended to it then)."""
        s = self.find(sha256)
        if label != s.label and label not in (names := classes()):
            raise ValueError(f"unknown label {label!r}; the model's classes: {names}")
        with file_lock(self.lock):
            existing = self.decided().get(s.sha256)
            if existing is not None:
                raise AlreadyDecided(existing)
            note = f"label audit {s.scope}, {s.method}, rank {s.rank}"
            made = overrides.decision(s.sha256, label, s.label, SOURCE, note=note)
            overrides.append_overrides(self.overrides, [made])
        return made


@functools.lru_cache(maxsize=64)
def _read_file(path: str, _mtime_ns: int, _size: int) -> tuple[list[Suspect], list[str]]:
    """A suspects file's rows (ranked) and its problems; cached until the file changes."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        return [], [f"not UTF-8 text ({exc.reason}); run the label audit again"]
    reader = csv.DictReader(io.StringIO(text))
    missing = [c for c in _REQUIRED if c not in (reader.fieldnames or [])]
    if missing:
        return [], [f"not a suspects table (missing the columns {', '.join(missing)}; expected {SUSPECT_COLUMNS})"]
    rows, bad = [], []
    try:
        for line, row in enumerate(reader, start=2):
            try:
                rows.append(_suspect(row, line))
            except ValueError as exc:
                bad.append(str(exc))
    except csv.Error as exc:  # a field past csv's size limit: the rest of the file is not read
        return rows, [f"unreadable from line {reader.line_num + 1} ({exc}); run the label audit again"]
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        bad = [f"{len(bad)} row(s) skipped: {bad[0]}{more}"]
    rows.sort(key=lambda s: s.rank)
    return rows, bad


def _suspect(row: dict[str, str | None], line: int) -> Suspect:
    get = {k: (v or "").strip() for k, v in row.items() if isinstance(k, str) and isinstance(v, str)}
    sha = get.get("sha256", "").lower()
    if not _SHA256.match(sha) or not all(get.get(c) for c in _REQUIRED):
        raise ValueError(f"line {line} needs a 64-hex sha256, a path, a label and a suggested label")
    try:
        rank = int(float(get.get("rank") or line - 1))
        score = float(get["score"]) if get.get("score") else None
    except ValueError:
        raise ValueError(
            f"line {line}: rank {get.get('rank')!r} or score {get.get('score')!r} is not a number"
        ) from None
    return Suspect(
        sha256=sha,
        scope=get.get("scope", ""),
        rank=rank,
        path=get["path"],
        label=get["label"],
        suggested=get["suggested"],
        score=score,
        method=get.get("method", ""),
    )


def audit_router(files: SuspectFiles, classes: Callable[[], list[str]], rules: DecodeRules, require_token) -> APIRouter:
    """/review/audit/...: the suspects, their images and the decisions. `classes()` gives the serving model's
    classes or raises 503 (only a decision other than "keep" needs them)."""
    router = APIRouter()
    api = [Depends(require_token)]

    @router.get("/review/audit/suspects", dependencies=api, summary="Suspected label errors waiting for a decision")
    def audit_suspects(limit: int = 50) -> dict[str, Any]:
        """The first `limit` undecided suspects (suspects files by name, then rank), how many are undecided in
        all, the model's classes, and anything that could not be read. Decide them and ask again for the next."""
        suspects, problems = files.suspects()
        try:
            done = files.decided()
        except DataError as exc:  # shown, and decisions refused until it is fixed; the suspects still listed
            done, problems = {}, [*problems, str(exc)]
        try:
            names = classes()
        except HTTPException:
            names = []
        left = [s for s in suspects if s.sha256 not in done]
        return {
            "suspects": [s.public() for s in left[: min(max(limit, 1), 500)]],
            "total": len(left),
            "decided": len(suspects) - len(left),
            "classes": names,
            "problems": problems,
            "overrides": files.paths.relative(files.overrides),
        }

    @router.get("/review/audit/image/{sha256}", dependencies=api, include_in_schema=False)
    def audit_image(sha256: str) -> Response:
        try:
            data, media = files.image(files.find(sha256), rules)
        except KeyError:
            raise HTTPException(404, "no such suspect") from None
        except (OSError, ValueError) as exc:  # missing, or changed: the image the audit judged is not there
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise HTTPException(410, f"the image is gone: {why}") from None
        except RejectedImage as exc:
            raise HTTPException(422, f"not shown: {exc}") from None
        return Response(data, media_type=media, headers={"X-Content-Type-Options": "nosniff"})

    @router.post(
        "/review/audit/{sha256}",
        dependencies=[*api, Depends(same_origin_json)],
        summary="Decide a suspected label error: its own label keeps it, another class corrects it",
    )
    async def audit_decide(sha256: str, request: Request) -> dict[str, Any]:
        label = await _label_sent(request)
        return await run_in_threadpool(_decide, files, sha256, label, classes)  # it may wait for the lock

    return router


def _decide(files: SuspectFiles, sha256: str, label: str, classes: Callable[[], list[str]]) -> dict[str, Any]:
    """A decision, with the store's failures as HTTP: 404 not a suspect, 422 not a class, 409 decided already,
    503 when the overrides file is malformed (fix it) or could not be written (retry)."""
    try:
        made = files.decide(sha256, label, classes)
    except KeyError:
        raise HTTPException(404, "no such suspect") from None
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from None
    except AlreadyDecided as exc:
        e = exc.existing
        raise HTTPException(409, f"already decided: {e.label} (by {e.source or 'unknown'}, {e.decided_at})") from None
    except DataError as exc:  # not retryable as it is: a person must fix the file (the message says how)
        raise HTTPException(503, f"{exc}; no decision is recorded until it is fixed") from None
    except OSError as exc:
        raise HTTPException(
            503, f"the decision could not be saved ({type(exc).__name__}: {exc}); retry", headers={"Retry-After": "5"}
        ) from None
    return {"id": made.sha256, "label": made.label, "was": made.was, "kept": made.keeps_label}
