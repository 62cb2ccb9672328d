"""Split: stratified train/val/test manifests, deterministic from the seed, checked for leakage.

Identical images (same sha256) are grouped before splitting so no image can sit in two splits; the
great-expectations leakage check then proves it on the written manifests.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from visionflow.data.expectations import Check, run_suite
from visionflow.data.validate import read_manifest
from visionflow.errors import DataError

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class SplitResult:
    counts: dict[str, int]
    per_class: dict[str, dict[str, int]]
    paths: dict[str, str]
    leakage_free: bool
    n_pinned: int = 0


def assign_splits(
    manifest: pd.DataFrame,
    *,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    pinned: dict[str, str] | None = None,
) -> pd.Series:
    """Split name per row: stratified by label, grouped by sha256, same answer for the same seed and rows.

    `pinned` (sha256 -> split, from the previous data version) keeps every image where it was: when new images
    arrive (reviewed production data), only they are assigned, so the test split never leaks into training and
    champion and challenger are compared on the images the champion was judged on.
    """
    pinned = pinned or {}
    rng = np.random.default_rng(seed)
    groups = manifest.groupby("sha256", sort=True)["label"].first().reset_index()
    assignment: dict[str, str] = {sha: pinned[sha] for sha in groups["sha256"] if sha in pinned}
    for label in sorted(groups["label"].unique()):
        shas = groups.loc[(groups["label"] == label) & ~groups["sha256"].isin(assignment.keys()), "sha256"].to_numpy()
        shas = shas[rng.permutation(len(shas))]
        n = len(shas)
        n_test = int(round(n * test_fraction))
        n_val = int(round(n * val_fraction))
        if n >= 3 and not pinned:  # every split gets at least one image of every class when there are enough
            n_test, n_val = max(n_test, 1), max(n_val, 1)
        for i, sha in enumerate(shas):
            assignment[sha] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    return manifest["sha256"].map(assignment)


def previous_assignment(out_dir: Path) -> dict[str, str]:
    """sha256 -> split from the split manifests already in out_dir (empty when there are none)."""
    pinned: dict[str, str] = {}
    for name in SPLITS:
        path = Path(out_dir) / f"{name}.csv"
        if path.is_file():
            pinned.update(dict.fromkeys(read_manifest(path)["sha256"], name))
    return pinned


def leakage_check(frames: dict[str, pd.DataFrame]):
    both = pd.concat([f.assign(split=name) for name, f in frames.items()], ignore_index=True)
    per_sha = both.drop_duplicates(["sha256", "split"]).reset_index(drop=True)
    return run_suite(
        "leakage",
        per_sha,
        "sha256",
        lambda E: [Check(E.ExpectColumnValuesToBeUnique(column="sha256"), "sha256_in_two_splits")],
    )


def split(
    *,
    manifest_path: Path,
    out_dir: Path,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    keep_previous: bool = True,
) -> SplitResult:
    manifest_path = Path(manifest_path)
    if not manifest_path.is_file():
        raise DataError(f"{manifest_path} not found: run `visionflow validate` first")
    manifest = read_manifest(manifest_path)
    if manifest.empty:
        raise DataError(f"{manifest_path} lists no accepted images: see reports/validation/index.html")
    manifest = manifest.sort_values("path").reset_index(drop=True)
    pinned = previous_assignment(out_dir) if keep_previous else {}
    manifest["split"] = assign_splits(
        manifest, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed, pinned=pinned
    )
    frames = {name: manifest[manifest["split"] == name].drop(columns="split") for name in SPLITS}
    outcome = leakage_check(frames)
    if not outcome.success:
        leaked = sorted(set(sum(outcome.failing.values(), [])))
        raise DataError(f"leakage: {len(leaked)} image(s) appear in more than one split, e.g. {leaked[:3]}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, frame in frames.items():
        path = out_dir / f"{name}.csv"
        frame.to_csv(path, index=False)
        paths[name] = str(path)
    per_class = {name: {str(k): int(v) for k, v in f.groupby("label").size().items()} for name, f in frames.items()}
    n_pinned = int(manifest["sha256"].isin(pinned.keys()).sum())
    return SplitResult({n: len(f) for n, f in frames.items()}, per_class, paths, True, n_pinned)
