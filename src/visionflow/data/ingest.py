"""Ingest: bring a dataset into data/raw/<class>/ as received, ready to be versioned.

Three sources go through the same path: the bundled default (Fashion-MNIST from Debian's `dataset-fashion-mnist`
package), camera-like photos generated from it (`fashion-mnist-photos`, see visionflow.data.photos) and a user's folder
with one sub-folder per class. Files are copied byte for byte; judging them is the
validation stage's job, so the data version names exactly what was received.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import json
import os
import shutil
import stat
import subprocess
import tempfile
import unicodedata
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image

from visionflow.data import photos
from visionflow.errors import DataError

FASHION_MNIST = "fashion-mnist"
FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
FASHION_MNIST_CLASSES = (
    "tshirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle_boot",
)
_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
_IDX_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
              "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
REVIEWED_PREFIX = "reviewed__"  # reviewed production images in raw_dir/<class>/ (see sync_reviewed)
MARKER = ".ingest.json"  # written beside raw_dir, not inside it, so it never changes the data version

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class IngestResult:
    raw_dir: str
    source: str
    n_images: int
    classes: dict[str, int]
    skipped: bool
    n_reviewed: int = 0
    skipped_files: tuple[dict[str, str], ...] = ()  # source entries left out, each with its reason


def _has_idx(folder: Path) -> bool:
    return all((folder / f).is_file() for f in _IDX_FILES)


def locate_fashion_mnist(cache_dir: Path) -> Path:
    """Find the Debian package's files, installing it (root) or unpacking the .deb (no root) when missing."""
    unpacked = cache_dir / "deb" / "usr/share/datasets/fashion-mnist"
    for candidate in (_SYSTEM_DIR, unpacked):
        if _has_idx(candidate):
            return candidate
    if shutil.which("apt-get") is None:
        raise DataError(
            f"Fashion-MNIST not found and apt-get is unavailable: install the Debian package "
            f"{FASHION_MNIST_PACKAGE}, or set data.source in params.yaml to your own folder-per-class dataset"
        )
    if os.geteuid() == 0:
        cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", FASHION_MNIST_PACKAGE]
        if subprocess.run(cmd, capture_output=True).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], capture_output=True)
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise DataError(f"apt-get install {FASHION_MNIST_PACKAGE} failed:\n{proc.stderr[-2000:]}")
        if _has_idx(_SYSTEM_DIR):
            return _SYSTEM_DIR
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        proc = subprocess.run(["apt-get", "download", FASHION_MNIST_PACKAGE], cwd=tmp, capture_output=True, text=True)
        if proc.returncode != 0:
            raise DataError(
                f"could not download {FASHION_MNIST_PACKAGE} with apt-get ({proc.stderr.strip()[-500:]}); "
                "run `apt-get update` or point data.source at your own dataset"
            )
        deb = next(Path(tmp).glob("*.deb"))
        subprocess.run(["dpkg-deb", "-x", str(deb), str(cache_dir / "deb")], check=True)
    if not _has_idx(unpacked):
        raise DataError(f"{FASHION_MNIST_PACKAGE} unpacked but its idx files are missing under {unpacked}")
    return unpacked


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as fh:
        data = fh.read()
    magic = int.from_bytes(data[:4], "big")
    ndim = magic & 0xFF
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def balanced_indices(labels: np.ndarray, max_images: int | None, seed: int) -> np.ndarray:
    """Indices of at most max_images items, spread as evenly as possible over classes, deterministic in seed."""
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    per_class = {c: rng.permutation(np.flatnonzero(labels == c)) for c in classes}
    if max_images is None or max_images >= len(labels):
        chosen = np.concatenate(list(per_class.values()))
    else:
        quota = {c: 0 for c in classes}
        remaining = max_images
        # Round-robin fill so small classes are exhausted first and the rest share what is left.
        while remaining > 0:
            open_classes = [c for c in classes if quota[c] < len(per_class[c])]
            if not open_classes:
                break
            share = max(1, remaining // len(open_classes))
            for c in open_classes:
                take = min(share, len(per_class[c]) - quota[c], remaining)
                quota[c] += take
                remaining -= take
                if remaining == 0:
                    break
        chosen = np.concatenate([per_class[c][: quota[c]] for c in classes])
    return np.sort(chosen)


def load_fashion_mnist(idx_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """All 70,000 items (train then test): images (N, 28, 28) uint8 and labels (N,) indexing FASHION_MNIST_CLASSES."""
    images = np.concatenate([_read_idx(idx_dir / _IDX_FILES[0]), _read_idx(idx_dir / _IDX_FILES[2])])
    labels = np.concatenate([_read_idx(idx_dir / _IDX_FILES[1]), _read_idx(idx_dir / _IDX_FILES[3])])
    return images, labels


def export_fashion_mnist(idx_dir: Path, raw_dir: Path, max_images: int | None, seed: int,
                         progress: Progress | None = None) -> dict[str, int]:
    images, labels = load_fashion_mnist(idx_dir)
    chosen = balanced_indices(labels, max_images, seed)
    counts: dict[str, int] = {}
    for name in FASHION_MNIST_CLASSES:
        (raw_dir / name).mkdir(parents=True, exist_ok=True)
    for done, i in enumerate(chosen, 1):
        name = FASHION_MNIST_CLASSES[int(labels[i])]
        # The original index in the 70k set names the file, so the same image always has the same path.
        Image.fromarray(images[i], mode="L").save(raw_dir / name / f"fmnist_{i:05d}.png", optimize=False)
        counts[name] = counts.get(name, 0) + 1
        if progress and (done % 500 == 0 or done == len(chosen)):
            progress(done, len(chosen))
    return counts


def export_photos(idx_dir: Path, raw_dir: Path, max_images: int | None, seed: int,
                  progress: Progress | None = None) -> dict[str, int]:
    """One camera-like photo per chosen Fashion-MNIST item (the same items `fashion-mnist` would choose), made by a
    process pool on every core."""
    images, labels = load_fashion_mnist(idx_dir)
    chosen = balanced_indices(labels, max_images, seed)
    return photos.write_photos(raw_dir, images, labels, chosen, list(FASHION_MNIST_CLASSES), seed, progress=progress)


# data.source values ingest makes from the bundled dataset, and how
GENERATED_SOURCES = {FASHION_MNIST: export_fashion_mnist, photos.PHOTOS_SOURCE: export_photos}


# Class names flow into file paths, the model card, HTML pages and log lines: only plain text is allowed.
MAX_CLASS_NAME = 64
CLASS_NAME_RULE = (f"class names may use letters and digits (any script), space, _ - and . (at most {MAX_CLASS_NAME} "
                   "characters, starting with a letter or digit, not ending with a space or a dot)")


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
        raise DataError(f"{where}: class folder name(s) not allowed: {', '.join(bad)}; {CLASS_NAME_RULE}. "
                        "Rename the folder(s).")


@dataclass(frozen=True)
class SourceFile:
    label: str
    path: Path          # what is read: the file itself, or the target of a symlink that stays inside the source
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
        raise DataError(f"data source {source} does not exist: set data.source in params.yaml to a folder "
                        f"with one sub-folder per class, or to one of {sorted(GENERATED_SOURCES)}")
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
        raise DataError(f"data source {source}: class folder(s) with no files: {', '.join(empty)}. "
                        "Add images or remove the empty folder(s).")
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


def copy_folder_dataset(scan: SourceScan, raw_dir: Path, max_images: int | None, seed: int,
                        progress: Progress | None = None) -> dict[str, int]:
    by_label: dict[str, list[int]] = {}
    for i, f in enumerate(scan.files):
        by_label.setdefault(f.label, []).append(i)
    dest_of: dict[int, Path] = {}
    for label, idx in by_label.items():
        (raw_dir / label).mkdir(parents=True, exist_ok=True)
        for i, name in zip(idx, flat_names([scan.files[i].rel for i in idx])):
            dest_of[i] = raw_dir / label / name
    labels = np.array([f.label for f in scan.files])
    chosen = balanced_indices(labels, max_images, seed) if max_images else np.arange(len(scan.files))
    counts = dict.fromkeys(by_label, 0)
    for done, i in enumerate(chosen, 1):
        f = scan.files[int(i)]
        try:
            fh = _open_regular(f.path)
        except OSError as exc:
            scan.skip(scan.source / f.label / Path(*f.rel), "unreadable_file", exc.strerror or str(exc))
            continue
        # A failure to write (disk full) is not the file's fault: it stops the stage.
        with fh, dest_of[int(i)].open("wb") as out:
            shutil.copyfileobj(fh, out, 1 << 20)
        counts[f.label] += 1
        if progress and (done % 500 == 0 or done == len(chosen)):
            progress(done, len(chosen))
    return counts


def _check_copied(raw_dir: Path, counts: dict[str, int]) -> None:
    """Fail loudly when the folder does not hold exactly the files copied into it (a name collision, or a
    case-insensitive file system folding two names into one), before it replaces the previous raw_dir."""
    wrong = []
    for label, n in counts.items():
        folder = raw_dir / label
        have = sum(1 for f in folder.iterdir() if f.is_file()) if folder.is_dir() else 0
        if have != n:
            wrong.append(f"{label}: {have} file(s) written for {n} copied")
    if wrong:
        raise DataError(f"ingest lost files, so {raw_dir} was not used: {'; '.join(wrong)}. Report this with the "
                        "source folder's layout; the previous data is unchanged.")


def _listing_ok(raw_dir: Path, counts: dict[str, int]) -> bool:
    try:
        return all(sum(1 for f in (raw_dir / c).iterdir() if f.is_file() and not f.name.startswith(REVIEWED_PREFIX))
                   == n for c, n in counts.items())
    except FileNotFoundError:
        return False


def _reviewed_classes(reviewed_dir: Path | None) -> list[Path]:
    if reviewed_dir is None or not Path(reviewed_dir).is_dir():
        return []
    return sorted(p for p in Path(reviewed_dir).iterdir() if p.is_dir() and not p.name.startswith("."))


def sync_reviewed(reviewed_dir: Path | None, raw_dir: Path) -> dict[str, int]:
    """Mirror reviewed images (data/reviewed/<class>/<file>) into raw_dir/<class>/reviewed__<file>.

    Reviewed images are labelled production data (the review page, or a reviewed batch): they join the dataset, so
    the next data version includes them. Copies are byte for byte; a reviewed file removed from reviewed_dir leaves
    the dataset too (DVC keeps every earlier version). The prefix is theirs alone: ingest never gives a source file
    a name that starts with it (see flat_names), so removing stale ones cannot remove a user's image.
    """
    classes = _reviewed_classes(reviewed_dir)
    check_class_names([d.name for d in classes], f"reviewed images {reviewed_dir}")
    wanted: dict[Path, Path] = {}
    for d in classes:
        for f in sorted(d.iterdir()):
            if f.is_file() and not f.name.startswith("."):
                wanted[raw_dir / d.name / f"{REVIEWED_PREFIX}{f.name}"] = f
    present = {f for f in raw_dir.glob(f"*/{REVIEWED_PREFIX}*") if f.is_file()}
    for stale in present - set(wanted):
        stale.unlink()
    counts: dict[str, int] = {}
    for dest, src in wanted.items():
        if dest not in present or dest.stat().st_size != src.stat().st_size:
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(".partial-" + dest.name)
            shutil.copyfile(src, tmp)
            os.replace(tmp, dest)
        counts[dest.parent.name] = counts.get(dest.parent.name, 0) + 1
    return counts


def ingest(*, source: str, raw_dir: Path, max_images: int | None, seed: int, cache_dir: Path,
           force: bool = False, progress: Progress | None = None, reviewed_dir: Path | None = None) -> IngestResult:
    """Write the dataset to raw_dir (skipped when raw_dir already holds exactly this source and selection), then
    add the reviewed production images from reviewed_dir."""
    raw_dir = Path(raw_dir)
    check_class_names([d.name for d in _reviewed_classes(reviewed_dir)], f"reviewed images {reviewed_dir}")
    res = _ingest_source(source=source, raw_dir=raw_dir, max_images=max_images, seed=seed, cache_dir=cache_dir,
                         force=force, progress=progress)
    reviewed = sync_reviewed(reviewed_dir, raw_dir)
    if not reviewed:
        return res
    classes = dict(res.classes)
    for c, n in reviewed.items():
        classes[c] = classes.get(c, 0) + n
    return IngestResult(res.raw_dir, res.source, sum(classes.values()), classes, res.skipped, sum(reviewed.values()),
                        res.skipped_files)


def _ingest_source(*, source: str, raw_dir: Path, max_images: int | None, seed: int, cache_dir: Path,
                   force: bool, progress: Progress | None) -> IngestResult:
    spec = {"source": source, "max_images": max_images, "seed": seed}
    if source == photos.PHOTOS_SOURCE:
        spec["generator"] = photos.GENERATOR_VERSION  # a changed generator makes different photos: ingest again
    scan = None
    if source not in GENERATED_SOURCES:
        src = Path(source).expanduser().resolve()
        scan = scan_source(src)  # fails on a bad source before raw_dir is touched
        spec["source"] = str(src)
        spec["listing"] = scan.fingerprint()
    marker = raw_dir.parent / MARKER
    if not force and marker.is_file():
        previous = json.loads(marker.read_text())
        if previous.get("spec") == spec and _listing_ok(raw_dir, previous["classes"]):
            return IngestResult(str(raw_dir), source, sum(previous["classes"].values()), previous["classes"], True,
                                skipped_files=tuple(previous.get("skipped_files", ())))

    staging = raw_dir.with_name(raw_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        if scan is None:
            counts = GENERATED_SOURCES[source](locate_fashion_mnist(cache_dir), staging, max_images, seed, progress)
        else:
            counts = copy_folder_dataset(scan, staging, max_images, seed, progress)
        _check_copied(staging, counts)
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
    marker.write_text(json.dumps({"spec": spec, "classes": counts, "skipped_files": skipped}, indent=2))
    return IngestResult(str(raw_dir), source, sum(counts.values()), counts, False, skipped_files=tuple(skipped))


def _force_rmtree(path: Path) -> None:
    def _chmod_retry(func, p, _exc_info):
        os.chmod(p, 0o700)
        func(p)

    shutil.rmtree(path, onerror=_chmod_retry)


def result_dict(result: IngestResult) -> dict:
    return asdict(result)
