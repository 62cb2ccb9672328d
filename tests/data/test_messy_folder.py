"""The issue's acceptance case: 1,000 good images plus broken and unusual ones through the real stages."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from tests.helpers import make_folder_dataset, png_header_only
from visionflow.config import ValidateParams
from visionflow.data.ingest import ingest
from visionflow.data.split import split
from visionflow.data.validate import read_manifest, validate

BROKEN = {
    "truncated.png": "corrupt_data",
    "zero.jpg": "empty_file",
    "random.jpg": "not_an_image",
    "tiny_1x1.png": "width_out_of_bounds",
    "bomb_50000.png": "too_many_pixels",
}


def _png_bytes(img):
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
    root = tmp_path_factory.mktemp("messy")
    src = make_folder_dataset(root / "src", classes=("boot", "coat", "shirt", "bag"), per_class=250, size=24)
    rng = np.random.default_rng(0)
    good = _png_bytes(Image.fromarray(rng.integers(0, 255, (24, 24), dtype=np.uint8)))
    broken = {
        "truncated.png": good[: len(good) // 2],
        "zero.jpg": b"",
        "random.jpg": rng.bytes(5000),
        "tiny_1x1.png": _png_bytes(Image.new("L", (1, 1), 3)),
        "bomb_50000.png": png_header_only(50_000, 50_000),
    }
    for name, data in broken.items():
        (src / "coat" / name).write_bytes(data)
    rgb = Image.fromarray(rng.integers(0, 255, (30, 30, 3), dtype=np.uint8))
    rgb.convert("CMYK").save(src / "bag" / "cmyk.jpg", "JPEG")
    Image.fromarray(rng.integers(0, 65535, (30, 30), dtype=np.uint16)).save(src / "bag" / "deep16.png")
    rgb.convert("P").save(src / "bag" / "palette.png")
    rgb.convert("RGBA").save(src / "bag" / "rgba.png")
    raw = root / "raw"
    res = ingest(source=str(src), raw_dir=raw, max_images=None, seed=0, cache_dir=root / "cache")
    cfg = ValidateParams(
        quarantine_dir=root / "quarantine",
        report_dir=root / "reports",
        max_quarantine_fraction=0.05,
        min_width=8,
        min_height=8,
    )
    vres = validate(raw_dir=raw, cfg=cfg, manifest_path=root / "manifest.csv", workers=2)
    return root, res, vres


def test_counts_add_up(messy):
    root, ingested, vres = messy
    assert ingested.n_images == 1000 + len(BROKEN) + 4
    assert vres.n_images == ingested.n_images
    assert vres.n_accepted + vres.n_quarantined == vres.n_images
    assert vres.n_quarantined == len(BROKEN)
    assert sum(vres.quarantined_by_reason.values()) == len(BROKEN)


def test_every_broken_file_quarantined_with_reason(messy):
    root, _, _ = messy
    reasons = read_manifest(root / "quarantine" / "reasons.csv")
    got = {p.split("/")[-1]: r for p, r in zip(reasons["original_path"], reasons["reason"])}
    assert got == BROKEN
    for row in reasons.itertuples():
        assert (root / "quarantine" / row.label / row.original_path.split("/")[-1]).exists()
    # Nothing lost: the raw copies are still there.
    for name in BROKEN:
        assert (root / "raw" / "coat" / name).exists()


def test_unusual_valid_images_are_kept(messy):
    root, _, _ = messy
    manifest = read_manifest(root / "manifest.csv")
    kept = set(manifest["path"].map(lambda p: p.split("/")[-1]))
    assert {"cmyk.jpg", "deep16.png", "palette.png", "rgba.png"} <= kept
    modes = dict(zip(manifest["path"].map(lambda p: p.split("/")[-1]), manifest["mode"]))
    assert modes["cmyk.jpg"] == "CMYK" and modes["palette.png"] == "P" and modes["rgba.png"] == "RGBA"


def test_report_written(messy):
    root, _, _ = messy
    summary = json.loads((root / "reports" / "validation.json").read_text())
    assert summary["success"] is True and summary["n_quarantined"] == len(BROKEN)
    html = (root / "reports" / "index.html").read_text()
    assert "PASSED" in html and "bomb_50000.png" in html


def test_split_of_accepted_images_is_leak_free(messy):
    root, _, vres = messy
    res = split(
        manifest_path=root / "manifest.csv", out_dir=root / "splits", val_fraction=0.1, test_fraction=0.2, seed=3
    )
    assert sum(res.counts.values()) == vres.n_accepted
    shas = [set(read_manifest(p)["sha256"]) for p in res.paths.values()]
    assert not (shas[0] & shas[1] or shas[0] & shas[2] or shas[1] & shas[2])
