"""Drift check for detection: does a batch of images still look like the champion detector's test split?

The same three views as classification's check (visionflow.monitoring.drift), compared with the same evidently
column tests and the same verdict, so the monitoring flow treats both tasks alike:

- image properties as received (brightness, contrast, sharpness, width, height, colourfulness);
- the backbone embedding (the ONNX graph's pooled features), on the reference's principal directions;
- the detector's answer per image: boxes at or above detection.score_threshold, mean and max score of every box the
  graph returns (all at or above its SCORE_FLOOR), the answered boxes' mean size (share of the image's area) and
  mean centre (shares of width and height), and the top box's class ("none" when nothing is answered).

An image with no answered box takes its top box's size and centre (the detector's best guess), and an image with
no box at all takes size 0 and the image centre, so every column is defined for every image.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from visionflow.config import Params
from visionflow.data.imageio import PROPERTY_NAMES, DecodeRules, RejectedImage, read_limited
from visionflow.data.validate import failure_detail
from visionflow.errors import DataError
from visionflow.monitoring.drift_features import Features
from visionflow.paths import ProjectPaths
from visionflow.report import write_json_atomic

OUTPUT_COLUMNS = ("n_boxes", "mean_score", "max_score", "box_area", "box_cx", "box_cy")
NO_BOX = "none"
# What a batch folder holds besides its images (the simulator's files, a review selection).
BATCH_FILES = frozenset({"annotations.json", "batch.json", "selection.csv", "labels.csv"})


def answer_features(
    boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, width: int, height: int, classes, threshold: float
) -> dict[str, Any]:
    """The prediction columns of one image from the graph's outputs (boxes x1, y1, x2, y2 sorted by score)."""
    answered = scores >= threshold
    n = int(answered.sum())
    chosen = boxes[answered] if n else boxes[:1]
    if len(chosen):
        w, h = chosen[:, 2] - chosen[:, 0], chosen[:, 3] - chosen[:, 1]
        area = float(np.mean(w * h)) / (width * height)
        cx = float(np.mean(chosen[:, 0] + w / 2)) / width
        cy = float(np.mean(chosen[:, 1] + h / 2)) / height
    else:
        area, cx, cy = 0.0, 0.5, 0.5
    return {
        "n_boxes": float(n),
        "mean_score": float(scores.mean()) if len(scores) else 0.0,
        "max_score": float(scores.max()) if len(scores) else 0.0,
        "box_area": area,
        "box_cx": cx,
        "box_cy": cy,
        "predicted_class": classes[int(labels[0]) - 1] if n else NO_BOX,
    }


def _decode(path: Path, rules: DecodeRules) -> tuple[dict[str, float], np.ndarray]:
    """An image's properties as received and its RGB pixels at full size (the graph resizes inside)."""
    from visionflow.data.imageio import open_guarded, to_array, visual_properties

    img = open_guarded(read_limited(path, rules.max_bytes), rules)
    return visual_properties(img), to_array(img, channels=3)


def extract(files: list[Path], session, card: dict[str, Any], threshold: float, rules: DecodeRules) -> Features:
    """Each file decoded once (guarded) and run through the detector; unreadable files are listed, never a crash."""
    rows, embeddings, rejected = [], [], []
    for f in files:
        try:
            row, pixels = _decode(f, rules)
        except RejectedImage as exc:
            rejected.append({"file": str(f), "reason": exc.reason, "detail": exc.detail})
            continue
        except OSError as exc:
            rejected.append({"file": str(f), "reason": "unreadable_file", "detail": str(exc)})
            continue
        except Exception as exc:  # noqa: BLE001 - one image Pillow cannot handle is listed, never a crash
            rejected.append({"file": str(f), "reason": "decode_failed", "detail": failure_detail(exc)})
            continue
        boxes, scores, labels, embedding = session.run(
            ["boxes", "scores", "labels", "embedding"], {"image": np.ascontiguousarray(pixels.transpose(2, 0, 1)[None])}
        )
        height, width = pixels.shape[:2]
        row.update(answer_features(boxes, scores, labels, width, height, card["classes"], threshold))
        rows.append(row)
        embeddings.append(embedding[0])
    frame = pd.DataFrame(rows, columns=[*PROPERTY_NAMES, *OUTPUT_COLUMNS, "predicted_class"])
    emb = np.stack(embeddings).astype(np.float32) if embeddings else np.zeros((0, 0), np.float32)
    return Features(frame, emb, rejected=rejected)


