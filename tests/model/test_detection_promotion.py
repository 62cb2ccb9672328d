"""Detection registration and promotion: AP@0.5 against torchmetrics (pycocotools), the paired bootstrap, and the
gates on a real MLflow registry (SQLite) with real ONNX Runtime.

The models are ONNX graphs with the detector's signature: "oracles" that find the coloured rectangles of the test
images by their colour (exact boxes, or boxes shifted off one class's objects: a planted worse model), and a real
untrained FCOS exported by model.export_onnx (finds nothing).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from visionflow.config import parse_params
from visionflow.errors import DataError
from visionflow.registry.store import CHALLENGER, CHAMPION, PREVIOUS, alias_version
from visionflow.tasks.detection import promotion
from visionflow.tasks.detection.metrics import collect, map50, match_image, paired_bootstrap_map

CLASSES = ["green", "red"]  # sorted; label k names CLASSES[k - 1]
COLOURS = {"green": (30, 210, 40), "red": (220, 30, 30)}


# --- AP@0.5 and the bootstrap ----------------------------------------------------------------------------------


def _random_case(seed: int, n_images: int = 20, k: int = 3, ties: bool = True):
    """Random ground truth and detections (most near a ground-truth box, some with the wrong class), as
    torchmetrics' inputs and as Matches."""
    rng = np.random.default_rng(seed)
    preds, targets, per_image, truth = [], [], [], []
    for _ in range(n_images):
        ng, nd = rng.integers(0, 5), rng.integers(0, 8)
        gt = np.c_[rng.uniform(0, 80, (ng, 2)), rng.uniform(5, 40, (ng, 2))].astype(np.float32)
        gl = rng.integers(0, k, ng)
        if ng:
            src = rng.integers(0, ng, nd)
            xy = gt[src, :2] + rng.normal(0, 4, (nd, 2))
            wh = gt[src, 2:] * rng.uniform(0.7, 1.3, (nd, 2))
            dl = np.where(rng.random(nd) < 0.8, gl[src], rng.integers(0, k, nd))
        else:
            xy, wh, dl = rng.uniform(0, 80, (nd, 2)), rng.uniform(5, 40, (nd, 2)), rng.integers(0, k, nd)
        dt = np.c_[xy, xy + wh].astype(np.float32)
        sc = np.round(rng.random(nd), 2 if ties else 12).astype(np.float32)  # ties across images, as real scores have
        preds.append({"boxes": torch.tensor(dt), "scores": torch.tensor(sc), "labels": torch.tensor(dl + 1)})
        targets.append({"boxes": torch.tensor(np.c_[gt[:, :2], gt[:, :2] + gt[:, 2:]]), "labels": torch.tensor(gl + 1)})
        per_image.append(match_image(dt, sc, dl, gt, gl))
        truth.append(gl)
    return preds, targets, collect(per_image, truth, k)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_map50_agrees_with_torchmetrics_pycocotools(seed):
    from torchmetrics.detection import MeanAveragePrecision

    preds, targets, matches = _random_case(seed)
    reference = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend="pycocotools")
    reference.update(preds, targets)
    assert map50(matches)[0] == pytest.approx(float(reference.compute()["map_50"]), abs=1e-3)


def test_map50_on_hand_cases():
    gt, gl = np.array([[10, 10, 20, 20], [50, 50, 10, 10]], float), np.array([0, 1])
    exact = np.array([[10, 10, 30, 30], [50, 50, 60, 60]], float)
    perfect = collect([match_image(exact, np.array([0.9, 0.8]), np.array([0, 1]), gt, gl)], [gl], 3)
    m, ap = map50(perfect)
    assert m == 1.0 and np.isnan(ap[2])  # class 2 has no ground truth: no AP, out of the mean
    shifted = exact + [15, 0, 15, 0]  # IoU 5/35 with its box
    half = collect([match_image(shifted[:1], np.array([0.9]), np.array([0]), gt[:1], gl[:1])], [gl[:1]], 3)
    assert map50(half)[0] == 0.0
    # two detections on one box: the higher score takes it, the other is a false positive after it
    double = collect([match_image(exact[[0, 0]], np.array([0.5, 0.9]), np.array([0, 0]), gt[:1], gl[:1])], [gl[:1]], 1)
    assert double.tp.tolist() == [True, False] and map50(double)[0] == 1.0


