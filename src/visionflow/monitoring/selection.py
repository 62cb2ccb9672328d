"""Budgeted selection: which images a person should label first.

Strategies (params review.strategy):

- "random": a seeded uniform draw, the baseline;
- "uncertainty": the smallest margin between the champion's two most likely classes first (entropy on request);
- "uncertainty-diversity" (default): the POOL_FACTOR * K most uncertain images, images in drifted features
  first, then k-center greedy (Sener & Savarese 2018, "core-set") on the champion's embeddings among them, so that
  K labels cover the uncertain region instead of K near-copies of one confusion (the usual "uncertain pool, then
  core-set" recipe). bench/selection.py measures it against the other two (BENCHMARKS.md, "selection").

Every strategy returns indices into the pool, most useful first; a budget of 0 or an empty pool selects nothing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from visionflow.data.imageio import PROPERTY_NAMES
from visionflow.errors import DataError

STRATEGIES = ("uncertainty-diversity", "uncertainty", "random")
# Candidates k-center greedy chooses among, as a multiple of the budget: 1 is uncertainty alone, large values
# drift towards confident images far from everything (k-center favours outliers). 3 is a common choice; it was
# measured (bench/selection.py), not swept.
POOL_FACTOR = 3
# How much a fully drifted image (every moved property outside the reference's range) is preferred, in margin
# units: a drifted image with margin m ranks like an undrifted one with margin m - DRIFT_BONUS.
DRIFT_BONUS = 0.25
SELECTION_FILE = "selection.csv"


def margins(probs: np.ndarray) -> np.ndarray:
    """Top-1 minus top-2 probability per row: 0 is a coin flip between two classes, 1 is certain."""
    if probs.shape[1] < 2:
        return np.ones(len(probs))
    top = np.partition(probs, -2, axis=1)[:, -2:]
    return top[:, 1] - top[:, 0]


def entropy(probs: np.ndarray) -> np.ndarray:
    p = np.clip(probs, 1e-12, 1)
    return -(p * np.log(p)).sum(1)


def k_center_greedy(embeddings: np.ndarray, k: int, first: int = 0, centers: np.ndarray | None = None) -> list[int]:
    """k indices of `embeddings`, each the point farthest from all chosen so far (and from `centers`, e.g. the
    images already labelled). Starts at `first` when there are no centers. Embeddings are L2-normalised so a few
    images with a large activation norm (noise) do not take every pick."""
    n = len(embeddings)
    k = min(k, n)
    if k <= 0:
        return []
    x = _unit(embeddings)
    if centers is not None and len(centers):
        c = _unit(np.asarray(centers, dtype=np.float32))
        dist = np.min(((x[:, None, :] - c[None, :, :]) ** 2).sum(-1), axis=1)
        chosen: list[int] = []
    else:
        chosen = [int(first)]
        dist = ((x - x[first]) ** 2).sum(1)
        dist[first] = -1
    while len(chosen) < k:
        i = int(np.argmax(dist))
        chosen.append(i)
        dist = np.minimum(dist, ((x - x[i]) ** 2).sum(1))
        dist[chosen] = -1
    return chosen


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-8)


def drift_membership(reference: pd.DataFrame, current: pd.DataFrame, moved: list[str]) -> np.ndarray | None:
    """Per image of `current`, the share of the drift check's moved image properties whose value lies outside the
    reference's 1st-99th percentile range; None when no image property moved."""
    cols = [c for c in moved if c in PROPERTY_NAMES and c in reference and c in current]
    if not cols:
        return None
    lo, hi = reference[cols].quantile(0.01), reference[cols].quantile(0.99)
    outside = (current[cols] < lo) | (current[cols] > hi)
    return outside.mean(axis=1).to_numpy(dtype=np.float64)


