"""The decode-once cache on camera-size photos: decode paths that agree, a process pool, quarantine instead of a failed
build, and a build killed half-way that continues where it stopped. A few dozen photos, so seconds on 2 cores."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from visionflow.data import photos
from visionflow.data.cache import build_cache
from visionflow.data.cache_decode import (
    TOLERANCE_MEAN,
    TOLERANCE_P99,
    Chunk,
    Target,
    TorchJpegDecoder,
    nvjpeg_available,
)
from visionflow.data.imageio import DecodeRules, decode_for_model

CLASSES = ["bag", "coat", "shoe"]
RULES = DecodeRules.accepted()
# (kind, width, height, orientation): mostly plain 1280x960 JPEGs, and every way a camera or an editor stores one
LAYOUT = (
    [("jpeg", 1280, 960, 1)] * 12
    + [("jpeg", 960, 1280, 1), ("jpeg", 1600, 1200, 1)]
    + [("exif", 1280, 960, o) for o in (3, 6, 8)]
    + [("cmyk", 1280, 960, 1)] * 2
    + [("png16", 1280, 960, 1)] * 2
)


def _item(rng: np.random.Generator, label: int) -> np.ndarray:
    """A Fashion-MNIST-like 28 px item: a bright shape per class on black (no dataset needed in the unit tier)."""
    yy, xx = np.mgrid[0:28, 0:28]
    shape = [(abs(yy - 14) < 10) & (abs(xx - 14) < 6), (yy - 14) ** 2 + (xx - 14) ** 2 < 90, (yy > 14) & (xx > 4)]
    return np.clip(shape[label] * rng.uniform(120, 230) + rng.normal(0, 12, (28, 28)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def camera(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("camera")
    rng = np.random.default_rng(0)
    rows = []
    for i, (kind, w, h, orientation) in enumerate(LAYOUT):
        label = i % len(CLASSES)
        spec = photos.PhotoSpec(
            item=i, label=label, width=w, height=h, kind=kind, quality=75 + i % 21, orientation=orientation
        )
        path = root / CLASSES[label] / photos.photo_name(spec)
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(photos.make_photo(spec, _item(rng, label), seed=0))
        rows.append({"path": str(path), "label": CLASSES[label]})
    manifest = root / "train.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    reference = build_cache(manifest, root / "reference", classes=CLASSES, image_size=224, channels=3, workers=1)
    return {"root": root, "manifest": manifest, "rows": rows, "reference": reference}


def _bad_photos(camera: dict, folder: Path) -> dict[str, Path]:
    """A truncated JPEG, and a JPEG whose header says 30,000 x 30,000 (the decompression-bomb case)."""
    data = Path(camera["rows"][0]["path"]).read_bytes()
    folder.mkdir(parents=True, exist_ok=True)
    truncated = folder / "truncated.jpg"
    truncated.write_bytes(data[: len(data) // 2])
    sof = data.index(b"\xff\xc0")  # baseline frame header: length(2) precision(1) height(2) width(2)
    huge = folder / "huge.jpg"
    huge.write_bytes(data[: sof + 5] + (30000).to_bytes(2, "big") * 2 + data[sof + 9 :])
    return {"truncated": truncated, "huge": huge}


def _diff(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    d = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return float(d.mean()), float(np.percentile(d, 99))


@pytest.mark.parametrize("channels", [3, 1])
def test_decode_paths_give_the_same_pixels_within_the_stated_tolerance(camera, channels):
    datas = [Path(r["path"]).read_bytes() for r in camera["rows"]]
    target = Target(224, channels, RULES)
    batched = TorchJpegDecoder(target, device="cpu")  # the nvJPEG path's code, on torchvision's CPU decoder
    taken = [batched._takes(d) for d in datas]
    assert sum(taken) == 14  # the plain JPEGs; EXIF-turned, CMYK and PNG go the CPU way
    via_batch = batched.decode(datas)
    for data, batch_pixels in zip(datas, via_batch):
        draft = decode_for_model(data, 224, channels, RULES)
        full = decode_for_model(data, 224, channels, RULES, draft=False)
        assert draft.shape == full.shape == batch_pixels.shape == (224, 224, channels)
        for other in (full, batch_pixels):
            mean, p99 = _diff(draft, other)
            assert mean <= TOLERANCE_MEAN and p99 <= TOLERANCE_P99, (mean, p99)


def test_a_pool_builds_the_same_cache_as_one_process_without_holding_it_in_ram(camera, tmp_path, caplog):
    ref = camera["reference"]
    with caplog.at_level(logging.INFO, logger="visionflow.data.cache"):
        split = build_cache(
            camera["manifest"], tmp_path, classes=CLASSES, image_size=224, channels=3, workers=2, chunk_size=4
        )
    assert isinstance(split.images, np.memmap) and split.images.shape == (len(LAYOUT), 224, 224, 3)
    assert np.array_equal(np.asarray(split.images), np.asarray(ref.images))
    assert split.labels.tolist() == ref.labels.tolist() and split.paths == ref.paths
    info = split.build_info
    assert info["workers"] == 2 and info["decoder"] == "pillow" and info["images"] == len(LAYOUT)
    assert info["seconds"] > 0 and split.build_seconds >= info["seconds"] and split.quarantined == []
    # not a terminal: progress is log lines, with the rate at the end
    lines = [r.getMessage() for r in caplog.records]
    assert any(f"/{len(LAYOUT)} images (" in m for m in lines), lines
    assert any(m.startswith(f"cache train.csv: {len(LAYOUT)} images in") for m in lines), lines
    again = build_cache(camera["manifest"], tmp_path, classes=CLASSES, image_size=224, channels=3, workers=2)
    assert again.build_seconds == 0.0 and again.build_info == info  # reused, and says how it was built


def test_a_truncated_and_a_30000_px_photo_are_quarantined_not_fatal(camera, tmp_path, caplog):
    bad = _bad_photos(camera, tmp_path / "bad")
    rows = list(camera["rows"])
    rows.insert(7, {"path": str(bad["truncated"]), "label": "coat"})
    rows.insert(15, {"path": str(bad["huge"]), "label": "bag"})
    rows.insert(20, {"path": str(tmp_path / "gone.jpg"), "label": "shoe"})  # deleted since validation
    manifest = tmp_path / "train.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    with caplog.at_level(logging.INFO, logger="visionflow.data.cache"):
        split = build_cache(
            manifest, tmp_path / "cache", classes=CLASSES, image_size=224, channels=3, workers=2, chunk_size=5
        )
    reasons = {Path(q["path"]).name: q["reason"] for q in split.quarantined}
    assert reasons == {"truncated.jpg": "corrupt_data", "huge.jpg": "too_many_pixels", "gone.jpg": "unreadable_file"}
    assert all(q["detail"] and q["label"] for q in split.quarantined)
    # the split the training reads has the good images only, in order, with their own pixels and labels
    ref = camera["reference"]
    assert split.paths == ref.paths and split.labels.tolist() == ref.labels.tolist()
    assert np.array_equal(np.asarray(split.images), np.asarray(ref.images))
    assert split.build_info["quarantined"] == 3
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("left out" in m for m in warned) == 3 and any("truncated.jpg (corrupt_data" in m for m in warned)
    # the batched (nvJPEG) path sends what it cannot trust to the CPU decoder, which gives the same reasons
    batched = TorchJpegDecoder(Target(224, 3, RULES), device="cpu")
    out = np.zeros((17, 224, 224, 3), np.uint8)  # manifest rows 5-21: the three bad ones and reference rows 5-18
    record = batched.decode_chunk(out, Chunk(0, 0, tuple(r["path"] for r in rows[5:22])))
    assert {Path(q["path"]).name: q["reason"] for q in record["quarantined"]} == reasons
    good = [r for r in range(len(out)) if r not in {q["row"] for q in record["quarantined"]}]
    assert len(good) == 14
    for got, want in zip(out[good], ref.images[5:19]):
        mean, p99 = _diff(got, want)
        assert mean <= TOLERANCE_MEAN and p99 <= TOLERANCE_P99, (mean, p99)


CHILD = """
import sys, time
from pathlib import Path
import visionflow.data.cache as cache
import visionflow.data.cache_decode as cache_decode

