"""Decode-once image cache: every image of a split decoded (guarded) and resized once into a uint8 array on disk.

Every epoch reads that array through a memory map, so no image is decoded twice and loader workers share the pages.
The build uses the machine: a process pool on every core decoding JPEGs at a reduced DCT scale (Pillow's draft),
or, where CUDA is present and a first chunk shows it faster, batched nvJPEG decode and resize on the GPU. It writes
chunk by chunk into a memory-mapped file (the cache never sits in RAM whole) and records each chunk written, so a
killed build continues where it stopped. An image that cannot be decoded is quarantined with its reason and left
out of the split: a log line and a record in the cache folder, never a failed build.
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
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, ThreadPoolExecutor, wait
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from visionflow.errors import DataError
from visionflow.locks import file_lock
from visionflow.data.imageio import DecodeRules, RejectedImage, decode_for_model, open_checked, read_limited
from visionflow.data.pools import default_workers, pool_worker_setup

CACHE_VERSION = 2
CHUNK = 64  # default images per chunk: a worker's task, one GPU batch, the unit a resumed build skips
# Any two decode paths (the DCT-scaled decode, the full decode, nvJPEG) give the same image within these, in uint8
# levels: each filters and rounds a little differently while shrinking a photo (tests/unit/test_cache.py).
TOLERANCE_MEAN = 1.5  # mean absolute difference over an image (measured: up to 0.6)
TOLERANCE_P99 = 5  # 99th percentile of the absolute difference (measured: up to 2; the largest are at sharp edges)
DECODERS = ("auto", "pillow", "nvjpeg")
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


# ----------------------------------------------------------------------------------------------- decoding a chunk


@dataclass(frozen=True)
class _Chunk:
    index: int
    start: int  # row of its first image
    paths: tuple[str, ...]


@dataclass(frozen=True)
class _Target:
    image_size: int
    channels: int
    rules: DecodeRules


def _quarantine(row: int, path: str, exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, RejectedImage):
        return {"row": row, "path": path, "reason": exc.reason, "detail": exc.detail}
    return {"row": row, "path": path, "reason": "unreadable_file", "detail": f"{type(exc).__name__}: {exc}"}


def _read(path: str, rules: DecodeRules) -> bytes | BaseException:
    try:
        return read_limited(Path(path), rules.max_bytes)
    except (OSError, RejectedImage) as exc:
        return exc


def decode_chunk(images: np.ndarray, chunk: _Chunk, target: _Target) -> dict[str, Any]:
    """Decode one chunk on this CPU core into its rows of `images`: the record of the chunk written."""
    quarantined = []
    for offset, path in enumerate(chunk.paths):
        row = chunk.start + offset
        try:
            data = read_limited(Path(path), target.rules.max_bytes)
            images[row] = decode_for_model(data, target.image_size, target.channels, target.rules)
        except (OSError, RejectedImage) as exc:
            images[row] = 0
            quarantined.append(_quarantine(row, path, exc))
    return {"chunk": chunk.index, "quarantined": quarantined}


_worker_images: np.ndarray | None = None


def _open_rows(file: str) -> None:
    """Pool initializer: each worker maps the cache file once and writes its chunks' rows straight into it, so
    no decoded pixel crosses a pipe."""
    global _worker_images
    pool_worker_setup()
    _worker_images = np.load(file, mmap_mode="r+")


def _decode_in_worker(chunk: _Chunk, target: _Target) -> dict[str, Any]:
    assert _worker_images is not None
    return decode_chunk(_worker_images, chunk, target)


def nvjpeg_available() -> bool:
    # No NVIDIA driver node: no CUDA, known without importing torch (seconds, in a process that has not yet)
    if sys.platform == "linux" and not any(Path(p).exists() for p in ("/dev/nvidiactl", "/proc/driver/nvidia")):
        return False
    try:
        import torch
        import torchvision.io  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


class TorchJpegDecoder:
    """Batched JPEG decode and resize with torchvision (nvJPEG on a CUDA device). The JPEGs it takes are decoded
    and resized in one batch; every other image (PNG, CMYK, an EXIF orientation to apply, a JPEG without its end
    marker) goes through decode_for_model on the CPU, which also gives the reason for a corrupt one."""

    def __init__(self, target: _Target, device: str = "cuda"):
        import torch
        import torchvision.io

        self.torch, self.tvio = torch, torchvision.io
        self.target = target
        self.device = torch.device(device)
        self._reader = ThreadPoolExecutor(4, thread_name_prefix="cache-read")  # file reads overlap the decode

    def _takes(self, data: bytes) -> bool:
        """Whether the GPU path decodes these bytes the way the CPU path would (header checks raise here)."""
        img = open_checked(data, self.target.rules)
        if img.format != "JPEG" or img.mode not in ("RGB", "L"):
            return False
        if not data.rstrip(b"\0").endswith(b"\xff\xd9"):  # truncated: nvJPEG fills the rest in grey, quietly
            return False
        try:
            orientation = img.getexif().get(0x0112, 1)
        except Exception:  # noqa: BLE001 - a corrupt EXIF block: the CPU path ignores it, so send it there
            return False
        return orientation in (1, None)

    def _resize(self, batch):
        """(N, C, H, W) uint8 on the device -> (N, S, S, C) uint8: box filter when shrinking, as cv2's INTER_AREA
        in the CPU path; bilinear when enlarging, as its INTER_LINEAR."""
        size = self.target.image_size
        x = batch.float()
        if x.shape[-2:] != (size, size):
            shrink = x.shape[-2] > size or x.shape[-1] > size
            x = self.torch.nn.functional.interpolate(x, size=(size, size), mode="area" if shrink else "bilinear",
                                                     **({} if shrink else {"align_corners": False}))
        return x.round_().clamp_(0, 255).to(self.torch.uint8).permute(0, 2, 3, 1)

    def _on_cpu(self, data: bytes) -> np.ndarray | RejectedImage:
        try:
            return decode_for_model(data, self.target.image_size, self.target.channels, self.target.rules)
        except RejectedImage as exc:
            return exc

    def decode(self, datas: list[bytes]) -> list[np.ndarray | RejectedImage]:
        """Each image's (S, S, C) uint8 pixels, or the reason it cannot be used."""
        torch = self.torch
        out: list[np.ndarray | RejectedImage | None] = [None] * len(datas)
        batch: list[int] = []
        for i, data in enumerate(datas):
            try:
                takes = self._takes(data)
            except RejectedImage as exc:
                out[i] = exc
                continue
            if takes:
                batch.append(i)
            else:
                out[i] = self._on_cpu(data)
        if not batch:
            return out  # type: ignore[return-value]
        mode = self.tvio.ImageReadMode.GRAY if self.target.channels == 1 else self.tvio.ImageReadMode.RGB
        try:
            decoded = self.tvio.decode_jpeg([torch.frombuffer(bytearray(datas[i]), dtype=torch.uint8)
                                             for i in batch], mode=mode, device=self.device)
        except RuntimeError:  # a JPEG nvJPEG refuses (or the GPU's memory) fails the batch: the CPU takes it
            for i in batch:
                out[i] = self._on_cpu(datas[i])
            return out  # type: ignore[return-value]
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for k, img in enumerate(decoded):
            by_shape.setdefault(tuple(img.shape), []).append(k)
        for ks in by_shape.values():  # one resize call per photo size (a camera's photos share a few)
            for k, row in zip(ks, self._resize(torch.stack([decoded[k] for k in ks])).cpu().numpy()):
                out[batch[k]] = row
        return out  # type: ignore[return-value]

    def decode_chunk(self, images: np.ndarray, chunk: _Chunk) -> dict[str, Any]:
        datas = list(self._reader.map(lambda p: _read(p, self.target.rules), chunk.paths))
        readable = [i for i, d in enumerate(datas) if isinstance(d, bytes)]
        results: dict[int, np.ndarray | BaseException] = {i: d for i, d in enumerate(datas) if not isinstance(d, bytes)}
        results.update(zip(readable, self.decode([datas[i] for i in readable])))
        quarantined = []
        for i, path in enumerate(chunk.paths):
            row, res = chunk.start + i, results[i]
            if isinstance(res, BaseException):
                images[row] = 0
                quarantined.append(_quarantine(row, path, res))
            else:
                images[row] = res
        return {"chunk": chunk.index, "quarantined": quarantined}

    def close(self) -> None:
        self._reader.shutdown()
        if self.device.type == "cuda":
            self.torch.cuda.empty_cache()  # training starts next and wants the memory


