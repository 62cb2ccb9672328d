"""Promotion: judge a registered challenger against every gate and against the champion, on the same images.

Both models are compared on the clean test split, the corruption suite on the robustness subset (the images
evaluation uses) and, for a retraining, a reviewed production batch. Those images are built once per model input
(image size, channels), however many models read them.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from visionflow.config import EvaluateParams, RegistryParams
from visionflow.data.imageio import DecodeRules
from visionflow.errors import DataError
from visionflow.paths import ProjectPaths
from visionflow.registry.gates import Decision, Gate, gate_decision


@dataclass(frozen=True)
class PromoteResult:
    """The decision (reports/registry.json): gates, aliases before and after, and both models' accuracies."""

    model: str
    version: str
    promoted: bool
    champion_before: str | None
    champion_after: str | None
    gates: list[Gate]
    reasons: list[str]  # the failed gates, "name: detail"
    clean_accuracy: dict[str, Any]  # challenger, champion (None without one), n_images: on the clean test split
    eval_batch: str | None = None
    eval_batch_accuracy: dict[str, Any] | None = None  # as clean_accuracy, on the eval batch (when one was given)

    def summary(self) -> dict[str, Any]:
        """The decision as the pipeline report carries it (metric: what the *_metric entries measure)."""
        return {
            "model": self.model,
            "version": self.version,
            "promoted": self.promoted,
            "reasons": self.reasons,
            "champion": self.champion_after,
            "champion_before": self.champion_before,
            "metric": "accuracy",
            "clean_accuracy": self.clean_accuracy,
            "eval_batch_accuracy": self.eval_batch_accuracy,
            "clean_metric": self.clean_accuracy,
            "eval_batch_metric": self.eval_batch_accuracy,
        }


@dataclass(frozen=True)
class Comparison:
    """The images a model is judged on. `every` is the clean test split, then each corruption at each severity on
    the robustness subset, then the eval batch (its last n_batch images); labels alongside."""

    clean: np.ndarray
    clean_labels: np.ndarray
    every: np.ndarray
    every_labels: np.ndarray
    n_batch: int


def labelled_batch(
    folder: Path, image_size: int, channels: int, classes: list[str], rules: DecodeRules
) -> tuple[np.ndarray, np.ndarray]:
    """A reviewed batch (images + labels.csv) decoded for a model; unreadable or unlabelled images are left out."""
    from visionflow.data.imageio import RejectedImage, decode_for_model, read_limited
    from visionflow.monitoring.simulate import load_batch

    batch = load_batch(folder)
    if batch.labels is None:
        raise DataError(f"{folder} has no labels.csv: an evaluation batch needs reviewed labels")
    images, labels = [], []
    for f, label in zip(batch.images, batch.labels):
        if label not in classes:
            continue
        try:
            images.append(decode_for_model(read_limited(f, rules.max_bytes), image_size, channels, rules))
        except RejectedImage:
            continue
        labels.append(classes.index(label))
    if not images:
        raise DataError(f"{folder}: no readable image with a known label")
    return np.stack(images), np.asarray(labels)


class ComparisonImages:
    """The promotion's images for each model input, built (test split from the cache, corruptions, eval batch
    decoded) the first time a model with that input asks."""

    def __init__(
        self, *, paths: ProjectPaths, cfg: EvaluateParams, seed: int, eval_batch: Path | None, rules: DecodeRules
    ):
        self.paths, self.cfg, self.seed = paths, cfg, seed
        self.eval_batch, self.rules = eval_batch, rules
        self._built: dict[tuple[int, int], Comparison] = {}

    def for_card(self, card: dict[str, Any], classes: list[str]) -> Comparison:
        key = (card["image_size"], card["channels"])
        if key not in self._built:
            self._built[key] = self._build(*key, classes)
        return self._built[key]

    def _build(self, image_size: int, channels: int, classes: list[str]) -> Comparison:
        from visionflow.data.cache import project_split
        from visionflow.training.evaluate import robustness_subset
        from visionflow.training.robustness import corrupt_batch

        test = project_split(self.paths, "test", classes=classes, image_size=image_size, channels=channels)
        imgs, labels = np.asarray(test.images), test.labels
        subset = robustness_subset(len(imgs), self.cfg.robustness_images, self.seed)
        corrupted = [
            corrupt_batch(imgs[subset], name, sev, seed=self.seed)
            for name in self.cfg.corruptions
            for sev in self.cfg.severities
        ]
        extra = [labelled_batch(self.eval_batch, image_size, channels, classes, self.rules)] if self.eval_batch else []
        every = np.concatenate([imgs, *corrupted, *(e[0] for e in extra)])
        every_labels = np.concatenate([labels] + [labels[subset]] * len(corrupted) + [e[1] for e in extra])
        return Comparison(imgs, labels, every, every_labels, n_batch=sum(len(e[1]) for e in extra))


