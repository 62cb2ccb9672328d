"""Detection drift and batches: a real (tiny, untrained) FCOS detector exported to ONNX and run by ONNX Runtime,
a reference test split of small scenes, simulated batches with their true boxes, and the reviewed take-in."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from visionflow.config import Params
from visionflow.data.imageio import sha256_bytes
from visionflow.errors import DataError
from visionflow.tasks.detection.batches import read_batch, simulate, take_in
from visionflow.tasks.detection.drift import answer_features, check_batch

CLASSES = ["disc", "square"]
SIZE = 64


def scenes(n: int, seed: int):
    """Deterministic little scenes: a lit, textured canvas with one to three flat shapes and their exact boxes."""
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        yy, xx = np.mgrid[0:SIZE, 0:SIZE]
        light = 90 + 60 * (xx / SIZE) * rng.uniform(0.5, 1) + rng.normal(0, 6, (SIZE, SIZE))
        img = np.repeat(light[..., None], 3, axis=2) * rng.uniform(0.8, 1.2, 3)
        boxes = []
        for _ in range(rng.integers(1, 4)):
            w, h = (int(v) for v in rng.integers(10, 24, 2))
            x, y = (int(v) for v in rng.integers(0, SIZE - 24, 2))
            cls = CLASSES[int(rng.integers(2))]
            colour = rng.uniform(0, 255, 3)
            if cls == "square":
                img[y : y + h, x : x + w] = colour
            else:
                inside = ((xx - x - w / 2) / (w / 2)) ** 2 + ((yy - y - h / 2) / (h / 2)) ** 2 <= 1
                img[inside] = colour
            boxes.append((float(x), float(y), float(w), float(h), cls))
        yield np.clip(img, 0, 255).astype(np.uint8), boxes


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """(root, params, onnx path, card): an untrained detector and a test split of 40 scenes as its reference."""
    import torch

    from visionflow.tasks.detection.model import build_detector, export_onnx

    root = tmp_path_factory.mktemp("detdrift")
    p = Params()
    # Kolmogorov-Smirnov (p < 0.05) rather than the default normalised Wasserstein distance (>= 0.1): at 40 images
    # against 40, the distance between two draws of the same scenes is 0.2-0.4 by sampling alone (every view of an
    # unshifted batch "drifted"), while KS's p-value accounts for the sample size (measured: 0 of 21 columns moved).
    drift = {"min_batch_size": 20, "numeric_method": "ks", "numeric_threshold": 0.05}
    p = p.model_copy(update={"drift": p.drift.model_copy(update=drift)})
    images = root / "data" / "raw" / "images"
    images.mkdir(parents=True)
    rows = []
    for k, (img, boxes) in enumerate(scenes(40, seed=0)):
        path = images / f"scene_{k:03d}.png"
        Image.fromarray(img).save(path)
        rows.append({"path": str(path), "sha256": sha256_bytes(path.read_bytes()), "boxes": json.dumps(boxes)})
    (root / p.data.splits_dir).mkdir(parents=True)
    pd.DataFrame(rows).to_csv(root / p.data.splits_dir / "test.csv", index=False)
    torch.manual_seed(0)
    onnx_path = export_onnx(build_detector(len(CLASSES), SIZE, weights=None), SIZE, root / "det.onnx")
    card = {"task": "detection", "classes": CLASSES, "image_size": SIZE, "score_threshold": 0.3, "version": "1"}
    return root, p, onnx_path, card


def _batch(project, shift: str, severity: int, seed: int, n: int = 40):
    root, p, *_ = project
    return simulate(p, root, shift=shift, severity=severity, n=n, seed=seed, source=scenes)


def test_a_noisy_batch_drifts_and_a_clean_one_does_not(project):
    root, p, onnx_path, card = project
    clean = check_batch(p, root, _batch(project, "none", 1, seed=1), onnx_path, card, html=False)
    noisy = check_batch(p, root, _batch(project, "noise", 5, seed=2), onnx_path, card)
    assert clean["status"] == noisy["status"] == "ok"
    assert clean["drifted"] is False and clean["drift_share"] < 0.1, clean["moved"]
    # measured: 8 of 21 columns (0.381) against the 0.3 share
    assert noisy["drifted"] is True and noisy["drift_share"] >= p.drift.drift_share
    assert {"blur", "contrast"} <= set(noisy["moved"])  # sensor noise: sharper, higher-contrast pixels
    assert noisy["views"]["embedding"]["drifted_features"]  # and the backbone sees it
    for v in (clean, noisy):
        assert v["n_images"] == v["n_checked"] == 40 and v["n_unreadable"] == 0
        assert set(v["features"]) >= {"n_boxes", "mean_score", "max_score", "box_area", "box_cx", "predicted_class"}
        assert v["features"]["mean_score"]["view"] == "prediction" and v["features"]["blur"]["view"] == "properties"
        assert v["attribution"]["status"] == "skipped" and v["task"] == "detection"
    assert clean["report_html"] is None and (root / noisy["report_html"]).is_file()
    written = json.loads((root / "reports" / "drift" / noisy["batch"] / "verdict.json").read_text())
    assert written["drifted"] is True and written["drift_share"] == noisy["drift_share"]


def test_darker_light_moves_even_an_untrained_detectors_answers(project):
    """An untrained detector answers nothing at score_threshold (n_boxes and the class are constant), but its
    scores and its best guesses' sizes and places still respond to the light."""
    import mlflow

    from tests.helpers import use_mlflow

    root, p, onnx_path, card = project
    use_mlflow(p, root)
    batch = _batch(project, "darker", 4, seed=3, n=30)
    v = check_batch(p, root, batch, onnx_path, card, html=False, log_to_mlflow=True)
    assert v["drifted"] is True and "brightness" in v["moved"]
    assert {"mean_score", "box_area"} <= set(v["views"]["prediction"]["drifted_features"])
    assert v["features"]["n_boxes"]["current_mean"] == v["features"]["n_boxes"]["reference_mean"] == 0
    run = mlflow.get_run(v["mlflow_run_id"])  # logged like a classification check, in the drift experiment
    assert run.data.tags["visionflow.drifted"] == "true" and run.data.tags["visionflow.batch"] == batch.name
    assert run.data.metrics["score/mean_score"] == pytest.approx(v["features"]["mean_score"]["score"])


