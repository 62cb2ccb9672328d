"""What the inference thread does with a batch of predict requests: parse and decode every upload, run each
model on all their images, queue the uncertain predictions for review, log every one, and encode each answer
(the event loop only sends them). A request sampled for the shadow (Job.shadow) also runs the challenger, but
only in `after()`, once the batch is answered."""

from __future__ import annotations

import json
import logging
import os
import queue as queues
import sqlite3
import threading
import time
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from visionflow.config import Params, ServeParams
from visionflow.data.imageio import DecodeRules, PixelBudget, decode_with_properties
from visionflow.onnxrt import ort_outputs, softmax
from visionflow.paths import ProjectPaths
from visionflow.serving.champion import LoadedModel
from visionflow.serving.multipart import multipart_files
from visionflow.serving.predictions import PredictionLog, encode_embedding
from visionflow.serving.review import ReviewQueue
from visionflow.tasks.detection.review import BoxReviewQueue
from visionflow.tasks.detection.serving import DetectImages

logger = logging.getLogger(__name__)

Prepared = tuple[list[Any], list[dict[str, float]]]  # one request's decoded images and their properties


class Job(NamedTuple):
    """One predict request, as the handler hands it to the inference thread."""

    model: LoadedModel  # the champion when the request came in (a swap meanwhile does not change it)
    body: bytes
    content_type: bytes
    max_files: int
    # The challenger to also run on this request's images, off the response path (serving.canary samples them).
    shadow: LoadedModel | None = None


class BatchInference:
    """The Batcher's `handle`: one outcome per job, (results, answer bytes) or the exception that request gets.

    What a task does differently (decoding, the model call, the answer, its review queue and log line) is its
    handler's: `tasks` maps a model card's task to it (ClassifyImages below, tasks.detection.serving for boxes),
    looked up by the task of the model each request was taken in with."""

    def __init__(self, cfg: ServeParams, rules: DecodeRules, tasks: Mapping[str, Any], log: PredictionLog):
        self.cfg, self.rules, self.tasks, self.log = cfg, rules, tasks, log
        # The last call's shadow-sampled requests, answered: (job, images, champion outputs, champion results).
        self._deferred: list[tuple[Job, list[Any], list[Any], list[dict[str, Any]]]] = []

    def __call__(self, jobs: list[Job]) -> list[Any]:
        outcomes: list[Any] = [None] * len(jobs)
        seen: dict[int, list[Any]] = {}  # the champion's outputs for the shadow-sampled requests
        prepared: dict[int, Prepared] = {}
        for i, job in enumerate(jobs):
            try:
                prepared[i] = self.prepare(job)
            except Exception as exc:  # noqa: BLE001 - a refused upload (HTTPException, RejectedImage) or an
                outcomes[i] = exc  # unforeseen failure (its 500, logged by the handler) is this request's alone
        records: list[dict[str, Any]] = []
        for model in {id(jobs[i].model): jobs[i].model for i in prepared}.values():  # one group per model (a swap)
            mine = [i for i in prepared if jobs[i].model is model]
            self._run_group(model, mine, jobs, prepared, outcomes, records, seen)
        # A request that timed out (504) still lands here: the model did see that image, so it is logged.
        outcomes = logged(self.log, records, outcomes)
        self._deferred = [
            (jobs[i], prepared[i][0], seen[i], outcomes[i][0]) for i in seen if isinstance(outcomes[i], tuple)
        ]
        return outcomes

    def after(self) -> dict[str, int] | None:
        """The shadow's work for the last call, which the Batcher runs once that call's answers are settled: each
        sampled request's challenger (Job.shadow) runs on the images the champion saw, and every image where the
        two labels differ goes to the review queue with both predictions (in the background). Returns the counts
        (requests, images agreed, disagreed, disagreements left out of the queue as its write backlog was full,
        requests whose shadow failed), or None when no request was sampled. Touches no
        parent-only state: it may run in an inference process."""
        deferred, self._deferred = self._deferred, []
        if not deferred:
            return None
        stats = {"shadow_requests": 0, "agree": 0, "disagree": 0, "unqueued": 0, "failed": 0}
        for shadow in {id(d[0].shadow): d[0].shadow for d in deferred}.values():
            mine = [d for d in deferred if d[0].shadow is shadow]
            try:
                agree, disagree, unqueued = self._shadow_group(shadow, mine)
            except Exception:  # the shadow must never hurt serving: counted, logged, dropped
                logger.exception("shadow: challenger v%s failed on %d request(s)", shadow.version, len(mine))
                stats["failed"] += len(mine)
                continue
            stats["shadow_requests"] += len(mine)
            stats["agree"] += agree
            stats["disagree"] += disagree + unqueued
            stats["unqueued"] += unqueued
        return stats

    def _shadow_group(self, shadow: LoadedModel, mine: list) -> tuple[int, int, int]:
        """One challenger call for the requests `mine`; (images agreed, disagreed, disagreed but not queued)."""
        task = self.tasks[shadow.task]
        images = []
        for job, arrays, _, _ in mine:
            same = job.model.task == shadow.task and all(
                job.model.card.get(k) == shadow.card.get(k) for k in ("image_size", "channels")
            )
            # A challenger with another input size decodes the upload again, at its own size.
            images += arrays if same else self.prepare(job._replace(model=shadow))[0]
        outputs = iter(task.infer(shadow, images))
        counts = {True: 0, False: 0, None: 0}  # agreed, disagreed, disagreed but not queued (backlog full)
        for _, arrays, seen, results in mine:
            for array, champion_output, result in zip(arrays, seen, results):
                counts[task.compare(shadow, result, champion_output, array, next(outputs))] += 1
        return counts[True], counts[False], counts[None]

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
        seen: dict[int, list[Any]],
    ) -> None:
        """One model call for the requests `mine`; fills in their outcomes and adds their log records, and keeps
        the outputs of those sampled for the shadow in `seen`."""
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
            if jobs[i].shadow is not None:
                seen[i] = outputs[k - len(results) : k]
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


