"""Shadow and canary without Kubernetes: the registry's challenger beside the champion, switched on by params.

- Challenger follows the registry's `challenger` alias (which every newly registered version gets) and, per
  request, picks the model that answers and the one that shadows it (PredictHandler's `route`): canary_fraction
  of requests are answered by the challenger; with serve.shadow on, shadow_fraction of the others also run it,
  after they are answered (BatchInference.after queues each disagreement for review, with both predictions).
- CanaryMonitor, a thread of the serving (parent) process, reads the review queue's reviewed items every
  reload_interval_s: it sets both models' reviewed-accuracy gauges and rolls the canary back when the challenger
  is worse than the champion by the bootstrap rule (registry.gates.unpaired_bootstrap_upper). A rollback stops
  its traffic at once and tags the version `visionflow.canary=rolled_back`, which a restarted server reads.

A challenger that is the champion (a promoted version keeps the alias), serves another task, or was rolled back
gets no traffic. Classification only: detection's answers are boxes, with no single label to agree on or score.
"""

from __future__ import annotations

import logging
import random
import threading
from pathlib import Path

import numpy as np

from visionflow.config import Params
from visionflow.registry.gates import unpaired_bootstrap_upper
from visionflow.serving.champion import ChampionHolder, LoadedModel
from visionflow.serving.metrics import ServingMetrics
from visionflow.serving.review import ReviewQueue

logger = logging.getLogger(__name__)

CANARY_TAG = "visionflow.canary"
ROLLED_BACK = "rolled_back"


class Challenger:
    """The registry's challenger, and which requests it answers (canary) or shadows."""

    def __init__(self, p: Params, holder: ChampionHolder):
        self.cfg, self.holder = p.serve, holder
        self.rng = random.Random(p.base.seed)  # drawn on the event loop only
        self.rolled_back: set[str] = set()  # rolled back by this process (the registry tag may be late)

    def active(self, champion: LoadedModel) -> LoadedModel | None:
        """The challenger when it may get traffic beside `champion`, else None."""
        m = self.holder.current
        if (
            m is None
            or m.version == champion.version
            or "classification" != m.task
            or "classification" != champion.task
        ):
            return None
        if m.version in self.rolled_back or m.tags.get(CANARY_TAG) == ROLLED_BACK:
            return None
        return m

    def route(self, champion: LoadedModel) -> tuple[LoadedModel, LoadedModel | None]:
        """(the model that answers this request, the challenger to shadow it or None)."""
        challenger = self.active(champion)
        if challenger is None:
            return champion, None
        if self.cfg.canary_fraction and self.rng.random() < self.cfg.canary_fraction:
            return challenger, None
        if self.cfg.shadow and self.rng.random() < self.cfg.shadow_fraction:
            return champion, challenger
        return champion, None