def test_a_small_or_broken_batch_gets_no_verdict_but_a_reason(project):
    root, p, onnx_path, card = project
    batch = _batch(project, "none", 1, seed=3, n=10)
    (batch / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    v = check_batch(p, root, batch, onnx_path, card)
    assert v["drifted"] is None and v["status"] == "insufficient_data"
    assert v["n_images"] == 11 and v["n_unreadable"] == 1 and v["unreadable"][0]["file"].endswith("broken.png")
    (root / "empty").mkdir()
    with pytest.raises(DataError, match="holds no image files"):
        check_batch(p, root, root / "empty", onnx_path, card)
    with pytest.raises(DataError, match="not a detection model"):
        check_batch(p, root, batch, onnx_path, {**card, "task": "classification"})
    with pytest.raises(DataError, match="no ONNX file"):
        check_batch(p, root, batch, root / "missing.onnx", card)


def test_the_reference_is_cached_per_model(project):
    from visionflow.onnxrt import ort_session
    from visionflow.tasks.detection.drift import reference_features

    root, p, onnx_path, card = project
    session = ort_session(onnx_path)
    fresh = reference_features(p, root, session, card, "model-a")
    cached = reference_features(p, root, session, card, "model-a")
    pd.testing.assert_frame_equal(fresh.frame, cached.frame)
    np.testing.assert_array_equal(fresh.embeddings, cached.embeddings)
    assert len(fresh.frame) == 40 and fresh.embeddings.shape[0] == 40
    reference_features(p, root, session, card, "model-b")  # another champion: its own file
    assert len(list((root / "data" / "drift").glob("detection-reference-*.npz"))) >= 2


def test_answer_features_summarise_the_detectors_boxes():
    boxes = np.array([[0, 0, 20, 10], [40, 40, 60, 60], [0, 0, 100, 100]], np.float32)
    f = answer_features(boxes, np.array([0.9, 0.5, 0.1]), np.array([2, 1, 1]), 100, 50, CLASSES, 0.3)
    assert f["n_boxes"] == 2 and f["predicted_class"] == "square" and f["max_score"] == pytest.approx(0.9)
    assert f["mean_score"] == pytest.approx(0.5) and f["box_area"] == pytest.approx((200 + 400) / 2 / 5000)
    assert (f["box_cx"], f["box_cy"]) == (pytest.approx(0.3), pytest.approx(0.55))
    weak = answer_features(boxes[2:], np.array([0.1]), np.array([1]), 100, 100, CLASSES, 0.3)
    assert weak["n_boxes"] == 0 and weak["predicted_class"] == "none" and weak["box_area"] == 1.0  # its best guess
    empty = answer_features(np.zeros((0, 4)), np.zeros(0), np.zeros(0, np.int64), 100, 100, CLASSES, 0.3)
    assert (empty["box_area"], empty["box_cx"], empty["max_score"], empty["predicted_class"]) == (0, 0.5, 0, "none")


def test_a_simulated_batch_keeps_its_true_boxes_and_follows_a_rescaling_shift(project):
    root, p, *_ = project
    batch = _batch(project, "resolution", 2, seed=4, n=3)  # upscaled x2: the boxes double
    entries = read_batch(batch)
    truth = list(scenes(3, seed=4))
    assert [f.name for f, _ in entries] == [f"{batch.name}_{k:05d}.png" for k in range(3)]
    for (file, boxes), (_, true_boxes) in zip(entries, truth):
        assert Image.open(file).size == (2 * SIZE, 2 * SIZE)
        assert boxes == [[2 * x, 2 * y, 2 * w, 2 * h, c] for x, y, w, h, c in true_boxes]
    meta = json.loads((batch / "batch.json").read_text())
    assert meta["shift"] == "resolution" and meta["n"] == 3
    jpeg = _batch(project, "jpeg", 3, seed=4, n=2)
    assert sorted(f.suffix for f, _ in read_batch(jpeg)) == [".jpg", ".jpg"]
    with pytest.raises(DataError, match="base.seed"):
        simulate(p, root, shift="none", severity=1, n=2, seed=p.base.seed)
    with pytest.raises(DataError, match="unknown shift"):
        _batch(project, "sepia", 1, seed=5)
    with pytest.raises(DataError, match="no path separators"):
        simulate(p, root, shift="none", severity=1, n=2, seed=5, name="../escape", source=scenes)
    with pytest.raises(DataError, match="after the first 1 but the source gave only 1"):
        simulate(p, root, shift="none", severity=1, n=5, seed=5, skip=1, source=lambda n, seed: scenes(2, seed))
    assert not list((root / "data" / "batches").glob("*.partial"))


def test_a_users_dataset_gives_disjoint_batches_from_its_test_split(project):
    """Not the bundled scenes: batches are drawn from the test split, with its boxes; skip keeps them apart."""
    root, p, *_ = project
    p = p.model_copy(update={"detection": p.detection.model_copy(update={"source": "export/annotations.json"})})
    first = read_batch(simulate(p, root, shift="none", severity=1, n=15, seed=p.base.seed, name="a"))
    second = read_batch(simulate(p, root, shift="none", severity=1, n=15, seed=p.base.seed, name="b", skip=15))
    split = pd.read_csv(root / p.data.splits_dir / "test.csv")
    truth = {sha: json.loads(b) for sha, b in zip(split["sha256"], split["boxes"])}
    shas = [sha256_bytes(f.read_bytes()) for f, _ in first + second]
    assert len(set(shas)) == 30 and set(shas) <= set(truth)  # lossless PNG: the split's own bytes back
    for sha, (_, boxes) in zip(shas, first + second):
        assert boxes == truth[sha]
    with pytest.raises(DataError, match="gave only 10"):
        simulate(p, root, shift="none", severity=1, n=15, seed=p.base.seed, name="c", skip=30)


def test_take_in_writes_each_reviewed_image_beside_its_boxes(project):
    root, p, *_ = project
    batch = _batch(project, "darker", 3, seed=6, n=4)
    entries = read_batch(batch)
    assert take_in(p, root, batch, only=[entries[1][0].name, entries[3][0].name]) == 2
    out = root / "data" / "reviewed" / "detection"
    records = sorted(out.glob("*.json"))
    assert len(records) == 2 and len(list(out.glob("*.png"))) == 2 and not list(out.glob(".*"))
    for file, boxes in (entries[1], entries[3]):
        sha = sha256_bytes(file.read_bytes())
        record = json.loads((out / f"{sha}.json").read_text())
        assert set(record) == {"file", "width", "height", "boxes", "reviewed_at"}
        assert record["file"] == f"{sha}.png" and (out / record["file"]).read_bytes() == file.read_bytes()
        assert (record["width"], record["height"]) == (SIZE, SIZE) and record["boxes"] == boxes
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", record["reviewed_at"])
    assert take_in(p, root, batch) == 4 and len(list(out.glob("*.json"))) == 4  # again: the same files, no copies
    twin = batch / "twin.png"  # the same bytes under another name: one reviewed image
    twin.write_bytes(entries[0][0].read_bytes())
    _annotations(batch, lambda c: c["images"].append({**c["images"][0], "id": 99, "file_name": twin.name}))
    assert take_in(p, root, batch) == 4 and len(list(out.glob("*.json"))) == 4


def _annotations(batch, edit) -> None:
    path = batch / "annotations.json"
    coco = json.loads(path.read_text())
    edit(coco)
    path.write_text(json.dumps(coco))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c["images"][0].update(file_name="../../outside.png"), "outside the batch folder"),
        (lambda c: c["images"][0].update(file_name="/etc/passwd"), "outside the batch folder"),
        (lambda c: c["images"][0].update(file_name="gone.png"), "missing from"),
        (lambda c: c["annotations"][0].update(category_id=99), "not in its categories"),
        (lambda c: c["annotations"][0].update(bbox=[1, 2, "x", 4]), "four finite numbers"),
        (lambda c: c.update(images=[]), "the batch is empty"),
        (lambda c: c["images"].append({**c["images"][0], "id": 99}), "listed twice"),
        (lambda c: c.pop("images"), "not COCO JSON"),
    ],
)
def test_take_in_refuses_a_bad_batch_and_adds_nothing(project, tmp_path, edit, message):
    root, p, *_ = project
    batch = _batch(project, "none", 1, seed=7, n=2)
    _annotations(batch, edit)
    p = p.model_copy(update={"serve": p.serve.model_copy(update={"reviewed_dir": tmp_path / "reviewed"})})
    with pytest.raises(DataError, match=message):
        take_in(p, root, batch)
    assert not (tmp_path / "reviewed").exists()


def test_take_in_refuses_missing_annotations_unknown_choices_and_broken_images(project, tmp_path):
    root, p, *_ = project
    p = p.model_copy(update={"serve": p.serve.model_copy(update={"reviewed_dir": tmp_path / "reviewed"})})
    batch = _batch(project, "none", 1, seed=8, n=2)
    with pytest.raises(DataError, match="not in its annotations.json"):
        take_in(p, root, batch, only=["nope.png"])
    first = read_batch(batch)[1][0]
    first.write_bytes(b"not an image")
    with pytest.raises(DataError, match="not_an_image"):
        take_in(p, root, batch)
    (batch / "annotations.json").unlink()
    with pytest.raises(DataError, match="has no annotations.json"):
        take_in(p, root, batch)
    (batch / "annotations.json").write_text("{not json")
    with pytest.raises(DataError, match="not COCO JSON"):
        take_in(p, root, batch)
    assert not (tmp_path / "reviewed").exists()
