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

The features are made in drift_features, compared in drift_compare; this module turns them into the verdict
(reports/drift/<batch>/verdict.json) and logs it to MLflow.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from visionflow.config import Params
from visionflow.errors import DataError
from visionflow.monitoring.attribution import attribute, load_suite, skipped
from visionflow.monitoring.drift_compare import feature_table, project_embeddings, run_evidently, summarise
from visionflow.monitoring.drift_features import (
    Features,
    batch_accuracy,
    batch_features,
    log_features,
    reference_features,
)
from visionflow.paths import ProjectPaths
from visionflow.report import write_json_atomic


def load_champion(p: Params, root: Path):
    """(version, ONNX Runtime session, model card) of the registry's champion."""
    from visionflow.onnxrt import ort_session
    from visionflow.registry.store import CHAMPION, alias_version, download_onnx

    version = alias_version(p.model_name, CHAMPION)
    if version is None:
        raise DataError(
            f"{p.model_name} has no champion yet: run the training pipeline "
            "(`make pipeline`) so there is a model to check drift against"
        )
    path, card = download_onnx(p.model_name, version, dest=ProjectPaths.of(p, root).drift_models / f"v{version}")
    return version, ort_session(path, device="auto"), card


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
    out_dir = ProjectPaths.of(p, root).drift_reports / name
    base = batch_facts(name, source, version, cur)
    if base["n_checked"] < p.drift.min_batch_size:
        verdict = insufficient_data(base, p)
        verdict["attribution"] = skipped("too few readable images for a drift verdict")
        write_json_atomic(out_dir / "verdict.json", verdict)
        return verdict
    html_path = out_dir / "drift.html" if html else None
    comparison, t_evidently = compare(p, ref, cur, html_path)
    verdict = {
        **base,
        "status": "ok",
        **comparison,
        "seconds": {
            "reference": round(t_ref, 3),
            "extract": round(t_extract, 3),
            "evidently": round(t_evidently, 3),
            "total": round(time.perf_counter() - start, 3),
        },
        "report_html": str(html_path.relative_to(root)) if html_path else None,
    }
    verdict["attribution"] = _attribute(p, root, (version, session, card), ref, cur, verdict)
    verdict["seconds"]["total"] = round(time.perf_counter() - start, 3)
    if html_path is not None and verdict["drifted"]:
        _headline(html_path, verdict["attribution"]["summary"])
    write_json_atomic(out_dir / "verdict.json", verdict)
    if log_to_mlflow:
        verdict["mlflow_run_id"] = log_verdict(p, root, verdict, out_dir)
        write_json_atomic(out_dir / "verdict.json", verdict)
    return verdict


def _attribute(p: Params, root: Path, champion, ref: Features, cur: Features, verdict: dict) -> dict[str, Any]:
    """What a drifted batch looks like (monitoring.attribution); skipped with a reason, never a crash, when the
    batch did not drift or the suite cannot be built."""
    if not verdict["drifted"]:
        return skipped("no drift")
    t0 = time.perf_counter()
    try:
        suite = load_suite(p, root, *champion, ref)
    except (DataError, OSError) as exc:
        return skipped(f"the shift suite could not be built: {exc}")
    out = attribute(p, suite, cur, verdict["n_unreadable"])
    verdict["seconds"]["attribution"] = round(time.perf_counter() - t0, 3)
    return out


def _headline(html: Path, sentence: str) -> None:
    """The attribution's sentence at the top of evidently's report, where a person opening it reads first."""
    import html as html_lib

    text = html.read_text(encoding="utf-8")
    banner = f'<p style="font:16px sans-serif;padding:8px"><b>Drift attribution:</b> {html_lib.escape(sentence)}</p>'
    html.write_text(text.replace("<body>", "<body>" + banner, 1), encoding="utf-8")


def batch_facts(name: str, source: dict[str, Any], version: str, cur: Features) -> dict[str, Any]:
    """What every verdict says about the batch, whether or not it was large enough to judge."""
    rejected = cur.rejected or []
    n_ok = len(cur.frame)
    return {
        "batch": name,
        "source": source,
        "champion_version": version,
        "n_images": n_ok + len(rejected),
        "n_checked": n_ok,
        "n_unreadable": len(rejected),
        "unreadable": rejected[:100],
    }


def insufficient_data(base: dict[str, Any], p: Params) -> dict[str, Any]:
    n_ok, n_unreadable = base["n_checked"], base["n_unreadable"]
    return {
        **base,
        "drifted": None,
        "status": "insufficient_data",
        "message": f"{n_ok} readable image(s), fewer than drift.min_batch_size={p.drift.min_batch_size}: "
        "no drift verdict"
        + (f"; {n_unreadable} unreadable, listed under 'unreadable' and left in place" if n_unreadable else ""),
    }


def compare(p: Params, ref: Features, cur: Features, html: Path | None) -> tuple[dict[str, Any], float]:
    """The verdict's comparison fields, and the seconds evidently took."""
    ref_pc, cur_pc, explained = project_embeddings(
        ref.embeddings, cur.embeddings, p.drift.embedding_components, p.base.seed
    )
    ref_t, cur_t = feature_table(ref, ref_pc), feature_table(cur, cur_pc)
    t0 = time.perf_counter()
    result = run_evidently(ref_t, cur_t, p, html)
    t_evidently = time.perf_counter() - t0
    return {
        **summarise(ref_t, cur_t, result, p),
        "accuracy": batch_accuracy(cur),
        "reference": {"split": "test", "n_images": len(ref_t)},
        "embedding_variance_explained": round(float(explained.sum()), 4),
    }, t_evidently


def log_verdict(p: Params, root: Path, verdict: dict[str, Any], out_dir: Path) -> str:
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
        a = verdict["attribution"]
        mlflow.set_tag("visionflow.attribution", a["summary"][:5000])
        if a["status"] != "skipped":
            mlflow.set_tag("visionflow.attribution_cause", a["cause"] or "no close match")
            metrics.update(
                attribution_distance=a["distance"],
                attribution_confidence=a["confidence"],
                predicted_accuracy=a["predicted_accuracy"],
            )
            if a["severity"] is not None:
                metrics["attribution_severity"] = a["severity"]
        mlflow.log_metrics(metrics)
        # The verdict only: evidently's HTML (~4.5 MB, mostly its scripts) would add ~110 MB a day to the artifact
        # store at the hourly schedule; it stays in the local report, named by the tag.
        mlflow.set_tag("visionflow.report_html", verdict["report_html"] or "not written")
        mlflow.log_artifact(str(out_dir / "verdict.json"), artifact_path="drift")
        return run.info.run_id
