"""Evaluate: clean test metrics, per-class numbers, calibration, plots, and the corruption-robustness suite.

Everything is logged to the training run in MLflow and written to reports/evaluation/ for people and machines.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchmetrics.functional.classification as tmf

from visionflow.config import EvaluateParams
from visionflow.report import write_json_atomic
from visionflow.training.robustness import corrupt_batch


@dataclass(frozen=True)
class EvalResult:
    test_accuracy: float
    macro_f1: float
    ece: float
    robust_accuracy: float
    per_class: dict[str, dict[str, float]]
    robustness: dict[str, dict[str, float]]
    n_test: int
    report_dir: str
    mlflow_run_id: str | None = None  # the training run the evaluation was logged to

    def headline(self) -> str:
        """The one line the pipeline logs."""
        return (
            f"test accuracy {self.test_accuracy:.4f}, macro F1 {self.macro_f1:.4f}, "
            f"robust accuracy {self.robust_accuracy:.4f}, ECE {self.ece:.4f}"
        )

    def summary(self) -> dict[str, float]:
        """The figures the pipeline report carries at its top level."""
        return {
            "test_accuracy": self.test_accuracy,
            "macro_f1": self.macro_f1,
            "ece": self.ece,
            "robust_accuracy": self.robust_accuracy,
        }


LOG = logging.getLogger(__name__)
# The pipeline's own inference (evaluation, the robustness suite) runs here; a GPU's numbers are the CPU's within
# GPU_TOLERANCE on the logits (fp32, but cuDNN convolutions use TF32), so top-1 differs only on near-ties and the
# accuracies agree to a few images in ten thousand. ONNX parity (export) stays CPU-against-ONNX-Runtime.
GPU_TOLERANCE = 0.05


def inference_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def in_batches(
    fn: Callable[[int, int], np.ndarray], n: int, batch_size: int, log: logging.Logger | logging.LoggerAdapter = LOG
) -> list[np.ndarray]:
    """fn(start, stop) over [0, n) in batches of batch_size; when the GPU runs out of memory the batch is halved
    (with a logged message) and the rest of the run keeps the smaller size. Out of memory with batches of one
    image is raised."""
    out, start = [], 0
    while start < n:
        stop = min(start + batch_size, n)
        try:
            out.append(fn(start, stop))
        except torch.cuda.OutOfMemoryError:
            if batch_size == 1:
                raise
            batch_size = max(1, batch_size // 2)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            log.warning(
                "GPU out of memory on a batch of %d images: retrying with batches of %d", stop - start, batch_size
            )
            continue
        start = stop
    return out


@torch.inference_mode()
def predict_logits(net: torch.nn.Module, images: np.ndarray, batch_size: int = 512, device: str = "cpu") -> np.ndarray:
    """Logits for (N, H, W, C) uint8 images, in batches, on `device` (the net is moved there and left there)."""
    net.to(device).eval()

    def batch(i: int, j: int) -> np.ndarray:
        x = torch.from_numpy(np.array(np.asarray(images[i:j]).transpose(0, 3, 1, 2), copy=True))
        return net(x.to(device, non_blocking=True)).float().cpu().numpy()

    out = in_batches(batch, len(images), batch_size)
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def classification_metrics(logits: np.ndarray, labels: np.ndarray, classes: list[str]) -> dict[str, Any]:
    n = len(classes)
    preds, target = torch.from_numpy(logits), torch.from_numpy(labels)
    probs = preds.softmax(dim=1)
    precision = tmf.multiclass_precision(probs, target, num_classes=n, average=None)
    recall = tmf.multiclass_recall(probs, target, num_classes=n, average=None)
    return {
        "accuracy": float(tmf.multiclass_accuracy(probs, target, num_classes=n, average="micro")),
        "macro_f1": float(tmf.multiclass_f1_score(probs, target, num_classes=n, average="macro")),
        "ece": float(tmf.multiclass_calibration_error(probs, target, num_classes=n, n_bins=15, norm="l1")),
        "per_class": {c: {"precision": float(precision[i]), "recall": float(recall[i])} for i, c in enumerate(classes)},
        "confusion": tmf.multiclass_confusion_matrix(preds, target, num_classes=n).numpy(),
    }


def robustness_subset(n_images: int, max_images: int, seed: int) -> np.ndarray:
    """Indices (sorted) of the test images the corruption suite runs on: a seeded random sample (not stratified by
    class) of at most max_images, so the suite stays affordable on CPU. Evaluation and promotion both use it, so a
    model's robust accuracy and the promotion comparison see the same images."""
    return np.sort(np.random.default_rng(seed).permutation(n_images)[:max_images])


def robustness_suite(
    net: torch.nn.Module, images: np.ndarray, labels: np.ndarray, cfg: EvaluateParams, seed: int, device: str = "cpu"
) -> dict[str, dict[str, float]]:
    """Accuracy per corruption and severity; key 'mean' per corruption, computed over cfg.severities."""
    results: dict[str, dict[str, float]] = {}
    for name in cfg.corruptions:
        per = {}
        for sev in cfg.severities:
            logits = predict_logits(net, corrupt_batch(images, name, sev, seed=seed), device=device)
            per[str(sev)] = float((logits.argmax(1) == labels).mean())
        per["mean"] = float(np.mean([per[str(s)] for s in cfg.severities]))
        results[name] = per
    return results


