"""Validate and drift per image (issue 21, items 10 and 15): an image whose decoding raises anything is quarantined
or listed as unreadable, never a crash of the stage; a drift batch may be a folder per class (labels from the
folder names), images/ + labels.csv, or a flat folder.

The drift checks run a real ONNX Runtime session on a tiny hand-built graph with the exported model's interface
(uint8 NCHW `image` in, `logits` and `embedding` out)."""

from __future__ import annotations

import io
import random
import struct
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, TiffTags

from tests.helpers import make_folder_dataset, make_image, tiny_onnx_champion
from visionflow.config import Params, ValidateParams
from visionflow.data.imageio import DecodeRules
from visionflow.data.validate import read_manifest, validate
from visionflow.monitoring.drift import check
from visionflow.monitoring.drift_features import batch_features, extract

SIZE, CLASSES = 16, ["cat", "dog", "fox"]
# TIFF tags whose type is fixed to a number: an ASCII value filed under one of them cannot be written back.
NUMERIC_TAGS = sorted(t for t, info in TiffTags.TAGS_V2.items() if info.type in (3, 4, 5) and t != 0x0112)


def corrupt_exif_jpegs(n: int, seed: int) -> list[bytes]:
    """Valid JPEGs whose EXIF files a text value under a numeric tag. Pillow decodes the pixels, then raises
    struct.error, TypeError or ValueError while rotating by the EXIF orientation (it re-serialises the EXIF)."""
    r = random.Random(seed)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        img = Image.fromarray(rng.integers(0, 255, (SIZE + r.randrange(8), SIZE, 3), dtype=np.uint8))
        exif = Image.Exif()
        exif[0x0112] = r.randint(2, 8)  # any orientation that needs a transpose
        exif[0x010F] = "x" * r.randint(1, 20)
        buf = io.BytesIO()
        img.save(buf, "JPEG", exif=exif.tobytes())
        data = bytearray(buf.getvalue())
        k = data.index(b"\x01\x0f\x00\x02")  # the Make tag (ASCII), big-endian as Pillow writes it
        data[k : k + 2] = struct.pack(">H", r.choice(NUMERIC_TAGS))
        out.append(bytes(data))
    return out


def test_the_fuzzed_files_are_what_the_issue_describes():
    """Today's Pillow reads them as images and fails only on the EXIF step, with the exception types named."""
    from PIL import ImageOps

    raised = set()
    for data in corrupt_exif_jpegs(30, seed=0):
        img = Image.open(io.BytesIO(data))
        img.load()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                ImageOps.exif_transpose(img)
            except Exception as exc:  # noqa: BLE001 - recording which types escape
                raised.add(type(exc).__name__)
    assert raised and raised <= {"error", "TypeError", "ValueError", "SyntaxError"}


# --- validate ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2])
def test_validate_never_crashes_on_a_corrupt_exif_image(tmp_path, workers):
    raw = make_folder_dataset(tmp_path / "raw", classes=tuple(CLASSES), per_class=12, size=SIZE)
    bad = {}
    for i, data in enumerate(corrupt_exif_jpegs(8, seed=workers)):
        path = raw / CLASSES[i % 3] / f"exif_{i}.jpg"
        path.write_bytes(data)
        bad[str(path)] = data
    cfg = ValidateParams(
        quarantine_dir=tmp_path / "q",
        report_dir=tmp_path / "reports",
        max_quarantine_fraction=0.5,
        min_width=8,
        min_height=8,
    )
    res = validate(raw_dir=raw, cfg=cfg, manifest_path=tmp_path / "manifest.csv", workers=workers)
    assert res.n_images == 36 + 8
    accepted = set(read_manifest(tmp_path / "manifest.csv")["path"])
    reasons = read_manifest(tmp_path / "q" / "reasons.csv")
    quarantined = dict(zip(reasons["original_path"], reasons["reason"]))
    for path in bad:  # each one either decoded (without its EXIF) or quarantined with a reason
        assert (path in accepted) != (path in quarantined), path
        assert quarantined.get(path, "decode_failed") == "decode_failed"
    assert res.n_accepted + res.n_quarantined == res.n_images


# --- drift -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def champion(tmp_path_factory):
    return tiny_onnx_champion(tmp_path_factory.mktemp("model") / "tiny.onnx", CLASSES, SIZE)


def _params() -> Params:
    p = Params()
    return p.model_copy(update={"drift": p.drift.model_copy(update={"min_batch_size": 5, "reference_size": 50})})


