"""Training callbacks: one log line per epoch, early validation workers, and the run's accelerator figures."""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import lightning as L
import torch

from visionflow.training.datamodule import ImageDataModule

Log = logging.Logger | logging.LoggerAdapter


def _duration(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    return f"{m // 60}h{m % 60:02d}m" if m >= 60 else f"{m}m{s:02d}s"


class EpochLog(L.Callback):
    """One plain log line per epoch: loss, accuracy, images/s and the time left.

    A logger, not a progress bar, so that progress reaches a piped log file and Prefect's flow-run logs (the
    flow passes its run logger). Rates are timed from each epoch's first batch, so that starting the data
    loader's worker processes does not count. The ETA is the run's wall time per step so far (validation and
    loader start-ups included, which the images/s leave out) over the steps left in the budget (early stopping
    can end the run sooner).
    """

    def __init__(self, log: Log, max_steps: int, steps_per_epoch: int, timing: RunFigures, monitor: str = "val/acc"):
        # timing: the run's RunFigures, which already times each epoch's batches and counts its images;
        # monitor: the validation metric the line shows (with val/loss when the module logs one)
        self.out, self.max_steps, self.steps_per_epoch, self.timing = log, max_steps, steps_per_epoch, timing
        self.monitor = monitor

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.fit_start, self.fit_first_step = time.perf_counter(), trainer.global_step
        self.loss_sum = 0.0  # a run resumed mid-epoch starts with that epoch's batches, without epoch start

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.loss_sum = 0.0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.loss_sum += float(outputs["loss"]) * len(batch[1])

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        t = self.timing
        if t.epoch_first is None or t.epoch_last is None:  # resumed at an epoch's very end: nothing trained in it
            return
        now, m, step = time.perf_counter(), trainer.callback_metrics, trainer.global_step
        per_step = (now - self.fit_start) / max(step - self.fit_first_step, 1)
        loss = f"loss {float(m['val/loss']):.4f} " if "val/loss" in m else ""
        name = self.monitor.split("/")[-1]
        val = f"val {loss}{name} {float(m[self.monitor]):.4f}" if self.monitor in m else "no validation"
        # a detector has no training accuracy: its line says nothing of one
        acc = f" acc {float(m['train/acc']):.4f}" if "train/acc" in m else ""
        self.out.info(
            "epoch %d/%d (step %d/%d): train loss %.4f%s, %s, %.0f images/s, elapsed %s, ETA %s",
            trainer.current_epoch + 1,
            math.ceil(self.max_steps / self.steps_per_epoch),
            step,
            self.max_steps,
            self.loss_sum / max(t.epoch_images, 1),
            acc,
            val,
            t.epoch_images / max(t.epoch_last - t.epoch_first, 1e-9),
            _duration(now - self.fit_start),
            _duration(per_step * (self.max_steps - step)),
        )


class StartValWorkers(L.Callback):
    """The validation loader's workers start with training, so they are ready at the end of the first epoch
    instead of starting then with the GPU idle. Single-process runs only: a distributed strategy replaces the
    loader with one that has a distributed sampler, whose workers would start at the first validation anyway."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dm = trainer.datamodule
        if trainer.world_size == 1 and isinstance(dm, ImageDataModule) and trainer.limit_val_batches != 0:
            dm.start_workers("val")


class RunFigures(L.Callback):
    """How well the run used its accelerator: images/s, the busy fraction, and the time to the first step.

    busy_fraction is busy seconds over the training stage's seconds after the cache (from the end of the cache
    build to the end of fit). On CUDA the busy seconds are GPU time between CUDA events recorded at the start
    and end of every training step (forward, backward, optimizer step); on CPU there is no accelerator, and they
    are the wall time spent inside training steps (reported as busy_basis "cpu_wall_in_step"). images_per_s is
    over the training epochs only, each from its first batch's start to its last step's end (loader waits inside
    an epoch count, validation does not), the rate that compares with a plain training loop.
    """

    def __init__(self, stage_start: float, cache_done: float):
        self.stage_start, self.cache_done = stage_start, cache_done
        self.cuda = torch.cuda.is_available()
        self.first_step: float | None = None
        self.busy_s = self.epoch_s = 0.0
        self.images = self.steps = 0
        self.events: list[tuple[Any, Any]] = []
        # set here too: a run resumed mid-epoch starts with that epoch's batches, without on_train_epoch_start
        self.epoch_first: float | None = None
        self.epoch_last: float | None = None
        self.epoch_images = 0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.epoch_first = self.epoch_last = None
        self.epoch_images = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self.epoch_first is None:
            self.epoch_first = now
        if self.cuda:
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            self.events.append((start, None))
        else:
            self.step_start = now

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.events[-1] = (self.events[-1][0], end)
        if self.first_step is None:
            if self.cuda:
                torch.cuda.synchronize()  # once: the first step's end is when the GPU finished it
            self.first_step = time.perf_counter()
        self.epoch_last = time.perf_counter()
        if not self.cuda:
            self.busy_s += self.epoch_last - self.step_start
        self.images += len(batch[1])
        self.epoch_images += len(batch[1])
        self.steps += 1

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.epoch_first is not None and self.epoch_last is not None:
            self.epoch_s += self.epoch_last - self.epoch_first
        self._collect_events()

    def _collect_events(self) -> None:
        if self.cuda and self.events:
            torch.cuda.synchronize()  # once per epoch, so that every recorded event has its time
            self.busy_s += sum(a.elapsed_time(b) for a, b in self.events if b is not None) / 1000
            self.events = []

    def figures(self) -> dict[str, Any]:
        self._collect_events()  # an epoch cut short by the step budget ends without on_train_epoch_end
        end = time.perf_counter()
        after_cache = max(end - self.cache_done, 1e-9)
        return {
            "images_per_s": round(self.images / self.epoch_s, 2) if self.epoch_s > 0 else None,
            "busy_fraction": round(min(self.busy_s / after_cache, 1.0), 4),
            "busy_basis": "cuda_events_in_step" if self.cuda else "cpu_wall_in_step",
            "busy_s": round(self.busy_s, 3),
            "time_to_first_step_s": (
                round(self.first_step - self.stage_start, 3) if self.first_step is not None else None
            ),
            "time_to_first_step_after_cache_s": (
                round(self.first_step - self.cache_done, 3) if self.first_step is not None else None
            ),
            "cache_s": round(self.cache_done - self.stage_start, 3),
            "stage_after_cache_s": round(after_cache, 3),
            "images": self.images,
            "steps": self.steps,
        }
