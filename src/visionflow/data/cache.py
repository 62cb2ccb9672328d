"""Decode-once image cache: every image of a split decoded (guarded) and resized once into a uint8 array on disk.

Every epoch reads that array through a memory map, so no image is decoded twice and loader workers share the pages.
The build uses the machine: a process pool on every core decoding JPEGs at a reduced DCT scale (Pillow's draft),
or, where CUDA is present and a first chunk shows it faster, batched nvJPEG decode and resize on the GPU. It writes
chunk by chunk into a memory-mapped file (the cache never sits in RAM whole) and records each chunk written, so a
killed build continues where it stopped. An image that cannot be decoded is quarantined with its reason and left
out of the split: a log line and a record in the cache folder, never a failed build. The decoders are in
visionflow.data.cache_decode.

Paths in the manifest, paths.json and quarantine.json are stored as the manifest has them (relative to the project
root) and resolved against `project` only to read the files, so a moved or cloned project keeps its cache key.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from visionflow.data.cache_decode import DECODERS, Chunk, Target, decode_records, nvjpeg_available
from visionflow.data.imageio import DecodeRules
from visionflow.data.pools import default_workers
from visionflow.errors import DataError
from visionflow.locks import file_lock
from visionflow.paths import ProjectPaths

CACHE_VERSION = 2
CHUNK = 64  # default images per chunk: a worker's task, one GPU batch, the unit a resumed build skips
LOG = logging.getLogger(__name__)


class CachedSplit:
    """A decoded split on disk: images (N, H, W, C) uint8 memory-mapped on first use, labels, source paths, the
    images left out (`quarantined`: path, label, reason, detail) and how the cache was built (`build_info`).

    build_seconds is what this process spent building it: 0.0 when an earlier run's cache was reused.
    Pickling sends only the folder, so DataLoader workers map the same file instead of receiving a copy.
    """

    def __init__(self, folder: Path, build_seconds: float = 0.0):
        self.folder = Path(folder)
        self.labels: np.ndarray = np.load(self.folder / "labels.npy")
        self.paths: list[str] = json.loads((self.folder / "paths.json").read_text())
        self.quarantined: list[dict[str, Any]] = json.loads((self.folder / "quarantine.json").read_text())
        self.build_info: dict[str, Any] = json.loads((self.folder / "build.json").read_text())
        self.build_seconds = build_seconds
        self._images: np.ndarray | None = None

    @property
    def images(self) -> np.ndarray:
        if self._images is None:
            self._images = np.load(self.folder / "images.npy", mmap_mode="r")
        return self._images

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_images": None}


def _cache_key(manifest: Path, image_size: int, channels: int, classes: list[str]) -> str:
    h = hashlib.sha256(Path(manifest).read_bytes())
    h.update(json.dumps([CACHE_VERSION, image_size, channels, classes]).encode())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------------------- the build


class _Partial:
    """A build in progress, <cache folder>.partial/: decoded.npy (a row for every image of the manifest, written in
    place through a memory map) and chunks.jsonl (one line per chunk written, with the images it quarantined)."""

    def __init__(self, path: Path, shape: tuple[int, ...], chunk_size: int):
        self.path = path
        self.file = path / "decoded.npy"
        self.log = path / "chunks.jsonl"
        meta = {"version": CACHE_VERSION, "shape": list(shape), "chunk_size": chunk_size}
        if (
            not (path / "meta.json").is_file()
            or json.loads((path / "meta.json").read_text()) != meta
            or not self.file.is_file()
        ):
            shutil.rmtree(path, ignore_errors=True)
            path.mkdir(parents=True)
            # a sparse file: rows take disk (and page cache) as they are written, never RAM as a whole
            np.lib.format.open_memmap(self.file, mode="w+", dtype=np.uint8, shape=shape).flush()
            (path / "meta.json").write_text(json.dumps(meta))
        self.done: dict[int, dict[str, Any]] = {}
        if self.log.is_file():
            for line in self.log.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:  # the line a kill cut short: that chunk is decoded again
                    continue
                self.done[rec["chunk"]] = rec
        self._out = self.log.open("a")

    def record(self, rec: dict[str, Any]) -> None:
        # Written after the chunk's rows: a kill between the two decodes the chunk again. The rows are in the page
        # cache, which a killed process does not take with it, so no flush is needed for a kill to be survived.
        self._out.write(json.dumps(rec) + "\n")
        self._out.flush()
        self.done[rec["chunk"]] = rec

    def close(self) -> None:
        self._out.close()


@contextlib.contextmanager
def _progress(name: str, total: int, done: int, log: logging.Logger) -> Iterator[Callable[[int], None]]:
    """advance(n): a rich progress bar on a terminal, otherwise a log line every 10% or 15 s."""
    if sys.stderr.isatty():
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        with Progress(
            TextColumn("[bold]cache[/bold] {task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
        ) as bar:
            task = bar.add_task(name, total=total, completed=done)
            yield lambda n: bar.advance(task, n)
        return
    state = {"done": done, "t": time.monotonic(), "step": max(1, total // 10)}
    t0, start = time.monotonic(), done

    def advance(n: int) -> None:
        before, state["done"] = state["done"], state["done"] + n
        now = time.monotonic()
        crossed = state["done"] // state["step"] > before // state["step"]
        if state["done"] < total and (crossed or now - state["t"] >= 15):
            rate = (state["done"] - start) / max(now - t0, 1e-9)
            log.info("cache %s: %d/%d images (%.0f images/s)", name, state["done"], total, rate)
            state["t"] = now

    yield advance


def _finish(partial: _Partial, folder: Path, df, labels: np.ndarray, info: dict[str, Any], manifest: Path) -> None:
    """Move the finished build into place, the quarantined images' rows taken out."""
    quarantined = sorted((q for rec in partial.done.values() for q in rec["quarantined"]), key=lambda q: q["row"])
    keep = np.setdiff1d(np.arange(len(df)), [q["row"] for q in quarantined])
    partial.close()
    if len(keep) == 0:
        reasons = "; ".join(f"{q['path']}: {q['reason']}" for q in quarantined[:3])
        raise DataError(
            f"{manifest}: none of its {len(df)} images can be decoded ({reasons}...); run `visionflow validate` again"
        )
    if quarantined:
        decoded = np.load(partial.file, mmap_mode="r")
        images = np.lib.format.open_memmap(
            partial.path / "images.npy", mode="w+", dtype=np.uint8, shape=(len(keep), *decoded.shape[1:])
        )
        block = max(1, (64 << 20) // decoded[0].nbytes)  # 64 MB at a time: the cache is never in RAM whole
        for k in range(0, len(keep), block):
            images[k : k + block] = decoded[keep[k : k + block]]
        images.flush()
        del images, decoded
        partial.file.unlink()
    else:
        os.replace(partial.file, partial.path / "images.npy")
    label_of, stored = df["label"].tolist(), df["path"].tolist()
    for q in quarantined:
        q["label"], q["path"] = label_of[q["row"]], stored[q["row"]]  # the decoder saw the resolved path
    np.save(partial.path / "labels.npy", labels[keep])
    (partial.path / "paths.json").write_text(json.dumps(df["path"].iloc[keep].tolist()))
    (partial.path / "quarantine.json").write_text(
        json.dumps([{k: q[k] for k in ("path", "label", "reason", "detail")} for q in quarantined], indent=1)
    )
    (partial.path / "build.json").write_text(
        json.dumps({**info, "images": int(len(keep)), "quarantined": len(quarantined)}, indent=1)
    )
    (partial.path / "done").write_text("ok")
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(partial.path, folder)


def project_split(
    project: ProjectPaths, split: str, *, classes: list[str], image_size: int, channels: int
) -> CachedSplit:
    """A split of the project (train, val, test) cached for one model input: what evaluation, export and promotion
    read; the cache is shared with training's when the input is the same."""
    return build_cache(
        project.splits / f"{split}.csv",
        project.cache,
        classes=classes,
        image_size=image_size,
        channels=channels,
        project=project,
    )


def build_cache(
    manifest: Path,
    cache_root: Path,
    *,
    classes: list[str],
    image_size: int,
    channels: int,
    rules: DecodeRules | None = None,
    workers: int | None = None,
    decoder: str = "auto",
    chunk_size: int = CHUNK,
    log: logging.Logger | None = None,
    project: ProjectPaths | None = None,
) -> CachedSplit:
    """Decode every image of a split manifest once into cache_root/<manifest stem>-<key>/ (reused while the
    manifest, the size, the channels and the classes are the same), with every core (`workers`, default all
    this process may use) or the GPU. decoder: "auto", "pillow" (CPU) or "nvjpeg" (needs CUDA); chunk_size: images
    per unit of work (a worker's task, a GPU batch, what a resumed build skips or decodes again).

    Images that cannot be decoded are left out of the split and listed in CachedSplit.quarantined, each with a
    warning in `log`; the split's build seconds are CachedSplit.build_seconds and build.json in its folder.
    project: the project whose root the manifest's relative paths are resolved against (None: the current folder).
    """
    if decoder not in DECODERS:
        raise ValueError(f"decoder {decoder!r} is not one of {DECODERS}")
    if decoder == "nvjpeg" and not nvjpeg_available():
        raise DataError("the nvjpeg decoder needs CUDA and torchvision: use decoder 'auto' or 'pillow'")
    log = log or LOG
    rules = rules or DecodeRules.accepted()
    folder = Path(cache_root) / f"{Path(manifest).stem}-{_cache_key(manifest, image_size, channels, classes)}"
    if (folder / "done").exists():
        return CachedSplit(folder)
    t0 = time.perf_counter()
    with file_lock(folder.with_name(folder.name + ".lock")):
        if (folder / "done").exists():  # built by another process while this one waited
            return CachedSplit(folder)
        _build(
            manifest,
            folder,
            classes,
            Target(image_size, channels, rules),
            workers or default_workers(),
            decoder,
            chunk_size,
            log,
            project,
        )
    return CachedSplit(folder, build_seconds=round(time.perf_counter() - t0, 3))


def _build(
    manifest: Path,
    folder: Path,
    classes: list[str],
    target: Target,
    workers: int,
    decoder: str,
    chunk_size: int,
    log: logging.Logger,
    project: ProjectPaths | None,
) -> None:
    df, labels = _read_split(manifest, classes)
    paths = [str(project.resolve(x)) if project else x for x in df["path"]]
    n, size = len(paths), target.image_size
    partial = _Partial(folder.with_name(folder.name + ".partial"), (n, size, size, target.channels), chunk_size)
    chunks = [Chunk(k, s, tuple(paths[s : s + chunk_size])) for k, s in enumerate(range(0, n, chunk_size))]
    already = sum(len(c.paths) for c in chunks if c.index in partial.done)
    name = Path(manifest).name
    log.info(
        "cache %s: decoding %d images at %d px (%d core(s)%s)%s",
        name,
        n - already,
        size,
        workers,
        ", or the GPU if faster" if decoder == "auto" and nvjpeg_available() else "",
        f"; resuming a build stopped after {already} of {n}" if already else "",
    )
    info, seconds = _decode(partial, chunks, target, decoder, workers, name, already, log)
    _finish(partial, folder, df, labels, info, manifest)
    _log_outcome(folder, name, info, seconds, log)


def _read_split(manifest: Path, classes: list[str]) -> tuple[Any, np.ndarray]:
    """The split's manifest (a DataFrame) and its labels as class indices; a label outside `classes` is an error."""
    # here, not at the top: the pool's workers import this module, and pandas would add half a second to each start
    from visionflow.data.validate import read_manifest

    df = read_manifest(manifest)
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(df["label"]) - set(index))
    if unknown:
        raise DataError(f"{manifest}: labels {unknown} are not among the classes {classes}")
    return df, df["label"].map(index).to_numpy(dtype=np.int64)