def test_drift_extract_lists_corrupt_exif_images_instead_of_crashing(tmp_path, champion):
    _, session, card = champion
    good = make_folder_dataset(tmp_path / "b", classes=("x",), per_class=6, size=SIZE, fmt="JPEG") / "x"
    files = sorted(good.iterdir())
    for i, data in enumerate(corrupt_exif_jpegs(6, seed=7)):
        (good / f"exif_{i}.jpg").write_bytes(data)
        files.append(good / f"exif_{i}.jpg")
    feats = extract(files, session, card, DecodeRules.from_params(_params().validation))
    assert len(feats.frame) + len(feats.rejected) == 12 and len(feats.frame) >= 6
    assert all(r["reason"] == "decode_failed" and r["detail"] for r in feats.rejected)


def _batch_layouts(root: Path, rng: np.random.Generator) -> dict[str, tuple[Path, list[str]]]:
    """The same 3 x 4 labelled images in each layout a user may bring, plus a flat unlabelled one."""
    items = [(c, make_image(rng, i, SIZE, "RGB")) for i, c in enumerate(CLASSES) for _ in range(4)]
    layouts = {}
    per_class = root / "per_class"
    for k, (c, img) in enumerate(items):
        (per_class / c / "sub").mkdir(parents=True, exist_ok=True)
        img.save(per_class / c / ("sub" if k % 4 == 0 else "") / f"{k}.png")  # nested folders count too
    layouts["per_class"] = (per_class, [c for c, _ in items])
    labelled = root / "labelled"
    (labelled / "images").mkdir(parents=True)
    for k, (_, img) in enumerate(items):
        img.save(labelled / "images" / f"{k}.png")
    pd.DataFrame({"file": [f"{k}.png" for k in range(len(items))], "label": [c for c, _ in items]}).to_csv(
        labelled / "labels.csv", index=False
    )
    layouts["labelled"] = (labelled, [c for c, _ in items])
    flat = root / "flat"
    flat.mkdir()
    for k, (_, img) in enumerate(items):
        img.save(flat / f"{k}.png")
    layouts["flat"] = (flat, [])
    return layouts


def test_drift_batch_accepts_every_layout(tmp_path, champion):
    _, session, card = champion
    p = _params()
    for name, (folder, labels) in _batch_layouts(tmp_path, np.random.default_rng(1)).items():
        feats, source = batch_features(p, tmp_path, folder, session, card)
        assert len(feats.frame) == 12, name
        assert sorted(feats.labels or []) == sorted(labels), name


def test_drift_check_of_a_folder_per_class_batch_with_a_corrupt_image(tmp_path, champion):
    """The whole check, as `visionflow drift <folder>` runs it: a verdict, accuracy from the folder names, and the
    corrupt-EXIF image listed as unreadable (or checked) rather than a crash."""
    p = _params()
    ref = make_folder_dataset(tmp_path / "ref", classes=tuple(CLASSES), per_class=20, size=SIZE, fmt="JPEG")
    rows = [{"path": str(f), "label": f.parent.name, "sha256": f.name} for f in sorted(ref.rglob("*.jpg"))]
    (tmp_path / p.data.splits_dir).mkdir(parents=True)
    pd.DataFrame(rows).to_csv(tmp_path / p.data.splits_dir / "test.csv", index=False)
    batch = make_folder_dataset(tmp_path / "batch", classes=tuple(CLASSES), per_class=8, size=SIZE, fmt="JPEG", seed=3)
    (batch / "dog" / "broken_exif.jpg").write_bytes(corrupt_exif_jpegs(1, seed=11)[0])
    verdict = check(p, tmp_path, batch=batch, log_to_mlflow=False, html=False, champion=champion)
    assert verdict["status"] == "ok" and verdict["drifted"] in (True, False)
    assert verdict["n_images"] == 25 and verdict["n_checked"] + verdict["n_unreadable"] == 25
    assert verdict["accuracy"] is not None
    assert all(u["reason"] == "decode_failed" for u in verdict["unreadable"])


def test_validate_holds_a_raw_folder_to_the_class_name_rule(tmp_path):
    """A raw folder made before ingest checked names (an older data version, or made by hand)."""
    from visionflow.errors import DataError

    raw = make_folder_dataset(tmp_path / "raw", classes=("cat", "dog"), per_class=3, size=SIZE)
    (raw / "cat").rename(raw / 'cat" onmouseover="alert(1)')
    cfg = ValidateParams(
        quarantine_dir=tmp_path / "q",
        report_dir=tmp_path / "reports",
        min_images_per_class=1,
        min_width=8,
        min_height=8,
    )
    with pytest.raises(DataError, match="not allowed"):
        validate(raw_dir=raw, cfg=cfg, manifest_path=tmp_path / "manifest.csv", workers=1)
    assert not (tmp_path / "manifest.csv").exists()
