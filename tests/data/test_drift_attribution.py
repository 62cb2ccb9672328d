"""Drift attribution (issue 20, part 3): a drifted batch's signature matched against the simulated shift suite, on a
real ONNX Runtime session (a tiny hand-built graph) and a small suite (45 test-split images per entry)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tests.helpers import make_folder_dataset, tiny_onnx_champion
from visionflow.config import Params
from visionflow.monitoring.attribution import attribute, load_suite
from visionflow.monitoring.drift import check
from visionflow.monitoring.drift_features import batch_features, reference_features
from visionflow.monitoring.simulate import simulate

SIZE, CLASSES = 16, ["cat", "dog", "fox"]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """(root, params, champion, reference, suite): a test split of 90 images, the suite built once."""
    root = tmp_path_factory.mktemp("attrib")
    src = make_folder_dataset(root / "images", classes=tuple(CLASSES), per_class=30, size=SIZE)
    rows = [{"path": str(f), "label": f.parent.name, "sha256": f.name} for f in sorted(src.rglob("*.png"))]
    p = Params()
    p = p.model_copy(
        update={
            "data": p.data.model_copy(update={"source": str(src), "max_images": None}),
            "drift": p.drift.model_copy(update={"min_batch_size": 10, "reference_size": 90, "attribution_images": 45}),
        }
    )
    (root / p.data.splits_dir).mkdir(parents=True)
    pd.DataFrame(rows).to_csv(root / p.data.splits_dir / "test.csv", index=False)
    champion = tiny_onnx_champion(root / "tiny.onnx", CLASSES, SIZE)
    ref = reference_features(p, root, *champion)
    said: list[str] = []
    suite = load_suite(p, root, *champion, ref, progress=said.append)
    assert said and "building the shift suite" in said[0]  # a champion without a cached suite: a progress line
    return root, p, champion, ref, suite


def _attribution(project, shift: str, severity: int, seed: int = 101) -> dict:
    root, p, champion, _, suite = project
    batch = simulate(p, root, root / "batches" / f"{shift}{severity}", shift=shift, severity=severity, n=40, seed=seed)
    cur, _ = batch_features(p, root, batch.folder, champion[1], champion[2])
    return attribute(p, suite, cur)


@pytest.mark.parametrize("shift", ["noise", "blur"])
def test_a_shifted_batch_is_named_after_its_shift(project, shift):
    a = _attribution(project, shift, 5)
    assert a["status"] == "ok" and a["cause"] == shift, a["summary"]
    assert a["runner_up"]["cause"] != shift and a["runner_up"]["distance"] >= a["distance"]
    assert a["augment"]["key"] == shift and a["augment"]["override"] == f"train.augment.{shift}=0.5"
    assert 0 <= a["predicted_accuracy"] <= 1 and set(a["predictions"]) == {"matched", "atc_suite", "atc_shift"}
    assert a["summary"].startswith(f"looks like {'sensor noise' if shift == 'noise' else 'blur'}, severity")


def test_the_suite_is_cached_per_champion(project):
    root, p, champion, ref, suite = project
    said: list[str] = []
    again = load_suite(p, root, *champion, ref, progress=said.append)
    assert not said and again.cache == suite.cache and again.entries == suite.entries
    np.testing.assert_array_equal(again.signatures, suite.signatures)


def test_a_damaged_suite_cache_is_rebuilt(project, tmp_path):
    root, p, champion, ref, suite = project
    saved = suite.cache.read_bytes()
    try:
        suite.cache.write_bytes(saved[: len(saved) // 2])  # a copy cut short
        said: list[str] = []
        again = load_suite(p, root, *champion, ref, progress=said.append)
        assert "unreadable" in said[0] and "building the shift suite" in said[1]
        np.testing.assert_allclose(again.signatures, suite.signatures)
    finally:
        suite.cache.write_bytes(saved)


def test_a_batch_unlike_any_shift_is_no_close_match(project):
    root, p, champion, _, suite = project
    folder = root / "inverted"
    folder.mkdir()
    for i, f in enumerate(sorted((root / "images").rglob("*.png"))[:40]):
        Image.fromarray(255 - np.asarray(Image.open(f))).save(folder / f"{i}.png")  # a negative: no suite shift
    cur, _ = batch_features(p, root, folder, champion[1], champion[2])
    a = attribute(p, suite, cur)
    assert a["status"] == "no_close_match" and a["cause"] is None and a["augment"] is None, a["summary"]
    assert a["summary"].startswith("no close match")


def test_the_verdict_of_a_drifted_batch_carries_the_attribution(project, tmp_path):
    root, p, champion, _, _ = project
    batch = simulate(p, root, tmp_path / "noisy", shift="noise", severity=5, n=40, seed=7)
    verdict = check(p, root, batch=batch.folder, log_to_mlflow=False, html=False, champion=champion)
    assert verdict["drifted"] is True
    a = verdict["attribution"]
    assert a["cause"] == "noise" and a["summary"] in json.dumps(verdict)
    saved = json.loads((root / "reports/drift/noisy/verdict.json").read_text())
    assert saved["attribution"]["cause"] == "noise"


def test_a_too_small_batch_skips_the_attribution_with_a_reason(project, tmp_path):
    root, p, champion, _, _ = project
    batch = simulate(p, root, tmp_path / "few", shift="noise", severity=5, n=5, seed=7)
    (batch.folder / "images" / "broken.png").write_bytes(b"not an image")
    verdict = check(p, root, batch=batch.folder, log_to_mlflow=False, html=False, champion=champion)
    assert verdict["status"] == "insufficient_data" and verdict["n_unreadable"] == 1
    assert verdict["attribution"]["status"] == "skipped" and "too few" in verdict["attribution"]["reason"]


def test_a_batch_with_unreadable_images_is_attributed_from_the_readable_ones(project, tmp_path):
    root, p, champion, _, _ = project
    batch = simulate(p, root, tmp_path / "blurry", shift="blur", severity=5, n=40, seed=8)
    (batch.folder / "images" / "broken.png").write_bytes(b"not an image")
    verdict = check(p, root, batch=Path(batch.folder), log_to_mlflow=False, html=False, champion=champion)
    assert verdict["n_unreadable"] == 1 and verdict["attribution"]["cause"] == "blur"
    assert verdict["attribution"]["n_unreadable_ignored"] == 1
