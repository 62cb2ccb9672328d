"""The network (preprocessing + timm backbone) and the LightningModule that trains it.

Preprocessing lives inside the network: it takes uint8 images (B, C, H, W) in 0..255 and normalises them itself
with the mean/std resolved from the timm model, so the exported ONNX graph, the server and the training loop
cannot disagree about it.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

import lightning as L
import timm
import torch
import torchmetrics
from torch import nn

from visionflow.errors import ConfigError
from visionflow.training.weights import load_pretrained


class Preprocess(nn.Module):
    def __init__(self, mean: list[float], std: list[float]):
        super().__init__()
        # Folding 1/255 into the scale keeps it one multiply-add per pixel.
        self.register_buffer("scale", torch.tensor([1.0 / (255.0 * s) for s in std]).view(1, -1, 1, 1))
        self.register_buffer("shift", torch.tensor([m / s for m, s in zip(mean, std)]).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() * self.scale - self.shift


class ClassifierNet(nn.Module):
    """uint8 images in, logits out; `embed` gives the penultimate features (used by drift checks)."""

    def __init__(self, backbone: nn.Module, mean: list[float], std: list[float]):
        super().__init__()
        self.preprocess = Preprocess(mean, std)
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.preprocess(x))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.backbone.forward_features(self.preprocess(x))
        return self.backbone.forward_head(feats, pre_logits=True)


def channel_stats(backbone: nn.Module, channels: int) -> tuple[list[float], list[float]]:
    cfg = timm.data.resolve_model_data_config(backbone)
    mean, std = list(cfg["mean"]), list(cfg["std"])
    if channels == 1 and len(mean) == 3:
        # A grayscale image is the mean of its RGB channels, so average the statistics the same way.
        mean, std = [sum(mean) / 3], [sum(std) / 3]
    return mean, std


def build_net(
    model_name: str, num_classes: int, channels: int, pretrained_weights: str | None = None, root: Path | None = None
) -> ClassifierNet:
    if model_name not in timm.list_models() and not timm.is_model(model_name):
        raise ConfigError(f"train.model: {model_name!r} is not a timm model name (see timm.list_models())")
    backbone = timm.create_model(model_name, pretrained=False, num_classes=num_classes, in_chans=channels)
    if pretrained_weights:
        load_pretrained(backbone, pretrained_weights, root=root)
    mean, std = channel_stats(backbone, channels)
    return ClassifierNet(backbone, mean, std)


OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adamw": torch.optim.AdamW,
    "sgd": partial(torch.optim.SGD, momentum=0.9, nesterov=True),
}


class ImageClassifier(L.LightningModule):
    def __init__(
        self,
        *,
        model_name: str,
        classes: list[str],
        channels: int,
        image_size: int,
        lr: float,
        weight_decay: float,
        optimizer: str,
        scheduler: str,
        pretrained_weights: str | None = None,
        channels_last: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.net = build_net(model_name, len(classes), channels, pretrained_weights)
        self.channels_last = channels_last
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        n = len(classes)
        self.train_acc = torchmetrics.classification.MulticlassAccuracy(num_classes=n, average="micro")
        self.val_acc = torchmetrics.classification.MulticlassAccuracy(num_classes=n, average="micro")
        self.val_f1 = torchmetrics.classification.MulticlassF1Score(num_classes=n, average="macro")
        self.test_acc = torchmetrics.classification.MulticlassAccuracy(num_classes=n, average="micro")
        self.loss = nn.CrossEntropyLoss()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)

    def training_step(self, batch, batch_idx):
        # (images, labels), or (images, labels, indices) from a loader that records training dynamics
        x, y = batch[0], batch[1]
        logits = self(x)
        loss = self.loss(logits, y)
        self.train_acc(logits.detach(), y)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        # the logits reach the callbacks' on_train_batch_end: the training-dynamics callback takes each sample's
        # margin from them without a second forward pass
        return {"loss": loss, "logits": logits.detach()}

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.val_acc(logits, y)
        self.val_f1(logits, y)
        self.log("val/loss", self.loss(logits, y), on_epoch=True, prog_bar=False)
        self.log("val/acc", self.val_acc, on_epoch=True, prog_bar=True)
        self.log("val/macro_f1", self.val_f1, on_epoch=True)

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.test_acc(self(x), y)
        self.log("test/acc", self.test_acc, on_epoch=True)

    def configure_optimizers(self):
        hp = self.hparams
        opt = OPTIMIZERS[hp.optimizer](self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        if hp.scheduler == "none":
            return opt
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=hp.lr, total_steps=total, pct_start=0.15, anneal_strategy="cos"
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