def test_weighted_images_are_the_resampled_list():
    """A bootstrap resample counts an image as often as it is drawn: the same AP as the list with the copies."""
    from visionflow.tasks.detection.metrics import class_ap

    rng = np.random.default_rng(5)
    per_image, truth = [], []
    for pred, target in zip(*_random_case(4, n_images=30, ties=False)[:2]):
        truth.append(target["labels"].numpy() - 1)
        gt = target["boxes"].numpy()
        per_image.append(
            match_image(
                pred["boxes"].numpy(),
                pred["scores"].numpy(),
                pred["labels"].numpy() - 1,
                np.c_[gt[:, :2], gt[:, 2:] - gt[:, :2]],
                truth[-1],
            )
        )
    matches = collect(per_image, truth, 3)
    for _ in range(5):
        drawn = np.sort(rng.integers(0, 30, 30))
        copies = collect([per_image[i] for i in drawn], [truth[i] for i in drawn], 3)
        weighted = class_ap(matches, np.bincount(drawn, minlength=30))[0]
        np.testing.assert_allclose(weighted, map50(copies)[1], atol=1e-12)


def _synthetic_parts(n: int, hit_rate: float, seed: int) -> tuple[list, list]:
    """n images with 2 boxes each (2 classes); each box is found (exact, score 0.9) with probability hit_rate,
    plus one false positive per image (score 0.5). Returns match_image's answers and the ground-truth labels."""
    rng = np.random.default_rng(seed)
    per_image, truth = [], []
    gt, gl = np.array([[0, 0, 10, 10], [20, 20, 10, 10]], float), np.array([0, 1])
    for _ in range(n):
        hit = rng.random(2) < hit_rate
        boxes = np.r_[np.c_[gt[hit, :2], gt[hit, :2] + 10], [[40, 40, 50, 50]]]
        scores = np.r_[np.full(hit.sum(), 0.9), 0.5]
        per_image.append(match_image(boxes, scores, np.r_[gl[hit], rng.integers(0, 2)], gt, gl))
        truth.append(gl)
    return per_image, truth


def test_paired_bootstrap_is_deterministic_fast_and_sided():
    good, bad = collect(*_synthetic_parts(250, 0.9, seed=1), 2), collect(*_synthetic_parts(250, 0.6, seed=2), 2)
    images = np.arange(250)
    t = time.perf_counter()
    gain, lower = paired_bootstrap_map(good, bad, images, n_boot=2000, alpha=0.05, seed=7)
    elapsed = time.perf_counter() - t
    assert elapsed < 10  # ~0.3 s here; generous for a loaded CI runner
    assert 0 < lower < gain
    assert paired_bootstrap_map(good, bad, images, n_boot=2000, alpha=0.05, seed=7) == (gain, lower)
    assert paired_bootstrap_map(bad, good, images, n_boot=2000, alpha=0.05, seed=7)[1] < 0
    assert paired_bootstrap_map(good, good, images, n_boot=500, alpha=0.05, seed=7) == (0.0, 0.0)


def test_gates_robustness_and_latency_each_refuse_alone():
    """Equal on the clean split, much worse on its corrupted copies: the robustness gate refuses, with its reason;
    the others pass (min_gain -0.1 lets an equal model through). Then a slow model: only latency refuses."""
    good_parts, bad_parts = _synthetic_parts(40, 1.0, seed=1), _synthetic_parts(40, 0.0, seed=1)
    old = collect(*good_parts, 2)
    new = collect(good_parts[0][:20] + bad_parts[0][20:], good_parts[1], 2)
    p = _params(Path("/unused"))
    p = p.model_copy(update={"registry": p.registry.model_copy(update={"min_gain": -0.1})})
    groups = {"clean": np.arange(20), "corrupted": np.arange(20, 40), "eval_batch": np.arange(0)}
    gates = promotion.detection_gates(p, (True, ""), 1.0, new, old, groups, CLASSES)
    assert [g.name for g in gates if not g.passed] == ["robustness"]
    robustness = gates[-1]
    assert robustness.value == pytest.approx(1.0) and "drop on 20 corrupted test images +1.0000" in robustness.detail
    gates = promotion.detection_gates(p, (True, ""), 1e4, old, old, groups, CLASSES)
    assert [g.name for g in gates if not g.passed] == ["latency"]
    gates = promotion.detection_gates(p, (False, "export parity gate failed: 3 boxes"), 1.0, old, None, groups, CLASSES)
    assert [f"{g.name}: {g.detail}" for g in gates if not g.passed] == ["parity: export parity gate failed: 3 boxes"]