# ------------------------------------------------------------------------------------------------- the build


class _Partial:
    """A build in progress, <cache folder>.partial/: decoded.npy (a row for every image of the manifest, written in
    place through a memory map) and chunks.jsonl (one line per chunk written, with the images it quarantined)."""

    def __init__(self, path: Path, shape: tuple[int, ...], chunk_size: int):
        self.path = path
        self.file = path / "decoded.npy"
        self.log = path / "chunks.jsonl"
        meta = {"version": CACHE_VERSION, "shape": list(shape), "chunk_size": chunk_size}
        if not (path / "meta.json").is_file() or json.loads((path / "meta.json").read_text()) != meta \
                or not self.file.is_file():
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
            BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn,
        )

        with Progress(TextColumn("[bold]cache[/bold] {task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True)) as bar:
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


def _pool_records(partial: _Partial, chunks: list[_Chunk], target: _Target, workers: int) -> Iterator[dict]:
    # spawn: a pool forked inside a flow run inherits the orchestrator's threads and locks (see datamodule._loader)
    pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_open_rows,
                               initargs=(str(partial.file),))
    try:
        pending = {pool.submit(_decode_in_worker, c, target) for c in chunks}
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for f in finished:
                yield f.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _local_records(partial: _Partial, chunks: list[_Chunk], target: _Target) -> Iterator[dict]:
    import cv2

    images = np.load(partial.file, mmap_mode="r+")
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)  # one process is one core, as each worker of the pool is
    try:
        for c in chunks:
            yield decode_chunk(images, c, target)
    finally:
        cv2.setNumThreads(threads)