def reference_features(p: Params, root: Path, session, card: dict[str, Any], model_sha256: str) -> Features:
    """The champion's test split (data/splits/test.csv) as the reference, cached per (model, test images,
    threshold, size cap) under data/drift/."""
    paths = ProjectPaths.of(p, root)
    test = paths.splits / "test.csv"
    if not test.is_file():
        raise DataError(f"{test} not found: the reference is the test split; run the detection pipeline first")
    manifest = pd.read_csv(test, dtype=str, keep_default_na=False)
    if not {"path", "sha256"} <= set(manifest.columns) or manifest.empty:
        raise DataError(f"{test} must list the test images (columns path, sha256): run the detection pipeline first")
    manifest = manifest.sort_values("path").reset_index(drop=True)
    if len(manifest) > p.drift.reference_size:
        pick = np.sort(np.random.default_rng(p.base.seed).choice(len(manifest), p.drift.reference_size, replace=False))
        manifest = manifest.iloc[pick].reset_index(drop=True)
    threshold = p.detection.score_threshold
    key = json.dumps([model_sha256, card.get("classes"), threshold, list(manifest["sha256"])])
    cache = paths.drift / f"detection-reference-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"
    if cache.is_file():
        with np.load(cache, allow_pickle=False) as z:
            frame = pd.DataFrame({c: z[c] for c in [*PROPERTY_NAMES, *OUTPUT_COLUMNS]})
            frame["predicted_class"] = z["predicted_class"].astype(str)
            return Features(frame, z["embeddings"])
    rules = DecodeRules.from_params(p.validation)
    feats = extract([paths.resolve(x) for x in manifest["path"]], session, card, threshold, rules)
    if feats.rejected:
        raise DataError(
            f"{len(feats.rejected)} reference image(s) could not be read, e.g. {feats.rejected[0]}: "
            "re-run `visionflow validate`"
        )
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(cache.stem + ".partial.npz")
    np.savez(
        tmp,
        embeddings=feats.embeddings,
        predicted_class=feats.frame["predicted_class"].to_numpy(dtype=str),
        **{c: feats.frame[c].to_numpy(dtype=np.float64) for c in [*PROPERTY_NAMES, *OUTPUT_COLUMNS]},
    )
    tmp.replace(cache)
    return feats


def batch_images(batch_dir: Path) -> list[Path]:
    """The images of a batch folder (in images/ when it has one): every file but the batch's own records."""
    batch_dir = Path(batch_dir)
    if not batch_dir.is_dir():
        raise DataError(f"batch folder {batch_dir} does not exist or is not a folder")
    folder = batch_dir / "images" if (batch_dir / "images").is_dir() else batch_dir
    files = sorted(
        f for f in folder.iterdir() if f.is_file() and not f.name.startswith(".") and f.name not in BATCH_FILES
    )
    if not files:
        raise DataError(f"batch {batch_dir} holds no image files: nothing to check")
    return files


def check_batch(
    p: Params,
    root: Path,
    batch_dir: Path,
    onnx_path: Path,
    card: dict[str, Any],
    *,
    name: str | None = None,
    version: str | None = None,
    log_to_mlflow: bool = False,
    html: bool = True,
) -> dict[str, Any]:
    """The drift verdict for a folder batch against the champion detector (onnx_path and its model card): the
    classification verdict's keys (drifted, drift_share, features, moved, views, n_images, ...), written to
    reports/drift/<name>/verdict.json (with evidently's drift.html when html). version: the champion's registry
    version, for the verdict (the card's "version" when not given)."""
    from visionflow.data.imageio import sha256_file
    from visionflow.monitoring import drift
    from visionflow.monitoring.attribution import skipped
    from visionflow.onnxrt import ort_session

    if card.get("task") != "detection":
        raise DataError(f"the model card beside {onnx_path} is not a detection model's (task {card.get('task')!r})")
    if not Path(onnx_path).is_file():
        raise DataError(f"no ONNX file at {onnx_path}: give the champion detector's exported model")
    start = time.perf_counter()
    files = batch_images(Path(batch_dir))
    session = ort_session(Path(onnx_path), device="auto")
    ref = reference_features(p, root, session, card, card.get("onnx_sha256") or sha256_file(Path(onnx_path)))
    t_ref = time.perf_counter() - start
    cur = extract(files, session, card, p.detection.score_threshold, DecodeRules.from_params(p.validation))
    t_extract = time.perf_counter() - start - t_ref
    name = name or Path(batch_dir).name
    out_dir = ProjectPaths.of(p, root).drift_reports / name
    source = {"kind": "folder", "path": str(batch_dir), "meta": _meta(Path(batch_dir))}
    base = drift.batch_facts(name, source, str(version or card.get("version")), cur)
    if base["n_checked"] < p.drift.min_batch_size:
        verdict = {**drift.insufficient_data(base, p), "attribution": skipped("too few readable images")}
        write_json_atomic(out_dir / "verdict.json", verdict)
        return verdict
    html_path = out_dir / "drift.html" if html else None
    comparison, t_evidently = drift.compare(p, ref, cur, html_path)
    verdict = {
        **base,
        "status": "ok",
        **comparison,
        "task": "detection",
        "attribution": skipped("the shift attribution is built for classification only"),
        "seconds": {
            "reference": round(t_ref, 3),
            "extract": round(t_extract, 3),
            "evidently": round(t_evidently, 3),
            "total": round(time.perf_counter() - start, 3),
        },
        "report_html": str(html_path.relative_to(root)) if html_path else None,
    }
    write_json_atomic(out_dir / "verdict.json", verdict)
    if log_to_mlflow:
        verdict["mlflow_run_id"] = drift.log_verdict(p, root, verdict, out_dir)
        write_json_atomic(out_dir / "verdict.json", verdict)
    return verdict


def _meta(batch_dir: Path) -> dict[str, Any]:
    path = batch_dir / "batch.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is not valid JSON ({failure_detail(exc)})") from None