def test_comparison_gives_every_model_the_same_corrupted_images():
    from visionflow.tasks.detection.comparison import Annotated, Comparison

    rng = np.random.default_rng(0)
    clean = [Annotated(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8), np.zeros((0, 4)), np.zeros(0, int))] * 12
    comp = Comparison(clean, np.arange(1, 11), [("noise", 1), ("blur", 3), ("jpeg", 5)], clean[:2], seed=3)
    first, second = [a.image for a in comp], [a.image for a in comp]
    groups = comp.groups()
    assert len(first) == 24 and [len(g) for g in groups.values()] == [12, 10, 2]
    assert all(np.array_equal(a, b) for a, b in zip(first, second))
    assert all(a.dtype == np.uint8 and a.shape == (24, 32, 3) for a in first)
    assert not any(np.array_equal(first[i], clean[0].image) for i in groups["corrupted"])


# --- the registry ---------------------------------------------------------------------------------------------


class Oracle(nn.Module):
    """Finds each class's rectangle by colour (one per class and image); shift moves a class's box right by that
    fraction of its width (0.6: IoU 0.25, a miss at 0.5)."""

    def __init__(self, shift: dict[str, float] | None = None):
        super().__init__()
        self.shift = [float((shift or {}).get(c, 0.0)) for c in CLASSES]

    def forward(self, image: torch.Tensor):
        x = image[0].float()
        boxes, scores = [], []
        for k, c in enumerate(CLASSES):
            ch = int(np.argmax(COLOURS[c]))
            others = [i for i in range(3) if i != ch]
            mask = ((x[ch] - torch.maximum(x[others[0]], x[others[1]])) > 80).float()
            cols, rows = mask.amax(0), mask.amax(1)
            xs = torch.arange(cols.shape[0], dtype=torch.float32)
            ys = torch.arange(rows.shape[0], dtype=torch.float32)
            x1, x2 = (xs + (1 - cols) * 1e4).amin(), (xs * cols).amax() + 1
            y1, y2 = (ys + (1 - rows) * 1e4).amin(), (ys * rows).amax() + 1
            dx = (x2 - x1) * self.shift[k]
            boxes.append(torch.stack([x1 + dx, y1, x2 + dx, y2]))
            scores.append(cols.amax() * (0.9 - 0.1 * k))
        boxes, scores = torch.stack(boxes), torch.stack(scores)
        keep = scores > 0.05
        labels = torch.arange(1, len(CLASSES) + 1)
        return boxes[keep], scores[keep], labels[keep], x.mean(dim=(1, 2))[None]


def _export_oracle(module: nn.Module, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        module.eval(),
        (torch.zeros(1, 3, 64, 64, dtype=torch.uint8),),
        str(path),
        input_names=["image"],
        output_names=["boxes", "scores", "labels", "embedding"],
        dynamic_axes={"image": {2: "h", 3: "w"}, "boxes": {0: "n"}, "scores": {0: "n"}, "labels": {0: "n"}},
        opset_version=17,
        dynamo=False,
    )


def _scene(rng: np.random.Generator, path: Path) -> list:
    """A 64 px grey-noise image with a rectangle of one or both colours; returns its boxes."""
    img = np.repeat(rng.integers(60, 180, (64, 64, 1)), 3, axis=2).astype(np.uint8)
    present = [c for c in CLASSES if rng.random() < 0.7] or [CLASSES[int(rng.integers(2))]]
    boxes = []
    for i, c in enumerate(present):
        w, h = (int(v) for v in rng.integers(10, 24, 2))
        x, y = int(rng.integers(0, 64 - w)), int(rng.integers(0, 32 - h)) + 32 * i  # one above the other
        img[y : y + h, x : x + w] = COLOURS[c]
        boxes.append([x, y, w, h, c])
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path)
    return boxes


