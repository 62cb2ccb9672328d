"""A user's dataset: a folder with one sub-folder per class, scanned (symlinks, hidden and odd entries judged and
listed with their reason) and copied byte for byte into raw_dir under collision-free names.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import stat
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

from visionflow.data import shards
from visionflow.data.fashion_mnist import GENERATED_SOURCES, Progress, balanced_indices
from visionflow.errors import DataError

REVIEWED_PREFIX = "reviewed__"  # reviewed production images in raw_dir/<class>/ (see ingest.sync_reviewed)


# Class names flow into file paths, the model card, HTML pages and log lines: only plain text is allowed.
MAX_CLASS_NAME = 64
CLASS_NAME_RULE = (
    f"class names may use letters and digits (any script), space, _ - and . (at most {MAX_CLASS_NAME} "
    "characters, starting with a letter or digit, not ending with a space or a dot)"
)


def class_name_problem(name: str) -> str | None:
    """Why `name` cannot be a class name (see CLASS_NAME_RULE), or None when it can."""
    if not name:
        return "empty"
    if len(name) > MAX_CLASS_NAME:
        return f"longer than {MAX_CLASS_NAME} characters"
    if not name[0].isalnum():
        return "does not start with a letter or digit"
    if name[-1] in " .":
        return "ends with a space or a dot"
    for ch in name:
        # Combining marks are allowed so that decomposed accents (as macOS writes file names) still pass.
        if not (ch.isalnum() or ch in " _-." or unicodedata.category(ch).startswith("M")):
            return f"contains {ch!r}"
    return None


def check_class_names(names: list[str], where: str) -> None:
    """Raise a one-line DataError naming every unsafe class folder name (repr shows control characters)."""
    bad = [f"{n!r} ({problem})" for n in names if (problem := class_name_problem(n))]
    if bad:
        raise DataError(
            f"{where}: class folder name(s) not allowed: {', '.join(bad)}; {CLASS_NAME_RULE}. Rename the folder(s)."
        )


@dataclass(frozen=True)
class SourceFile:
    label: str
    path: Path  # what is read: the file itself, or the target of a symlink that stays inside the source
    rel: tuple[str, ...]  # its place inside the class folder
    st: os.stat_result


@dataclass
class SourceScan:
    source: Path
    files: list[SourceFile] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"path": relative to source, "reason", "detail"}

    def skip(self, path: Path, reason: str, detail: str = "") -> None:
        self.skipped.append({"path": path.relative_to(self.source).as_posix(), "reason": reason, "detail": detail})

    def fingerprint(self) -> str:
        """Changes when any file taken is added, removed, resized or touched, or the skipped entries change."""
        h = hashlib.sha256()
        for f in self.files:
            h.update(json.dumps([f.label, f.rel, f.st.st_size, f.st.st_mtime_ns]).encode())
        h.update(json.dumps(self.skipped).encode())
        return h.hexdigest()


def _classify(path: Path, source: Path) -> tuple[str, Path | None, os.stat_result | None]:
    """(kind, what to read, its stat): kind is "dir", "file" or the reason to skip the entry.

    Symlinks are resolved only to judge them: a folder symlink is never followed (no escape, no loop), a file
    symlink only when its target is a regular file inside the source.
    """
    try:
        st = path.lstat()
    except OSError:  # gone since the listing, or a folder we may list but not search
        return "unreadable_file", None, None
    if stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode):
        return ("dir" if stat.S_ISDIR(st.st_mode) else "file"), path, st
    if not stat.S_ISLNK(st.st_mode):
        return "not_a_regular_file", None, None  # a FIFO (reading one would hang), a socket or a device
    try:
        target_st = path.stat()
    except OSError as exc:
        return ("symlink_loop" if exc.errno == errno.ELOOP else "dangling_symlink"), None, None
    if stat.S_ISDIR(target_st.st_mode):
        return "symlinked_folder", None, None
    target = Path(os.path.realpath(path))
    if not target.is_relative_to(source):
        return "symlink_outside_source", None, None
    if not stat.S_ISREG(target_st.st_mode):
        return "not_a_regular_file", None, None
    return "file", target, target_st


def _entries(folder: Path, scan: SourceScan) -> list[Path]:
    try:
        names = sorted(os.listdir(folder))
    except OSError as exc:
        scan.skip(folder, "unreadable_folder", exc.strerror or str(exc))
        return []
    visible = []
    for name in names:
        if name.startswith("."):
            scan.skip(folder / name, "hidden")
        else:
            visible.append(folder / name)
    return visible


def _walk_class(label: str, folder: Path, scan: SourceScan) -> int:
    """Add the files under one class folder to the scan; returns how many."""
    taken = 0
    for path in _entries(folder, scan):
        kind, target, st = _classify(path, scan.source)
        if kind == "dir":
            taken += _walk_class(label, path, scan)
        elif kind == "file":
            scan.files.append(SourceFile(label, target, path.relative_to(scan.source / label).parts, st))
            taken += 1
        else:
            scan.skip(path, kind)
    return taken


def scan_source(source: Path) -> SourceScan:
    """Every file a folder-per-class source offers, and every entry left out with its reason. Raises DataError
    for a source that cannot be used (missing, a file, no classes, an empty class, an unsafe class name)."""
    if not source.exists():
        raise DataError(
            f"data source {source} does not exist: set data.source in params.yaml to a folder "
            f"with one sub-folder per class, or to one of {sorted(GENERATED_SOURCES)}"
        )
    if not source.is_dir():
        raise DataError(f"data source {source} is a file; it must be a folder with one sub-folder per class")
    scan = SourceScan(source)
    classes = []
    for path in _entries(source, scan):
        kind, _, _ = _classify(path, source)
        if kind == "dir":
            classes.append(path)
        else:
            scan.skip(path, "not_in_a_class_folder" if kind == "file" else kind)
    if not classes:
        raise DataError(f"data source {source} has no class sub-folders: expected {source}/<class name>/<images>")
    check_class_names([d.name for d in classes], f"data source {source}")
    taken = {d.name: _walk_class(d.name, d, scan) for d in classes}
    unreadable = {s["path"] for s in scan.skipped if s["reason"] == "unreadable_folder"}
    empty = [name for name, n in taken.items() if n == 0 and name not in unreadable]
    if empty:
        raise DataError(
            f"data source {source}: class folder(s) with no files: {', '.join(empty)}. "
            "Add images or remove the empty folder(s)."
        )
    return scan


def flat_names(rels: list[tuple[str, ...]]) -> list[str]:
    """Collision-free file names for one class folder, in the order of `rels`.

    A file keeps its name and a nested one is named after its path (sub/a.png -> sub__a.png). A name already
    taken (compared without case, as macOS and Windows file systems do) gets a short hash of the file's path, and a
    name in the reviewed images' namespace gets a leading '_', so no file ever replaces another.
    """
    used: set[str] = set()
    names: dict[int, str] = {}
    # Files at the top of the class folder choose first: the common case keeps its own name.
    for i in sorted(range(len(rels)), key=lambda k: (len(rels[k]) > 1, rels[k])):
        name = "__".join(rels[i])
        if name.casefold().startswith(REVIEWED_PREFIX):
            name = "_" + name
        stem, suffix = os.path.splitext(name)
        tag = hashlib.sha256("/".join(rels[i]).encode()).hexdigest()[:8]
        n = 0
        while name.casefold() in used:
            n += 1
            name = f"{stem}~{tag}{suffix}" if n == 1 else f"{stem}~{tag}-{n}{suffix}"
        used.add(name.casefold())
        names[i] = name
    return [names[i] for i in range(len(rels))]


def _open_regular(path: Path) -> BinaryIO:
    """Open a source file for reading; O_NOFOLLOW and O_NONBLOCK so that a file swapped for a symlink or a FIFO
    since the scan fails instead of being followed or hanging."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file")
    return os.fdopen(fd, "rb")


