"""Export the detector: the ONNX graph (model.export_onnx: preprocessing, decoding and NMS inside), its model card,
and the parity gate, ONNX Runtime against PyTorch on test images, box by box at the served threshold."""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from visionflow.config import Params
from visionflow.errors import DataError
from visionflow.onnxrt import ort_session
from visionflow.paths import ProjectPaths
from visionflow.registry.export import write_model_card
from visionflow.report import write_json_atomic
from visionflow.tasks.detection.detector_module import load_detector
from visionflow.tasks.detection.model import export_onnx, predict_torch
from visionflow.tasks.detection.trainset import load_rgb, read_split

# Parity runs image by image (the graph takes one image): export.parity_images is capped here to keep the gate
# to seconds on CPU.
PARITY_CAP = 100
OUTPUTS = ["boxes", "scores", "labels", "embedding"]


@dataclass(frozen=True)
class DetParity:
    passed: bool
    n_images: int  # images compared
    boxes_compared: int  # PyTorch boxes at or above the threshold, each looked for in ONNX Runtime's answer
    worst_iou: float  # the lowest IoU of a matched pair (1.0 when there was no box to match)
    max_score_diff: float  # the largest score difference of a matched pair
    score_tolerance: float
    iou_floor: float
    score_threshold: float
    ort_ms: float  # median per image
    torch_ms: float
    reasons: list[str]


@dataclass(frozen=True)
class DetExportResult(DetParity):
    """reports/export.json: the parity figures, where the model is, and its card."""

    onnx_path: str  # relative to the project root
    card: dict[str, Any]

    def headline(self) -> str:
        """The one line the pipeline logs."""
        return (
            f"ONNX parity passed on {self.n_images} images: {self.boxes_compared} boxes at score >= "
            f"{self.score_threshold}, worst IoU {self.worst_iou:.4f}, max score diff {self.max_score_diff:.2e}; "
            f"ORT {self.ort_ms:.2f} ms vs torch {self.torch_ms:.2f} ms per image"
        )

    def summary(self) -> dict[str, Any]:
        """The parity figures the pipeline report carries."""
        keys = ("n_images", "boxes_compared", "worst_iou", "max_score_diff", "ort_ms", "torch_ms")
        return {k: getattr(self, k) for k in keys}


Answer = dict[str, np.ndarray]


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else float(np.allclose(a, b))


def compare(ref: Answer, got: Answer, threshold: float, tol: float, iou_floor: float) -> tuple[list[str], list, list]:
    """PyTorch's boxes at or above the threshold against ONNX Runtime's: each must have an unmatched ONNX box of
    the same label at IoU >= iou_floor and a score within tol; ONNX boxes left over must be below the threshold.
    A score within tol of the threshold may fall on either side of it. Returns (problems, IoUs, score diffs)."""
    keep = np.flatnonzero(ref["scores"] >= threshold)
    pool = [j for j in np.flatnonzero(got["scores"] >= threshold - tol)]
    problems, ious, diffs = [], [], []
    for i in keep:  # PyTorch's boxes come sorted by score
        cands = [(j, _iou(ref["boxes"][i], got["boxes"][j])) for j in pool if got["labels"][j] == ref["labels"][i]]
        j, iou = max(cands, key=lambda c: c[1], default=(None, 0.0))
        if j is None or iou < iou_floor:
            problems.append(f"box {i} (label {int(ref['labels'][i])}, score {ref['scores'][i]:.3f}) has no ONNX match")
            continue
        pool.remove(j)
        ious.append(iou)
        diffs.append(abs(float(ref["scores"][i]) - float(got["scores"][j])))
        if diffs[-1] > tol:
            problems.append(f"box {i} scores {ref['scores'][i]:.5f} in PyTorch, {got['scores'][j]:.5f} in ONNX")
    if extra := [j for j in pool if got["scores"][j] >= threshold + tol]:
        problems.append(f"{len(extra)} ONNX box(es) at or above the threshold that PyTorch does not give")
    return problems, ious, diffs


