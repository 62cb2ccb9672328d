"""Ingest: bring a dataset into data/raw/<class>/ as received, ready to be versioned.

Three sources go through the same path: the bundled default (Fashion-MNIST from Debian's `dataset-fashion-mnist`
package), camera-like photos generated from it (`fashion-mnist-photos`, see visionflow.data.photos) and a user's folder
with one sub-folder per class. Files are copied byte for byte; judging them is the
validation stage's job, so the data version names exactly what was received.

The sources are read by visionflow.data.fashion_mnist and visionflow.data.folder_source; this module swaps their
files into raw_dir only once complete, and adds the reviewed production images. The label overrides file
(data.label_overrides) moves corrected images' copies into their new class (visionflow.data.relabel); the
source files stay as they are.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from visionflow.data import photos, shards
from visionflow.data.fashion_mnist import FASHION_MNIST_CLASSES, GENERATED_SOURCES, Progress, locate_fashion_mnist
from visionflow.data.folder_source import REVIEWED_PREFIX, check_class_names, copy_folder_dataset, scan_source
from visionflow.data.imageio import sha256_file
from visionflow.data.relabel import Relabels, relabel_folder, relabel_members, relabel_shards
from visionflow.errors import DataError

MARKER = ".ingest.json"  # written beside raw_dir, not inside it, so it never changes the data version


@dataclass(frozen=True)
class IngestResult:
    raw_dir: str
    source: str
    n_images: int
    classes: dict[str, int]
    skipped: bool
    n_reviewed: int = 0
    skipped_files: tuple[dict[str, str], ...] = ()  # source entries left out, each with its reason
    n_shards: int = 0  # data.layout: shards only
    content_version: str | None = None  # shards.content_version: the images' own version, however packed
    overrides_applied: int = 0  # images moved to another class by the label overrides (data.label_overrides)
    overrides_missing: tuple[str, ...] = ()  # sha256s of label changes whose image the data does not hold


def _check_copied(raw_dir: Path, counts: dict[str, int]) -> None:
    """Fail loudly when the folder (or its shards) does not hold exactly the files copied into it (a name
    collision, or a case-insensitive file system folding two names into one), before it replaces the previous
    raw_dir."""
    wrong = []
    in_shards = Counter(m.label for m in shards.read_index(raw_dir)) if shards.is_sharded(raw_dir) else None
    for label, n in counts.items():
        folder = raw_dir / label
        if in_shards is not None:
            have = in_shards[label]
        else:
            have = sum(1 for f in folder.iterdir() if f.is_file()) if folder.is_dir() else 0
        if have != n:
            wrong.append(f"{label}: {have} file(s) written for {n} copied")
    if wrong:
        raise DataError(
            f"ingest lost files, so {raw_dir} was not used: {'; '.join(wrong)}. Report this with the "
            "source folder's layout; the previous data is unchanged."
        )


def _listing_ok(raw_dir: Path, counts: dict[str, int], sharded: bool = False) -> bool:
    if sharded != shards.is_sharded(raw_dir):
        return False
    if sharded:
        try:
            return Counter(m.label for m in shards.read_index(raw_dir) if not _is_reviewed(m.member)) == counts
        except (OSError, DataError):
            return False
    try:
        return all(
            sum(1 for f in (raw_dir / c).iterdir() if f.is_file() and not f.name.startswith(REVIEWED_PREFIX)) == n
            for c, n in counts.items()
        )
    except FileNotFoundError:
        return False


def _reviewed_classes(reviewed_dir: Path | None) -> list[Path]:
    if reviewed_dir is None or not Path(reviewed_dir).is_dir():
        return []
    return sorted(p for p in Path(reviewed_dir).iterdir() if p.is_dir() and not p.name.startswith("."))


def _reviewed_members(reviewed_dir: Path | None) -> dict[str, Path]:
    """Each reviewed image (reviewed_dir/<class>/<file>) under the member name it has in raw_dir,
    <class>/reviewed__<file>, in both layouts; class names checked first."""
    classes = _reviewed_classes(reviewed_dir)
    check_class_names([d.name for d in classes], f"reviewed images {reviewed_dir}")
    return {
        f"{d.name}/{REVIEWED_PREFIX}{f.name}": f
        for d in classes
        for f in sorted(d.iterdir())
        if f.is_file() and not f.name.startswith(".")
    }


def _per_class(members) -> dict[str, int]:
    return dict(Counter(m.split("/", 1)[0] for m in members))


def sync_reviewed(reviewed_dir: Path | None, raw_dir: Path, members: dict[str, Path] | None = None) -> dict[str, int]:
    """Mirror reviewed images (data/reviewed/<class>/<file>) into raw_dir/<class>/reviewed__<file>.

    Reviewed images are labelled production data (the review page, or a reviewed batch): they join the dataset, so
    the next data version includes them. Copies are byte for byte; a reviewed file removed from reviewed_dir leaves
    the dataset too (DVC keeps every earlier version). The prefix is theirs alone: ingest never gives a source file
    a name that starts with it (see flat_names), so removing stale ones cannot remove a user's image. members:
    the reviewed images' member names when already worked out (with the label overrides applied).
    """
    members = _reviewed_members(reviewed_dir) if members is None else members
    wanted = {raw_dir / member: src for member, src in members.items()}
    present = {f for f in raw_dir.glob(f"*/{REVIEWED_PREFIX}*") if f.is_file()}
    for stale in present - set(wanted):
        stale.unlink()
    for dest, src in wanted.items():
        if dest not in present or dest.stat().st_size != src.stat().st_size:
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(".partial-" + dest.name)
            shutil.copyfile(src, tmp)
            os.replace(tmp, dest)
    return _per_class(members)


def ingest(
    *,
    source: str,
    raw_dir: Path,
    max_images: int | None,
    seed: int,
    cache_dir: Path,
    force: bool = False,
    progress: Progress | None = None,
    reviewed_dir: Path | None = None,
    shard_bytes: int | None = None,
    label_overrides: Path | None = None,
    labels: list[str] | None = None,
) -> IngestResult:
    """Write the dataset to raw_dir (skipped when raw_dir already holds exactly this source and selection), then
    add the reviewed production images from reviewed_dir. shard_bytes: pack it into shards of about this size
    (visionflow.data.shards) instead of one file per image. label_overrides: the corrections file whose label
    changes move images to another class (visionflow.data.relabel); labels (data.labels): the classes it may name,
    by default the data's own."""
    raw_dir = Path(raw_dir)
    relabels = Relabels.load(label_overrides) if label_overrides is not None else Relabels(Path("-"))
    reviewed_members = _reviewed_members(reviewed_dir)
    reviewed_classes = {m.split("/", 1)[0] for m in reviewed_members}
    reviewed_members, found, moved = relabel_members(reviewed_members, relabels)
    res, found_in_source = _ingest_source(
        source=source,
        raw_dir=raw_dir,
        max_images=max_images,
        seed=seed,
        cache_dir=cache_dir,
        force=force,
        progress=progress,
        shard_bytes=shard_bytes,
        relabels=relabels,
        labels=labels,
        reviewed_classes=reviewed_classes,
    )
    if shard_bytes is None:
        reviewed = sync_reviewed(reviewed_dir, raw_dir, reviewed_members)
        sharded = {}
    else:
        reviewed = sync_reviewed_shards(reviewed_dir, raw_dir, shard_bytes, reviewed_members)
        members = shards.read_index(raw_dir)
        sharded = {"n_shards": len({m.shard for m in members}), "content_version": shards.content_version(members)}
    classes = dict(res.classes)
    for c, n in reviewed.items():
        classes[c] = classes.get(c, 0) + n
    return dataclasses.replace(
        res,
        n_images=sum(classes.values()),
        classes=classes,
        n_reviewed=sum(reviewed.values()),
        overrides_applied=res.overrides_applied + moved,
        overrides_missing=tuple(sorted(set(relabels.to) - found - found_in_source)),
        **sharded,
    )


