"""Drift check: does a production batch still look like the data the champion was tested on?

Three views of every image, compared column by column with evidently against a reference (the champion's test
split, images the model never trained on, so its confidence there is what it will be on new data from the same
distribution):

- image properties measured on the image as received: brightness, contrast, sharpness (Laplacian variance),
  width, height, colourfulness;
- the champion's embedding (penultimate layer, an output of the exported ONNX graph), projected on the reference's
  first principal components so each direction is one readable column;
- the champion's predictions: confidence and predicted class.

The verdict is "drifted" when the share of drifted columns reaches drift.drift_share. Methods and thresholds come
from params.yaml. A batch is a folder of images (labels.csv beside them when reviewed) or the serving prediction
log; unreadable images are listed in the verdict and left where they are.
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
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
from visionflow.report import write_json_atomic

# Tests that return a p-value (drift when below the threshold); every other method returns a distance.
P_VALUE_METHODS = {"ks", "chisquare", "z", "t_test", "mannw", "anderson", "cramer_von_mises", "g_test"}
VIEWS = ("properties", "embedding", "prediction")


@dataclass
class Features:
    """Per-image drift features (one row per image) plus the raw embeddings and the true labels if known."""

    frame: pd.DataFrame  # PROPERTY_NAMES + confidence + predicted_class
    embeddings: np.ndarray  # (n, d) float32
    labels: list[str | None] | None = None
    rejected: list[dict[str, str]] | None = None


def load_champion(p: Params, root: Path):
    """(version, ONNX Runtime session, model card) of the registry's champion."""
    from visionflow.onnxrt import ort_session
    from visionflow.registry.store import CHAMPION, alias_version, download_onnx

    version = alias_version(p.registry.model_name, CHAMPION)
    if version is None:
        raise DataError(
            f"{p.registry.model_name} has no champion yet: run the training pipeline "
            "(`make pipeline`) so there is a model to check drift against"
        )
    path, card = download_onnx(
        p.registry.model_name, version, dest=ProjectPaths.of(p, root).drift_models / f"v{version}"
    )
    return version, ort_session(path, accelerated=True), card


def extract(
    files: list[Path], session, card: dict[str, Any], rules: DecodeRules, batch_size: int = 256, progress=None
) -> Features:
    """Decode each file once (guarded), measure its properties, and run the champion on it."""
    from visionflow.data.imageio import decode_with_properties
    from visionflow.onnxrt import ort_outputs, softmax

    size, channels, classes = card["image_size"], card["channels"], card["classes"]
    arrays, props, rejected, kept = [], [], [], []
    for i, f in enumerate(files):
        try:
            arr, pr = decode_with_properties(read_limited(Path(f), rules.max_bytes), size, channels, rules)
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
        )
    logits, embeddings = ort_outputs(session, np.stack(arrays), ("logits", "embedding"), batch_size)
    probs = softmax(logits)
    frame = pd.DataFrame(props)
    frame["confidence"] = probs.max(1)
    frame["predicted_class"] = [classes[k] for k in probs.argmax(1)]
    frame.index = kept
    return Features(frame.reset_index(drop=True), embeddings.astype(np.float32), rejected=rejected)


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


def project_embeddings(ref: np.ndarray, cur: np.ndarray, components: int, seed: int) -> tuple[np.ndarray, ...]:
    """Both embedding sets on the reference's principal directions (scaled to unit variance on the reference)."""
    from sklearn.decomposition import PCA

    k = max(1, min(components, ref.shape[1], len(ref) - 1))
    pca = PCA(n_components=k, random_state=seed).fit(ref)
    r, c = pca.transform(ref), pca.transform(cur)
    scale = r.std(0) + 1e-8
    return r / scale, c / scale, pca.explained_variance_ratio_


def feature_table(feats: Features, pcs: np.ndarray) -> pd.DataFrame:
    table = feats.frame[[*PROPERTY_NAMES, "confidence", "predicted_class"]].copy()
    for j in range(pcs.shape[1]):
        table[f"embedding_pc{j + 1}"] = pcs[:, j]
    return table


def view_of(column: str) -> str:
    if column.startswith("embedding_"):
        return "embedding"
    return "prediction" if column in ("confidence", "predicted_class") else "properties"