real = cache_decode.decode_chunk
def slowed(*args, **kwargs):  # the real decode, slowed so the parent can kill the build half-way, mid-chunk
    out = real(*args, **kwargs)
    time.sleep(0.2)
    return out
cache_decode.decode_chunk = slowed
cache.build_cache(Path(sys.argv[1]), Path(sys.argv[2]), classes={classes!r}, image_size=224, channels=3,
                  workers=1, chunk_size=2)
"""


def test_a_build_killed_half_way_continues_where_it_stopped(camera, tmp_path):
    cache_dir = tmp_path / "cache"
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(CHILD).format(classes=CLASSES), str(camera["manifest"]), str(cache_dir)],
        env=dict(os.environ),
    )
    n_chunks = len(LAYOUT) // 2
    deadline = time.monotonic() + 600  # a generous bound for a very busy machine; the build takes seconds
    written = 0
    while time.monotonic() < deadline and child.poll() is None:
        logs = list(cache_dir.glob("*.partial/chunks.jsonl"))
        written = len(logs[0].read_text().splitlines()) if logs else 0
        if written >= n_chunks // 2:
            break
        time.sleep(0.01)
    assert child.poll() is None, f"the build ended before it could be killed ({written} chunks written)"
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=30)
    partial = next(cache_dir.glob("*.partial"))
    assert not list(cache_dir.glob("*/done"))  # killed: nothing finished
    done_before = len((partial / "chunks.jsonl").read_text().splitlines())
    assert n_chunks // 2 <= done_before < n_chunks

    split = build_cache(
        camera["manifest"], cache_dir, classes=CLASSES, image_size=224, channels=3, workers=1, chunk_size=2
    )
    assert split.build_info["resumed_from"] >= 2 * done_before  # the chunks written before the kill were kept
    assert split.build_info["decoded"] == len(LAYOUT) - split.build_info["resumed_from"]
    assert np.array_equal(np.asarray(split.images), np.asarray(camera["reference"].images))
    assert not partial.exists()


@pytest.mark.skipif(not nvjpeg_available(), reason="needs CUDA (nvJPEG)")
def test_nvjpeg_build_matches_the_cpu_build(camera, tmp_path):
    bad = _bad_photos(camera, tmp_path / "bad")
    rows = [
        *camera["rows"][:5],
        {"path": str(bad["truncated"]), "label": "coat"},
        {"path": str(bad["huge"]), "label": "bag"},
        *camera["rows"][5:],
    ]
    manifest = tmp_path / "train.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    for channels in (3, 1):
        gpu = build_cache(
            manifest,
            tmp_path / f"gpu{channels}",
            classes=CLASSES,
            image_size=224,
            channels=channels,
            decoder="nvjpeg",
            chunk_size=8,
        )
        cpu = build_cache(
            manifest,
            tmp_path / f"cpu{channels}",
            classes=CLASSES,
            image_size=224,
            channels=channels,
            decoder="pillow",
            workers=1,
        )
        assert gpu.build_info["decoder"] == "nvjpeg" and gpu.paths == cpu.paths
        assert [q["reason"] for q in gpu.quarantined] == [q["reason"] for q in cpu.quarantined]
        for a, b in zip(gpu.images, cpu.images):
            mean, p99 = _diff(a, b)
            assert mean <= TOLERANCE_MEAN and p99 <= TOLERANCE_P99, (mean, p99)
    auto = build_cache(manifest, tmp_path / "auto", classes=CLASSES, image_size=224, channels=3, chunk_size=8)
    assert auto.build_info["decoder"] in ("nvjpeg", "pillow") and "calibration" in auto.build_info


def test_a_split_with_no_decodable_image_is_one_clear_error(camera, tmp_path):
    from visionflow.errors import DataError

    bad = _bad_photos(camera, tmp_path / "bad")
    manifest = tmp_path / "val.csv"
    pd.DataFrame([{"path": str(bad["truncated"]), "label": "coat"}, {"path": str(bad["huge"]), "label": "bag"}]).to_csv(
        manifest, index=False
    )
    with pytest.raises(DataError, match="none of its 2 images can be decoded .*corrupt_data"):
        build_cache(manifest, tmp_path / "cache", classes=CLASSES, image_size=224, channels=3)
