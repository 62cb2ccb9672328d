"""Drift comparison: reference and batch in one table layout, compared column by column with evidently.

The embedding is projected on the reference's first principal components so each direction is one readable column.
Methods and thresholds come from params.yaml (drift.*); the summary groups the columns into three views (image
properties, embedding, prediction) and names the ones that moved most.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from visionflow.config import Params
from visionflow.data.imageio import PROPERTY_NAMES
from visionflow.errors import DataError
from visionflow.monitoring.drift_features import Features

# Tests that return a p-value (drift when below the threshold); every other method returns a distance.
P_VALUE_METHODS = {"ks", "chisquare", "z", "t_test", "mannw", "anderson", "cramer_von_mises", "g_test"}
VIEWS = ("properties", "embedding", "prediction")


def project_embeddings(ref: np.ndarray, cur: np.ndarray, components: int, seed: int) -> tuple[np.ndarray, ...]:
    """Both embedding sets on the reference's principal directions (scaled to unit variance on the reference)."""
    from sklearn.decomposition import PCA

    k = max(1, min(components, ref.shape[1], len(ref) - 1))
    pca = PCA(n_components=k, random_state=seed).fit(ref)
    r, c = pca.transform(ref), pca.transform(cur)
    scale = r.std(0) + 1e-8
    return r / scale, c / scale, pca.explained_variance_ratio_


def feature_table(feats: Features, pcs: np.ndarray) -> pd.DataFrame:
    """The compared columns: the frame's own (image properties and the task's prediction columns) and the PCs."""
    table = feats.frame.copy()
    for j in range(pcs.shape[1]):
        table[f"embedding_pc{j + 1}"] = pcs[:, j]
    return table


def view_of(column: str) -> str:
    """Image properties and embedding directions are named; any other column is the task's prediction view
    (classification's confidence and class, detection's box counts, scores, sizes and places)."""
    if column.startswith("embedding_"):
        return "embedding"
    return "properties" if column in PROPERTY_NAMES else "prediction"


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