def select(
    probs: np.ndarray,
    embeddings: np.ndarray,
    budget: int,
    strategy: str = "uncertainty-diversity",
    *,
    seed: int = 0,
    drift: np.ndarray | None = None,
    measure: str = "margin",
    pool_factor: float = POOL_FACTOR,
    labelled: np.ndarray | None = None,
) -> np.ndarray:
    """Indices of the `budget` images to label, most useful first.

    drift: per-image drifted-feature membership in [0, 1] (drift_membership); labelled: embeddings of images
    already labelled in this window, which k-center treats as centers (nothing near them is asked again).
    """
    if strategy not in STRATEGIES:
        raise DataError(f"unknown selection strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
    if measure not in ("margin", "entropy"):
        raise DataError(f"unknown uncertainty measure {measure!r}: margin or entropy")
    n, k = len(probs), min(max(int(budget), 0), len(probs))
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    if strategy == "random":
        return np.random.default_rng(seed).permutation(n)[:k]
    # lower is more uncertain; the stable sort keeps the pool's order among ties
    key = margins(probs) if measure == "margin" else -entropy(probs) / np.log(max(probs.shape[1], 2))
    if drift is not None and strategy == "uncertainty-diversity":
        key = key - DRIFT_BONUS * np.asarray(drift, dtype=np.float64)
    order = np.argsort(key, kind="stable")
    if strategy == "uncertainty":
        return order[:k]
    pool = order[: max(k, int(round(pool_factor * k)))]
    picked = k_center_greedy(np.asarray(embeddings)[pool], k, first=0, centers=labelled)
    return pool[picked]


@dataclass
class BatchSelection:
    """A batch's ranked selection: the table written to <batch>/selection.csv and what it was made from."""

    table: pd.DataFrame  # file, rank, margin, predicted_class, confidence, drifted
    strategy: str
    budget: int
    pool: int
    unreadable: list[dict[str, str]]

    def summary(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "budget": self.budget,
            "pool": self.pool,
            "chosen": len(self.table),
            "n_unreadable": len(self.unreadable),
            "unreadable": self.unreadable[:100],
        }


def select_batch(
    p, root: Path, folder: Path, *, budget: int | None = None, strategy: str | None = None, champion=None
) -> BatchSelection:
    """Run the champion on a batch folder and rank its images; writes <folder>/selection.csv.

    Images in the features the batch's last drift verdict (reports/drift/<batch>/verdict.json) names as moved
    are preferred. Unreadable images are listed, never chosen, and left in place.
    """
    from visionflow.monitoring.drift import load_champion
    from visionflow.monitoring.drift_features import batch_features
    from visionflow.monitoring.simulate import load_batch

    budget = p.review.budget if budget is None else budget
    strategy = strategy or p.review.strategy
    if budget < 0:
        raise DataError(f"the budget must be 0 or more, not {budget}")
    if not load_batch(Path(folder)).images:  # before the champion is fetched
        raise DataError(f"batch {folder} holds no images: nothing to select from (an empty pool)")
    version, session, card = champion or load_champion(p, root)
    feats, _ = batch_features(p, root, Path(folder), session, card)
    files = _readable_files(Path(folder), feats)
    drift = _drift_of(p, root, Path(folder), feats, (version, session, card))
    chosen = select(feats.probabilities, feats.embeddings, budget, strategy, seed=p.base.seed, drift=drift)
    m = margins(feats.probabilities) if len(feats.frame) else np.zeros(0)
    table = pd.DataFrame(
        {
            "file": [files[i] for i in chosen],
            "rank": np.arange(1, len(chosen) + 1),
            "margin": np.round(m[chosen], 6),
            "predicted_class": feats.frame["predicted_class"].to_numpy()[chosen],
            "confidence": np.round(feats.frame["confidence"].to_numpy(dtype=np.float64)[chosen], 6),
            "drifted": np.round(drift[chosen], 4) if drift is not None else np.nan,
        }
    )
    from visionflow.report import write_text_atomic

    write_text_atomic(Path(folder) / SELECTION_FILE, table.to_csv(index=False))
    return BatchSelection(table, strategy, budget, len(feats.frame), feats.rejected or [])


def _readable_files(folder: Path, feats) -> list[str]:
    """The images the champion saw, in its order, named as selection.csv names them (selected_files)."""
    from visionflow.monitoring.simulate import load_batch

    rejected = {r["file"] for r in feats.rejected or []}
    return [batch_name(folder, f) for f in load_batch(folder).images if str(f) not in rejected]


def batch_name(folder: Path, file: Path) -> str:
    """An image's name in selection.csv: its path under the batch's images folder (images/, or the batch itself
    with one sub-folder per class), with forward slashes."""
    base = folder / "images" if (folder / "images").is_dir() else folder
    return Path(os.path.relpath(Path(file).resolve(), base.resolve())).as_posix()


def selected_files(folder: Path) -> set[str] | None:
    """The names <folder>/selection.csv chose, or None when the batch has no selection (every image counts)."""
    path = Path(folder) / SELECTION_FILE
    if not path.is_file():
        return None
    table = pd.read_csv(path, dtype=str)
    if "file" not in table.columns:
        raise DataError(f"{path} has no 'file' column: remove it, or write it again with `visionflow select`")
    return set(table["file"].dropna())


def _drift_of(p, root: Path, folder: Path, feats, champion) -> np.ndarray | None:
    """Drifted-feature membership from the batch's drift verdict, when one was written by this champion."""
    import json

    from visionflow.monitoring.drift_features import reference_features
    from visionflow.paths import ProjectPaths

    verdict_path = ProjectPaths.of(p, root).drift_reports / folder.name / "verdict.json"
    if not verdict_path.is_file() or not len(feats.frame):
        return None
    verdict = json.loads(verdict_path.read_text())
    if str(verdict.get("champion_version")) != str(champion[0]) or not verdict.get("moved"):
        return None
    ref = reference_features(p, root, champion[0], champion[1], champion[2])
    return drift_membership(ref.frame, feats.frame, verdict["moved"])