def _decode(
    partial: _Partial,
    chunks: list[Chunk],
    target: Target,
    decoder: str,
    workers: int,
    name: str,
    already: int,
    log: logging.Logger,
) -> tuple[dict[str, Any], float]:
    """Decode the chunks a resumed build has not written yet; returns build.json's timing and decoder fields, and
    the seconds unrounded."""
    n = sum(len(c.paths) for c in chunks)
    todo = [c for c in chunks if c.index not in partial.done]
    t0 = time.perf_counter()
    choice: dict[str, Any] = {}
    with _progress(name, n, already, log) as advance:
        for rec in decode_records(partial.file, todo, target, decoder, workers, choice):
            partial.record(rec)
            advance(len(chunks[rec["chunk"]].paths))
    seconds = time.perf_counter() - t0
    info = {
        "seconds": round(seconds, 3),
        "decoded": n - already,
        "resumed_from": already,
        "images_per_s": round((n - already) / seconds, 1) if seconds > 0 else None,
        "image_size": target.image_size,
        "channels": target.channels,
        **choice,
    }
    return info, seconds


def _log_outcome(folder: Path, name: str, info: dict[str, Any], seconds: float, log: logging.Logger) -> None:
    """A warning per image left out (the first 20), then the build's one-line summary."""
    quarantined = json.loads((folder / "quarantine.json").read_text())
    for q in quarantined[:20]:
        log.warning("cache %s: left out %s (%s: %s)", name, q["path"], q["reason"], q["detail"])
    if len(quarantined) > 20:
        log.warning(
            "cache %s: ... and %d more left out (all in %s)", name, len(quarantined) - 20, folder / "quarantine.json"
        )
    log.info(
        "cache %s: %d images in %.1f s (%s images/s, %s)%s",
        name,
        info["decoded"],
        seconds,
        info["images_per_s"],
        info["decoder"],
        f"; {len(quarantined)} quarantined and left out of the split" if quarantined else "",
    )