def _params(proj: Path):
    return parse_params(
        {
            "base": {"task": "detection", "seed": 3},
            "registry": {
                "tracking_uri": f"sqlite:///{proj / 'mlflow.db'}",
                "bootstrap_samples": 500,
                "latency_budget_ms": 500,  # the gate itself is checked above; a loaded runner must not trip it
            },
            "evaluate": {"corruptions": ["noise", "blur"], "severities": [1]},
            "detection": {"map_floor": 0.3, "max_class_ap_drop": 0.05, "robustness_images": 10},
        },
        "test",
    )


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    from visionflow.registry.tracking import setup_mlflow

    proj = tmp_path_factory.mktemp("detgate")
    rng = np.random.default_rng(0)
    rows = [(f"data/raw/images/{i}.png", _scene(rng, proj / f"data/raw/images/{i}.png")) for i in range(16)]
    (proj / "data/splits").mkdir(parents=True)
    import pandas as pd

    pd.DataFrame({"path": [r[0] for r in rows], "boxes": [json.dumps(r[1]) for r in rows]}).to_csv(
        proj / "data/splits/test.csv", index=False
    )
    batch = proj / "batch"
    coco = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "green"}, {"id": 2, "name": "red"}]}
    for i in range(6):
        coco["images"].append({"id": i, "file_name": f"b{i}.png", "width": 64, "height": 64})
        for b in _scene(rng, batch / f"b{i}.png"):
            coco["annotations"].append({"image_id": i, "category_id": CLASSES.index(b[4]) + 1, "bbox": b[:4]})
    coco["images"].append({"id": 99, "file_name": "broken.png", "width": 64, "height": 64})
    (batch / "broken.png").write_bytes(b"not a png")
    (batch / "annotations.json").write_text(json.dumps(coco))
    p = _params(proj)
    return proj, p, batch, setup_mlflow(p.registry.tracking_uri, proj, "detgate-test")