def _plot_confusion(confusion: np.ndarray, classes: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    norm = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * len(classes), 0.8 + 0.6 * len(classes)))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(len(classes)):
        for j in range(len(classes)):
            if confusion[i, j]:
                ax.text(
                    j,
                    i,
                    str(confusion[i, j]),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if norm[i, j] > 0.5 else "black",
                )
    ax.set_title("Confusion matrix (test split; colour = row share)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_worst(
    images: np.ndarray, labels: np.ndarray, logits: np.ndarray, classes: list[str], path: Path, k: int = 25
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    probs = torch.from_numpy(logits).softmax(1).numpy()
    preds = probs.argmax(1)
    wrong = np.flatnonzero(preds != labels)
    worst = wrong[np.argsort(-probs[wrong, preds[wrong]])][:k]
    cols = 5
    rows = max(1, math.ceil(len(worst) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 2.0, rows * 2.3))
    for ax in np.atleast_1d(axes).ravel():
        ax.axis("off")
    for ax, i in zip(np.atleast_1d(axes).ravel(), worst):
        img = np.asarray(images[i])
        ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None)
        ax.set_title(f"true {classes[labels[i]]}\npred {classes[preds[i]]} {probs[i, preds[i]]:.2f}", fontsize=7)
    fig.suptitle("Most confident mistakes (test split)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_robustness(rob: dict[str, dict[str, float]], clean: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, per in rob.items():
        sev = sorted(int(s) for s in per if s != "mean")
        ax.plot([0] + sev, [clean] + [per[str(s)] for s in sev], marker="o", label=f"{name} ({per['mean']:.3f})")
    ax.set_xlabel("severity (0 = clean)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Corruption robustness (test split)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def evaluate(
    *,
    net: torch.nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    classes: list[str],
    cfg: EvaluateParams,
    seed: int,
    report_dir: Path,
    mlflow_run_id: str | None = None,
    device: str | None = None,
) -> EvalResult:
    """device: where the network runs (default: the GPU when there is one)."""
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    device = device or inference_device()
    logits = predict_logits(net, images, device=device)
    m = classification_metrics(logits, labels, classes)
    subset = robustness_subset(len(labels), cfg.robustness_images, seed)
    rob = robustness_suite(net, np.asarray(images[subset]), labels[subset], cfg, seed, device=device)
    robust_accuracy = float(np.mean([per["mean"] for per in rob.values()]))
    result = EvalResult(
        test_accuracy=m["accuracy"],
        macro_f1=m["macro_f1"],
        ece=m["ece"],
        robust_accuracy=robust_accuracy,
        per_class=m["per_class"],
        robustness=rob,
        n_test=len(labels),
        report_dir=str(report_dir),
        mlflow_run_id=mlflow_run_id,
    )
    _plot_confusion(m["confusion"], classes, report_dir / "confusion_matrix.png")
    _plot_worst(images, labels, logits, classes, report_dir / "worst_errors.png")
    _plot_robustness(rob, m["accuracy"], report_dir / "robustness.png")
    payload = {
        **asdict(result),
        "confusion_matrix": m["confusion"].tolist(),
        "classes": classes,
        "robustness_images": len(subset),
        "device": device,
    }
    write_json_atomic(report_dir / "evaluation.json", payload)
    if mlflow_run_id:
        _log_to_mlflow(mlflow_run_id, result, report_dir)
    return result


def _log_to_mlflow(run_id: str, r: EvalResult, report_dir: Path) -> None:
    """Four headline figures as metrics; the per-class and per-corruption detail as tags (and evaluation.json).

    Each metric is a chart in MLflow's UI: dozens of one-point charts would bury the training curves.
    """
    import mlflow
    from mlflow.entities import Metric

    from visionflow.registry.tracking import detail_tags

    client = mlflow.MlflowClient()
    ts = int(time.time() * 1000)
    metrics = {
        "test/accuracy": r.test_accuracy,
        "test/macro_f1": r.macro_f1,
        "test/ece": r.ece,
        "robust/accuracy": r.robust_accuracy,
    }
    detail = {f"{kind}.{c}": pr[kind] for c, pr in r.per_class.items() for kind in ("precision", "recall")}
    detail |= {f"robust.{name}.{sev}": acc for name, per in r.robustness.items() for sev, acc in per.items()}
    client.log_batch(
        run_id, metrics=[Metric(k, float(v), ts, 0) for k, v in metrics.items()], tags=detail_tags("eval", detail)
    )
    for f in ("confusion_matrix.png", "worst_errors.png", "robustness.png", "evaluation.json"):
        client.log_artifact(run_id, str(report_dir / f), artifact_path="evaluation")
