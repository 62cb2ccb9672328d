"""train_step: images/s of visionflow's Lightning + timm training loop vs a hand-written PyTorch loop.

A: visionflow.training.model.ImageClassifier inside a lightning Trainer configured as visionflow.training.train
   configures it
   (accelerator, precision, deterministic flag, AtomicCheckpointIO plugin, no sanity steps, max_steps) but with no
   logger, checkpoints or progress bar, so that only the loop itself is timed.
B: a plain loop over the same net (visionflow.training.model.build_net), optimizer (AdamW), OneCycle schedule, batch,
   precision and memory format: zero_grad, forward + loss (under autocast on GPU), backward, step.

Both are timed from the end of the warm-up steps to the end of the last step (CUDA synchronised at both ends), so
Trainer set-up and torch.compile's compilation are outside the measurement; the fit() wall time is kept as an
extra. Variants: synthetic uint8 batches already in memory, and the real cached dataset through
ImageDataModule's train loader (both loops read the same loader) when data/splits + data/cache exist.
CPU: the params.yaml default (test_resnet at 28 px). GPU (only when CUDA is available): resnet50 at 224 px,
bf16 autocast + channels_last, optional torch.compile (--compile), with MFU from FlopCounterMode's fwd+bwd count.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial
from typing import Any

from bench.common import Context, Skip, compare, goal
from bench.sample_data import synthetic_classes
from bench.train_data import real_loader, synthetic_batches
from bench.train_loops import flops_per_image, lightning_run, plain_run
from bench.train_profiles import Profile, profiles

NAME = "train_step"
REAL_CPU_WARMUP, REAL_CPU_STEPS = 3, 20  # real-data variant on CPU (full mode); synthetic keeps 5 + 40


def _loop_row(ctx: Context, variant: str, prof: Profile, data, classes: list[str], notes: list[str]) -> dict[str, Any]:
    """A (visionflow's Lightning loop) against B (the plain loop), both reading `data`."""
    return compare(
        ctx,
        variant,
        partial(lightning_run, ctx, prof, data, classes),
        partial(plain_run, ctx, prof, data, classes),
        unit="images/s",
        a_label="visionflow Lightning",
        b_label="plain PyTorch loop",
        higher_is_better=True,
        the_goal=goal(f">= {prof.goal:.2f}x", ">=", prof.goal),
        notes=notes,
    )


def _synthetic_row(ctx: Context, prof: Profile) -> dict[str, Any]:
    notes = (
        ["A runs with visionflow's deterministic=True on CPU (as `visionflow train` does); B with PyTorch defaults"]
        if prof.accelerator == "cpu"
        else []
    )
    data = synthetic_batches(prof, prof.total)
    return _loop_row(ctx, f"{prof.name} synthetic", prof, data, synthetic_classes(), notes)


def _real_row(ctx: Context, prof: Profile) -> dict[str, Any]:
    """Both loops on ImageDataModule's train loader over the real cached dataset; Skip when it is not here."""
    # The real-data variant runs fewer steps on CPU: its ten runs each restart the loader's epoch (and on a busy
    # machine its worker competes with the step for the 2 cores); the synthetic variant keeps the longer count.
    real_prof = (
        prof if ctx.quick or prof.accelerator != "cpu" else replace(prof, warmup=REAL_CPU_WARMUP, steps=REAL_CPU_STEPS)
    )
    loader, split = real_loader(ctx, real_prof)
    ctx.log(f"[train_step] {prof.name} real data: {real_prof.warmup} warm-up + {real_prof.steps} timed steps")
    notes = [
        f"both loops read ImageDataModule's train loader ({split.source}, "
        f"{split.counts['train']} images, {prof.workers} worker(s), augmentation on)"
    ]
    row = _loop_row(ctx, f"{prof.name} real data", real_prof, loader, split.classes, notes)
    row["extra"]["steps"] = {"warmup": real_prof.warmup, "timed": real_prof.steps}
    return row  # the loader goes with this frame, and its spawned workers with it


def run(ctx: Context) -> dict[str, Any]:
    import torch

    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    config: dict[str, Any] = {}
    if not torch.cuda.is_available():
        notes.append(
            "GPU profile (resnet50 at 224 px, bf16 + channels_last, goal >= 0.98x) skipped: CUDA is not available here"
        )
    for prof in profiles(ctx):
        config[prof.name] = prof.describe()
        ctx.log(
            f"[train_step] {prof.name}: {prof.model} at {prof.image_size} px, batch {prof.batch_size}, "
            f"{prof.precision}, {prof.warmup} warm-up + {prof.steps} timed steps"
        )
        try:
            fpi = flops_per_image(prof)
        except Exception as exc:  # noqa: BLE001 - the count is a side figure; never lose the benchmark over it
            fpi = None
            notes.append(f"{prof.name}: FLOP count failed ({type(exc).__name__}: {exc})")
        config[prof.name]["flops_per_image_fwd_bwd"] = fpi
        row = _synthetic_row(ctx, prof)
        _add_flops(ctx, row, prof, fpi)
        rows.append(row)
        ctx.shared.setdefault(NAME, {})[prof.name] = {"images_per_s": row["a"]["median"], "profile": prof}
        try:
            row = _real_row(ctx, prof)
        except Skip as exc:
            notes.append(f"{prof.name} real-data variant skipped: {exc}")
            continue
        _add_flops(ctx, row, prof, fpi)
        rows.append(row)
    return {"rows": rows, "notes": notes, "config": config}


def _add_flops(ctx: Context, row: dict[str, Any], prof: Profile, fpi: float | None) -> None:
    if not fpi:
        return
    for side in ("a", "b"):
        ips = row[side]["median"]
        achieved = ips * fpi / 1e12
        row["extra"][f"{side}_tflops"] = round(achieved, 4)
        if prof.accelerator == "gpu":
            row["extra"][f"{side}_mfu"] = round(achieved / ctx.peak_tflops, 4)
    if prof.accelerator == "gpu":
        row["notes"].append(
            f"MFU = images/s x {fpi / 1e9:.2f} GFLOP/image (fwd+bwd, FlopCounterMode) / "
            f"--peak-tflops {ctx.peak_tflops:g}"
        )