@pytest.fixture
def tracking(project, monkeypatch):
    """MLflow at the module's store (another test module may have pointed it elsewhere); the experiment's id."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    mlflow.set_tracking_uri(project[1].registry.tracking_uri)
    return project[3]


def _stage(proj: Path, experiment: str, onnx_from: nn.Module | Path, *, evaluated_run: str | None = None) -> str:
    """What train, evaluate and export leave for register: a run, the three reports, the ONNX file + card."""
    with mlflow.start_run(experiment_id=experiment) as run:
        run_id = run.info.run_id
    onnx = proj / "models/onnx/model.onnx"
    if isinstance(onnx_from, nn.Module):
        _export_oracle(onnx_from, onnx)
    else:
        onnx.write_bytes(Path(onnx_from).read_bytes())
    card = {"task": "detection", "classes": CLASSES, "image_size": 64, "score_threshold": 0.3, "architecture": "t"}
    (onnx.parent / "model_card.json").write_text(json.dumps(card))
    reports = proj / "reports"
    (reports / "evaluation").mkdir(parents=True, exist_ok=True)
    (reports / "train.json").write_text(json.dumps({"mlflow_run_id": run_id, "data_version": "dv-det"}))
    export = {"onnx_path": "models/onnx/model.onnx", "passed": True, "reasons": [], "min_iou": 1.0}
    (reports / "export.json").write_text(json.dumps(export))
    evaluation = {"mlflow_run_id": evaluated_run or run_id, "map_50": 0.5}
    (reports / "evaluation/evaluation.json").write_text(json.dumps(evaluation))
    return run_id


@pytest.fixture(scope="module")
def untrained_fcos(tmp_path_factory) -> Path:
    from visionflow.tasks.detection.model import build_detector, export_onnx

    torch.manual_seed(0)
    return export_onnx(build_detector(2, 64, weights=None), 64, tmp_path_factory.mktemp("fcos") / "fcos.onnx")


@pytest.mark.slow
def test_register_and_promote_first_then_refuse_worse_then_promote_better(project, tracking, untrained_fcos):
    proj, p, batch, _ = project
    name = p.detection.model_name

    _stage(proj, tracking, Oracle(shift={"green": 0.6}))  # finds red exactly, misses green: mAP 0.5
    first = promotion.register(p, proj)
    tags = mlflow.MlflowClient().get_model_version(name, first.version).tags
    assert tags["visionflow.task"] == "detection" and tags["visionflow.data_version"] == "dv-det"
    assert tags["visionflow.metric.map_50"] == "0.500000" and tags["visionflow.gate.parity"] == "passed"
    d1 = promotion.promote(p, proj)
    assert d1.promoted and d1.champion_before is None and d1.champion_after == first.version, d1.reasons
    assert {g.name for g in d1.gates} == {"parity", "map_floor", "latency"}  # no champion: no comparison
    assert d1.map50["clean"]["challenger"] == pytest.approx(0.5) and d1.class_ap50["red"]["challenger"] == 1.0

    _stage(proj, tracking, untrained_fcos)  # the real detector's graph, untrained: finds nothing
    worse = promotion.register(p, proj)
    d2 = promotion.promote(p, proj, worse.version)
    assert not d2.promoted and d2.champion_after == first.version
    failed = {r.split(":")[0] for r in d2.reasons}
    assert failed == {"map_floor", "beats_champion", "no_class_regression", "robustness"}, d2.reasons
    assert "(red)" in next(r for r in d2.reasons if r.startswith("no_class_regression"))
    assert alias_version(name, CHAMPION) == first.version and alias_version(name, CHALLENGER) == worse.version
    report = json.loads((proj / "reports/registry.json").read_text())
    assert report["promoted"] is False and report["reasons"] == d2.reasons

    _stage(proj, tracking, Oracle())  # exact on both classes: mAP 1.0
    better = promotion.register(p, proj)
    d3 = promotion.promote(p, proj, eval_batch=batch)
    assert d3.promoted and d3.version == better.version, d3.reasons
    assert alias_version(name, CHAMPION) == better.version and alias_version(name, PREVIOUS) == first.version
    assert d3.map50["clean"] == {"challenger": 1.0, "champion": 0.5, "n_images": 16}
    assert d3.eval_batch_map50 == {"challenger": 1.0, "champion": 0.5, "n_images": 6}
    assert d3.map50["corrupted"] == {"challenger": 1.0, "champion": 0.5, "n_images": 10}
    assert len(d3.eval_batch_skipped) == 1 and d3.eval_batch_skipped[0].startswith("broken.png")
    beats = next(g for g in d3.gates if g.name == "beats_champion")
    assert "22 clean test + eval-batch images" in beats.detail and beats.value > 0.3
    gate_tags = mlflow.MlflowClient().get_model_version(name, better.version).tags
    assert gate_tags["visionflow.gate.robustness"] == "passed" and gate_tags["visionflow.promoted"] == "true"


@pytest.mark.slow
def test_register_refuses_mismatched_reports_and_non_detection_cards(project, tracking):
    proj, p, _, _ = project
    _stage(proj, tracking, Oracle(), evaluated_run="another-run")
    with pytest.raises(DataError, match="does not describe the model"):
        promotion.register(p, proj)
    _stage(proj, tracking, Oracle())
    card = proj / "models/onnx/model_card.json"
    card.write_text(json.dumps({**json.loads(card.read_text()), "task": "classification"}))
    with pytest.raises(DataError, match="not a detector"):
        promotion.register(p, proj)
    card.write_text(json.dumps({**json.loads(card.read_text()), "task": "detection", "onnx_sha256": "0" * 64}))
    with pytest.raises(DataError, match="another ONNX file"):
        promotion.register(p, proj)


def test_eval_batch_errors_are_one_line(tmp_path):
    from visionflow.data.imageio import DecodeRules
    from visionflow.tasks.detection.comparison import eval_batch

    with pytest.raises(DataError, match="is not a folder"):
        eval_batch(tmp_path / "missing", CLASSES, DecodeRules())
    with pytest.raises(DataError, match="no annotations.json"):
        eval_batch(tmp_path, CLASSES, DecodeRules())
    (tmp_path / "annotations.json").write_text("{not json")
    with pytest.raises(DataError, match="is not COCO annotations"):
        eval_batch(tmp_path, CLASSES, DecodeRules())
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    coco = {
        "images": [{"id": 1, "file_name": "a.png"}],
        "annotations": [{"image_id": 1, "category_id": 3, "bbox": [0, 0, 4, 4]}],
        "categories": [{"id": 3, "name": "blue"}],
    }
    (tmp_path / "annotations.json").write_text(json.dumps(coco))
    with pytest.raises(DataError, match="class blue that the model does not predict"):
        eval_batch(tmp_path, CLASSES, DecodeRules())