def _read_regular(path: Path) -> bytes:
    with _open_regular(path) as fh:
        return fh.read()


def copy_folder_dataset(
    scan: SourceScan,
    raw_dir: Path,
    max_images: int | None,
    seed: int,
    progress: Progress | None = None,
    shard_bytes: int | None = None,
) -> dict[str, int]:
    """Copy the chosen files into raw_dir/<class>/<flat name>, or with shard_bytes straight into shards of that
    size in raw_dir (members <class>/<flat name>: see visionflow.data.shards), each byte read once."""
    by_label: dict[str, list[int]] = {}
    for i, f in enumerate(scan.files):
        by_label.setdefault(f.label, []).append(i)
    member_of: dict[int, str] = {}
    for label, idx in by_label.items():
        for i, name in zip(idx, flat_names([scan.files[i].rel for i in idx])):
            member_of[i] = f"{label}/{name}"
    labels = np.array([f.label for f in scan.files])
    chosen = balanced_indices(labels, max_images, seed) if max_images else np.arange(len(scan.files))
    counts = dict.fromkeys(by_label, 0)
    if shard_bytes:
        files = {member_of[int(i)]: scan.files[int(i)] for i in chosen}
        items = [(m, f.path, f.st.st_size) for m, f in files.items()]
        written, failed = shards.pack_files(raw_dir, items, shard_bytes, read=_read_regular, progress=progress)
        for member, _path, exc in failed:
            f = files[member]
            scan.skip(scan.source / f.label / Path(*f.rel), "unreadable_file", exc.strerror or str(exc))
        counts.update(Counter(m.label for m in written))
        return counts
    for done, i in enumerate(chosen, 1):
        f = scan.files[int(i)]
        try:
            fh = _open_regular(f.path)
        except OSError as exc:
            scan.skip(scan.source / f.label / Path(*f.rel), "unreadable_file", exc.strerror or str(exc))
            continue
        # A failure to write (disk full) is not the file's fault: it stops the stage.
        dest = raw_dir / member_of[int(i)]
        dest.parent.mkdir(parents=True, exist_ok=True)
        with fh, dest.open("wb") as out:
            shutil.copyfileobj(fh, out, 1 << 20)
        counts[f.label] += 1
        if progress and (done % 500 == 0 or done == len(chosen)):
            progress(done, len(chosen))
    return counts