def _gpu_records(partial: _Partial, chunks: list[_Chunk], gpu: TorchJpegDecoder) -> Iterator[dict]:
    images = np.load(partial.file, mmap_mode="r+")
    for c in chunks:
        yield gpu.decode_chunk(images, c)


def _calibrate(partial: _Partial, first: list[_Chunk], target: _Target,
               workers: int) -> tuple[list[dict], str, dict[str, Any]]:
    """Decode one chunk with nvJPEG and one on a CPU core (both written, not wasted): the faster of nvJPEG and the
    pool of `workers` cores, with the rates it was chosen on."""
    images = np.load(partial.file, mmap_mode="r+")
    gpu = TorchJpegDecoder(target)
    try:
        warm = [d for d in (_read(p, target.rules) for p in first[0].paths[:2]) if isinstance(d, bytes)]
        gpu.decode(warm)  # CUDA and nvJPEG start-up, once per process: not what the rate should compare
        records, rates = [], {}
        for chunk, (name, run) in zip(first, (("nvjpeg", lambda c: gpu.decode_chunk(images, c)),
                                              ("pillow", lambda c: decode_chunk(images, c, target)))):
            t0 = time.perf_counter()
            records.append(run(chunk))
            rates[name] = len(chunk.paths) / (time.perf_counter() - t0)
    finally:
        gpu.close()
    chosen = "nvjpeg" if rates["nvjpeg"] > rates["pillow"] * workers else "pillow"
    return records, chosen, {"nvjpeg_images_per_s": round(rates["nvjpeg"], 1),
                             "pillow_images_per_s_per_core": round(rates["pillow"], 1), "workers": workers}


