"""Evaluate the detector on the test split: COCO mAP (torchmetrics on pycocotools), AP@0.5 per class, PR curves, the
worst detections, and the corruption-robustness suite in mAP@0.5; logged to the training run in MLflow."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchmetrics.detection import MeanAveragePrecision

from visionflow.config import Params
from visionflow.data.corruptions import ROBUSTNESS, corrupter
from visionflow.errors import DataError
from visionflow.paths import ProjectPaths
from visionflow.report import write_json_atomic
from visionflow.tasks.detection.detector_module import load_detector, quiet_cocoeval
from visionflow.tasks.detection.plots import plot_pr_curves, plot_worst
from visionflow.tasks.detection.trainset import load_rgb, read_split, split_targets
from visionflow.training.evaluate import in_batches, inference_device, robustness_subset

PLOTS = ("pr_curves.png", "worst_detections.png")
WORST_SHOWN = 12


@dataclass(frozen=True)
class DetEvalResult:
    map_50: float  # mAP at IoU 0.5 (test split)
    map: float  # COCO mAP averaged over IoU 0.5:0.95
    per_class_ap: dict[str, float | None]  # AP@0.5 per class name; None for a class without test boxes
    robustness: dict[str, dict[str, float]]  # corruption -> severity -> mAP@0.5, and "mean" over the severities
    robust_map_50: float  # mean over every corruption and severity of the suite
    n_test: int
    n_negatives: int  # test images without boxes
    report_dir: str
    mlflow_run_id: str | None = None  # the training run the evaluation was logged to

    def headline(self) -> str:
        """The one line the pipeline logs."""
        return (
            f"test mAP@0.5 {self.map_50:.4f}, mAP@[.5:.95] {self.map:.4f}, robust mAP@0.5 {self.robust_map_50:.4f} "
            f"({self.n_test} test images, {self.n_negatives} without boxes)"
        )

    def summary(self) -> dict[str, Any]:
        """The figures the pipeline report carries at its top level."""
        return {
            "test_map_50": self.map_50,
            "test_map": self.map,
            "robust_map_50": self.robust_map_50,
            "per_class_ap_50": self.per_class_ap,
        }


Found = dict[str, torch.Tensor]  # boxes (x1 y1 x2 y2), scores, labels of one image, on CPU


@torch.inference_mode()
def predict(net: torch.nn.Module, images: list[np.ndarray], device: str = "cpu", batch_size: int = 16) -> list[Found]:
    """The detector's boxes (down to its score floor) for (H, W, 3) uint8 images, in input pixels."""
    net.to(device).eval()

    def batch(i: int, j: int) -> list[Found]:
        x = [
            torch.from_numpy(np.ascontiguousarray(im.transpose(2, 0, 1))).to(device).float().div_(255)
            for im in images[i:j]
        ]
        return [{k: v.float().cpu() if k != "labels" else v.cpu() for k, v in f.items()} for f in net(x)]

    return [f for part in in_batches(batch, len(images), batch_size) for f in part]


def _map(found: list[Found], targets: list[Found], **kwargs: Any) -> dict[str, torch.Tensor]:
    metric = MeanAveragePrecision(**kwargs)
    metric.update(found, targets)
    with quiet_cocoeval():
        return metric.compute()


def detection_metrics(found: list[Found], targets: list[Found], classes: list[str]) -> dict[str, Any]:
    """mAP@0.5, mAP@[.5:.95], AP@0.5 per class and the PR curve per class at IoU 0.5."""
    full = _map(found, targets)
    at50 = _map(found, targets, iou_thresholds=[0.5], class_metrics=True, extended_summary=True)
    ids = [int(c) for c in at50["classes"].reshape(-1)]
    ap = {c: None for c in classes}
    curves = {}
    for k, cid in enumerate(ids):
        if 1 <= cid <= len(classes) and float(at50["map_per_class"].reshape(-1)[k]) >= 0:
            ap[classes[cid - 1]] = float(at50["map_per_class"].reshape(-1)[k])
            curves[classes[cid - 1]] = at50["precision"][0, :, k, 0, -1].numpy()  # all areas, most detections
    return {"map_50": _score(full["map_50"]), "map": _score(full["map"]), "per_class_ap": ap, "curves": curves}


def _score(v: torch.Tensor) -> float:
    """torchmetrics says -1 when there is nothing to score (no boxes at all): no detections found, 0."""
    return max(float(v), 0.0)


def robustness_suite(
    net: torch.nn.Module, images: list[np.ndarray], targets: list[Found], p: Params, device: str
) -> dict[str, dict[str, float]]:
    """mAP@0.5 per corruption and severity (the seeded, fixed-parameter suite of visionflow.data.corruptions)."""
    out: dict[str, dict[str, float]] = {}
    for name in p.evaluate.corruptions:
        per = {}
        for sev in p.evaluate.severities:
            corrupt = corrupter(ROBUSTNESS, name, sev, np.random.default_rng(p.base.seed))
            found = predict(net, [corrupt(im) for im in images], device)
            per[str(sev)] = _score(_map(found, targets, iou_thresholds=[0.5])["map_50"])
        per["mean"] = float(np.mean([per[str(s)] for s in p.evaluate.severities]))
        out[name] = per
    return out


