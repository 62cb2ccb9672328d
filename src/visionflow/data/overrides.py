"""Label overrides: corrections to labels, kept beside the data instead of in it.

A person accepting a label audit's suggestion (the review page's "label audit" view, or `visionflow audit-labels`)
appends a row here; ingest applies the file to the next data version (an image whose sha256 has a row goes into
the row's class), so the original files stay untouched and every correction is versioned: the file is a DVC
dependency of the ingest stage, and the data version it produces records its effect.

    data/label_overrides.csv   sha256,label,was,source,decided_at,note

One row per image (the sha256 of its bytes, so a renamed or re-shot file name does not matter); a later row for
the same image replaces an earlier one, and `label` == `was` records a decision to keep the label as it is (the
audit then stops flagging it).
"""

from __future__ import annotations

import csv
import io
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from visionflow.errors import DataError
from visionflow.locks import file_lock

COLUMNS = ("sha256", "label", "was", "source", "decided_at", "note")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class Override:
    sha256: str
    label: str  # the label the image should have
    was: str  # the label it had when the decision was made
    source: str  # who or what decided: "review-page", "audit-cli", ...
    decided_at: str  # ISO 8601, UTC
    note: str = ""

    @property
    def keeps_label(self) -> bool:
        return self.label == self.was


def read_overrides(path: Path) -> dict[str, Override]:
    """sha256 -> the latest decision for that image; {} when the file does not exist."""
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"label overrides {path} cannot be read ({exc}); restore it from git or DVC") from exc
    rows = list(csv.DictReader(io.StringIO(text)))
    missing = [c for c in ("sha256", "label") if rows and c not in rows[0]]
    if missing or (not rows and text.strip() and text.split("\n", 1)[0].split(",")[:1] != ["sha256"]):
        raise DataError(f"label overrides {path} must have a header with the columns {','.join(COLUMNS)}")
    out: dict[str, Override] = {}
    for n, row in enumerate(rows, start=2):
        sha, label = (row.get("sha256") or "").strip().lower(), (row.get("label") or "").strip()
        if not _SHA256.match(sha) or not label:
            raise DataError(
                f"label overrides {path} line {n}: expected a 64-hex sha256 and a label, got "
                f"{sha[:70]!r} and {label[:40]!r}; fix or delete the line"
            )
        out[sha] = Override(
            sha256=sha,
            label=label,
            was=(row.get("was") or "").strip(),
            source=(row.get("source") or "").strip(),
            decided_at=(row.get("decided_at") or "").strip(),
            note=(row.get("note") or "").strip(),
        )
    return out


def append_overrides(path: Path, decisions: list[Override]) -> None:
    """Append decisions (file-locked, so the review page and a CLI can write at once; the file is rewritten
    atomically, never left half-written)."""
    if not decisions:
        return
    for d in decisions:
        if not _SHA256.match(d.sha256) or not d.label:
            raise DataError(f"a label override needs a 64-hex sha256 and a label, got {d.sha256!r}, {d.label!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(path.with_name(path.name + ".lock")):
        old = path.read_text(encoding="utf-8") if path.is_file() else ""
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        if not old.strip():
            writer.writerow(COLUMNS)
        elif not old.endswith("\n"):
            buf.write("\n")
        for d in decisions:
            writer.writerow([d.sha256, d.label, d.was, d.source, d.decided_at, d.note])
        tmp = path.with_name(f".{path.name}.partial")
        tmp.write_text(old + buf.getvalue(), encoding="utf-8")
        os.replace(tmp, path)


def decision(sha256: str, label: str, was: str, source: str, note: str = "") -> Override:
    """An override stamped with the current time (UTC)."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return Override(sha256.lower(), label, was, source, stamp, note)
