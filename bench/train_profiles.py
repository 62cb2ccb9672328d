"""The training set-ups train_step and input_pipeline measure: params.yaml's CPU default, and a GPU profile."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bench.common import Context


@dataclass(frozen=True)
class Profile:
    name: str
    model: str
    image_size: int
    channels: int
    batch_size: int
    accelerator: str  # "cpu" or "gpu"
    precision: str  # Lightning precision string
    channels_last: bool
    warmup: int
    steps: int  # timed steps after the warm-up
    workers: int  # DataLoader workers for the real-data variant
    goal: float
    compile: bool = False

    @property
    def device(self) -> str:
        return "cuda" if self.accelerator == "gpu" else "cpu"

    @property
    def total(self) -> int:
        return self.warmup + self.steps

    def describe(self) -> dict[str, Any]:
        return {
            k: getattr(self, k)
            for k in (
                "model",
                "image_size",
                "channels",
                "batch_size",
                "accelerator",
                "precision",
                "channels_last",
                "warmup",
                "steps",
                "workers",
                "compile",
            )
        }


def profiles(ctx: Context) -> list[Profile]:
    """The tiny CPU default from params.yaml, plus the GPU profile when CUDA is available."""
    import torch

    from visionflow.training.runtime import resolve_runtime

    cfg = ctx.params().train
    cpu = resolve_runtime(cfg.model_copy(update={"accelerator": "cpu"}))
    out = [
        Profile(
            "cpu-default",
            cfg.model,
            cfg.image_size,
            cfg.channels,
            cfg.batch_size,
            "cpu",
            cpu.precision,
            cpu.channels_last,
            warmup=2 if ctx.quick else 5,
            steps=5 if ctx.quick else 40,
            workers=cfg.num_workers,
            goal=0.90,
        )
    ]
    if torch.cuda.is_available():
        gpu = resolve_runtime(cfg.model_copy(update={"accelerator": "gpu"}))
        out.append(
            Profile(
                "gpu-resnet50",
                "resnet50",
                224,
                3,
                64 if ctx.quick else 256,
                "gpu",
                gpu.precision,
                gpu.channels_last,
                warmup=(5 if ctx.quick else 15) + (10 if ctx.compile else 0),
                steps=10 if ctx.quick else 60,
                workers=min(8, max(1, (torch.get_num_threads()))),
                goal=0.98,
                compile=ctx.compile,
            )
        )
    return out