def _iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    from torchvision.ops import box_iou

    return box_iou(a, b) if len(a) and len(b) else torch.zeros(len(a), len(b))


def _errors(found: Found, target: Found, threshold: float) -> tuple[int, int]:
    """(missed ground-truth boxes, false detections) at the served threshold, matched greedily at IoU 0.5."""
    keep = found["scores"] >= threshold
    boxes, labels = found["boxes"][keep], found["labels"][keep]
    iou = _iou(boxes, target["boxes"])
    iou[labels[:, None] != target["labels"][None, :]] = 0
    matched, used = 0, set()
    for i in range(len(boxes)):  # boxes come sorted by score
        free = [j for j in range(len(target["boxes"])) if j not in used and iou[i, j] >= 0.5]
        if free:
            used.add(max(free, key=lambda j: float(iou[i, j])))
            matched += 1
    return len(target["boxes"]) - matched, len(boxes) - matched


def worst_items(images, found, targets, classes: list[str], threshold: float, k: int = WORST_SHOWN) -> list[dict]:
    """The k test images with the most errors (missed + false boxes at the threshold), for plot_worst."""
    errors = [_errors(f, t, threshold) for f, t in zip(found, targets)]
    order = sorted(range(len(images)), key=lambda i: (-sum(errors[i]), i))
    items = []
    for i in [i for i in order if sum(errors[i])][:k]:
        keep = found[i]["scores"] >= threshold
        items.append(
            {
                "image": images[i],
                "title": f"#{i}: {errors[i][0]} missed, {errors[i][1]} false",
                "gt": [(b.tolist(), classes[int(c) - 1]) for b, c in zip(targets[i]["boxes"], targets[i]["labels"])],
                "pred": [
                    (b.tolist(), classes[int(c) - 1], float(s))
                    for b, c, s in zip(found[i]["boxes"][keep], found[i]["labels"][keep], found[i]["scores"][keep])
                ],
            }
        )
    return items


def evaluate(p: Params, root: Path) -> DetEvalResult:
    """The published model (models/model.ckpt, reports/train.json) on the test split; writes the report folder's
    evaluation.json and plots, and logs them to the training run. Runs on the GPU when there is one."""
    paths = ProjectPaths.of(p, root)
    if not paths.train_report.is_file() or not paths.checkpoint.is_file():
        raise DataError(
            f"no trained detector ({paths.relative(paths.checkpoint)}, {paths.relative(paths.train_report)})"
            ": run `visionflow train` first"
        )
    run_id = json.loads(paths.train_report.read_text()).get("mlflow_run_id")
    net, hp = load_detector(paths.checkpoint)
    classes, device = list(hp["classes"]), inference_device()
    split = read_split(paths, "test")
    targets = split_targets(split, classes)
    images = [load_rgb(path) for path in split.paths]
    if not images:
        raise DataError(f"the test split ({paths.relative(paths.splits / 'test.csv')}) is empty: nothing to evaluate")
    found = predict(net, images, device)
    m = detection_metrics(found, targets, classes)
    subset = robustness_subset(len(images), p.detection.robustness_images, p.base.seed)
    rob = robustness_suite(net, [images[i] for i in subset], [targets[i] for i in subset], p, device)
    report_dir = paths.evaluation_reports
    report_dir.mkdir(parents=True, exist_ok=True)
    result = DetEvalResult(
        map_50=m["map_50"],
        map=m["map"],
        per_class_ap=m["per_class_ap"],
        robustness=rob,
        robust_map_50=float(np.mean([per[str(s)] for per in rob.values() for s in p.evaluate.severities])),
        n_test=len(images),
        n_negatives=sum(len(t["boxes"]) == 0 for t in targets),
        report_dir=paths.relative(report_dir),
        mlflow_run_id=run_id,
    )
    plot_pr_curves(m["curves"], m["per_class_ap"], report_dir / PLOTS[0])
    plot_worst(worst_items(images, found, targets, classes, p.detection.score_threshold), report_dir / PLOTS[1])
    extra = {"task": "detection", "classes": classes, "robustness_images": len(subset), "device": device}
    write_json_atomic(report_dir / "evaluation.json", {**asdict(result), **extra})
    if run_id:
        _log_to_mlflow(run_id, result, report_dir)
    return result


def _log_to_mlflow(run_id: str, r: DetEvalResult, report_dir: Path) -> None:
    """Three headline metrics; per-class and per-corruption detail as tags (as the classifier's evaluation)."""
    import mlflow
    from mlflow.entities import Metric

    from visionflow.registry.tracking import detail_tags

    client = mlflow.MlflowClient()
    ts = int(time.time() * 1000)
    metrics = {"test/map_50": r.map_50, "test/map": r.map, "robust/map_50": r.robust_map_50}
    detail = {f"ap50.{c}": ap for c, ap in r.per_class_ap.items() if ap is not None}
    detail |= {f"robust.{name}.{sev}": v for name, per in r.robustness.items() for sev, v in per.items()}
    client.log_batch(
        run_id, metrics=[Metric(k, float(v), ts, 0) for k, v in metrics.items()], tags=detail_tags("eval", detail)
    )
    for f in (*PLOTS, "evaluation.json"):
        client.log_artifact(run_id, str(report_dir / f), artifact_path="evaluation")
