"""Detection training, evaluation and export on a tiny generated project: real Lightning, a real SQLite MLflow
store, real ONNX Runtime. Coloured rectangles on noise, exact boxes, 64 px, one epoch."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import mlflow
import numpy as np
import pytest
from PIL import Image

from visionflow.config import parse_params

pytestmark = pytest.mark.slow

COLOURS = {"blue": (40, 60, 230), "red": (230, 40, 40)}


def _scene(rng: np.random.Generator, size: int, n: int) -> tuple[np.ndarray, list]:
    img = rng.integers(60, 140, (size, size, 3), dtype=np.uint8)
    boxes = []
    for _ in range(n):
        name = str(rng.choice(sorted(COLOURS)))
        w, h = (int(v) for v in rng.integers(14, 30, 2))
        x, y = int(rng.integers(0, size - w)), int(rng.integers(0, size - h))
        img[y : y + h, x : x + w] = COLOURS[name]
        boxes.append([x, y, w, h, name])
    return img, boxes


def make_detection_project(root: Path, n: int = 24, size: int = 64, **detection) -> Path:
    """Split CSVs (path, sha256, width, height, boxes) over generated PNGs, params.yaml for a one-epoch run."""
    rng = np.random.default_rng(0)
    (root / "data/raw/images").mkdir(parents=True)
    rows = []
    for i in range(n):
        img, boxes = _scene(rng, size, 0 if i % 8 == 7 else int(rng.integers(1, 3)))  # every 8th: a negative
        rel = f"data/raw/images/{i:03d}.png"
        Image.fromarray(img).save(root / rel)
        rows.append({"path": rel, "sha256": f"{i:064x}", "width": size, "height": size, "boxes": json.dumps(boxes)})
    splits = root / "data/splits"
    splits.mkdir(parents=True)
    import pandas as pd

    for name, part in (("train", rows[: n // 2]), ("val", rows[n // 2 : 3 * n // 4]), ("test", rows[3 * n // 4 :])):
        pd.DataFrame(part).to_csv(splits / f"{name}.csv", index=False)
    params = {
        "base": {"task": "detection"},
        "train": {"num_workers": 0, "accelerator": "cpu", "system_metrics_interval_s": 1.0},
        "evaluate": {"corruptions": ["noise", "blur"], "severities": [1, 5], "robustness_images": 10},
        "export": {"parity_images": 6},
        "registry": {"tracking_uri": f"sqlite:///{root / 'mlflow.db'}"},
        "detection": {
            "image_size": size,
            "batch_size": 4,
            "max_epochs": 1,
            "pretrained_weights": None,
            "robustness_images": 10,
            **detection,
        },
    }
    import yaml

    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


def _params(root: Path, **detection):
    import yaml

    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw["detection"].update(detection)
    return parse_params(raw)


def _use_mlflow(p, root: Path) -> None:
    from visionflow.registry.tracking import setup_mlflow

    setup_mlflow(p.registry.tracking_uri, root, p.base.project)


def _publish(root: Path, res) -> None:
    """What the stage wrapper does after training: models/model.ckpt and reports/train.json."""
    (root / "models").mkdir(exist_ok=True)
    shutil.copyfile(root / res.best_checkpoint, root / "models/model.ckpt")
    (root / "reports").mkdir(exist_ok=True)
    (root / "reports/train.json").write_text(json.dumps(asdict(res)))


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: a 64 px detector is all per-op overhead, and on a busy 2-core runner two threads wait
    on each other (a training step measured 10x slower), so the module's seconds stay seconds."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def trained(_one_thread, tmp_path_factory):
    from visionflow.tasks.detection.train import train

    root = make_detection_project(tmp_path_factory.mktemp("det"))
    p = _params(root)
    _use_mlflow(p, root)
    res = train(p, root, "dv1", flow_run_id="flow-1", progress=False)
    _publish(root, res)
    return root, res


def test_train_records_a_run_with_its_map_and_reuses_it(trained):
    from visionflow.tasks.detection.train import load_detector, train

    root, res = trained
    assert res.global_step == res.max_steps == 3 and not res.resumed and not res.reused
    assert res.classes == ["blue", "red"] and 0.0 <= res.best_val_acc <= 1.0
    net, hp = load_detector(root / res.best_checkpoint)
    assert hp["classes"] == ["blue", "red"] and hp["image_size"] == 64 and hp["model"] == "fcos_mobilenetv2"
    assert not net.training
    client = mlflow.MlflowClient()
    run = client.get_run(res.mlflow_run_id)
    assert run.data.params["train.model"] == "fcos_mobilenetv2" and run.data.params["detection.image_size"] == "64"
    assert run.data.tags["visionflow.data_version"] == "dv1" and run.data.tags["visionflow.task"] == "detection"
    assert [m.value for m in client.get_metric_history(res.mlflow_run_id, "val/map_50")] == [res.best_val_acc]
    assert any(k.startswith("system/") for k in run.data.metrics)
    again = train(_params(root), root, "dv1", progress=False)
    assert again.reused and again.mlflow_run_id == res.mlflow_run_id


def test_an_interrupted_run_resumes_in_its_mlflow_run_from_its_last_checkpoint(trained):
    from visionflow.tasks.detection.train import train

    root, res = trained
    state_path = root / res.run_dir / "state.json"
    # as if killed before the result was recorded: state.json says running, last.ckpt is there
    state_path.write_text(json.dumps({"status": "running", "mlflow_run_id": res.mlflow_run_id}))
    again = train(_params(root), root, "dv1", progress=False)
    assert again.resumed and not again.reused and again.mlflow_run_id == res.mlflow_run_id
    # last.ckpt was written at the final step, before that epoch's validation: the resumed run has nothing left
    # to train, and its best checkpoint is the last one
    assert again.global_step == res.max_steps and (root / again.best_checkpoint).is_file()
    assert json.loads(state_path.read_text())["status"] == "completed"


def test_evaluate_writes_the_report_plots_and_logs_to_the_training_run(trained):
    from visionflow.tasks.detection.evaluate import evaluate

    root, res = trained
    p = _params(root)
    r = evaluate(p, root)
    assert r.n_test == 6 and r.n_negatives == 1 and r.mlflow_run_id == res.mlflow_run_id
    assert 0.0 <= r.map <= r.map_50 <= 1.0 and set(r.per_class_ap) == {"blue", "red"}
    assert set(r.robustness) == {"noise", "blur"} and set(r.robustness["noise"]) == {"1", "5", "mean"}
    report = root / "reports/evaluation"
    saved = json.loads((report / "evaluation.json").read_text())
    assert saved["map_50"] == r.map_50 and saved["robust_map_50"] == r.robust_map_50
    for png in ("pr_curves.png", "worst_detections.png"):
        assert (report / png).stat().st_size > 1000
    run = mlflow.MlflowClient().get_run(res.mlflow_run_id)
    assert run.data.metrics["test/map_50"] == r.map_50 and "robust/map_50" in run.data.metrics
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(res.mlflow_run_id, "evaluation")}
    assert {"evaluation/pr_curves.png", "evaluation/worst_detections.png"} <= artifacts


def test_export_passes_parity_and_a_tampered_graph_fails_it(trained, tmp_path):
    import copy

    import torch

    from visionflow.paths import ProjectPaths
    from visionflow.tasks.detection.export import export, parity_check
    from visionflow.tasks.detection.model import export_onnx
    from visionflow.tasks.detection.train import load_detector
    from visionflow.tasks.detection.trainset import load_rgb, read_split

    root, res = trained
    p = _params(root)
    r = export(p, root)
    assert r.passed and not r.reasons and r.n_images == 6
    assert r.card["task"] == "detection" and r.card["classes"] == ["blue", "red"] and r.card["score_threshold"] == 0.3
    assert json.loads((root / "reports/export.json").read_text())["onnx_path"] == "models/onnx/model.onnx"
    tags = mlflow.MlflowClient().get_run(res.mlflow_run_id).data.tags
    assert tags["visionflow.onnx.n_images"] == "6"

    # a one-epoch net scores below the threshold everywhere: raise its class scores so that there are boxes to match
    # (by 1: ~30 boxes an image, under the 50-box cap, where near-tied scores would make the cut arbitrary)
    net, hp = load_detector(root / "models/model.ckpt")
    confident = copy.deepcopy(net)
    with torch.no_grad():
        confident.head.classification_head.cls_logits.bias += 1.0
    onnx = export_onnx(confident, 64, tmp_path / "confident.onnx")
    images = [load_rgb(x) for x in read_split(ProjectPaths.of(p, root), "test").paths]
    kw = {"score_threshold": 0.3, "iou_floor": 0.99, "tolerance": 1e-4}
    same = parity_check(confident, onnx, images, **kw)
    assert same.passed and same.boxes_compared > 0 and same.worst_iou >= 0.99, same
    # the graph of another model (the tampered head) against the published one
    tampered = parity_check(net, onnx, images, **kw)
    assert not tampered.passed and "images differ between ONNX and PyTorch" in tampered.reasons[0]


def test_parity_compare_allows_the_threshold_boundary_and_names_each_difference():
    from visionflow.tasks.detection.export import compare

    def answer(boxes, scores, labels):
        return {
            "boxes": np.array(boxes, np.float32),
            "scores": np.array(scores, np.float32),
            "labels": np.array(labels),
        }

    ref = answer([[0, 0, 10, 10], [20, 20, 30, 30]], [0.9, 0.30004], [1, 2])
    # the second box falls just under the threshold in ONNX, within the tolerance: the same answer
    assert compare(ref, answer([[0, 0, 10, 10], [20, 20, 30, 30]], [0.9, 0.29997], [1, 2]), 0.3, 1e-4, 0.99)[0] == []
    problems, ious, diffs = compare(
        ref, answer([[0, 0, 10, 10], [20, 20, 30, 30]], [0.9, 0.3], [1, 1]), 0.3, 1e-4, 0.99
    )
    assert problems == ["box 1 (label 2, score 0.300) has no ONNX match"] and ious == [1.0]
    shifted = answer([[0, 0, 10, 11], [20, 20, 30, 30], [50, 50, 60, 60]], [0.9, 0.30004, 0.5], [1, 2, 1])
    problems, _, _ = compare(ref, shifted, 0.3, 1e-4, 0.99)
    assert problems == [
        "box 0 (label 1, score 0.900) has no ONNX match",
        "2 ONNX box(es) at or above the threshold that PyTorch does not give",  # the shifted one and the new one
    ]
    problems, _, diffs = compare(
        ref, answer([[0, 0, 10, 10], [20, 20, 30, 30]], [0.8, 0.30004], [1, 2]), 0.3, 1e-4, 0.99
    )
    assert problems == ["box 0 scores 0.90000 in PyTorch, 0.80000 in ONNX"] and max(diffs) > 0.09


def test_bad_split_and_checkpoint_inputs_are_one_line_data_errors(tmp_path):
    import torch

    from visionflow.errors import DataError
    from visionflow.paths import ProjectPaths
    from visionflow.tasks.detection.train import load_detector
    from visionflow.tasks.detection.trainset import class_names, read_split

    root = make_detection_project(tmp_path / "proj", n=8)
    paths = ProjectPaths.of(_params(root), root)
    (root / "data/splits/val.csv").write_text('path,boxes\na.png,"[[1, 2, 3]]"\n')
    with pytest.raises(DataError, match=r"val.csv row 2: the boxes column is not JSON"):
        read_split(paths, "val")
    (root / "data/splits/val.csv").write_text("path,label\na.png,cat\n")
    with pytest.raises(DataError, match="no path/boxes columns"):
        read_split(paths, "val")
    (root / "data/splits/val.csv").write_text("path,boxes\na.png,[]\nb.png,\n")
    with pytest.raises(DataError, match="the val split has no boxes"):
        class_names(read_split(paths, "val"))
    torch.save({"state_dict": {}, "hyper_parameters": {"classes": ["a"]}}, tmp_path / "cls.ckpt")
    with pytest.raises(DataError, match="is not a detector checkpoint"):
        load_detector(tmp_path / "cls.ckpt")


def test_the_learning_rate_warms_up_then_decays_to_zero():
    from visionflow.tasks.detection.detector_module import warmup_cosine, warmup_steps

    assert warmup_steps(600) == 60 and warmup_steps(5000) == 100 and warmup_steps(3) == 1
    f = [warmup_cosine(s, warmup=60, total=600) for s in range(601)]
    assert f[0] == pytest.approx(1 / 60) and f[59] == 1.0 and f[60] == 1.0
    assert all(a >= b for a, b in zip(f[60:], f[61:])) and f[600] == pytest.approx(0.0)
