"""The server's Prometheus metrics (/metrics), in a registry of its own so that two apps in one process (tests)
never share counters."""

from __future__ import annotations

from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# The inference thread's side: a queue wait that grows while batches stay small means the thread is the
# bottleneck (it is busy for the sum of inference_seconds); batches that grow mean load is being shared.
FINE_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)


class ServingMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        self.latency = Histogram(
            "visionflow_request_seconds",
            "request latency from the handler start (upload read included)",
            ["endpoint"],
            registry=registry,
            buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )
        self.requests = Counter("visionflow_requests_total", "requests", ["endpoint", "status"], registry=registry)
        self.predictions = Counter(
            "visionflow_predictions_total", "predictions (a detector's: boxes) per class", ["label"], registry=registry
        )
        self.low_confidence = Counter(
            "visionflow_low_confidence_total", "predictions sent to review", registry=registry
        )
        self.queue_wait = Histogram(
            "visionflow_inference_queue_seconds",
            "time a request waited for the inference thread",
            registry=registry,
            buckets=FINE_BUCKETS,
        )
        self.batch_seconds = Histogram(
            "visionflow_inference_seconds",
            "time the inference thread spent on one batch (parse, decode, model, log, answers)",
            registry=registry,
            buckets=FINE_BUCKETS,
        )
        self.batch_size = Histogram(
            "visionflow_inference_batch_requests",
            "requests run together in one batch",
            registry=registry,
            buckets=(1, 2, 4, 8, 16, 32, 64),
        )
        self._shadow_metrics(registry)

    def _shadow_metrics(self, registry: CollectorRegistry) -> None:
        """The shadow challenger's live agreement, and both models' accuracy on reviewed images (serving.canary)."""
        self.shadow_requests = Counter(
            "visionflow_shadow_requests_total", "requests the shadow challenger also ran on", registry=registry
        )
        self.shadow_images = Counter(
            "visionflow_shadow_images_total",
            "shadowed images by outcome: the challenger's label agreed or disagreed with the champion's",
            ["outcome"],
            registry=registry,
        )
        self.shadow_failures = Counter(
            "visionflow_shadow_failures_total", "requests whose shadow run failed", registry=registry
        )
        self.shadow_unqueued = Counter(
            "visionflow_shadow_unqueued_total",
            "disagreements not queued for review (over serve.shadow_review_per_s, or its writes backlogged)",
            registry=registry,
        )
        self.shadow_agreement = Gauge(
            "visionflow_shadow_agreement", "share of shadowed images where the two labels agreed", registry=registry
        )
        self.reviewed_accuracy = Gauge(
            "visionflow_reviewed_accuracy",
            "accuracy on reviewed images (each image a model answered or shadowed) by role",
            ["role"],
            registry=registry,
        )
        self.reviewed_images = Gauge(
            "visionflow_reviewed_images",
            "reviewed images behind visionflow_reviewed_accuracy",
            ["role"],
            registry=registry,
        )
        self._agreed = self._shadowed = 0  # the agreement gauge's running totals
        self.canary_rollbacks = Counter(
            "visionflow_canary_rollbacks_total", "canary challengers rolled back", registry=registry
        )

    def observe_shadow(self, stats: dict[str, int]) -> None:
        """The Batcher's `observe_after`: BatchInference.after()'s counts for one batch."""
        self.shadow_requests.inc(stats["shadow_requests"])
        self.shadow_failures.inc(stats["failed"])
        self.shadow_unqueued.inc(stats["unqueued"])
        self.shadow_images.labels("agree").inc(stats["agree"])
        self.shadow_images.labels("disagree").inc(stats["disagree"])
        self._agreed += stats["agree"]
        self._shadowed += stats["agree"] + stats["disagree"]
        if self._shadowed:
            self.shadow_agreement.set(self._agreed / self._shadowed)

    def observe_reviewed(self, role: str, correct: list[bool]) -> None:
        """The canary monitor's: `role`'s (champion, challenger) correctness on every reviewed image it predicted."""
        self.reviewed_images.labels(role).set(len(correct))
        if correct:
            self.reviewed_accuracy.labels(role).set(sum(correct) / len(correct))

    def observe_batch(self, waits_s: list[float], seconds: float) -> None:
        """The Batcher's `observe`: one batch of len(waits_s) requests took `seconds`."""
        self.batch_size.observe(len(waits_s))
        self.batch_seconds.observe(seconds)
        for w in waits_s:
            self.queue_wait.observe(w)

    def answered(self, endpoint: str, status: int, seconds: float, results: list[dict[str, Any]]) -> None:
        """One predict request answered with `status` after `seconds`; `results` are its predictions."""
        self.requests.labels(endpoint, str(status)).inc()
        if status != 200:
            return
        self.latency.labels(endpoint).observe(seconds)
        for r in results:
            for label in [b["label"] for b in r["boxes"]] if "boxes" in r else [r["label"]]:  # a detector's: per box
                self.predictions.labels(label).inc()
            if r["review_id"] is not None:
                self.low_confidence.inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
