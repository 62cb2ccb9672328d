"""Serving a detector: the predict handler's task for a champion whose model card says "task": "detection".

One image per ONNX Runtime call (the graph takes one image of any size and resizes it inside); the image is
decoded upright, reduced first when it is at least twice the model's size (the graph would shrink it anyway), and
the boxes are scaled back to the image as received. The answer is the boxes at or above detection.score_threshold,
COCO-style ([x, y, w, h] in input pixels); an image with one of them under detection.review_threshold goes to the
box review queue (tasks.detection.review) with its upload's bytes and its boxes.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from visionflow.config import DetectionParams
from visionflow.data.imageio import DecodeRules, PixelBudget, decode_reduced
from visionflow.serving.predictions import encode_embedding
from visionflow.tasks.detection.review import BoxReviewQueue

OUTPUTS = ("boxes", "scores", "labels", "embedding")


class Upload(NamedTuple):
    """One decoded upload: the pixels the model sees, the bytes as sent, and its upright size at full scale."""

    pixels: np.ndarray  # (h, w, 3) uint8, upright, possibly reduced
    data: bytes
    width: int
    height: int


class DetectImages:
    """serving.inference.BatchInference's handler for detection models (see that class for the protocol)."""

    def __init__(self, det: DetectionParams, queue: BoxReviewQueue):
        self.det, self.queue = det, queue

    def decode(
        self, data: bytes, card: dict[str, Any], rules: DecodeRules, budget: PixelBudget
    ) -> tuple[Upload, dict[str, float]]:
        pixels, props, (width, height) = decode_reduced(data, card["image_size"], 3, rules, budget)
        return Upload(pixels, data, width, height), props

    def infer(self, model, images: list[Upload]) -> list[list[np.ndarray]]:
        """(boxes, scores, labels, embedding) per image, one model call each."""
        return [
            model.session.run(list(OUTPUTS), {"image": np.ascontiguousarray(u.pixels.transpose(2, 0, 1)[None])})
            for u in images
        ]

    def answer(
        self, model, output: list[np.ndarray], upload: Upload, props: dict[str, float], now: float
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """(the answer, its prediction-log record) for one image; an uncertain one is queued for review."""
        boxes = served_boxes(output, upload, model.card["classes"], self.det.score_threshold)
        review_id = None
        if any(b["score"] < self.det.review_threshold for b in boxes):
            review_id = self.queue.add(
                upload.data, width=upload.width, height=upload.height, model_version=model.version, boxes=boxes
            )
        record = {
            "time": now,
            "model_version": model.version,
            "review_id": review_id,
            **drift_view(boxes, upload.width, upload.height),
            **props,
            "embedding": encode_embedding(output[3][0]),
        }
        return {"boxes": boxes, "model_version": model.version, "review_id": review_id}, record


def served_boxes(
    output: list[np.ndarray], upload: Upload, classes: list[str], threshold: float
) -> list[dict[str, Any]]:
    """The graph's boxes at or above `threshold`, as COCO [x, y, w, h] in the upload's pixels, best first."""
    boxes, scores, labels = output[0], output[1], output[2]
    ph, pw = upload.pixels.shape[:2]
    sx, sy = upload.width / pw, upload.height / ph
    served = []
    for (x1, y1, x2, y2), score, label in zip(boxes.tolist(), scores.tolist(), labels.tolist()):
        if score < threshold or not 1 <= label <= len(classes):  # (label 0 is the background)
            continue
        bbox = [x1 * sx, y1 * sy, (x2 - x1) * sx, (y2 - y1) * sy]
        served.append({"bbox": [round(v, 2) for v in bbox], "label": classes[label - 1], "score": round(score, 6)})
    return served


def drift_view(boxes: list[dict[str, Any]], width: int, height: int) -> dict[str, Any]:
    """What the drift check reads of a detection answer: how many boxes, their scores and labels, their areas as
    a fraction of the image and their centres as fractions of its sides."""
    area = float(width * height)
    return {
        "n_boxes": len(boxes),
        "scores": [b["score"] for b in boxes],
        "labels": [b["label"] for b in boxes],
        "box_areas": [round(b["bbox"][2] * b["bbox"][3] / area, 6) for b in boxes],
        "box_centres": [
            [round((x + w / 2) / width, 6), round((y + h / 2) / height, 6)] for x, y, w, h in (b["bbox"] for b in boxes)
        ],
    }