def parity_check(
    net: nn.Module,
    onnx_path: Path,
    images: list[np.ndarray],
    *,
    score_threshold: float,
    iou_floor: float,
    tolerance: float,
) -> DetParity:
    """ONNX Runtime (CPU) against PyTorch (model.predict_torch) on (H, W, 3) uint8 images."""
    session = ort_session(onnx_path)
    net = net.cpu().eval()
    ious, diffs, bad, ort_ms, torch_ms, boxes = [], [], [], [], [], 0
    for k, img in enumerate(images):
        chw = np.ascontiguousarray(img.transpose(2, 0, 1))
        t = time.perf_counter()
        ref = {key: v.numpy() for key, v in predict_torch(net, torch.from_numpy(chw)).items()}
        torch_ms.append((time.perf_counter() - t) * 1000)
        t = time.perf_counter()
        got = dict(zip(OUTPUTS, session.run(OUTPUTS, {"image": chw[None]})))
        ort_ms.append((time.perf_counter() - t) * 1000)
        problems, i, d = compare(ref, got, score_threshold, tolerance, iou_floor)
        boxes += int((ref["scores"] >= score_threshold).sum())
        ious, diffs = ious + i, diffs + d
        bad += [f"image {k}: {problems[0]}"] if problems else []
    reasons = (
        [f"{len(bad)} of {len(images)} images differ between ONNX and PyTorch: " + "; ".join(bad[:3])] if bad else []
    )
    if not images:
        reasons.append("no test images to compare ONNX with PyTorch on")
    return DetParity(
        passed=not reasons,
        n_images=len(images),
        boxes_compared=boxes,
        worst_iou=min(ious, default=1.0),
        max_score_diff=max(diffs, default=0.0),
        score_tolerance=tolerance,
        iou_floor=iou_floor,
        score_threshold=score_threshold,
        ort_ms=statistics.median(ort_ms) if ort_ms else 0.0,
        torch_ms=statistics.median(torch_ms) if torch_ms else 0.0,
        reasons=reasons,
    )


def export(p: Params, root: Path) -> DetExportResult:
    """The published detector (models/model.ckpt) to models/onnx/model.onnx with its card; the parity figures in
    reports/export.json and as tags of the training run. The caller refuses the model when not passed."""
    paths = ProjectPaths.of(p, root)
    if not paths.checkpoint.is_file():
        raise DataError(f"no trained model at {paths.relative(paths.checkpoint)}: run `visionflow train` first")
    trained = json.loads(paths.train_report.read_text()) if paths.train_report.is_file() else {}
    net, hp = load_detector(paths.checkpoint)
    onnx_path = export_onnx(net, hp["image_size"], paths.onnx_dir / "model.onnx")
    split = read_split(paths, "test")
    images = [load_rgb(path) for path in split.paths[: min(p.export.parity_images, PARITY_CAP)]]
    d = p.detection
    parity = parity_check(
        net,
        onnx_path,
        images,
        score_threshold=d.score_threshold,
        iou_floor=d.parity_iou,
        tolerance=p.export.parity_tolerance,
    )
    card = write_model_card(
        onnx_path,
        image_size=hp["image_size"],
        channels=3,
        classes=list(hp["classes"]),
        model_name=hp["model"],
        data_version=trained.get("data_version"),
        extra={
            "task": "detection",
            "input": {"name": "image", "dtype": "uint8", "layout": "NCHW", "shape": [1, 3, "height", "width"]},
            "outputs": OUTPUTS,
            "score_threshold": d.score_threshold,
            "mlflow_run_id": trained.get("mlflow_run_id"),
        },
    )
    res = DetExportResult(**asdict(parity), onnx_path=paths.relative(onnx_path), card=card)
    write_json_atomic(paths.export_report, asdict(res))
    if trained.get("mlflow_run_id"):
        _log_parity(trained["mlflow_run_id"], parity)
    return res


def _log_parity(run_id: str, parity: DetParity) -> None:
    """The parity and latency figures as visionflow.onnx.* tags of the training run (as the classifier's)."""
    import mlflow

    from visionflow.registry.tracking import detail_tags

    names = ("passed", "n_images", "boxes_compared", "worst_iou", "max_score_diff", "ort_ms", "torch_ms")
    mlflow.MlflowClient().log_batch(run_id, tags=detail_tags("onnx", {k: getattr(parity, k) for k in names}))
