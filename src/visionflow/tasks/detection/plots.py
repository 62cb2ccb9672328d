"""The detection evaluation's pictures: precision-recall curves per class, and the worst test images with their
ground truth and predicted boxes."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

GROUND_TRUTH, PREDICTED = "#20c040", "#ff3030"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_pr_curves(curves: dict[str, np.ndarray], ap: dict[str, float | None], path: Path) -> None:
    """curves: class -> precision at the 101 COCO recall points (IoU 0.5); -1 where there is none."""
    plt = _pyplot()
    recall = np.linspace(0, 1, 101)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for name, precision in curves.items():
        ok = precision >= 0
        ax.plot(recall[ok], precision[ok], label=f"{name} (AP@0.5 {ap.get(name) or 0:.3f})")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(fontsize=8, loc="lower left")
    ax.set_title("Precision-recall per class at IoU 0.5 (test split)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _draw(ax, img: np.ndarray, gt: list[tuple[np.ndarray, str]], pred: list[tuple[np.ndarray, str, float]]) -> None:
    from matplotlib.patches import Rectangle

    ax.imshow(img)
    for (x1, y1, x2, y2), _name in gt:
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=GROUND_TRUTH, linewidth=1.5))
    for (x1, y1, x2, y2), name, score in pred:
        ax.add_patch(
            Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=PREDICTED, linewidth=1.2, linestyle="--")
        )
        ax.text(x1, y1, f"{name} {score:.2f}", color="white", fontsize=6, va="bottom", backgroundcolor=PREDICTED)


def plot_worst(items: list[dict], path: Path, cols: int = 4) -> None:
    """items: per image {image, title, gt [(xyxy, class)], pred [(xyxy, class, score)]}, worst first."""
    plt = _pyplot()
    rows = max(1, math.ceil(len(items) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 2.6, rows * 2.9))
    for ax in np.atleast_1d(axes).ravel():
        ax.axis("off")
    for ax, item in zip(np.atleast_1d(axes).ravel(), items):
        _draw(ax, item["image"], item["gt"], item["pred"])
        ax.set_title(item["title"], fontsize=7)
    fig.suptitle("Worst detections (test split): ground truth solid green, predictions dashed red", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
