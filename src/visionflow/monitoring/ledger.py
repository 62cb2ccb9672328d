"""The closed loop's bookkeeping: a cool-down ledger that stops retraining storms, and reviewed batches becoming
labelled data.

The ledger is a JSON file under a file lock (data/drift/retrain_ledger.json): a drift alarm may start a retraining
only when none was started within drift.cooldown_hours. Any number of drift checks, in any number of processes,
agree on who got the claim.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from visionflow.errors import DataError
from visionflow.locks import file_lock
from visionflow.report import write_json_atomic


@dataclass(frozen=True)
class Claim:
    granted: bool
    claim_id: str | None
    last: dict[str, Any] | None
    next_allowed: float | None


def read_ledger(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    try:
        return json.loads(path.read_text())["retrainings"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise DataError(f"{path} is damaged ({exc}); move it aside to reset the retraining cool-down") from None


def claim_retraining(
    path: Path, *, cooldown_s: float, trigger: str, detail: dict[str, Any] | None = None, now: float | None = None
) -> Claim:
    """Atomically grant a retraining unless one was granted within the cool-down window."""
    now = time.time() if now is None else now
    with file_lock(path.with_suffix(".lock")):
        entries = read_ledger(path)
        started = [e for e in entries if e.get("granted")]
        last = started[-1] if started else None
        if last is not None and now - last["time"] < cooldown_s:
            entries.append(
                {"time": now, "trigger": trigger, "granted": False, "suppressed_by": last["claim_id"], **(detail or {})}
            )
            write_json_atomic(path, {"retrainings": entries[-500:]})
            return Claim(False, None, last, last["time"] + cooldown_s)
        claim_id = uuid.uuid4().hex[:12]
        entries.append({"time": now, "trigger": trigger, "granted": True, "claim_id": claim_id, **(detail or {})})
        write_json_atomic(path, {"retrainings": entries[-500:]})
        return Claim(True, claim_id, last, None)


def record_outcome(path: Path, claim_id: str, **outcome: Any) -> None:
    with file_lock(path.with_suffix(".lock")):
        entries = read_ledger(path)
        for e in entries:
            if e.get("claim_id") == claim_id:
                e.update(outcome)
        write_json_atomic(path, {"retrainings": entries})


def batch_labels(
    batch_dir: Path, classes: list[str] | None = None, only: set[str] | None = None
) -> tuple[list[Path], list[str]]:
    """A reviewed batch's labelled images and their labels (an image without a label is left out; with `only`,
    names as selection.csv gives them, only those: the images a person was asked to label). Raises a one-line
    DataError for a batch without labels.csv, or labels naming a class outside `classes` (when given) or one that
    cannot be a folder name."""
    from visionflow.data.folder_source import check_class_names
    from visionflow.monitoring.selection import batch_name
    from visionflow.monitoring.simulate import load_batch

    batch = load_batch(batch_dir)
    if batch.labels is None:
        raise DataError(f"{batch_dir} has no labels.csv: only reviewed batches can become training data")
    # pandas reads an empty cell as NaN: no label
    pairs = [
        (f, lab.strip())
        for f, lab in zip(batch.images, batch.labels)
        if isinstance(lab, str) and lab.strip() and (only is None or batch_name(Path(batch_dir), f) in only)
    ]
    unknown = sorted({lab for _, lab in pairs if classes and lab not in classes})
    if unknown:
        raise DataError(
            f"{batch_dir}/labels.csv names classes the model does not know: {unknown}; known classes: {classes}"
        )
    check_class_names(sorted({lab for _, lab in pairs}), f"{batch_dir}/labels.csv")
    return [f for f, _ in pairs], [lab for _, lab in pairs]


def take_in_reviewed_batch(
    batch_dir: Path, reviewed_dir: Path, classes: list[str] | None = None, only: set[str] | None = None
) -> dict[str, int]:
    """Copy a reviewed batch's labelled images (with `only`, just those: see batch_labels) into
    reviewed_dir/<label>/ (what a person's review would produce). The batch itself is left untouched. Returns
    images per class.
    """
    counts: dict[str, int] = {}
    for f, label in zip(*batch_labels(batch_dir, classes, only)):
        dest = Path(reviewed_dir) / label / f"{Path(batch_dir).name}__{f.name}"
        if not dest.exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(".partial-" + dest.name)
            shutil.copyfile(f, tmp)
            os.replace(tmp, dest)
        counts[label] = counts.get(label, 0) + 1
    return counts