def _correct(onnx_path: Path, images: Comparison) -> tuple[np.ndarray, np.ndarray]:
    """Per-image correctness of a model on the clean split and on every image of the comparison."""
    from visionflow.onnxrt import ort_logits, ort_session

    session = ort_session(onnx_path, device="auto")
    return (
        ort_logits(session, images.clean).argmax(1) == images.clean_labels,
        ort_logits(session, images.every).argmax(1) == images.every_labels,
    )


def _accuracy(new: np.ndarray, old: np.ndarray | None) -> dict[str, Any]:
    return {
        "challenger": round(float(new.mean()), 4),
        "champion": round(float(old.mean()), 4) if old is not None else None,
        "n_images": int(len(new)),
    }


def promote(
    *, model_name: str, version: str | None, cfg: RegistryParams, seed: int, lock_dir: Path, images: ComparisonImages
) -> PromoteResult:
    """Judge `version` (default: the challenger) against every gate and the current champion; move the aliases
    if it wins. Runs under the promotion lock; the downloaded models go when the promotion is decided."""
    from visionflow.registry.store import (
        CHALLENGER,
        CHAMPION,
        RegistryError,
        alias_version,
        apply_promotion,
        download_onnx,
        promotion_lock,
        version_info,
    )

    name = model_name
    version = version or alias_version(name, CHALLENGER)
    if version is None:
        raise RegistryError(f"no version given and {name} has no challenger: register a model first")
    with promotion_lock(lock_dir, name), tempfile.TemporaryDirectory(prefix="visionflow-promote-") as tmp:
        tags = version_info(name, version)["tags"]
        champion = alias_version(name, CHAMPION)
        new_path, card = download_onnx(name, version, Path(tmp) / version)
        classes = card["classes"]
        new = images.for_card(card, classes)
        clean_new, all_new = _correct(new_path, new)
        clean_old = all_old = None
        if champion is not None and champion != version:
            clean_old, all_old = _champion_correct(name, champion, version, classes, images, Path(tmp))
        gates = gate_decision(
            cfg=cfg,
            parity_passed=tags.get("visionflow.gate.parity") == "passed",
            parity_detail=(
                f"max |logit diff| {tags.get('visionflow.parity.max_abs_diff')}, top-1 agreement "
                f"{tags.get('visionflow.parity.top1_agreement')}"
            ),
            latency_ms=float(tags.get("visionflow.latency.ort_ms_b1", "inf")),
            clean_new=clean_new,
            labels=new.clean_labels,
            classes=classes,
            seed=seed,
            clean_old=clean_old,
            all_new=all_new,
            all_old=all_old,
            compared_on="clean+corrupted+eval-batch" if images.eval_batch else "clean+corrupted",
        )
        d = apply_promotion(name, version, gates)
    return _result(d, images.eval_batch, new.n_batch, (clean_new, all_new), (clean_old, all_old))


def _champion_correct(
    name: str, champion: str, version: str, classes: list[str], images: ComparisonImages, tmp: Path
) -> tuple[np.ndarray, np.ndarray]:
    """The champion's per-image correctness on the images the challenger is judged on; a champion that predicts
    other classes cannot be compared, so the promotion stops for a person."""
    from visionflow.registry.store import RegistryError, download_onnx

    old_path, old_card = download_onnx(name, champion, tmp / champion)
    if old_card["classes"] != classes:
        raise RegistryError(
            f"champion v{champion} predicts classes {old_card['classes']}, challenger "
            f"v{version} predicts {classes}: promote by hand after review"
        )
    return _correct(old_path, images.for_card(old_card, classes))


def _result(
    d: Decision,
    batch: Path | None,
    n_batch: int,
    new: tuple[np.ndarray, np.ndarray],
    old: tuple[np.ndarray | None, np.ndarray | None],
) -> PromoteResult:
    """The decision with both models' accuracies; new and old are (clean, every) correctness as _correct gives
    (old is (None, None) without a champion), the eval batch being every's last n_batch images."""
    (clean_new, all_new), (clean_old, all_old) = new, old
    return PromoteResult(
        model=d.model,
        version=d.version,
        promoted=d.promoted,
        champion_before=d.champion_before,
        champion_after=d.champion_after,
        gates=d.gates,
        reasons=d.reasons,
        clean_accuracy=_accuracy(clean_new, clean_old),
        eval_batch=str(batch) if batch else None,
        eval_batch_accuracy=(
            _accuracy(all_new[-n_batch:], all_old[-n_batch:] if all_old is not None else None) if batch else None
        ),
    )
