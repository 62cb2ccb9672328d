"""Pieces of the closed loop that need no model: shifts, the cool-down ledger, pinned splits, reviewed intake."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from visionflow.data.imageio import visual_properties
from visionflow.data.ingest import REVIEWED_PREFIX, sync_reviewed
from visionflow.data.split import assign_splits
from visionflow.errors import DataError
from visionflow.monitoring import ledger as monitor
from visionflow.monitoring.simulate import SHIFTS, apply_shift


def _img() -> np.ndarray:
    rng = np.random.default_rng(0)
    img = np.zeros((28, 28), np.uint8)
    img[6:22, 8:20] = rng.integers(90, 220, (16, 12))
    return img


@pytest.mark.parametrize("shift", sorted(SHIFTS))
def test_shifts_are_deterministic_and_grow_with_severity(shift):
    img = _img()
    a = apply_shift(img, shift, 3, np.random.default_rng(1))
    b = apply_shift(img, shift, 3, np.random.default_rng(1))
    assert a.dtype == np.uint8 and np.array_equal(a, b)
    if shift in ("none", "jpeg"):  # jpeg is applied when the file is written
        return
    d1 = np.abs(apply_shift(img, shift, 1, np.random.default_rng(1)).astype(float).mean() - img.mean())
    mild, severe = (apply_shift(img, shift, s, np.random.default_rng(1)) for s in (1, 5))
    if shift == "resolution":
        assert severe.shape[0] > mild.shape[0] > img.shape[0]
    elif shift == "color_cast":
        from PIL import Image

        assert (
            visual_properties(Image.fromarray(severe))["colorfulness"]
            > visual_properties(Image.fromarray(mild))["colorfulness"]
            > 0
        )
    else:
        diff = lambda x: np.abs(x.astype(float) - img).mean()  # noqa: E731
        assert diff(severe) > diff(mild) >= 0, (shift, d1)


def test_unknown_shift_and_severity_are_refused():
    with pytest.raises(DataError, match="unknown shift"):
        apply_shift(_img(), "fog", 1, np.random.default_rng())
    with pytest.raises(DataError, match="severity"):
        apply_shift(_img(), "blur", 9, np.random.default_rng())


def test_cooldown_grants_one_retraining_per_window(tmp_path):
    ledger = tmp_path / "ledger.json"
    claims = [monitor.claim_retraining(ledger, cooldown_s=3600, trigger=f"alarm{i}", now=1000.0 + i) for i in range(3)]
    assert [c.granted for c in claims] == [True, False, False]
    assert claims[1].next_allowed == 1000.0 + 3600
    later = monitor.claim_retraining(ledger, cooldown_s=3600, trigger="later", now=1000.0 + 3601)
    assert later.granted and later.claim_id != claims[0].claim_id
    monitor.record_outcome(ledger, later.claim_id, new_version="7")
    entries = monitor.read_ledger(ledger)
    assert len(entries) == 4 and entries[-1]["new_version"] == "7"


def _claim(path: str) -> bool:
    return monitor.claim_retraining(Path(path), cooldown_s=3600, trigger="race").granted


def test_cooldown_holds_across_processes(tmp_path):
    with mp.get_context("spawn").Pool(4) as pool:
        granted = pool.map(_claim, [str(tmp_path / "ledger.json")] * 8)
    assert sum(granted) == 1


def test_damaged_ledger_is_reported_not_overwritten(tmp_path):
    ledger = tmp_path / "ledger.json"
    ledger.write_text("{not json")
    with pytest.raises(DataError, match="damaged"):
        monitor.claim_retraining(ledger, cooldown_s=1, trigger="x")
    assert ledger.read_text() == "{not json"


def _manifest(n_per_class: int, offset: int = 0) -> pd.DataFrame:
    rows = [
        {"sha256": f"{label}{i + offset:05d}", "label": label, "path": f"{label}/{i + offset}.png"}
        for label in ("a", "b")
        for i in range(n_per_class)
    ]
    return pd.DataFrame(rows)


def test_pinned_split_keeps_old_images_in_place_and_assigns_new_ones():
    old = _manifest(100)
    first = assign_splits(old, val_fraction=0.1, test_fraction=0.2, seed=0)
    pinned = dict(zip(old["sha256"], first))
    grown = pd.concat([old, _manifest(50, offset=100)], ignore_index=True)
    second = assign_splits(grown, val_fraction=0.1, test_fraction=0.2, seed=0, pinned=pinned)
    assert (second[: len(old)].to_numpy() == first.to_numpy()).all()
    new = second[len(old) :]
    assert (new == "test").sum() == 20 and (new == "val").sum() == 10  # 20% and 10% of 2 x 50
    # From scratch the same rows would be split differently, which is what pinning prevents.
    scratch = assign_splits(grown, val_fraction=0.1, test_fraction=0.2, seed=0)
    assert (scratch[: len(old)].to_numpy() != first.to_numpy()).any()


def test_reviewed_images_join_and_leave_the_raw_folder(tmp_path):
    raw, reviewed = tmp_path / "raw", tmp_path / "reviewed"
    (raw / "cat").mkdir(parents=True)
    (raw / "cat" / "base.png").write_bytes(b"base")
    (reviewed / "cat").mkdir(parents=True)
    (reviewed / "dog").mkdir(parents=True)
    (reviewed / "cat" / "r1.png").write_bytes(b"one")
    (reviewed / "dog" / "r2.png").write_bytes(b"two")
    assert sync_reviewed(reviewed, raw) == {"cat": 1, "dog": 1}
    assert (raw / "cat" / f"{REVIEWED_PREFIX}r1.png").read_bytes() == b"one"
    assert (raw / "dog" / f"{REVIEWED_PREFIX}r2.png").read_bytes() == b"two"
    (reviewed / "dog" / "r2.png").unlink()
    assert sync_reviewed(reviewed, raw) == {"cat": 1}
    assert not (raw / "dog" / f"{REVIEWED_PREFIX}r2.png").exists()
    assert (raw / "cat" / "base.png").read_bytes() == b"base"  # the base dataset is never touched


def test_reviewed_batch_intake_needs_labels_and_known_classes(tmp_path):
    batch = tmp_path / "batch"
    (batch / "images").mkdir(parents=True)
    (batch / "images" / "x.png").write_bytes(b"x")
    with pytest.raises(DataError, match="labels.csv"):
        monitor.take_in_reviewed_batch(batch, tmp_path / "reviewed", ["cat"])
    (batch / "labels.csv").write_text("file,label\nx.png,zebra\n")
    with pytest.raises(DataError, match="zebra"):
        monitor.take_in_reviewed_batch(batch, tmp_path / "reviewed", ["cat"])
    (batch / "labels.csv").write_text("file,label\nx.png,cat\n")
    assert monitor.take_in_reviewed_batch(batch, tmp_path / "reviewed", ["cat"]) == {"cat": 1}
    assert (tmp_path / "reviewed" / "cat" / "batch__x.png").read_bytes() == b"x"
    assert (batch / "images" / "x.png").exists()


@pytest.mark.parametrize("channels", [1, 3])
def test_decode_with_properties_measures_the_image_as_received(channels):
    """One decode serves both: the model's pixels at its size, and the properties of the image as it came."""
    import io

    from PIL import Image

    from visionflow.data.imageio import DecodeRules, decode_with_properties, open_guarded

    rgb = np.random.default_rng(5).integers(0, 256, (40, 30, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG")
    pixels, props = decode_with_properties(buf.getvalue(), 16, channels, DecodeRules())
    assert pixels.shape == (16, 16, channels) and pixels.dtype == np.uint8
    assert props == visual_properties(open_guarded(buf.getvalue(), DecodeRules()))
    assert props["width"] == 30 and props["height"] == 40 and props["colorfulness"] > 0