def run_evidently(ref: pd.DataFrame, cur: pd.DataFrame, p: Params, html: Path | None) -> dict[str, Any]:
    """Column-wise drift with evidently; returns {column: {score, method, threshold, drifted}}, share, count."""
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    cfg = p.drift
    numeric = [c for c in ref.columns if c != "predicted_class"]
    definition = DataDefinition(numerical_columns=numeric, categorical_columns=["predicted_class"])
    preset = DataDriftPreset(
        num_method=cfg.numeric_method,
        num_threshold=cfg.numeric_threshold,
        cat_method=cfg.categorical_method,
        cat_threshold=cfg.categorical_threshold,
        drift_share=cfg.drift_share,
    )
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        # Constant columns (every image 28 px wide) make evidently's correlation plots divide by zero: harmless.
        warnings.simplefilter("ignore", RuntimeWarning)
        snapshot = Report([preset]).run(
            current_data=Dataset.from_pandas(cur, data_definition=definition),
            reference_data=Dataset.from_pandas(ref, data_definition=definition),
        )
    if html is not None:
        html.parent.mkdir(parents=True, exist_ok=True)
        snapshot.save_html(str(html))
    columns: dict[str, dict[str, Any]] = {}
    count = share = None
    for m in snapshot.dict()["metrics"]:
        conf = m["config"]
        if conf["type"].endswith("DriftedColumnsCount"):
            count, share = int(m["value"]["count"]), float(m["value"]["share"])
        elif conf["type"].endswith("ValueDrift"):
            col = conf["column"]
            method = cfg.categorical_method if col == "predicted_class" else cfg.numeric_method
            threshold = cfg.categorical_threshold if col == "predicted_class" else cfg.numeric_threshold
            score = float(m["value"])
            drifted = score < threshold if method in P_VALUE_METHODS else score >= threshold
            columns[col] = {
                "score": score,
                "method": method,
                "threshold": threshold,
                "drifted": bool(drifted),
                "p_value" if method in P_VALUE_METHODS else "distance": score,
            }
    if count is None:
        raise DataError("evidently returned no drift summary (DriftedColumnsCount); check the evidently version")
    return {"columns": columns, "count": count, "share": share}


def summarise(ref: pd.DataFrame, cur: pd.DataFrame, result: dict[str, Any], p: Params) -> dict[str, Any]:
    features: dict[str, dict[str, Any]] = {}
    for col, r in result["columns"].items():
        entry = {**r, "view": view_of(col)}
        if col == "predicted_class":
            rf = ref[col].value_counts(normalize=True)
            cf = cur[col].value_counts(normalize=True)
            delta = cf.reindex(rf.index.union(cf.index), fill_value=0) - rf.reindex(
                rf.index.union(cf.index), fill_value=0
            )
            entry["largest_class_shift"] = {
                str(k): round(float(v), 4) for k, v in delta.sort_values(key=abs, ascending=False).head(3).items()
            }
        else:
            entry.update(
                reference_mean=round(float(ref[col].mean()), 4),
                current_mean=round(float(cur[col].mean()), 4),
                reference_std=round(float(ref[col].std()), 4),
            )
        features[col] = entry
    moved = sorted(
        (c for c, f in features.items() if f["drifted"]),
        key=lambda c: (
            -abs(features[c]["score"]) if features[c]["method"] not in P_VALUE_METHODS else features[c]["score"]
        ),
    )
    views = {}
    for v in VIEWS:
        cols = [c for c, f in features.items() if f["view"] == v]
        hit = [c for c in cols if features[c]["drifted"]]
        views[v] = {"drift_share": round(len(hit) / max(len(cols), 1), 4), "drifted_features": hit}
    return {
        "drifted": result["share"] >= p.drift.drift_share,
        "drift_share": round(result["share"], 4),
        "n_drifted_features": result["count"],
        "n_features": len(features),
        "threshold": p.drift.drift_share,
        "moved": moved,
        "views": views,
        "features": features,
    }


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
    emb = np.asarray([r["embedding"] for r in rows], dtype=np.float32)
    return Features(frame, emb, rejected=[]), {
        "kind": "prediction_log",
        "path": str(log_path),
        "since": since,
        "skipped_other_versions": other_versions,
        "skipped_malformed_lines": malformed,
    }


