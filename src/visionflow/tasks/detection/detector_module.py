"""The LightningModule that trains the detector (tasks/detection/model.py), and loading it back from a checkpoint."""

from __future__ import annotations

import contextlib
import io
import math
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn
from torchmetrics.detection import MeanAveragePrecision

from visionflow.errors import DataError
from visionflow.tasks.detection.model import build_detector
from visionflow.training.weights import resolve

# Linear warm-up before the cosine decay: at the full rate from the first step, AdamW drives FCOS's box-regression
# head below zero within ~10 steps, where its ReLU stops every gradient (GIoU loss stuck at 1.0, all boxes empty;
# measured on 128 px scenes at lr 1e-3). A tenth of the run, at most this many steps:
WARMUP_STEPS = 100
# The monitored validation metric: mAP at IoU 0.5 (higher is better); it picks the best checkpoint.
MONITOR = "val/map_50"


@contextlib.contextmanager
def quiet_cocoeval():
    """pycocotools prints a dozen lines per evaluation to stdout, which a flow with log_prints turns into log
    records: the figures that matter are logged as metrics instead."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


class DetectorModule(L.LightningModule):
    def __init__(
        self,
        classes: list[str],
        image_size: int,
        model: str,
        lr: float,
        weight_decay: float,
        pretrained_weights: str | None = None,
        score_threshold: float = 0.3,
    ):
        super().__init__()
        # classes, image_size and model go into the checkpoint: load_detector rebuilds the network from them
        self.save_hyperparameters()
        weights = resolve(pretrained_weights) if pretrained_weights else None
        self.net = build_detector(len(classes), image_size, weights)
        self.val_map = MeanAveragePrecision(iou_thresholds=[0.5])

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, targets = batch
        losses = self.net(images, targets)
        loss = sum(losses.values())
        n = len(images)
        self.log("train/loss", loss, on_step=False, on_epoch=True, batch_size=n, prog_bar=True)
        for name, value in losses.items():
            self.log(f"train/{name}", value, on_step=False, on_epoch=True, batch_size=n)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        images, targets = batch
        found = self.net(images)
        self.val_map.update([{k: v.float() if k != "labels" else v for k, v in f.items()} for f in found], targets)

    def on_validation_epoch_end(self) -> None:
        with quiet_cocoeval():
            score = self.val_map.compute()["map_50"].float()
        self.log(MONITOR, score, prog_bar=True)
        self.val_map.reset()

    def configure_optimizers(self):
        hp = self.hparams
        opt = torch.optim.AdamW(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, partial(warmup_cosine, warmup=warmup_steps(total), total=total))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def warmup_steps(total: int) -> int:
    return max(1, min(WARMUP_STEPS, total // 10))


def warmup_cosine(step: int, *, warmup: int, total: int) -> float:
    """The learning rate's factor: linear warm-up, then cosine down to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min((step - warmup) / max(total - warmup, 1), 1.0)))


def load_detector(checkpoint: Path | str) -> tuple[nn.Module, dict[str, Any]]:
    """The trained network in eval mode on CPU, and its hyperparameters (classes, image_size, model, ...)."""
    ckpt = torch.load(str(checkpoint), map_location="cpu", weights_only=False)
    hp = dict(ckpt.get("hyper_parameters") or {}) if isinstance(ckpt, dict) else {}
    if not {"classes", "image_size", "model"} <= set(hp) or "state_dict" not in ckpt:
        raise DataError(f"{checkpoint} is not a detector checkpoint (no classes/image_size/model hyperparameters)")
    net = build_detector(len(hp["classes"]), hp["image_size"], weights=None)  # the weights are in the checkpoint
    prefix = "net."
    net.load_state_dict({k[len(prefix) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)})
    return net.eval(), hp
