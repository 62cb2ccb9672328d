"""What the inference thread does with a batch of predict requests: parse and decode every upload, run each
model once on all their images, queue the uncertain predictions for review, log every one, and encode each answer
(the event loop only sends them)."""

from __future__ import annotations

import json
import sqlite3
import time
from typing import Any, NamedTuple

import numpy as np

from visionflow.config import ServeParams
from visionflow.data.imageio import DecodeRules
from visionflow.onnxrt import ort_outputs, softmax
from visionflow.serving.champion import LoadedModel
from visionflow.serving.multipart import multipart_files
from visionflow.serving.predictions import PredictionLog
from visionflow.serving.review import ReviewQueue

Prepared = tuple[list[np.ndarray], list[dict[str, float]]]  # one request's images and their properties


class Job(NamedTuple):
    """One predict request, as the handler hands it to the inference thread."""

    model: LoadedModel  # the champion when the request came in (a swap meanwhile does not change it)
    body: bytes
    content_type: bytes
    max_files: int


class BatchInference:
    """The Batcher's `handle`: one outcome per job, (results, answer bytes) or the exception that request gets."""

    def __init__(self, cfg: ServeParams, rules: DecodeRules, queue: ReviewQueue, log: PredictionLog):
        self.cfg, self.rules, self.queue, self.log = cfg, rules, queue, log

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
        try:
            # A request that timed out (504) still lands here: the model did see that image, so it is logged.
            self.log.append(*records)
        except OSError as exc:
            outcomes = [exc if isinstance(o, tuple) else o for o in outcomes]
        return outcomes

    def prepare(self, job: Job) -> Prepared:
        """Parse one request's form and decode its images (raises HTTPException / RejectedImage for that one)."""
        from visionflow.data.imageio import PixelBudget, decode_with_properties

        files = multipart_files(
            job.body,
            job.content_type,
            max_files=job.max_files,
            max_fields=self.cfg.max_form_fields,
            max_file_bytes=self.rules.max_bytes,
        )
        size, channels = job.model.card["image_size"], job.model.card["channels"]
        budget = PixelBudget(self.cfg.max_request_pixels)  # one request's images together
        decoded = [decode_with_properties(data, size, channels, self.rules, budget) for data in files]
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
        arrays = np.stack([a for i in mine for a in prepared[i][0]])
        try:
            logits, embedding = ort_outputs(model.session, arrays, ("logits", "embedding"), batch_size=None)
        except Exception as exc:  # noqa: BLE001 - fails this model's group; another group may still run
            for i in mine:
                outcomes[i] = exc
            return
        probs, now, k = softmax(logits), time.time(), 0
        for i in mine:
            results = []
            try:
                for props in prepared[i][1]:
                    results.append(self._result(model, probs[k], arrays[k], props, embedding[k], now, records))
                    k += 1
            except (OSError, sqlite3.Error) as exc:  # the review queue cannot be written
                outcomes[i] = exc
                continue
            answer = results[0] if jobs[i].max_files == 1 else {"predictions": results}
            outcomes[i] = (results, json.dumps(answer, separators=(",", ":")).encode())

    def _result(
        self,
        model: LoadedModel,
        probs: np.ndarray,
        array: np.ndarray,
        props: dict[str, float],
        embedding: np.ndarray,
        now: float,
        records: list[dict],
    ) -> dict[str, Any]:
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
        records.append(
            {
                "time": now,
                "model_version": model.version,
                "label": label,
                "confidence": round(confidence, 6),
                "review_id": review_id,
                **props,
                "embedding": np.round(embedding.astype(np.float64), 4).tolist(),
            }
        )
        return {
            "label": label,
            "confidence": confidence,
            "probabilities": probabilities,
            "model_version": model.version,
            "review_id": review_id,
        }


def _png(arr: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(buf, "PNG")
    return buf.getvalue()
