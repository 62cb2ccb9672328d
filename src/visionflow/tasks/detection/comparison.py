"""The images a detector is judged on for promotion, and each model's matched detections on them.

In order: the clean test split, the robustness subset corrupted, then the reviewed eval batch. Each image of the
robustness subset gets one (corruption, severity) pair, the pairs taken in turn: every corruption and severity is
represented at the cost of one pass over the subset (a detector runs ~50 ms an image on 2 cores, so all 18 pairs
on every image would take minutes per model). Images are decoded at their own size (the ONNX graph resizes
inside); corrupted copies are made on the fly, from the same seed for every model, so both models see identical
pixels without holding the copies.

Eval batch format: a folder with a COCO `annotations.json` (images' file_name relative to the folder, or to its
`images/` sub-folder; bbox [x, y, w, h] in pixels; categories by name), the form data/raw uses. Images without
boxes are negatives; an image that is missing or cannot be decoded is left out and counted.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from visionflow.data.imageio import DecodeRules, RejectedImage, open_guarded, read_limited, to_array
from visionflow.errors import DataError
from visionflow.tasks.detection.metrics import Matches, collect, match_image


@dataclass(frozen=True)
class Annotated:
    image: np.ndarray  # (H, W, 3) uint8 RGB
    gt_boxes: np.ndarray  # (k, 4) x, y, w, h in pixels
    gt_labels: np.ndarray  # (k,) 0-based class indices


def _decode(path: Path, rules: DecodeRules) -> np.ndarray:
    return to_array(open_guarded(read_limited(path, rules.max_bytes), rules), 3)


def _truth(boxes: list, classes: list[str], where: str) -> tuple[np.ndarray, np.ndarray]:
    """[[x, y, w, h, "class"], ...] as (xywh array, 0-based labels); a class the model does not know is an error."""
    unknown = sorted({str(b[4]) for b in boxes if b[4] not in classes})
    if unknown:
        raise DataError(f"{where}: boxes of class {', '.join(unknown)} that the model does not predict ({classes})")
    xywh = np.asarray([b[:4] for b in boxes], float).reshape(-1, 4)
    return xywh, np.asarray([classes.index(b[4]) for b in boxes], np.int64)


def test_split(csv: Path, root: Path, classes: list[str], rules: DecodeRules) -> list[Annotated]:
    """The test split (one row per image, `path` relative to the project root, `boxes` JSON)."""
    import pandas as pd

    if not csv.is_file():
        raise DataError(f"{csv} not found: run `visionflow split` first")
    table = pd.read_csv(csv, dtype=str, keep_default_na=False)
    if not {"path", "boxes"} <= set(table.columns):
        raise DataError(f"{csv} has no path and boxes columns: not a detection split (base.task?)")
    out = []
    for path, boxes in zip(table["path"], table["boxes"]):
        try:
            image = _decode(root / path, rules)
        except (OSError, RejectedImage) as exc:
            raise DataError(f"{csv}: test image {path} cannot be read ({exc}): rerun `visionflow validate`") from exc
        out.append(Annotated(image, *_truth(json.loads(boxes or "[]"), classes, f"{csv} ({path})")))
    if not out:
        raise DataError(f"{csv} holds no image: nothing to judge a model on")
    return out


def eval_batch(folder: Path, classes: list[str], rules: DecodeRules) -> tuple[list[Annotated], list[str]]:
    """A reviewed batch in the COCO form above: its images with boxes, and the files left out (with why)."""
    spec = Path(folder) / "annotations.json"
    if not Path(folder).is_dir():
        raise DataError(f"evaluation batch {folder} is not a folder (images + a COCO annotations.json)")
    if not spec.is_file():
        raise DataError(f"{folder} has no annotations.json: an evaluation batch needs reviewed boxes (COCO JSON)")
    try:
        coco = json.loads(spec.read_text())
        names = {c["id"]: c["name"] for c in coco["categories"]}
        files = {im["id"]: im["file_name"] for im in coco["images"]}
        boxes: dict[int, list] = {i: [] for i in files}
        for a in coco.get("annotations", []):
            boxes[a["image_id"]].append([*map(float, a["bbox"]), names[a["category_id"]]])
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{spec} is not COCO annotations ({type(exc).__name__}: {exc})") from None
    base = folder / "images" if (folder / "images").is_dir() else folder
    out, skipped = [], []
    for image_id, name in sorted(files.items()):
        try:
            image = _decode(base / name, rules)
        except (OSError, RejectedImage) as exc:
            skipped.append(f"{name}: {exc}")
            continue
        out.append(Annotated(image, *_truth(boxes[image_id], classes, f"{spec} ({name})")))
    if not out:
        raise DataError(f"{folder}: no readable image in annotations.json")
    return out, skipped


@dataclass
class Comparison:
    clean: list[Annotated]
    subset: np.ndarray  # the clean images the corruptions are applied to, one pair each
    corruptions: list[tuple[str, int]]  # (name, severity) pairs, taken in turn
    batch: list[Annotated] = field(default_factory=list)
    seed: int = 0

    def groups(self) -> dict[str, np.ndarray]:
        """Each group's image indices in the order __iter__ yields them."""
        n_clean, n_corr = len(self.clean), len(self.subset) if self.corruptions else 0
        return {
            "clean": np.arange(n_clean),
            "corrupted": np.arange(n_clean, n_clean + n_corr),
            "eval_batch": np.arange(n_clean + n_corr, n_clean + n_corr + len(self.batch)),
        }

    def __iter__(self) -> Iterator[Annotated]:
        from visionflow.data.corruptions import ROBUSTNESS, corrupter

        yield from self.clean
        for k, (name, severity) in enumerate(self.corruptions):
            # the same generator state for every model: each model sees the very same corrupted pixels
            corrupt = corrupter(ROBUSTNESS, name, severity, np.random.default_rng(self.seed))
            for i in self.subset[k :: len(self.corruptions)]:
                a = self.clean[i]
                yield Annotated(corrupt(a.image).reshape(a.image.shape), a.gt_boxes, a.gt_labels)
        yield from self.batch


def judge(onnx_path: Path, images: Comparison, n_classes: int) -> Matches:
    """A detection model's detections (ONNX Runtime, every box the graph returns) matched on every image."""
    from visionflow.onnxrt import ort_session

    session = ort_session(onnx_path, device="auto")
    per_image, truth = [], []
    for a in images:
        boxes, scores, labels = session.run(
            ["boxes", "scores", "labels"], {"image": np.ascontiguousarray(a.image.transpose(2, 0, 1)[None])}
        )
        per_image.append(match_image(boxes, scores, labels.astype(np.int64) - 1, a.gt_boxes, a.gt_labels))
        truth.append(a.gt_labels)
    return collect(per_image, truth, n_classes)


def latency_ms(onnx_path: Path, image: np.ndarray, repeats: int = 20) -> float:
    """ONNX Runtime batch-1 p50 on CPU (what serving runs), after one warm-up run."""
    import statistics
    import time

    from visionflow.onnxrt import ort_session

    session = ort_session(onnx_path)
    feed = {"image": np.ascontiguousarray(image.transpose(2, 0, 1)[None])}
    session.run(None, feed)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)