class CanaryMonitor:
    """Reviewed accuracy of champion and challenger (gauges), and the canary's automatic rollback."""

    def __init__(
        self, p: Params, queue: ReviewQueue, champion: ChampionHolder, challenger: Challenger, metrics: ServingMetrics
    ):
        self.p, self.queue, self.champion, self.challenger, self.metrics = p, queue, champion, challenger, metrics
        self._untagged: set[str] = set()  # rolled back, but the registry tag could not be written yet
        self._stop = threading.Event()

    def check(self) -> None:
        """One look at the reviewed items: the gauges, then the rollback rule."""
        self._retry_tags()
        champ, chall = self.champion.current, self.challenger.holder.current
        if champ is None or chall is None:
            return
        rows = self.queue.reviewed()
        if self.p.serve.canary_fraction and self.challenger.active(champ) is chall:
            self._judge(champ.version, chall.version, rows)
        for role, version in (("champion", champ.version), ("challenger", chall.version)):
            # every reviewed image this version predicted: answered, or shadowed where it disagreed (set after
            # the rule: gauges that count a review say that the rule has seen it)
            self.metrics.observe_reviewed(
                role,
                [r["predicted"] == r["label"] for r in rows if r["model_version"] == version]
                + [r["challenger_predicted"] == r["label"] for r in rows if r["challenger_version"] == version],
            )

    def _judge(self, champion: str, challenger: str, rows: list[dict]) -> None:
        """Roll the canary back when, on the images each answered, it is worse than the champion: the upper bound
        of (challenger - champion) accuracy is below 0. The two saw different images, so the bootstrap is unpaired;
        shadow disagreements are left out (chosen for disagreeing, they are no sample of either's traffic), and the
        champion is judged on what it answered since the canary's first reviewed answer (the same stretch of
        traffic)."""
        answered = [r for r in rows if r["challenger_version"] is None]
        new = [r for r in answered if r["model_version"] == challenger]
        if not new:
            return
        since = min(r["created"] for r in new)
        old = [r for r in answered if r["model_version"] == champion and r["created"] >= since]
        need = self.p.serve.canary_min_reviewed
        if len(new) < need or len(old) < need:
            return
        reg = self.p.registry
        gain, upper = unpaired_bootstrap_upper(
            np.array([r["predicted"] == r["label"] for r in new]),
            np.array([r["predicted"] == r["label"] for r in old]),
            n_boot=reg.bootstrap_samples,
            alpha=reg.bootstrap_alpha,
            seed=self.p.base.seed,
        )
        if upper < 0:
            self.roll_back(
                challenger,
                f"reviewed accuracy {gain:+.4f} against champion v{champion} ({len(new)} vs {len(old)} reviewed "
                f"images), {1 - reg.bootstrap_alpha:.0%} upper bound {upper:+.4f} < 0",
            )

    def roll_back(self, version: str, detail: str) -> None:
        """Stop the challenger's traffic at once, then record the verdict in the registry."""
        self.challenger.rolled_back.add(version)
        self.metrics.canary_rollbacks.inc()
        logger.warning("canary: rolled back challenger v%s of %s: %s", version, self.p.served_model_name, detail)
        self._untagged.add(version)
        self._retry_tags()

    def _retry_tags(self) -> None:
        from visionflow.registry.store import tag_version

        for version in sorted(self._untagged):
            try:
                tag_version(self.p.served_model_name, version, CANARY_TAG, ROLLED_BACK)
                self._untagged.discard(version)
            except Exception as exc:  # noqa: BLE001 - retried at the next check; traffic is already stopped
                logger.error(
                    "canary: cannot tag v%s %s=%s in the registry (%s: %s); retrying; a server restarted before "
                    "it is written would canary it again",
                    version,
                    CANARY_TAG,
                    ROLLED_BACK,
                    type(exc).__name__,
                    exc,
                )

    def watch(self, interval_s: float) -> threading.Thread:
        def loop() -> None:
            while not self._stop.wait(interval_s):
                try:
                    self.check()
                except Exception:  # a failed look (a locked database) is retried next time
                    logger.exception("canary: check failed")

        t = threading.Thread(target=loop, name="canary-monitor", daemon=True)
        t.start()
        return t

    def stop(self) -> None:
        self._stop.set()


class ShadowCanary:
    """The challenger and its monitor, started and stopped with the app."""

    def __init__(self, challenger: Challenger, monitor: CanaryMonitor):
        self.challenger, self.monitor = challenger, monitor
        self.route = challenger.route

    def attach(self, app, *, watch: bool, interval_s: float) -> None:
        """Load the challenger at startup (and follow its alias when watched); the monitor always runs."""

        @app.on_event("startup")
        def _start() -> None:
            self.challenger.holder.refresh()
            if watch:
                self.challenger.holder.watch(interval_s)
            self.monitor.watch(interval_s)

        @app.on_event("shutdown")
        def _stop() -> None:
            self.challenger.holder.stop()
            self.monitor.stop()


def shadow_canary(
    p: Params, cache_dir: Path, champion: ChampionHolder, queue: ReviewQueue, metrics: ServingMetrics
) -> ShadowCanary | None:
    """The shadow and canary as params.yaml sets them, or None when both are off. A detection server leaves them
    off, with one line in its log (params.yaml is one file for both tasks, so the switch is not an error)."""
    cfg = p.serve
    if not cfg.shadow and not cfg.canary_fraction:
        return None
    if p.base.task != "classification":
        logger.warning(
            "serve.shadow / serve.canary_fraction ignored: shadow and canary serve classification only (base.task "
            "is %s)",
            p.base.task,
        )
        return None
    # its own cache folder: the two holders' watch threads never download into the same place
    challenger = Challenger(
        p,
        ChampionHolder(
            p.served_model_name, alias="challenger", cache_dir=cache_dir / "challenger", device=p.serve.device
        ),
    )
    return ShadowCanary(challenger, CanaryMonitor(p, queue, champion, challenger, metrics))
