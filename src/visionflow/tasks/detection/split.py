"""Split for detection: train/val/test CSVs stratified on which classes appear, checked for leakage by sha256.

An image's stratum is its rarest class (the class in it that the fewest images hold), so every class reaches every
split as far as the data allows; images without boxes are a stratum of their own. The assignment, the grouping of
identical images (same sha256) into one split, the pinning of earlier images to their earlier split and the
leakage check are classification's own (visionflow.data.split), run on the stratum in place of the label.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from visionflow.config import Params
from visionflow.data.split import SPLITS, SplitResult, assign_splits, leakage_check, previous_assignment
from visionflow.errors import DataError
from visionflow.paths import ProjectPaths
from visionflow.tasks.detection.validate import MANIFEST_COLUMNS, read_detection_manifest

NEGATIVES = "(no boxes)"  # the negatives' stratum and per_class key: no class name can start with "("


def strata(classes) -> list[str]:
    """Each image's stratum from its '|'-joined classes: its rarest class (ties: the first name), or NEGATIVES."""
    sets = [[c for c in s.split("|") if c] for s in classes]
    images_with = Counter(c for cs in sets for c in cs)
    return [min(cs, key=lambda c: (images_with[c], c)) if cs else NEGATIVES for cs in sets]


def split(p: Params, root: Path, *, keep_previous: bool = True) -> SplitResult:
    """Write data/splits/{train,val,test}.csv (the manifest's columns). keep_previous: images already split stay in
    their split (see visionflow.data.split.assign_splits)."""
    paths = ProjectPaths.of(p, root)
    if not paths.manifest.is_file():
        raise DataError(f"{paths.manifest} not found: run `visionflow validate` first")
    manifest = read_detection_manifest(paths.manifest)
    if manifest.empty:
        raise DataError(f"{paths.manifest} lists no accepted images: see reports/validation/index.html")
    manifest = manifest.sort_values("path").reset_index(drop=True)
    # one stratum per sha256 (the first row's), so identical images can only land together
    manifest["label"] = manifest["sha256"].map(dict(zip(manifest["sha256"], strata(manifest["classes"]))))
    pinned = previous_assignment(paths.splits) if keep_previous else {}
    manifest["split"] = assign_splits(
        manifest,
        val_fraction=p.data.val_fraction,
        test_fraction=p.data.test_fraction,
        seed=p.base.seed,
        pinned=pinned,
    )
    frames = {name: manifest.loc[manifest["split"] == name, MANIFEST_COLUMNS] for name in SPLITS}
    outcome = leakage_check(frames)
    if not outcome.success:
        leaked = sorted(set(sum(outcome.failing.values(), [])))
        raise DataError(f"leakage: {len(leaked)} image(s) appear in more than one split, e.g. {leaked[:3]}")
    paths.splits.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, frame in frames.items():
        out[name] = paths.splits / f"{name}.csv"
        frame.to_csv(out[name], index=False)
    per_class = {name: _images_per_class(f["classes"]) for name, f in frames.items()}
    n_pinned = int(manifest["sha256"].isin(pinned.keys()).sum())
    counts = {n: len(f) for n, f in frames.items()}
    return SplitResult(counts, per_class, {n: str(q) for n, q in out.items()}, True, n_pinned)


def _images_per_class(classes) -> dict[str, int]:
    """Images holding each class, and the negatives under NEGATIVES."""
    counts = Counter(c for s in classes for c in s.split("|") if c)
    counts[NEGATIVES] = sum(1 for s in classes if not s)
    return dict(sorted(counts.items()))
