"""Reviewed-batch audit: are a reviewed batch's labels believable before they join the next data version?

Confident learning (visionflow.monitoring.label_audit) against the champion: its probabilities on the batch are
out-of-sample (it never trained on production images). A batch of a few hundred images is too small to set the
per-class thresholds from, so they come from the champion's probabilities on its own test split (also images it
never trained on), computed once per champion version and cached under data/drift like the drift reference. A
batch image is a suspect when a class other than its label confidently holds (p_j >= t_j, the highest such p_j).

The suspects go to reports/label_audit/suspects-reviewed-<batch>.csv (ranked by self-confidence, lowest first),
where the review page's label audit view shows them. An image a person already decided on (a row in the label
overrides file, keep or change) is no longer a suspect. When the suspects' share of the audited images exceeds
review.max_suspect_share, the batch is held back: not copied into serve.reviewed_dir, and recorded in
<review_dir>/held/<batch>.json with the reason. A later take-in of the same batch (its labels fixed, or the
suspects decided) goes through and removes the record.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from visionflow.config import Params
from visionflow.data.imageio import DecodeRules, sha256_file
from visionflow.data.overrides import read_overrides
from visionflow.errors import DataError
from visionflow.monitoring.label_audit import class_thresholds, confident_class, write_suspects
from visionflow.paths import ProjectPaths

METHOD = "confident-learning"


def test_split_thresholds(p: Params, root: Path, version: str, session, card: dict[str, Any]) -> np.ndarray:
    """The per-class thresholds t_j from the champion's out-of-sample probabilities on its test split (at most
    drift.reference_size images, a seeded draw), cached per (champion version, test images, model bytes)."""
    from visionflow.data.validate import read_manifest
    from visionflow.monitoring.drift_features import extract

    paths = ProjectPaths.of(p, root)
    test = paths.splits / "test.csv"
    if not test.is_file():
        raise DataError(f"{test} not found: the audit's thresholds come from the test split; run the pipeline first")
    manifest = read_manifest(test).sort_values("path").reset_index(drop=True)
    manifest = manifest[manifest["label"].isin(card["classes"])].reset_index(drop=True)
    if len(manifest) > p.drift.reference_size:
        pick = np.random.default_rng(p.base.seed).choice(len(manifest), p.drift.reference_size, replace=False)
        manifest = manifest.iloc[np.sort(pick)].reset_index(drop=True)
    key = hashlib.sha256(json.dumps([version, list(manifest["sha256"]), card.get("onnx_sha256")]).encode())
    cache = paths.drift / f"audit-thresholds-v{version}-{key.hexdigest()[:12]}.json"
    if cache.is_file():
        return np.asarray(json.loads(cache.read_text())["thresholds"], dtype=np.float64)
    files = [paths.resolve(x) for x in manifest["path"]]
    feats = extract(files, session, card, DecodeRules.from_params(p.validation))
    if feats.rejected or feats.probabilities is None:
        raise DataError(f"{len(feats.rejected or files)} test image(s) could not be read: re-run `visionflow validate`")
    index = {c: i for i, c in enumerate(card["classes"])}
    thresholds = class_thresholds(np.array([index[c] for c in manifest["label"]]), feats.probabilities)
    from visionflow.report import write_json_atomic

    write_json_atomic(cache, {"classes": card["classes"], "thresholds": thresholds.tolist(), "n_images": len(files)})
    return thresholds


def find_suspects(
    p: Params, root: Path, batch_name: str, images: list[Path], labels: list[str], champion
) -> tuple[list[dict[str, Any]], int, int]:
    """The batch's undecided suspects (SUSPECT_COLUMNS rows, ranked), how many images were audited, and how many
    suspects a person already decided on (a row in the label overrides file)."""
    from visionflow.monitoring.drift_features import extract

    version, session, card = champion
    classes = list(card["classes"])
    pairs = [(f, lab) for f, lab in zip(images, labels) if lab in classes]  # a class the champion lacks: unjudged
    if not pairs:
        return [], 0, 0
    thresholds = test_split_thresholds(p, root, version, session, card)
    feats = extract([f for f, _ in pairs], session, card, DecodeRules.from_params(p.validation))
    unreadable = {r["file"] for r in feats.rejected or []}
    pairs = [(f, lab) for f, lab in pairs if str(f) not in unreadable]
    if not pairs:
        return [], 0, 0
    given = np.array([classes.index(lab) for _, lab in pairs])
    confident, suggested = confident_class(feats.probabilities, thresholds)
    flagged = np.flatnonzero(confident & (suggested != given))
    decided = read_overrides(ProjectPaths.of(p, root).label_overrides)
    paths = ProjectPaths.of(p, root)
    rows, n_decided = [], 0
    for i in flagged:
        f, lab = pairs[i]
        sha = sha256_file(f)
        if sha in decided:
            n_decided += 1
            continue
        rows.append(
            {
                "path": paths.relative(Path(f).resolve()),
                "sha256": sha,
                "label": lab,
                "suggested": classes[suggested[i]],
                "score": round(float(feats.probabilities[i, given[i]]), 6),
                "method": METHOD,
                "scope": f"reviewed-{batch_name}",
            }
        )
    rows.sort(key=lambda r: r["score"])
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank
    return rows, len(pairs), n_decided


def audit_batch(
    p: Params,
    root: Path,
    batch_dir: Path,
    images: list[Path],
    labels: list[str],
    champion,
    predicted_accuracy: float | None = None,
) -> dict[str, Any]:
    """Audit a reviewed batch's labelled images against champion ((version, session, card), or None): the figures,
    whether it is held back, and the held record written or removed accordingly. Without a champion the audit is
    skipped (with a note) and the batch is not held.

    predicted_accuracy: the champion's accuracy the drift attribution predicts on this (drifted) batch. Where the
    champion is expected to be wrong on a share 1 - a of the images, its confident disagreement with a label is
    expected that often even when every label is right, so the limit grows by that share; otherwise a drifted
    batch, the one a drift-triggered retraining needs most, would be held back for the champion's own mistakes
    (measured: 24 of 200 correct labels flagged on the noise-5 loop batch, 45 of 200 with a weaker champion)."""
    paths = ProjectPaths.of(p, root)
    name = Path(batch_dir).name
    limit = p.review.max_suspect_share
    if predicted_accuracy is not None:
        limit = min(1.0, limit + max(0.0, 1.0 - predicted_accuracy))
    out: dict[str, Any] = {"batch": name, "n_images": len(images), "threshold": round(limit, 4)}
    if not images:
        return {**out, "status": "empty", "held": False, "note": "no labelled images in the batch: nothing to audit"}
    if champion is None:
        note = "no champion yet: the labels are taken in unaudited"
        return {**out, "status": "skipped", "held": False, "note": note}
    rows, n_audited, n_decided = find_suspects(p, root, name, images, labels, champion)
    suspects_file = paths.label_audit / f"suspects-reviewed-{name}.csv"
    write_suspects(suspects_file, rows)
    share = len(rows) / n_audited if n_audited else 0.0
    out.update(
        status="ok",
        champion_version=champion[0],
        n_audited=n_audited,
        suspects=len(rows),
        decided=n_decided,
        suspect_share=round(share, 4),
        suspects_file=paths.relative(suspects_file),
        held=share > limit,
    )
    held = paths.held_batches / f"{name}.json"
    if out["held"]:
        out["reason"] = (
            f"{len(rows)} of {n_audited} labels ({share:.1%}) look wrong to champion v{champion[0]}, more than "
            f"the limit {limit:.0%} (review.max_suspect_share {p.review.max_suspect_share:.0%}"
            + (
                f", plus the champion's predicted error {1 - predicted_accuracy:.0%} on this drifted batch"
                if predicted_accuracy is not None
                else ""
            )
            + f"): re-review them ({out['suspects_file']})"
        )
        from visionflow.report import write_json_atomic

        write_json_atomic(held, {**out, "path": str(batch_dir), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ")})
    elif held.is_file():
        held.unlink()
        out["released"] = True  # held before, re-reviewed since
    return out


def take_in_audited(
    p: Params,
    root: Path,
    batch_dir: Path,
    classes: list[str] | None,
    only: set[str] | None = None,
    predicted_accuracy: float | None = None,
) -> dict[str, Any]:
    """Audit a reviewed batch (with `only`, the images a person was asked to label), then take it into
    serve.reviewed_dir unless it is held back: {"images": per-class counts taken in, "audit": the audit's figures}.
    Labels naming an unknown class stop it before anything is written (DataError); the batch is never changed."""
    from visionflow.monitoring.ledger import batch_labels, take_in_reviewed_batch

    champion = _champion(p, root)
    known = classes or p.data.labels or (list(champion[2]["classes"]) if champion else None)
    images, labels = batch_labels(batch_dir, known, only)
    audit = audit_batch(p, root, batch_dir, images, labels, champion, predicted_accuracy)
    if audit["held"]:
        return {"images": {}, "audit": audit}
    return {"images": take_in_reviewed_batch(batch_dir, ProjectPaths.of(p, root).reviewed, known, only), "audit": audit}


def _champion(p: Params, root: Path):
    """(version, ONNX Runtime session, model card) of the champion, None when there is none yet."""
    from visionflow.monitoring.drift import load_champion
    from visionflow.registry.store import CHAMPION, alias_version

    return load_champion(p, root) if alias_version(p.model_name, CHAMPION) is not None else None
