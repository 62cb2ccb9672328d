"""The cache build's decoders: a chunk of images decoded into its rows of the memory-mapped cache file, on a CPU
core (a process pool of them) or in batches on the GPU (nvJPEG), and the choice between them."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, ThreadPoolExecutor, wait
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from visionflow.data.imageio import DecodeRules, RejectedImage, decode_for_model, open_checked, read_limited
from visionflow.data.pools import pool_worker_setup

# Any two decode paths (the DCT-scaled decode, the full decode, nvJPEG) give the same image within these, in uint8
# levels: each filters and rounds a little differently while shrinking a photo (tests/unit/test_cache.py).
TOLERANCE_MEAN = 1.5  # mean absolute difference over an image (measured: up to 0.6)
TOLERANCE_P99 = 5  # 99th percentile of the absolute difference (measured: up to 2; the largest are at sharp edges)
DECODERS = ("auto", "pillow", "nvjpeg")


@dataclass(frozen=True)
class Chunk:
    index: int
    start: int  # row of its first image
    paths: tuple[str, ...]


@dataclass(frozen=True)
class Target:
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


def decode_chunk(images: np.ndarray, chunk: Chunk, target: Target) -> dict[str, Any]:
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


def _decode_in_worker(chunk: Chunk, target: Target) -> dict[str, Any]:
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

    def __init__(self, target: Target, device: str = "cuda"):
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
            x = self.torch.nn.functional.interpolate(
                x,
                size=(size, size),
                mode="area" if shrink else "bilinear",
                **({} if shrink else {"align_corners": False}),
            )
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
            decoded = self.tvio.decode_jpeg(
                [torch.frombuffer(bytearray(datas[i]), dtype=torch.uint8) for i in batch], mode=mode, device=self.device
            )
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

    def decode_chunk(self, images: np.ndarray, chunk: Chunk) -> dict[str, Any]:
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


def _pool_records(file: Path, chunks: list[Chunk], target: Target, workers: int) -> Iterator[dict]:
    # spawn: a pool forked inside a flow run inherits the orchestrator's threads and locks (see datamodule._loader)
    pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_open_rows, initargs=(str(file),))
    try:
        pending = {pool.submit(_decode_in_worker, c, target) for c in chunks}
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for f in finished:
                yield f.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _local_records(file: Path, chunks: list[Chunk], target: Target) -> Iterator[dict]:
    import cv2

    images = np.load(file, mmap_mode="r+")
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)  # one process is one core, as each worker of the pool is
    try:
        for c in chunks:
            yield decode_chunk(images, c, target)
    finally:
        cv2.setNumThreads(threads)


def _gpu_records(file: Path, chunks: list[Chunk], gpu: TorchJpegDecoder) -> Iterator[dict]:
    images = np.load(file, mmap_mode="r+")
    for c in chunks:
        yield gpu.decode_chunk(images, c)


def _calibrate(file: Path, first: list[Chunk], target: Target, workers: int) -> tuple[list[dict], str, dict[str, Any]]:
    """Decode one chunk with nvJPEG and one on a CPU core (both written, not wasted): the faster of nvJPEG and the
    pool of `workers` cores, with the rates it was chosen on."""
    images = np.load(file, mmap_mode="r+")
    gpu = TorchJpegDecoder(target)
    try:
        warm = [d for d in (_read(p, target.rules) for p in first[0].paths[:2]) if isinstance(d, bytes)]
        gpu.decode(warm)  # CUDA and nvJPEG start-up, once per process: not what the rate should compare
        records, rates = [], {}
        for chunk, (name, run) in zip(
            first,
            (("nvjpeg", lambda c: gpu.decode_chunk(images, c)), ("pillow", lambda c: decode_chunk(images, c, target))),
        ):
            t0 = time.perf_counter()
            records.append(run(chunk))
            rates[name] = len(chunk.paths) / (time.perf_counter() - t0)
    finally:
        gpu.close()
    chosen = "nvjpeg" if rates["nvjpeg"] > rates["pillow"] * workers else "pillow"
    return (
        records,
        chosen,
        {
            "nvjpeg_images_per_s": round(rates["nvjpeg"], 1),
            "pillow_images_per_s_per_core": round(rates["pillow"], 1),
            "workers": workers,
        },
    )


def decode_records(
    file: Path, chunks: list[Chunk], target: Target, decoder: str, workers: int, choice: dict[str, Any]
) -> Iterator[dict]:
    """Records of the chunks written, by the decoder asked for; "auto" measures nvJPEG (when CUDA is present) and
    one CPU core on a chunk each, and goes on with the faster of nvJPEG and the pool of `workers` cores."""
    if decoder == "auto":
        decoder = "pillow"
        if nvjpeg_available() and len(chunks) >= 2:
            records, decoder, choice["calibration"] = _calibrate(file, chunks[:2], target, workers)
            yield from records
            chunks = chunks[2:]
    choice["decoder"] = decoder
    pool = min(workers, len(chunks))
    choice["workers"] = pool if decoder == "pillow" and pool > 1 else 1  # processes that decoded
    if decoder == "nvjpeg":
        gpu = TorchJpegDecoder(target)
        try:
            yield from _gpu_records(file, chunks, gpu)
        finally:
            gpu.close()
    elif choice["workers"] > 1:
        yield from _pool_records(file, chunks, target, pool)
    else:
        yield from _local_records(file, chunks, target)
