"""AP@0.5 fast enough to bootstrap: detections matched to ground truth once per image, AP from any multiset of images.

Matching follows COCO (pycocotools' evaluateImg at IoU 0.5, area "all", 100 detections per image and class):
per image and class, detections in descending score take the unmatched ground-truth box they overlap most, if
at least 0.5. After that an image contributes only (score, true positive) pairs and ground-truth counts, so AP
over any resample of images is a weighted sum: each image counts as often as the resample draws it. AP uses
COCO's 101-point interpolation; a class without ground truth in the images has no AP (NaN) and stays out of
the mean, as in COCO and torchmetrics.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IOU = 0.5
MAX_DETS = 100
RECALL_POINTS = np.linspace(0.0, 1.0, 101)
# Resamples per block of the vectorised AP: bounds memory at (block x true positives of a class) floats.
_BLOCK = 256


@dataclass(frozen=True)
class Matches:
    """The detections on a list of images, matched: one entry per detection, ground-truth counts per image."""

    image: np.ndarray  # int: the image a detection is on (its index in the list)
    label: np.ndarray  # int: 0-based class
    score: np.ndarray  # float
    tp: np.ndarray  # bool: matched a ground-truth box of its class at IoU >= 0.5
    n_gt: np.ndarray  # int (n_images, n_classes): ground-truth boxes per image and class

    @property
    def n_images(self) -> int:
        return len(self.n_gt)


def _iou(dt_xyxy: np.ndarray, gt_xywh: np.ndarray) -> np.ndarray:
    """IoU (n_dt, n_gt) of x1y1x2y2 detections with xywh ground truth, COCO's way (no +1 pixel)."""
    gt = np.concatenate([gt_xywh[:, :2], gt_xywh[:, :2] + gt_xywh[:, 2:]], axis=1)
    lt = np.maximum(dt_xyxy[:, None, :2], gt[None, :, :2])
    rb = np.minimum(dt_xyxy[:, None, 2:], gt[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=2)
    area_dt = np.clip(dt_xyxy[:, 2:] - dt_xyxy[:, :2], 0, None).prod(axis=1)
    area_gt = gt_xywh[:, 2:].prod(axis=1)
    union = area_dt[:, None] + area_gt[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def match_image(
    boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, gt_boxes: np.ndarray, gt_labels: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One image: detections (x1y1x2y2 boxes, scores, 0-based labels) against ground truth (xywh boxes, 0-based
    labels). Returns the kept detections' (labels, scores, true-positive flags), by class then descending score."""
    out_labels, out_scores, out_tp = [], [], []
    boxes, gt_boxes = np.asarray(boxes, float).reshape(-1, 4), np.asarray(gt_boxes, float).reshape(-1, 4)
    for c in np.unique(labels):
        dt = np.flatnonzero(labels == c)
        dt = dt[np.argsort(-scores[dt], kind="mergesort")][:MAX_DETS]
        gt = np.flatnonzero(gt_labels == c)
        tp = np.zeros(len(dt), bool)
        if len(gt):
            ious = _iou(boxes[dt], gt_boxes[gt])
            taken = np.zeros(len(gt), bool)
            for i in range(len(dt)):
                # the best unmatched box at IoU >= 0.5; on equal IoU the later one, as pycocotools' loop does
                cand = np.where(taken, -1.0, ious[i])
                best = len(cand) - 1 - int(np.argmax(cand[::-1]))
                if cand[best] >= IOU:
                    taken[best], tp[i] = True, True
        out_labels.append(np.full(len(dt), c, np.int64))
        out_scores.append(scores[dt])
        out_tp.append(tp)
    if not out_labels:
        return np.zeros(0, np.int64), np.zeros(0, float), np.zeros(0, bool)
    return np.concatenate(out_labels), np.concatenate(out_scores).astype(float), np.concatenate(out_tp)


def collect(
    per_image: list[tuple[np.ndarray, np.ndarray, np.ndarray]], gt_labels: list[np.ndarray], n_classes: int
) -> Matches:
    """Matches from match_image's answers for a list of images and each image's 0-based ground-truth labels."""
    image = np.concatenate([np.full(len(m[0]), i, np.int64) for i, m in enumerate(per_image)] or [np.zeros(0, int)])
    counts = [np.bincount(np.asarray(g, int), minlength=n_classes) for g in gt_labels]
    n_gt = np.stack(counts) if counts else np.zeros((0, n_classes), int)
    return Matches(
        image=image,
        label=np.concatenate([m[0] for m in per_image] or [np.zeros(0, np.int64)]),
        score=np.concatenate([m[1] for m in per_image] or [np.zeros(0)]),
        tp=np.concatenate([m[2] for m in per_image] or [np.zeros(0, bool)]),
        n_gt=n_gt,
    )


def class_ap(m: Matches, weights: np.ndarray) -> np.ndarray:
    """AP@0.5 per class for each row of weights (r, n_images): how many times each image is counted (1 and 0
    select images; a bootstrap resample draws counts). Returns (r, n_classes), NaN where a class has no ground
    truth among the counted images.

    Only the true positives' ranks matter: recall grows only there, and a false positive's precision never tops
    the true positive before it, so the envelope the recall points read is the same. The false positives come in
    as counts per image before each true positive (a sparse matrix), which keeps the work per resample at the
    number of true positives, not of detections (an untrained detector returns 50 an image).
    """
    from scipy.sparse import csr_matrix

    weights = np.atleast_2d(np.asarray(weights, float))
    n_classes = m.n_gt.shape[1]
    npos = weights @ m.n_gt
    out = np.where(npos > 0, 0.0, np.nan)  # a class with ground truth but no true positive: AP 0
    for c in range(n_classes):
        dets = np.flatnonzero(m.label == c)
        # images in list order, each by descending score (match_image), then a stable sort: pycocotools' order
        dets = dets[np.argsort(-m.score[dets], kind="mergesort")]
        hits = np.flatnonzero(m.tp[dets])
        if not len(hits):
            continue
        misses = np.flatnonzero(~m.tp[dets][: hits[-1]])  # false positives after the last hit change nothing
        before = csr_matrix(
            (np.ones(len(misses)), (m.image[dets[misses]], np.searchsorted(hits, misses))),
            shape=(m.n_images, len(hits)),
        )
        for lo in range(0, len(weights), _BLOCK):
            w = weights[lo : lo + _BLOCK]
            ctp = np.cumsum(w[:, m.image[dets[hits]]], axis=1)
            cfp = np.cumsum(np.asarray((before.T @ w.T).T), axis=1)
            out[lo : lo + _BLOCK, c] = _ap(ctp, cfp, npos[lo : lo + _BLOCK, c])
    return out


def _ap(ctp: np.ndarray, cfp: np.ndarray, npos: np.ndarray) -> np.ndarray:
    """101-point interpolated AP per row from the cumulative true and false positive counts (rows, hits) at each
    true positive in ranked order, and the ground-truth count per row."""
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = ctp / npos[:, None]
        precision = np.where(ctp + cfp > 0, ctp / np.maximum(ctp + cfp, 1e-300), 0.0)
    # the precision envelope (best precision at this recall or beyond), then each recall point takes the
    # envelope at the first hit reaching it: hit k covers the points in (recall[k-1], recall[k]]
    envelope = np.flip(np.maximum.accumulate(np.flip(precision, 1), axis=1), 1)
    reached = np.searchsorted(RECALL_POINTS, np.nan_to_num(recall, nan=-1.0), side="right")
    covered = np.diff(reached, axis=1, prepend=0)
    ap = (covered * envelope).sum(axis=1) / len(RECALL_POINTS)
    return np.where(npos > 0, ap, np.nan)


def mean_ap(ap: np.ndarray) -> np.ndarray:
    """mAP over the classes that have an AP (the last axis); NaN when none has."""
    ap = np.asarray(ap, float)
    n = (~np.isnan(ap)).sum(axis=-1)
    return np.where(n > 0, np.nansum(ap, axis=-1) / np.maximum(n, 1), np.nan)


def map50(m: Matches, images: np.ndarray | None = None) -> tuple[float, np.ndarray]:
    """(mAP@0.5, AP@0.5 per class) over the images selected by index (default: all)."""
    w = np.zeros(m.n_images)
    w[np.arange(m.n_images) if images is None else images] = 1.0
    ap = class_ap(m, w)[0]
    return float(mean_ap(ap)), ap


def paired_bootstrap_map(
    new: Matches, old: Matches, images: np.ndarray, *, n_boot: int, alpha: float, seed: int
) -> tuple[float, float]:
    """mAP@0.5 gain (new - old) on the selected images (distinct indices, the same for both) and its one-sided
    (1 - alpha) lower bound from n_boot paired resamples of those images (deterministic from the seed)."""
    images = np.asarray(images, int)
    counts = np.random.default_rng(seed).multinomial(len(images), np.full(len(images), 1 / len(images)), n_boot)
    w = np.zeros((n_boot, new.n_images))
    w[:, images] = counts
    diff = mean_ap(class_ap(new, w)) - mean_ap(class_ap(old, w))
    gain = map50(new, images)[0] - map50(old, images)[0]
    return float(gain), float(np.nanquantile(diff, alpha))
