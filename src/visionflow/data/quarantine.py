"""Quarantine: the images validate leaves out, copied to data/quarantine/<class>/ with reasons.csv saying why.

data/raw stays exactly as versioned; the quarantine folder is derived from it and rewritten on every run.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd

from visionflow.data.expectations import SuiteOutcome
from visionflow.data.imageio import read_limited
from visionflow.paths import ProjectPaths


def quarantine_reasons(df: pd.DataFrame, images: SuiteOutcome) -> pd.Series:
    """Each row's quarantine reason (None: accepted): its first failing expectation (the suite result keeps them
    all), and for an undecodable image the decoder's own reason."""
    reason_of: dict[str, str] = {}
    for reason, paths in images.failing.items():
        for p in paths:
            reason_of.setdefault(p, reason)
    reasons = df["path"].map(reason_of).astype(object)
    undecodable = reasons == "undecodable"
    reasons[undecodable] = df.loc[undecodable, "decode_error"].fillna("undecodable")
    return reasons


def write_quarantine(rejected: pd.DataFrame, qdir: Path, project: ProjectPaths | None) -> None:
    shutil.rmtree(qdir, ignore_errors=True)  # derived from raw_dir, which still holds every original
    qdir.mkdir(parents=True, exist_ok=True)
    for row in rejected.itertuples():
        src = project.resolve(row.path) if project else Path(row.path)
        dest = qdir / row.label / src.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            dest.write_bytes(read_limited(src, None))  # a file, or a member of a shard
        except OSError:
            pass  # an unreadable file is still listed in reasons.csv
    out = rejected[["path", "label", "quarantine_reason", "decode_detail", "sha256", "file_size"]].copy()
    stored = [qdir / r.label / Path(r.path).name for r in rejected.itertuples()]
    out.insert(1, "quarantined_as", [project.relative(q) if project else str(q) for q in stored])
    out.rename(columns={"path": "original_path", "quarantine_reason": "reason", "decode_detail": "detail"}).to_csv(
        qdir / "reasons.csv", index=False
    )