def batch_inference(p: Params, root: Path, log, share: float = 1.0) -> BatchInference:
    """The handler the server runs on each batch, for the server's own inference thread or an inference process
    (which builds its own: the review queues are SQLite and files, shared safely between processes). `share` is
    this handler's part of the server's limits (one of n inference processes: 1/n)."""
    cfg = p.serve
    queue, boxes = review_queues(p, root)
    return BatchInference(
        cfg,
        DecodeRules.from_params(p.validation, cfg),
        # the handler for each model card's task: BatchInference picks it by the task of the model it runs
        {"classification": ClassifyImages(cfg, queue, share), "detection": DetectImages(p.detection, boxes)},
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


class Background:
    """A daemon thread that runs the calls handed to it, in order, off the inference thread: a shadow
    disagreement's review-queue write (a PNG, a file and an fsynced SQLite commit, ~5 ms) would otherwise hold up
    the next batch. A full backlog refuses the call (submit says False) rather than slow serving. The thread
    starts on first use, in the process that uses it (an inference process)."""

    def __init__(self, limit: int = 1000):
        self._calls: queues.Queue = queues.Queue(limit)
        self._thread: threading.Thread | None = None
        self._pid = 0

    def submit(self, call) -> bool:
        if self._thread is None or self._pid != os.getpid():  # (a forked copy has no thread)
            self._pid = os.getpid()
            self._thread = threading.Thread(target=self._run, name="shadow-writes", daemon=True)
            self._thread.start()
        try:
            self._calls.put_nowait(call)
        except queues.Full:
            return False
        return True

    def _run(self) -> None:
        while True:
            call = self._calls.get()
            try:
                call()
            except Exception:  # a full disk or a locked database loses this item, not the thread
                logger.exception("shadow: a disagreement could not be queued for review")


class RateLimit:
    """A token bucket: `take()` allows `per_s` calls a second on average and `per_s * burst_s` (at least one) at
    once, and says False to the rest."""

    def __init__(self, per_s: float, burst_s: float, clock=time.monotonic):
        self.per_s, self.burst, self.clock = per_s, max(1.0, per_s * burst_s), clock
        self.tokens, self.last = self.burst, clock()

    def take(self) -> bool:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.per_s)
        self.last = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


class ClassifyImages:
    """Classification's handler: images at the model's size, one batched model call, a label per image; the
    uncertain ones go to the review queue as PNGs of what the model saw. `share`: this handler's part of
    serve.shadow_review_per_s (batch_inference's)."""

    def __init__(self, cfg: ServeParams, queue: ReviewQueue, share: float = 1.0):
        self.cfg, self.queue = cfg, queue
        self.writes = Background()  # the shadow's review-queue writes
        # the new review items the shadow's disagreements may add: a bucket of ten seconds' worth
        self.shadow_writes = RateLimit(cfg.shadow_review_per_s * share, burst_s=10)

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
            "embedding": encode_embedding(embedding),
        }
        result = {
            "label": label,
            "confidence": confidence,
            "probabilities": probabilities,
            "model_version": model.version,
            "review_id": review_id,
        }
        return result, record

    def compare(
        self,
        shadow: LoadedModel,
        result: dict[str, Any],
        output: tuple[np.ndarray, np.ndarray],
        array: np.ndarray,
        shadow_output: tuple[np.ndarray, np.ndarray],
    ) -> bool:
        """Whether the shadow challenger agrees with the champion's answer `result` (its `output`, on `array`), or
        None when they disagree and the disagreement is not queued (over serve.shadow_review_per_s, or the backlog
        of review-queue writes is full). A disagreement goes to the review queue with both predictions, written in
        the background: onto the champion's item if it has one (not rate-bounded: the champion's own write is
        the costly one, and the canary is judged on exactly these items), or as a new item."""
        probs = shadow_output[0]
        k = int(probs.argmax())
        label = shadow.card["classes"][k]
        if label == result["label"]:
            return True
        other = {"version": shadow.version, "predicted": label, "confidence": float(probs[k])}
        if result["review_id"] is not None:
            write = partial(self.queue.set_challenger, result["review_id"], **other)
        elif self.shadow_writes.take():
            write = partial(self._add_disagreement, array, result, output[1], other)
        else:
            return None
        return False if self.writes.submit(write) else None

    def _add_disagreement(
        self, array: np.ndarray, result: dict[str, Any], embedding: np.ndarray, other: dict[str, Any]
    ) -> None:
        self.queue.add(
            _png(array),
            model_version=result["model_version"],
            predicted=result["label"],
            confidence=result["confidence"],
            probabilities=result["probabilities"],
            embedding=embedding,
            challenger=other,
        )


def _png(arr: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(buf, "PNG")
    return buf.getvalue()
