"""Data tier: camera-like photos made from the bundled Fashion-MNIST (data.source: fashion-mnist-photos)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visionflow.data import photos
from visionflow.data.fashion_mnist import FASHION_MNIST_CLASSES, load_fashion_mnist, locate_fashion_mnist
from visionflow.data.imageio import DecodeRules, open_guarded, to_array
from visionflow.data.ingest import ingest

RULES = DecodeRules.accepted()
SMALL = (((1280, 960), 0.8), ((960, 1280), 0.2))  # camera-size, but the cheapest of them


@pytest.fixture(scope="module")
def fmnist(tmp_path_factory) -> tuple[np.ndarray, np.ndarray]:
    return load_fashion_mnist(locate_fashion_mnist(tmp_path_factory.mktemp("fm")))


def test_specs_cover_every_kind_size_and_quality():
    specs = [photos.photo_spec(0, i, i % 10) for i in range(3000)]
    assert {s.kind for s in specs} == {"jpeg", "exif", "cmyk", "png16"}
    assert {(s.width, s.height) for s in specs} == {wh for wh, _ in photos.SIZES}
    assert min(s.width * s.height for s in specs) >= 1280 * 960
    assert {s.quality for s in specs} == set(range(75, 96))
    assert {s.orientation for s in specs if s.kind == "exif"} == {3, 6, 8}
    assert all(s.orientation == 1 for s in specs if s.kind != "exif")
    assert max(s.width * s.height for s in specs if s.kind == "png16") <= photos.PNG16_MAX_PIXELS
    assert specs == [photos.photo_spec(0, i, i % 10) for i in range(3000)]  # a function of (seed, item) alone
    assert specs != [photos.photo_spec(1, i, i % 10) for i in range(3000)]


@pytest.mark.parametrize(
    "kind,orientation", [("jpeg", 1), ("exif", 3), ("exif", 6), ("exif", 8), ("cmyk", 1), ("png16", 1)]
)
def test_each_kind_is_stored_as_a_camera_would_and_reads_back_upright(fmnist, kind, orientation):
    images, labels = fmnist
    item = 4321
    spec = photos.PhotoSpec(
        item=item, label=int(labels[item]), width=1280, height=960, kind=kind, quality=80, orientation=orientation
    )
    data = photos.make_photo(spec, images[item], seed=3)
    img = Image.open(io.BytesIO(data))
    turned = orientation in (6, 8)
    assert img.size == ((960, 1280) if turned else (1280, 960))  # stored as the sensor read it
    assert img.format == ("PNG" if kind == "png16" else "JPEG")
    assert img.getexif().get(0x0112, 1) == orientation
    if kind == "cmyk":
        assert img.mode == "CMYK"
    if kind == "png16":
        assert data[24] == 16  # IHDR bit depth: 16 bits per sample
    upright = (photos.render_photo(spec, images[item], seed=3) * 255).round()
    got = to_array(open_guarded(data, RULES), channels=3).astype(np.float64)
    assert got.shape == (960, 1280, 3)  # the orientation applied gives the upright photo
    # what the encoder lost of the sensor noise at quality 80; the photo turned half a turn is much further away
    assert np.abs(got - upright).mean() < 6 < 3 * 6 < np.abs(got - upright[::-1, ::-1]).mean()


def test_photos_have_sensor_noise_and_uneven_light(fmnist):
    images, labels = fmnist
    for item in (0, 17, 30001, 69999):
        spec = photos.PhotoSpec(
            item=item, label=int(labels[item]), width=1280, height=960, kind="jpeg", quality=90, orientation=1
        )
        scene = photos.render_photo(spec, images[item], seed=0)
        grey = scene.mean(axis=2)
        # sensor noise: neighbouring pixels differ even where the scene is smooth
        assert np.abs(np.diff(grey, axis=1)).mean() > 0.002
        # uneven light: the brightest and darkest quarters of the frame differ
        quarters = [grey[:480, :640].mean(), grey[:480, 640:].mean(), grey[480:, :640].mean(), grey[480:, 640:].mean()]
        assert max(quarters) - min(quarters) > 0.01


def test_generation_is_the_same_bytes_with_one_process_or_a_pool(fmnist, tmp_path):
    images, labels = fmnist
    chosen = [5, 70, 900, 12345, 40000, 69000]
    classes = list(FASHION_MNIST_CLASSES)
    a = photos.write_photos(tmp_path / "a", images, labels, chosen, classes, seed=7, sizes=SMALL, workers=1)
    b = photos.write_photos(tmp_path / "b", images, labels, chosen, classes, seed=7, sizes=SMALL, workers=2)
    assert a == b and sum(a.values()) == len(chosen)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == len(chosen)
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
        item = int(rel.stem.removeprefix("photo_"))
        assert rel.parts[0] == classes[int(labels[item])]  # the label is the item's real class
    photos.write_photos(tmp_path / "c", images, labels, chosen[:1], classes, seed=8, sizes=SMALL, workers=1)
    other = next((tmp_path / "c").rglob("photo_*"))
    assert other.read_bytes() != (tmp_path / "a" / other.relative_to(tmp_path / "c")).read_bytes()


def test_ingest_makes_the_photo_source(tmp_path):
    res = ingest(
        source=photos.PHOTOS_SOURCE, raw_dir=tmp_path / "raw", max_images=10, seed=0, cache_dir=tmp_path / "cache"
    )
    assert res.n_images == 10 and set(res.classes) == set(FASHION_MNIST_CLASSES)
    assert set(res.classes.values()) == {1}
    files = sorted(Path(tmp_path / "raw").rglob("photo_*"))
    assert len(files) == 10
    for f in files:
        with Image.open(f) as im:
            assert im.format in ("JPEG", "PNG") and im.width * im.height >= 1280 * 960
    again = ingest(
        source=photos.PHOTOS_SOURCE, raw_dir=tmp_path / "raw", max_images=10, seed=0, cache_dir=tmp_path / "cache"
    )
    assert again.skipped
