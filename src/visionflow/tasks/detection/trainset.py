"""Detection examples from the split CSVs: decoded RGB images, their boxes, box-aware augmentation and the collate
torchvision's detectors take (lists, since images keep their own sizes)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset, get_worker_info

from visionflow.config import AugmentParams
from visionflow.data.imageio import DecodeRules, RejectedImage, open_guarded, read_limited, to_array
from visionflow.errors import DataError
from visionflow.paths import ProjectPaths

# A box cropped by the scale/shift augmentation to less than this share of its area is dropped from the target.
MIN_VISIBILITY = 0.3


@dataclass(frozen=True)
class Split:
    """One split: image paths (absolute) and per image its boxes, xywh pixels (n, 4) float32, and class names."""

    name: str
    paths: list[Path]
    boxes: list[np.ndarray]
    names: list[list[str]]

    def __len__(self) -> int:
        return len(self.paths)


def _parse_boxes(raw: object, where: str) -> tuple[np.ndarray, list[str]]:
    try:
        items = json.loads(raw) if isinstance(raw, str) and raw.strip() else []
        xywh = np.array([[float(v) for v in b[:4]] for b in items], dtype=np.float32).reshape(-1, 4)
        names = [str(b[4]) for b in items]
    except (ValueError, TypeError, IndexError) as exc:
        raise DataError(f"{where}: the boxes column is not JSON [[x, y, w, h, class], ...]: {exc}") from None
    return xywh, names


def read_split(paths: ProjectPaths, name: str) -> Split:
    csv = paths.splits / f"{name}.csv"
    if not csv.is_file():
        raise DataError(f"{paths.relative(csv)} not found: run `visionflow split` first")
    df = pd.read_csv(csv, dtype={"path": str, "boxes": str}, keep_default_na=False)
    if "boxes" not in df.columns or "path" not in df.columns:
        raise DataError(f"{paths.relative(csv)} has no path/boxes columns: it is not a detection split")
    parsed = [_parse_boxes(b, f"{paths.relative(csv)} row {i + 2}") for i, b in enumerate(df["boxes"])]
    return Split(
        name=name,
        paths=[paths.resolve(p) for p in df["path"]],
        boxes=[b for b, _ in parsed],
        names=[n for _, n in parsed],
    )


def class_names(split: Split) -> list[str]:
    """The sorted class names found in (the training) split; model label k names classes[k - 1]."""
    classes = sorted({n for names in split.names for n in names})
    if not classes:
        raise DataError(f"the {split.name} split has no boxes: nothing to train a detector on")
    return classes


def load_rgb(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 through the guarded decoder (the split's images were accepted by validation)."""
    rules = DecodeRules.accepted()
    try:
        return to_array(open_guarded(read_limited(path, rules.max_bytes), rules), 3)
    except (OSError, RejectedImage) as exc:
        raise DataError(f"{path}: cannot be read for detection: {exc}") from None


def augmentation(aug: AugmentParams, seed: int):
    """Flip, brightness/contrast and a mild scale/shift, moving the boxes with the pixels (COCO xywh)."""
    import albumentations as A

    return A.Compose(
        [
            A.HorizontalFlip(p=aug.hflip),
            A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=aug.brightness_contrast),
            A.Affine(scale=(0.9, 1.1), translate_percent=(-0.06, 0.06), border_mode=0, p=aug.shift_scale_rotate),
        ],
        bbox_params=A.BboxParams(format="coco", label_fields=["labels"], min_visibility=MIN_VISIBILITY),
        seed=seed,
    )


def to_target(xywh: np.ndarray, labels: np.ndarray) -> dict[str, torch.Tensor]:
    """torchvision's target: boxes (n, 4) x1 y1 x2 y2 float32, labels (n,) int64 (1-based)."""
    b = torch.as_tensor(np.asarray(xywh, dtype=np.float32).reshape(-1, 4))
    return {"boxes": torch.cat([b[:, :2], b[:, :2] + b[:, 2:]], dim=1), "labels": torch.as_tensor(labels).long()}


def class_labels(split: Split, classes: list[str]) -> list[np.ndarray]:
    """Per image, each box's model label (1-based); 0 for a class the model does not know (absent from train)."""
    index = {c: i + 1 for i, c in enumerate(classes)}
    return [np.array([index.get(n, 0) for n in names], dtype=np.int64) for names in split.names]


def split_targets(split: Split, classes: list[str]) -> list[dict[str, torch.Tensor]]:
    """The ground truth of every image as torchvision targets (boxes of unknown classes left out)."""
    return [to_target(b[lab > 0], lab[lab > 0]) for b, lab in zip(split.boxes, class_labels(split, classes))]


class DetectionDataset(Dataset):
    """(image float [3, H, W] in 0..1, target) pairs; `augment` (an albumentations Compose) for training only."""

    def __init__(self, split: Split, classes: list[str], augment=None, seed: int = 0):
        self.split, self.augment, self.seed = split, augment, seed
        # boxes of a class the model does not know (label 0) are not targets it could learn: left out
        self.labels = class_labels(split, classes)
        self._seeded = False

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        img, boxes, labels = load_rgb(self.split.paths[i]), self.split.boxes[i], self.labels[i]
        boxes, labels = _sized(_clipped(boxes, img.shape), labels, labels > 0)
        if self.augment is not None:
            if not self._seeded:  # each loader worker draws its own seeded sequence
                worker = get_worker_info()
                self.augment.set_random_seed(self.seed + (worker.id if worker else 0))
                self._seeded = True
            out = self.augment(image=img, bboxes=boxes, labels=labels)
            boxes = np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4)
            img, (boxes, labels) = out["image"], _sized(boxes, np.asarray(out["labels"]), True)
        x = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).float().div_(255.0)
        return x, to_target(boxes, labels.astype(np.int64))


def _sized(xywh: np.ndarray, labels: np.ndarray, keep) -> tuple[np.ndarray, np.ndarray]:
    """The boxes (and labels) kept, of at least one pixel each way: a thinner box has no cell to learn from."""
    keep = keep & (xywh[:, 2:] >= 1).all(axis=1)
    return xywh[keep], labels[keep]


def _clipped(xywh: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Boxes clipped to the image: albumentations refuses a coordinate outside it."""
    h, w = shape[:2]
    x1 = np.clip(xywh[:, 0], 0, w)
    y1 = np.clip(xywh[:, 1], 0, h)
    x2 = np.clip(xywh[:, 0] + xywh[:, 2], 0, w)
    y2 = np.clip(xywh[:, 1] + xywh[:, 3], 0, h)
    return np.stack([x1, y1, x2 - x1, y2 - y1], axis=1).astype(np.float32).reshape(-1, 4)


def collate(batch):
    """Lists, not stacked tensors: torchvision detection takes list[Tensor] images and list[dict] targets."""
    images, targets = zip(*batch)
    return list(images), list(targets)
