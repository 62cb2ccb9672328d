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

import time
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

from bench.common import (
    Context,
    Measurement,
    Skip,
    compare,
    goal,
    make_splits,
    quiet_lightning,
    real_data_available,
    silenced,
    torch_state,
)

NAME = "train_step"
N_CLASSES = 10
REAL_CPU_WARMUP, REAL_CPU_STEPS = 3, 20  # real-data variant on CPU (full mode); synthetic keeps 5 + 40


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

    from visionflow.training.train import resolve_runtime

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


class CyclicBatches:
    """`n` batches cycling over a few distinct in-memory ones; has a length, so Lightning runs one epoch of n."""

    def __init__(self, batches: list[tuple[Any, Any]], n: int):
        self.batches = batches
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        for i in range(self.n):
            yield self.batches[i % len(self.batches)]


def synthetic_batches(prof: Profile, n: int, distinct: int = 4) -> CyclicBatches:
    import torch

    g = torch.Generator().manual_seed(0)
    pin = prof.device == "cuda"
    batches = []
    for _ in range(distinct):
        x = torch.randint(
            0, 256, (prof.batch_size, prof.channels, prof.image_size, prof.image_size), dtype=torch.uint8, generator=g
        )
        y = torch.randint(0, N_CLASSES, (prof.batch_size,), generator=g)
        batches.append((x.pin_memory(), y.pin_memory()) if pin else (x, y))
    return CyclicBatches(batches, n)


class LoaderView:
    """The real loader seen as a plain iterable with a length. Lightning shuts a DataLoader's persistent workers
    down at the end of fit(), so every run after it would wait for a freshly spawned worker (about 10 s on 2
    cores, before the warm-up steps, so outside the figure but not outside the suite's time); through this view
    the worker started once serves all ten runs. What is timed is unchanged: the same loader, batches and steps."""

    def __init__(self, loader) -> None:
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        return iter(self.loader)


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def _clock_callback(prof: Profile):
    from lightning.pytorch.callbacks import Callback

    class StepClock(Callback):
        """Timestamps the end of the warm-up step and of the last step (after the optimizer step)."""

        def __init__(self) -> None:
            self.n = 0
            self.t0 = self.t1 = None

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.n += 1
            if self.n == prof.warmup:
                _sync(prof.device)
                self.t0 = time.perf_counter()
            elif self.n == prof.total:
                _sync(prof.device)
                self.t1 = time.perf_counter()

    return StepClock()


