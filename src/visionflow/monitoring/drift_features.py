"""Drift features: the per-image columns a drift check compares, for the reference and for a batch.

Every image is decoded once (guarded) and measured as received (brightness, contrast, sharpness, width, height,
colourfulness), then run through the champion's ONNX graph for its embedding (penultimate layer) and prediction.
The reference is the champion's test split, cached per champion version; a batch is a folder of images
(labels.csv beside them when reviewed) or the serving prediction log, whose records already carry these columns.
Unreadable images are listed, never a crash.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from visionflow.config import Params
from visionflow.data.imageio import PROPERTY_NAMES, DecodeRules, RejectedImage, read_limited
from visionflow.data.validate import failure_detail
from visionflow.errors import DataError
from visionflow.paths import ProjectPaths
from visionflow.serving.predictions import decode_embedding


@dataclass
class Features:
    """Per-image drift features (one row per image) plus the raw embeddings and the true labels if known."""

    frame: pd.DataFrame  # PROPERTY_NAMES + confidence + predicted_class
    embeddings: np.ndarray  # (n, d) float32
    labels: list[str | None] | None = None
    rejected: list[dict[str, str]] | None = None
    # (n, classes): extract's, for the label audit and budgeted selection; not cached with the reference
    probabilities: np.ndarray | None = None


def extract(
    files: list, session, card: dict[str, Any], rules: DecodeRules, batch_size: int = 256, progress=None, read=None
) -> Features:
    """Decode each file once (guarded), measure its properties, and run the champion on it.

    read: item -> bytes, for items that are not stored files (the attribution suite's shifted images, in memory)."""
    from visionflow.data.imageio import decode_with_properties
    from visionflow.onnxrt import ort_outputs, softmax

    size, channels, classes = card["image_size"], card["channels"], card["classes"]
    arrays, props, rejected, kept = [], [], [], []
    for i, f in enumerate(files):
        try:
            data = read(f) if read else read_limited(Path(f), rules.max_bytes)
            arr, pr = decode_with_properties(data, size, channels, rules)
        except RejectedImage as exc:
            rejected.append({"file": str(f), "reason": exc.reason, "detail": exc.detail})
            continue
        except OSError as exc:
            rejected.append({"file": str(f), "reason": "unreadable_file", "detail": str(exc)})
            continue
        except Exception as exc:  # noqa: BLE001 - one image Pillow cannot handle (e.g. broken EXIF) is listed, never a crash
            rejected.append({"file": str(f), "reason": "decode_failed", "detail": failure_detail(exc)})
            continue
        arrays.append(arr)
        props.append(pr)
        kept.append(i)
        if progress and (i + 1) % 500 == 0:
            progress(i + 1, len(files))
    if not arrays:
        return Features(
            pd.DataFrame(columns=[*PROPERTY_NAMES, "confidence", "predicted_class"]),
            np.zeros((0, 0), np.float32),
            rejected=rejected,
            probabilities=np.zeros((0, len(classes)), np.float32),
        )
    logits, embeddings = ort_outputs(session, np.stack(arrays), ("logits", "embedding"), batch_size)
    probs = softmax(logits)
    frame = pd.DataFrame(props)
    frame["confidence"] = probs.max(1)
    frame["predicted_class"] = [classes[k] for k in probs.argmax(1)]
    frame.index = kept
    return Features(frame.reset_index(drop=True), embeddings.astype(np.float32), rejected=rejected, probabilities=probs)


def reference_features(p: Params, root: Path, version: str, session, card) -> Features:
    """The champion's test split as the reference, cached per (champion version, test manifest, size cap)."""
    from visionflow.data.validate import read_manifest

    paths = ProjectPaths.of(p, root)
    test = paths.splits / "test.csv"
    if not test.is_file():
        raise DataError(f"{test} not found: the reference is the test split; run the training pipeline first")
    manifest = read_manifest(test).sort_values("path").reset_index(drop=True)
    if len(manifest) > p.drift.reference_size:
        pick = np.sort(np.random.default_rng(p.base.seed).choice(len(manifest), p.drift.reference_size, replace=False))
        manifest = manifest.iloc[pick].reset_index(drop=True)
    key = hashlib.sha256(json.dumps([version, list(manifest["sha256"]), card.get("onnx_sha256")]).encode())
    cache = paths.drift / f"reference-v{version}-{key.hexdigest()[:12]}.npz"
    if cache.is_file():
        with np.load(cache, allow_pickle=False) as z:
            frame = pd.DataFrame({c: z[c] for c in [*PROPERTY_NAMES, "confidence"]})
            frame["predicted_class"] = z["predicted_class"].astype(str)
            return Features(frame, z["embeddings"], labels=list(z["labels"].astype(str)))
    feats = extract([paths.resolve(x) for x in manifest["path"]], session, card, DecodeRules.from_params(p.validation))
    if feats.rejected:
        raise DataError(
            f"{len(feats.rejected)} reference image(s) could not be read, e.g. {feats.rejected[0]}: "
            "re-run `visionflow validate`"
        )
    feats.labels = list(manifest["label"])
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(cache.stem + ".partial.npz")
    np.savez(
        tmp,
        embeddings=feats.embeddings,
        labels=np.array(feats.labels),
        predicted_class=feats.frame["predicted_class"].to_numpy(dtype=str),
        **{c: feats.frame[c].to_numpy(dtype=np.float64) for c in [*PROPERTY_NAMES, "confidence"]},
    )
    tmp.replace(cache)
    return feats


def batch_accuracy(feats: Features) -> float | None:
    if not feats.labels:
        return None
    pairs = [(pred, lab) for pred, lab in zip(feats.frame["predicted_class"], feats.labels) if lab is not None]
    return round(float(np.mean([a == b for a, b in pairs])), 4) if pairs else None


def batch_features(p: Params, root: Path, folder: Path, session, card) -> tuple[Features, dict[str, Any]]:
    from visionflow.monitoring.simulate import load_batch

    batch = load_batch(folder)
    if not batch.images:
        raise DataError(
            f"batch {folder} holds no files: nothing to check (expected images, in {folder}/images/ "
            "with labels.csv beside them, or one sub-folder per class)"
        )
    feats = extract(batch.images, session, card, DecodeRules.from_params(p.validation))
    if batch.labels is not None:
        readable = {str(f) for f in batch.images} - {r["file"] for r in feats.rejected or []}
        feats.labels = [lab for f, lab in zip(batch.images, batch.labels) if str(f) in readable]
    return feats, {"kind": "folder", "path": str(folder), "meta": batch.meta}


def log_features(
    p: Params, root: Path, log_path: Path, version: str, since: float | None
) -> tuple[Features, dict[str, Any]]:
    """Records of the serving prediction log newer than `since` (epoch seconds) made by the champion version."""
    if not log_path.is_file():
        raise DataError(
            f"prediction log {log_path} not found: serve the model (`visionflow serve`) first, or "
            "check a folder batch instead"
        )
    rows, other_versions, malformed = [], 0, 0
    with log_path.open() as fh:
        for line in fh:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                malformed += 1  # a line cut short by a crash: skipped, the file is left as it is
                continue
            if since is not None and rec.get("time", 0) < since:
                continue
            if str(rec.get("model_version")) != str(version):
                other_versions += 1
                continue
            try:
                if "embedding" in rec:  # (a log of an older server has none: said below)
                    rec["embedding"] = decode_embedding(rec["embedding"])
            except (TypeError, ValueError):  # (binascii.Error is a ValueError)
                malformed += 1  # hand-edited or foreign: skipped like a torn line
                continue
            rows.append(rec)
    if not rows:
        raise DataError(
            f"no predictions by champion v{version} in {log_path}"
            + (f" since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(since))}" if since else "")
            + (f" ({other_versions} by other versions)" if other_versions else "")
        )
    missing = [k for k in (*PROPERTY_NAMES, "embedding", "confidence", "label") if k not in rows[0]]
    if missing:
        raise DataError(
            f"prediction log records lack {missing}: it was written by an older server; check a folder batch instead"
        )
    frame = pd.DataFrame({k: [r[k] for r in rows] for k in (*PROPERTY_NAMES, "confidence")})
    frame["predicted_class"] = [r["label"] for r in rows]
    if len({r["embedding"].shape for r in rows}) > 1:
        raise DataError(f"prediction log {log_path}: v{version}'s records hold embeddings of different sizes")
    emb = np.stack([r["embedding"] for r in rows])
    return Features(frame, emb, rejected=[]), {
        "kind": "prediction_log",
        "path": str(log_path),
        "since": since,
        "skipped_other_versions": other_versions,
        "skipped_malformed_lines": malformed,
    }
