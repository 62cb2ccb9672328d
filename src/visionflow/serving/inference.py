"""What the inference thread does with a batch of predict requests: parse and decode every upload, run each
model on all their images, queue the uncertain predictions for review, log every one, and encode each answer
(the event loop only sends them)."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from visionflow.config import Params, ServeParams
from visionflow.data.imageio import DecodeRules, PixelBudget, decode_with_properties
from visionflow.onnxrt import ort_outputs, softmax
from visionflow.paths import ProjectPaths
from visionflow.serving.champion import LoadedModel
from visionflow.serving.multipart import multipart_files
from visionflow.serving.predictions import PredictionLog
from visionflow.serving.review import ReviewQueue
from visionflow.tasks.detection.review import BoxReviewQueue
from visionflow.tasks.detection.serving import DetectImages

Prepared = tuple[list[Any], list[dict[str, float]]]  # one request's decoded images and their properties


class Job(NamedTuple):
    """One predict request, as the handler hands it to the inference thread."""

    model: LoadedModel  # the champion when the request came in (a swap meanwhile does not change it)
    body: bytes
    content_type: bytes
    max_files: int


class BatchInference:
    """The Batcher's `handle`: one outcome per job, (results, answer bytes) or the exception that request gets.

    What a task does differently (decoding, the model call, the answer, its review queue and log line) is its
    handler's: `tasks` maps a model card's task to it (ClassifyImages below, tasks.detection.serving for boxes),
    looked up by the task of the model each request was taken in with."""

    def __init__(self, cfg: ServeParams, rules: DecodeRules, tasks: Mapping[str, Any], log: PredictionLog):
        self.cfg, self.rules, self.tasks, self.log = cfg, rules, tasks, log

    def __call__(self, jobs: list[Job]) -> list[Any]:
        outcomes: list[Any] = [None] * len(jobs)
        prepared: dict[int, Prepared] = {}
        for i, job in enumerate(jobs):
            try:
                prepared[i] = self.prepare(job)
            except Exception as exc:  # noqa: BLE001 - a refused upload (HTTPException, RejectedImage) or an
                outcomes[i] = exc  # unforeseen failure (its 500, logged by the handler) is this request's alone
        records: list[dict[str, Any]] = []
        for model in {id(jobs[i].model): jobs[i].model for i in prepared}.values():  # one group per model (a swap)
            mine = [i for i in prepared if jobs[i].model is model]
            self._run_group(model, mine, jobs, prepared, outcomes, records)
        # A request that timed out (504) still lands here: the model did see that image, so it is logged.
        return logged(self.log, records, outcomes)

    def prepare(self, job: Job) -> Prepared:
        """Parse one request's form and decode its images (raises HTTPException / RejectedImage for that one)."""
        files = multipart_files(
            job.body,
            job.content_type,
            max_files=job.max_files,
            max_fields=self.cfg.max_form_fields,
            max_file_bytes=self.rules.max_bytes,
        )
        budget = PixelBudget(self.cfg.max_request_pixels)  # one request's images together
        task = self.tasks[job.model.task]
        decoded = [task.decode(data, job.model.card, self.rules, budget) for data in files]
        # properties are measured on the image as received, like the drift check's reference
        return [a for a, _ in decoded], [props for _, props in decoded]

    def _run_group(
        self,
        model: LoadedModel,
        mine: list[int],
        jobs: list[Job],
        prepared: dict[int, Prepared],
        outcomes: list[Any],
        records: list[dict[str, Any]],
    ) -> None:
        """One model call for the requests `mine`; fills in their outcomes and adds their log records."""
        task = self.tasks[model.task]
        images = [a for i in mine for a in prepared[i][0]]
        try:
            outputs = task.infer(model, images)
        except Exception as exc:  # noqa: BLE001 - fails this model's group; another group may still run
            for i in mine:
                outcomes[i] = exc
            return
        now, k = time.time(), 0
        for i in mine:
            results = []
            try:
                for props in prepared[i][1]:
                    result, record = task.answer(model, outputs[k], images[k], props, now)
                    results.append(result)
                    records.append(record)
                    k += 1
            except (OSError, sqlite3.Error) as exc:  # the review queue cannot be written
                k += len(prepared[i][1]) - len(results)
                outcomes[i] = exc
                continue
            answer = results[0] if jobs[i].max_files == 1 else {"predictions": results}
            outcomes[i] = (results, json.dumps(answer, separators=(",", ":")).encode())


