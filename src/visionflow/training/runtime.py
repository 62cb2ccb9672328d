"""Where and how a training run executes: the device, precision and compilation decided from train params, and
checkpoint writes that a crash cannot leave half done."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from visionflow.config import TrainParams


@dataclass(frozen=True)
class Runtime:
    accelerator: str
    devices: int | str
    precision: str
    strategy: str
    channels_last: bool
    num_nodes: int = 1
    compile: bool = False


def _compile_pays(gpu: bool) -> bool:
    """train.compile auto: on a CUDA GPU Triton can compile for (compute capability 7.0+); never on CPU, where
    compiling takes longer than the default's whole few-minute run gains."""
    return gpu and torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 7


def resolve_runtime(cfg: TrainParams) -> Runtime:
    """GPU when present: bf16 (or fp16) autocast, channels_last and torch.compile; CPU: plain fp32, eager."""
    gpu = torch.cuda.is_available() if cfg.accelerator == "auto" else cfg.accelerator == "gpu"
    if cfg.precision != "auto":
        precision = cfg.precision
    elif gpu:
        precision = "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    else:
        precision = "32-true"
    return Runtime(
        accelerator="gpu" if gpu else "cpu",
        devices=cfg.devices if gpu else 1,
        precision=precision,
        strategy=cfg.strategy,
        channels_last=gpu,
        num_nodes=cfg.num_nodes,
        compile=_compile_pays(gpu) if cfg.compile == "auto" else bool(cfg.compile),
    )


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to a temporary file in the same folder, fsync, then rename: a crash leaves the old file intact."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                torch.save(checkpoint, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
