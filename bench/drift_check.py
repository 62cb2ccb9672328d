"""drift: seconds of visionflow.monitoring.drift_compare's evidently comparison vs scipy's two-sample KS test on
the same columns.

Feature tables shaped like visionflow's (drift_compare.feature_table: 6 image properties, confidence,
predicted_class and 8 embedding principal components), synthetic: a 10k-row reference and 1k / 10k-row current
batches with a mild shift. A: visionflow.monitoring.drift_compare.run_evidently (params.yaml's methods and
thresholds, no HTML), which is the check minus embedding extraction; B: scipy.stats.ks_2samp over the same columns
(predicted_class as class codes). Also the scaling 10k / 1k of A. Goal: A <= 15 s for 10k current rows.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pandas as pd

from bench.common import Context, Measurement, compare, goal, single
from bench.sample_data import synthetic_classes

NAME = "drift"


def feature_table(n: int, seed: int, shift: float = 0.0) -> pd.DataFrame:
    """A table with drift_compare.feature_table's columns, built through it (Features + embedding PCs)."""
    from visionflow.monitoring.drift_compare import feature_table as vf_feature_table
    from visionflow.monitoring.drift_features import Features

    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(
        {
            "brightness": rng.normal(73 + 5 * shift, 20, n),
            "contrast": rng.normal(85, 12, n),
            "blur": rng.lognormal(9.0 + 0.2 * shift, 0.5, n),
            "width": np.full(n, 28.0),  # constant columns, as on Fashion-MNIST
            "height": np.full(n, 28.0),
            "colorfulness": np.zeros(n),
            "confidence": rng.beta(8 - 2 * shift, 2, n),
            "predicted_class": rng.choice(synthetic_classes(), n),
        }
    )
    pcs = rng.normal(0.2 * shift, 1, (n, 8))
    return vf_feature_table(Features(frame, np.zeros((n, 0), np.float32)), pcs)


def ks_all(ref: pd.DataFrame, cur: pd.DataFrame) -> dict[str, float]:
    from scipy.stats import ks_2samp

    out = {}
    for col in ref.columns:
        if col == "predicted_class":
            cats = pd.Categorical(pd.concat([ref[col], cur[col]])).categories
            a = pd.Categorical(ref[col], categories=cats).codes
            b = pd.Categorical(cur[col], categories=cats).codes
        else:
            a, b = ref[col].to_numpy(), cur[col].to_numpy()
        out[col] = float(ks_2samp(a, b).pvalue)
    return out


def _size_row(ctx: Context, p, ref: pd.DataFrame, n: int) -> dict[str, Any]:
    """evidently against KS for n current rows with a mild shift, against the reference."""
    from visionflow.monitoring.drift import run_evidently

    cur = feature_table(n, seed=n, shift=1.0)
    drifted: dict[str, Any] = {}

    def evidently_run() -> Measurement:
        t = time.perf_counter()
        res = run_evidently(ref, cur, p, None)
        dt = time.perf_counter() - t
        drifted["evidently"] = res["count"]
        return Measurement(dt)

    def ks_run() -> Measurement:
        t = time.perf_counter()
        pv = ks_all(ref, cur)
        dt = time.perf_counter() - t
        drifted["ks"] = sum(v < 0.05 for v in pv.values())
        return Measurement(dt)

    label = f"{n // 1000}k" if n >= 1000 else str(n)
    row = compare(
        ctx,
        f"{label} current vs {len(ref) // 1000}k reference",
        evidently_run,
        ks_run,
        unit="s",
        a_label="visionflow run_evidently",
        b_label="scipy ks_2samp",
        higher_is_better=False,
        the_goal=goal("<= 15 s", "<=", 15.0, on="a") if n == 10_000 else None,
    )
    row["notes"].append(
        f"{len(ref.columns)} columns; drifted columns in the last run: evidently "
        f"{drifted.get('evidently')} ({p.drift.numeric_method}/{p.drift.categorical_method}), "
        f"KS p < 0.05: {drifted.get('ks')}"
    )
    return row


def _scaling_row(sizes: tuple[int, int], medians: dict[int, tuple[float, float]]) -> dict[str, Any]:
    """How evidently's seconds (and KS's, as an extra) grow from the small current batch to the big one."""
    small, big = sizes
    return single(
        f"scaling {big // 1000}k / {small // 1000 if small >= 1000 else small}{'k' if small >= 1000 else ''} rows",
        medians[big][0] / medians[small][0],
        unit="x",
        label="evidently seconds ratio",
        extra={"ks_scaling": medians[big][1] / medians[small][1]},
        notes=[f"ks_2samp scales {medians[big][1] / medians[small][1]:.2f}x over the same sizes"],
    )


def run(ctx: Context) -> dict[str, Any]:
    from visionflow.monitoring.drift_compare import run_evidently

    p = ctx.params()
    n_ref = 2_000 if ctx.quick else 10_000
    sizes = (200, 2_000) if ctx.quick else (1_000, 10_000)
    ref = feature_table(n_ref, seed=0)
    run_evidently(ref.iloc[:500], feature_table(200, seed=9), p, None)  # imports and first-call costs
    rows = []
    medians = {}
    for n in sizes:
        row = _size_row(ctx, p, ref, n)
        rows.append(row)
        medians[n] = (row["a"]["median"], row["b"]["median"])
    rows.append(_scaling_row(sizes, medians))
    quick_note = (
        f"quick mode: {n_ref}-row reference and {sizes} current rows instead of 10k "
        "and (1k, 10k); the goal (<= 15 s at 10k rows) is judged in full mode only"
    )
    return {
        "rows": rows,
        "notes": [quick_note] if ctx.quick else [],
        "config": {
            "reference_rows": n_ref,
            "current_rows": list(sizes),
            "columns": list(ref.columns),
            "numeric_method": p.drift.numeric_method,
            "categorical_method": p.drift.categorical_method,
        },
    }