def lightning_run(ctx: Context, prof: Profile, data, classes: list[str]) -> Measurement:
    """visionflow's loop: ImageClassifier in a Trainer with visionflow's (MLflow-free) configuration."""
    import lightning as L
    import torch

    from visionflow.training.model import ImageClassifier
    from visionflow.training.train import AtomicCheckpointIO

    quiet_lightning()
    cfg = ctx.params().train
    clock = _clock_callback(prof)
    torch.manual_seed(0)
    with torch_state(), silenced():
        model = ImageClassifier(
            model_name=prof.model,
            classes=classes,
            channels=prof.channels,
            image_size=prof.image_size,
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            optimizer=cfg.optimizer,
            scheduler=cfg.scheduler,
            pretrained_weights=None,
            channels_last=prof.channels_last,
        )
        if prof.compile:
            model.net = torch.compile(model.net)
        steps_per_epoch = len(data)
        trainer = L.Trainer(
            accelerator=prof.accelerator,
            devices=1,
            strategy="auto",
            precision=prof.precision,
            max_steps=prof.total,
            max_epochs=-1,
            logger=False,
            callbacks=[clock],
            plugins=[AtomicCheckpointIO()],
            deterministic=not torch.cuda.is_available(),
            log_every_n_steps=max(1, min(50, steps_per_epoch // 2)),
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            default_root_dir=str(ctx.tmp("train_step/lightning")),
            num_sanity_val_steps=0,
        )
        start = time.perf_counter()
        trainer.fit(model, train_dataloaders=data)
        wall = time.perf_counter() - start
    if clock.t0 is None or clock.t1 is None:
        raise RuntimeError(f"Lightning ran {clock.n} steps, fewer than the {prof.total} asked for")
    return Measurement(prof.batch_size * prof.steps / (clock.t1 - clock.t0), {"fit_wall_s": wall})


def plain_run(ctx: Context, prof: Profile, data, classes: list[str]) -> Measurement:
    """The baseline: the same net, optimizer and schedule in a hand-written loop."""
    import torch
    from torch import nn

    from visionflow.training.model import OPTIMIZERS, build_net

    cfg = ctx.params().train
    device = torch.device(prof.device)
    torch.manual_seed(0)
    start = time.perf_counter()
    net = build_net(prof.model, len(classes), prof.channels).to(device)
    if prof.channels_last:
        net = net.to(memory_format=torch.channels_last)
    opt = OPTIMIZERS[cfg.optimizer](net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = None
    if cfg.scheduler != "none":
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=cfg.lr, total_steps=prof.total, pct_start=0.15, anneal_strategy="cos"
        )
    model = torch.compile(net) if prof.compile else net
    loss_fn = nn.CrossEntropyLoss()
    amp = prof.precision.startswith("bf16") or prof.precision.startswith("16")
    amp_dtype = torch.bfloat16 if prof.precision.startswith("bf16") else torch.float16
    scaler = torch.amp.GradScaler(enabled=prof.precision == "16-mixed" and device.type == "cuda")
    net.train()
    t0 = t1 = None
    n = 0
    for x, y in data:
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        if prof.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
            loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        if sched is not None:
            sched.step()
        n += 1
        if n == prof.warmup:
            _sync(prof.device)
            t0 = time.perf_counter()
        elif n == prof.total:
            _sync(prof.device)
            t1 = time.perf_counter()
            break
    if t0 is None or t1 is None:
        raise RuntimeError(f"the loader gave {n} batches, fewer than the {prof.total} asked for")
    return Measurement(prof.batch_size * prof.steps / (t1 - t0), {"fit_wall_s": time.perf_counter() - start})


def flops_per_image(prof: Profile) -> float:
    """Forward + backward FLOPs of one image, counted by torch's FlopCounterMode on a batch of 2."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from visionflow.training.model import build_net

    device = torch.device(prof.device)
    net = build_net(prof.model, N_CLASSES, prof.channels).to(device)
    if prof.channels_last:
        net = net.to(memory_format=torch.channels_last)
    x = torch.randint(0, 256, (2, prof.channels, prof.image_size, prof.image_size), dtype=torch.uint8, device=device)
    if prof.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.zeros(2, dtype=torch.long, device=device)
    amp = prof.precision.startswith("bf16") or prof.precision.startswith("16")
    amp_dtype = torch.bfloat16 if prof.precision.startswith("bf16") else torch.float16
    with FlopCounterMode(display=False) as counter:
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
            loss = nn_loss(net(x), y)
        loss.backward()
    return counter.get_total_flops() / 2


def nn_loss(logits, y):
    from torch import nn

    return nn.functional.cross_entropy(logits, y)


def real_loader(ctx: Context, prof: Profile):
    """ImageDataModule's train loader on the real cached dataset (a subset for the GPU profile and --quick)."""
    from visionflow.training.datamodule import ImageDataModule

    if not real_data_available():
        raise Skip("no real dataset here (data/splits/train.csv + data/cache): run `make pipeline` first")
    need = prof.batch_size * (prof.total + 2)
    whole = not ctx.quick and prof.accelerator == "cpu"
    data = make_splits(ctx, f"train_step/{prof.name}", {"train": need, "val": 1, "test": 1}, use_whole_real_train=whole)
    cfg = ctx.params()
    dm = ImageDataModule(
        splits_dir=data.splits_dir,
        cache_dir=data.cache_dir,
        classes=data.classes,
        image_size=prof.image_size,
        channels=prof.channels,
        batch_size=prof.batch_size,
        num_workers=prof.workers,
        augment=cfg.train.augment,
        seed=cfg.base.seed,
    )
    split = dm.load("train")
    if len(split.labels) < need - prof.batch_size:
        raise Skip(f"the real train split has {len(split.labels)} images, fewer than the {need} this run needs")
    loader = dm.train_dataloader()
    for i, _ in enumerate(loader):  # start the (persistent, spawned) workers outside the timed runs
        if i >= 1:
            break
    return LoaderView(loader), data


def run(ctx: Context) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    config: dict[str, Any] = {}
    import torch

    if not torch.cuda.is_available():
        notes.append(
            "GPU profile (resnet50 at 224 px, bf16 + channels_last, goal >= 0.98x) skipped: CUDA is not available here"
        )
    for prof in profiles(ctx):
        config[prof.name] = prof.describe()
        classes = [f"class_{i}" for i in range(N_CLASSES)]
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
        goal_text = f">= {prof.goal:.2f}x"
        data = synthetic_batches(prof, prof.total)
        row = compare(
            ctx,
            f"{prof.name} synthetic",
            partial(lightning_run, ctx, prof, data, classes),
            partial(plain_run, ctx, prof, data, classes),
            unit="images/s",
            a_label="visionflow Lightning",
            b_label="plain PyTorch loop",
            higher_is_better=True,
            the_goal=goal(goal_text, ">=", prof.goal),
            notes=[
                "A runs with visionflow's deterministic=True on CPU (as `visionflow train` does); B "
                "with PyTorch defaults"
            ]
            if prof.accelerator == "cpu"
            else [],
        )
        _add_flops(ctx, row, prof, fpi)
        rows.append(row)
        ctx.shared.setdefault(NAME, {})[prof.name] = {"images_per_s": row["a"]["median"], "profile": prof}
        # The real-data variant runs fewer steps on CPU: its ten runs each restart the loader's epoch (and on a busy
        # machine its worker competes with the step for the 2 cores); the synthetic variant keeps the longer count.
        real_prof = (
            prof
            if ctx.quick or prof.accelerator != "cpu"
            else replace(prof, warmup=REAL_CPU_WARMUP, steps=REAL_CPU_STEPS)
        )
        try:
            loader, split = real_loader(ctx, real_prof)
        except Skip as exc:
            notes.append(f"{prof.name} real-data variant skipped: {exc}")
            continue
        real_classes = split.classes
        ctx.log(f"[train_step] {prof.name} real data: {real_prof.warmup} warm-up + {real_prof.steps} timed steps")
        row = compare(
            ctx,
            f"{prof.name} real data",
            partial(lightning_run, ctx, real_prof, loader, real_classes),
            partial(plain_run, ctx, real_prof, loader, real_classes),
            unit="images/s",
            a_label="visionflow Lightning",
            b_label="plain PyTorch loop",
            higher_is_better=True,
            the_goal=goal(goal_text, ">=", prof.goal),
            notes=[
                f"both loops read ImageDataModule's train loader ({split.source}, "
                f"{split.counts['train']} images, {prof.workers} worker(s), augmentation on)"
            ],
        )
        row["extra"]["steps"] = {"warmup": real_prof.warmup, "timed": real_prof.steps}
        _add_flops(ctx, row, prof, fpi)
        rows.append(row)
        loader = None  # lets the spawned loader workers go
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