def _records(partial: _Partial, chunks: list[_Chunk], target: _Target, decoder: str, workers: int,
             choice: dict[str, Any]) -> Iterator[dict]:
    """Records of the chunks written, by the decoder asked for; "auto" measures nvJPEG (when CUDA is present) and
    one CPU core on a chunk each, and goes on with the faster of nvJPEG and the pool of `workers` cores."""
    if decoder == "auto":
        decoder = "pillow"
        if nvjpeg_available() and len(chunks) >= 2:
            records, decoder, choice["calibration"] = _calibrate(partial, chunks[:2], target, workers)
            yield from records
            chunks = chunks[2:]
    choice["decoder"] = decoder
    pool = min(workers, len(chunks))
    choice["workers"] = pool if decoder == "pillow" and pool > 1 else 1  # processes that decoded
    if decoder == "nvjpeg":
        gpu = TorchJpegDecoder(target)
        try:
            yield from _gpu_records(partial, chunks, gpu)
        finally:
            gpu.close()
    elif choice["workers"] > 1:
        yield from _pool_records(partial, chunks, target, pool)
    else:
        yield from _local_records(partial, chunks, target)


def _finish(partial: _Partial, folder: Path, df, labels: np.ndarray, info: dict[str, Any], manifest: Path) -> None:
    """Move the finished build into place, the quarantined images' rows taken out."""
    quarantined = sorted((q for rec in partial.done.values() for q in rec["quarantined"]), key=lambda q: q["row"])
    keep = np.setdiff1d(np.arange(len(df)), [q["row"] for q in quarantined])
    partial.close()
    if len(keep) == 0:
        reasons = "; ".join(f"{q['path']}: {q['reason']}" for q in quarantined[:3])
        raise DataError(f"{manifest}: none of its {len(df)} images can be decoded ({reasons}...); "
                        "run `visionflow validate` again")
    if quarantined:
        decoded = np.load(partial.file, mmap_mode="r")
        images = np.lib.format.open_memmap(partial.path / "images.npy", mode="w+", dtype=np.uint8,
                                           shape=(len(keep), *decoded.shape[1:]))
        block = max(1, (64 << 20) // decoded[0].nbytes)  # 64 MB at a time: the cache is never in RAM whole
        for k in range(0, len(keep), block):
            images[k:k + block] = decoded[keep[k:k + block]]
        images.flush()
        del images, decoded
        partial.file.unlink()
    else:
        os.replace(partial.file, partial.path / "images.npy")
    label_of = df["label"].tolist()
    for q in quarantined:
        q["label"] = label_of[q["row"]]
    np.save(partial.path / "labels.npy", labels[keep])
    (partial.path / "paths.json").write_text(json.dumps(df["path"].iloc[keep].tolist()))
    (partial.path / "quarantine.json").write_text(json.dumps(
        [{k: q[k] for k in ("path", "label", "reason", "detail")} for q in quarantined], indent=1))
    (partial.path / "build.json").write_text(json.dumps({**info, "images": int(len(keep)),
                                                         "quarantined": len(quarantined)}, indent=1))
    (partial.path / "done").write_text("ok")
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(partial.path, folder)


def build_cache(manifest: Path, cache_root: Path, *, classes: list[str], image_size: int, channels: int,
                rules: DecodeRules | None = None, workers: int | None = None, decoder: str = "auto",
                chunk_size: int = CHUNK, log: logging.Logger | None = None) -> CachedSplit:
    """Decode every image of a split manifest once into cache_root/<manifest stem>-<key>/ (reused while the
    manifest, the size, the channels and the classes are the same), with every core (`workers`, default all
    this process may use) or the GPU. decoder: "auto", "pillow" (CPU) or "nvjpeg" (needs CUDA); chunk_size: images
    per unit of work (a worker's task, a GPU batch, what a resumed build skips or decodes again).

    Images that cannot be decoded are left out of the split and listed in CachedSplit.quarantined, each with a
    warning in `log`; the split's build seconds are CachedSplit.build_seconds and build.json in its folder."""
    if decoder not in DECODERS:
        raise ValueError(f"decoder {decoder!r} is not one of {DECODERS}")
    if decoder == "nvjpeg" and not nvjpeg_available():
        raise DataError("the nvjpeg decoder needs CUDA and torchvision: use decoder 'auto' or 'pillow'")
    log = log or LOG
    rules = rules or DecodeRules(max_pixels=200_000_000, max_bytes=1 << 30)
    folder = Path(cache_root) / f"{Path(manifest).stem}-{_cache_key(manifest, image_size, channels, classes)}"
    if (folder / "done").exists():
        return CachedSplit(folder)
    t0 = time.perf_counter()
    # one builder per cache folder at a time (two training processes on one machine): the second waits, then
    # finds the cache done
    with file_lock(folder.with_name(folder.name + ".lock")):
        if (folder / "done").exists():  # built by another process while this one waited
            return CachedSplit(folder)
        _build(manifest, folder, classes, _Target(image_size, channels, rules), workers or default_workers(),
               decoder, chunk_size, log)
    return CachedSplit(folder, build_seconds=round(time.perf_counter() - t0, 3))


def _build(manifest: Path, folder: Path, classes: list[str], target: _Target, workers: int, decoder: str,
           chunk_size: int, log: logging.Logger) -> None:
    # here, not at the top: the pool's workers import this module, and pandas would add half a second to each start
    from visionflow.data.validate import read_manifest

    df = read_manifest(manifest)
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(df["label"]) - set(index))
    if unknown:
        raise DataError(f"{manifest}: labels {unknown} are not among the classes {classes}")
    labels = df["label"].map(index).to_numpy(dtype=np.int64)
    paths = df["path"].tolist()
    n, size = len(paths), target.image_size
    partial = _Partial(folder.with_name(folder.name + ".partial"), (n, size, size, target.channels), chunk_size)
    chunks = [_Chunk(k, s, tuple(paths[s:s + chunk_size])) for k, s in enumerate(range(0, n, chunk_size))]
    todo = [c for c in chunks if c.index not in partial.done]
    already = sum(len(c.paths) for c in chunks if c.index in partial.done)
    name = Path(manifest).name
    log.info("cache %s: decoding %d images at %d px (%d core(s)%s)%s", name, n - already, size, workers,
             ", or the GPU if faster" if decoder == "auto" and nvjpeg_available() else "",
             f"; resuming a build stopped after {already} of {n}" if already else "")
    t0 = time.perf_counter()
    choice: dict[str, Any] = {}
    with _progress(name, n, already, log) as advance:
        for rec in _records(partial, todo, target, decoder, workers, choice):
            partial.record(rec)
            advance(len(chunks[rec["chunk"]].paths))
    seconds = time.perf_counter() - t0
    info = {"seconds": round(seconds, 3), "decoded": n - already, "resumed_from": already,
            "images_per_s": round((n - already) / seconds, 1) if seconds > 0 else None,
            "image_size": size, "channels": target.channels, **choice}
    _finish(partial, folder, df, labels, info, manifest)
    quarantined = json.loads((folder / "quarantine.json").read_text())
    for q in quarantined[:20]:
        log.warning("cache %s: left out %s (%s: %s)", name, q["path"], q["reason"], q["detail"])
    if len(quarantined) > 20:
        log.warning("cache %s: ... and %d more left out (all in %s)", name, len(quarantined) - 20,
                    folder / "quarantine.json")
    log.info("cache %s: %d images in %.1f s (%s images/s, %s)%s", name, n - already, seconds,
             info["images_per_s"], info["decoder"],
             f"; {len(quarantined)} quarantined and left out of the split" if quarantined else "")