def check(
    p: Params,
    root: Path,
    *,
    batch: Path | None = None,
    log_path: Path | None = None,
    since: float | None = None,
    name: str | None = None,
    log_to_mlflow: bool = True,
    html: bool = True,
    champion=None,
) -> dict[str, Any]:
    """Run the drift check on a folder batch or the prediction log; writes reports/drift/<name>/."""
    if (batch is None) == (log_path is None):
        raise DataError("give either a batch folder or the prediction log to check")
    start = time.perf_counter()
    version, session, card = champion or load_champion(p, root)
    ref = reference_features(p, root, version, session, card)
    t_ref = time.perf_counter() - start
    if batch is not None:
        cur, source = batch_features(p, root, Path(batch), session, card)
        name = name or Path(batch).name
    else:
        cur, source = log_features(p, root, Path(log_path), version, since)
        name = name or time.strftime("log-%Y%m%d-%H%M%S")
    t_extract = time.perf_counter() - start - t_ref
    rejected = cur.rejected or []
    n_ok = len(cur.frame)
    out_dir = ProjectPaths.of(p, root).drift_reports / name
    base = {
        "batch": name,
        "source": source,
        "champion_version": version,
        "n_images": n_ok + len(rejected),
        "n_checked": n_ok,
        "n_unreadable": len(rejected),
        "unreadable": rejected[:100],
    }
    if n_ok < p.drift.min_batch_size:
        verdict = {
            **base,
            "drifted": None,
            "status": "insufficient_data",
            "message": f"{n_ok} readable image(s), fewer than drift.min_batch_size={p.drift.min_batch_size}: "
            "no drift verdict"
            + (f"; {len(rejected)} unreadable, listed under 'unreadable' and left in place" if rejected else ""),
        }
        write_json_atomic(out_dir / "verdict.json", verdict)
        return verdict
    ref_pc, cur_pc, explained = project_embeddings(
        ref.embeddings, cur.embeddings, p.drift.embedding_components, p.base.seed
    )
    ref_t, cur_t = feature_table(ref, ref_pc), feature_table(cur, cur_pc)
    t0 = time.perf_counter()
    result = run_evidently(ref_t, cur_t, p, out_dir / "drift.html" if html else None)
    t_evidently = time.perf_counter() - t0
    verdict = {
        **base,
        "status": "ok",
        **summarise(ref_t, cur_t, result, p),
        "accuracy": batch_accuracy(cur),
        "reference": {"split": "test", "n_images": len(ref_t)},
        "embedding_variance_explained": round(float(explained.sum()), 4),
        "seconds": {
            "reference": round(t_ref, 3),
            "extract": round(t_extract, 3),
            "evidently": round(t_evidently, 3),
            "total": round(time.perf_counter() - start, 3),
        },
        "report_html": str((out_dir / "drift.html").relative_to(root)) if html else None,
    }
    write_json_atomic(out_dir / "verdict.json", verdict)
    if log_to_mlflow:
        verdict["mlflow_run_id"] = _log(p, root, verdict, out_dir)
        write_json_atomic(out_dir / "verdict.json", verdict)
    return verdict


def _log(p: Params, root: Path, verdict: dict[str, Any], out_dir: Path) -> str:
    import mlflow

    from visionflow.registry.tracking import ensure_experiment

    exp = ensure_experiment(f"{p.base.project}-drift", root, p.registry.artifact_location)
    with mlflow.start_run(experiment_id=exp, run_name=f"drift-{verdict['batch']}") as run:
        mlflow.set_tags(
            {
                "visionflow.drifted": str(verdict["drifted"]).lower(),
                "visionflow.champion_version": verdict["champion_version"],
                "visionflow.batch": verdict["batch"],
                "visionflow.moved": ",".join(verdict["moved"])[:5000],
            }
        )
        mlflow.log_params(
            {
                "numeric_method": p.drift.numeric_method,
                "numeric_threshold": p.drift.numeric_threshold,
                "categorical_method": p.drift.categorical_method,
                "categorical_threshold": p.drift.categorical_threshold,
                "drift_share_threshold": p.drift.drift_share,
                "n_images": verdict["n_images"],
            }
        )
        metrics = {
            "drift_share": verdict["drift_share"],
            "n_drifted_features": verdict["n_drifted_features"],
            "n_unreadable": verdict["n_unreadable"],
            **{f"score/{k}": v["score"] for k, v in verdict["features"].items()},
        }
        if verdict.get("accuracy") is not None:
            metrics["batch_accuracy"] = verdict["accuracy"]
        mlflow.log_metrics(metrics)
        # The verdict only: evidently's HTML (~4.5 MB, mostly its scripts) would add ~110 MB a day to the artifact
        # store at the hourly schedule; it stays in the local report, named by the tag.
        mlflow.set_tag("visionflow.report_html", verdict["report_html"] or "not written")
        mlflow.log_artifact(str(out_dir / "verdict.json"), artifact_path="drift")
        return run.info.run_id