def logged(log, records: list[dict[str, Any]], outcomes: list[Any]) -> list[Any]:
    """Append a batch's records to the prediction log; when the log cannot be written, the batch's answers become
    that error (a 503), since a prediction that is not logged is invisible to the drift check."""
    try:
        log.append(*records)
    except OSError as exc:
        return [exc if isinstance(o, tuple) else o for o in outcomes]
    return outcomes


def batch_inference(p: Params, root: Path, log) -> BatchInference:
    """The handler the server runs on each batch, for the server's own inference thread or an inference process
    (which builds its own: the review queues are SQLite and files, shared safely between processes)."""
    cfg = p.serve
    queue, boxes = review_queues(p, root)
    return BatchInference(
        cfg,
        DecodeRules.from_params(p.validation, cfg),
        # the handler for each model card's task: BatchInference picks it by the task of the model it runs
        {"classification": ClassifyImages(cfg, queue), "detection": DetectImages(p.detection, boxes)},
        log,
    )


def review_queues(p: Params, root: Path) -> tuple[ReviewQueue, BoxReviewQueue]:
    """Where uncertain predictions wait for a person: the labels queue, and the boxes queue of a detector."""
    paths = ProjectPaths.of(p, root)
    queue = ReviewQueue(
        paths.review,
        paths.reviewed,
        budget=p.review.budget,
        window_hours=p.review.window_hours,
        strategy=p.review.strategy,
        seed=p.base.seed,
    )
    return queue, BoxReviewQueue(paths.review / "detection", paths.reviewed / "detection")


class ClassifyImages:
    """Classification's handler: images at the model's size, one batched model call, a label per image; the
    uncertain ones go to the review queue as PNGs of what the model saw."""

    def __init__(self, cfg: ServeParams, queue: ReviewQueue):
        self.cfg, self.queue = cfg, queue

    def decode(
        self, data: bytes, card: dict[str, Any], rules: DecodeRules, budget: PixelBudget
    ) -> tuple[np.ndarray, dict[str, float]]:
        return decode_with_properties(data, card["image_size"], card["channels"], rules, budget)

    def infer(self, model: LoadedModel, images: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        """(probabilities, embedding) per image."""
        logits, embedding = ort_outputs(model.session, np.stack(images), ("logits", "embedding"), batch_size=None)
        return list(zip(softmax(logits), embedding))

    def answer(
        self,
        model: LoadedModel,
        output: tuple[np.ndarray, np.ndarray],
        array: np.ndarray,
        props: dict[str, float],
        now: float,
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """(the answer, its prediction-log record) for one image; an uncertain one is queued for review."""
        probs, embedding = output
        classes = model.card["classes"]
        k = int(probs.argmax())
        label, confidence = classes[k], float(probs[k])
        probabilities = {c: round(float(v), 6) for c, v in zip(classes, probs)}
        review_id = None
        if confidence < self.cfg.review_threshold:  # encoded as PNG only when it goes to the review queue
            review_id = self.queue.add(
                _png(array),
                model_version=model.version,
                predicted=label,
                confidence=confidence,
                probabilities=probabilities,
                embedding=embedding,  # the budgeted queue spreads its offer over the embedding space
            )
        record = {
            "time": now,
            "model_version": model.version,
            "label": label,
            "confidence": round(confidence, 6),
            "review_id": review_id,
            **props,
            "embedding": np.round(embedding.astype(np.float64), 4).tolist(),
        }
        result = {
            "label": label,
            "confidence": confidence,
            "probabilities": probabilities,
            "model_version": model.version,
            "review_id": review_id,
        }
        return result, record


def _png(arr: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(buf, "PNG")
    return buf.getvalue()