def _ingest_source(
    *,
    source: str,
    raw_dir: Path,
    max_images: int | None,
    seed: int,
    cache_dir: Path,
    force: bool,
    progress: Progress | None,
    shard_bytes: int | None,
    relabels: Relabels,
    labels: list[str] | None,
    reviewed_classes: set[str],
) -> tuple[IngestResult, set[str]]:
    """The source part of ingest, and the sha256s of the label changes found among its images. The classes an
    override may name: labels (data.labels) when set, else the source's and the reviewed images' classes."""
    spec = {"source": source, "max_images": max_images, "seed": seed}
    if shard_bytes is not None:
        spec["shard_bytes"] = shard_bytes  # a change of layout or shard size converts raw_dir
    if source == photos.PHOTOS_SOURCE:
        spec["generator"] = photos.GENERATOR_VERSION  # a changed generator makes different photos: ingest again
    scan = None
    if source not in GENERATED_SOURCES:
        src = Path(source).expanduser().resolve()
        scan = scan_source(src)  # fails on a bad source before raw_dir is touched
        spec["source"] = str(src)
        spec["listing"] = scan.fingerprint()
    if relabels.to:
        # before anything is written; data.labels (when set) is the whole list of classes
        source_classes = set(FASHION_MNIST_CLASSES) if scan is None else {f.label for f in scan.files}
        relabels.check_classes(set(labels) if labels else source_classes | reviewed_classes)
        spec["label_overrides"] = relabels.digest()  # a changed label change ingests again
    marker = raw_dir.parent / MARKER
    if not force and marker.is_file():
        previous = json.loads(marker.read_text())
        if previous.get("spec") == spec and _listing_ok(raw_dir, previous["classes"], sharded=shard_bytes is not None):
            applied = previous.get("label_overrides", {})
            return IngestResult(
                str(raw_dir),
                source,
                sum(previous["classes"].values()),
                previous["classes"],
                True,
                skipped_files=tuple(previous.get("skipped_files", ())),
                overrides_applied=applied.get("applied", 0),
            ), set(applied.get("found", ()))

    staging = raw_dir.with_name(raw_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        if scan is None:
            counts = GENERATED_SOURCES[source](locate_fashion_mnist(cache_dir), staging, max_images, seed, progress)
            _check_copied(staging, counts)
            delta, found = relabel_folder(staging, relabels)
            if shard_bytes is not None:
                _pack_folder(staging, shard_bytes)
        else:
            counts = copy_folder_dataset(scan, staging, max_images, seed, progress, shard_bytes)
            _check_copied(staging, counts)
            delta, found = (relabel_folder if shard_bytes is None else relabel_shards)(staging, relabels)
        counts = {c: n for c in sorted({*counts, *delta}) if (n := counts.get(c, 0) + delta[c])}
        if shard_bytes is not None:
            _carry_reviewed_shards(raw_dir, staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # a failed or interrupted ingest leaves nothing half-written
        raise
    # Swap in only when complete: an interrupted ingest leaves the previous raw_dir untouched.
    if raw_dir.exists():
        old = raw_dir.with_name(raw_dir.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        # DVC may have made cached files read-only; renaming the folder is still allowed.
        raw_dir.rename(old)
        staging.rename(raw_dir)
        _force_rmtree(old)
    else:
        staging.rename(raw_dir)
    skipped = scan.skipped if scan else []
    applied = {"applied": -sum(n for n in delta.values() if n < 0), "found": sorted(found)}
    marker.write_text(
        json.dumps({"spec": spec, "classes": counts, "skipped_files": skipped, "label_overrides": applied}, indent=2)
    )
    return IngestResult(
        str(raw_dir),
        source,
        sum(counts.values()),
        counts,
        False,
        skipped_files=tuple(skipped),
        overrides_applied=applied["applied"],
    ), found


def _is_reviewed(member: str) -> bool:
    return member.split("/", 1)[1].startswith(REVIEWED_PREFIX)


def _pack_folder(folder: Path, shard_bytes: int) -> None:
    """Replace the class folders in `folder` by shards of the same files (the generated sources write files)."""
    classes = sorted(d for d in folder.iterdir() if d.is_dir())
    shards.pack(folder, [(f"{d.name}/{f.name}", f) for d in classes for f in sorted(d.iterdir())], shard_bytes)
    for d in classes:
        shutil.rmtree(d)


def _carry_reviewed_shards(raw_dir: Path, staging: Path) -> None:
    """Copy the reviewed shards of the current raw_dir into the new one unchanged: sync_reviewed_shards then adds
    only what is new, append-only, whatever happened to the source's shards."""
    if not shards.is_sharded(raw_dir):
        return
    for name in sorted({m.shard for m in shards.read_index(raw_dir) if _is_reviewed(m.member)}):
        for f in (raw_dir / name, shards.index_path(raw_dir / name)):
            shutil.copyfile(f, staging / f.name)


def sync_reviewed_shards(
    reviewed_dir: Path | None, raw_dir: Path, shard_bytes: int, members: dict[str, Path] | None = None
) -> dict[str, int]:
    """The sharded sync_reviewed: reviewed images are members <class>/reviewed__<file>, added append-only. A
    reviewed shard whose images are all still reviewed (same bytes) stays as it is; new reviewed images go into
    new shards; a shard holding an image no longer reviewed is rewritten without it."""
    wanted = _reviewed_members(reviewed_dir) if members is None else members
    by_shard: dict[str, list[shards.Member]] = {}
    for m in shards.read_index(raw_dir):
        if _is_reviewed(m.member):
            by_shard.setdefault(m.shard, []).append(m)
    have: set[str] = set()
    for name, members in sorted(by_shard.items()):
        if all(m.member in wanted and sha256_file(wanted[m.member]) == m.sha256 for m in members):
            have.update(m.member for m in members)
        else:
            (raw_dir / name).unlink()
            shards.index_path(raw_dir / name).unlink()
    new = [(member, f) for member, f in wanted.items() if member not in have]
    if new:
        shards.pack(raw_dir, new, shard_bytes)
    return _per_class(wanted)


def _force_rmtree(path: Path) -> None:
    def _chmod_retry(func, p, _exc_info):
        os.chmod(p, 0o700)
        func(p)

    shutil.rmtree(path, onerror=_chmod_retry)
