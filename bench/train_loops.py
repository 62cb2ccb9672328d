"""The two loops train_step compares (visionflow's Lightning set-up and a hand-written one), and the FLOP count
behind its MFU figure."""

from __future__ import annotations

import time

from bench.common import Context, Measurement
from bench.process_state import quiet_lightning, silenced, torch_state
from bench.sample_data import N_CLASSES
from bench.train_profiles import Profile


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


def _net(prof: Profile, n_classes: int, device):
    """The profile's bare net on the device, in its memory format."""
    import torch

    from visionflow.training.model import build_net

    net = build_net(prof.model, n_classes, prof.channels).to(device)
    return net.to(memory_format=torch.channels_last) if prof.channels_last else net


def _amp(prof: Profile):
    """(enabled, dtype) of autocast at the profile's precision: bf16 or fp16 mixed, off at full precision."""
    import torch

    amp = prof.precision.startswith("bf16") or prof.precision.startswith("16")
    return amp, torch.bfloat16 if prof.precision.startswith("bf16") else torch.float16


def lightning_run(ctx: Context, prof: Profile, data, classes: list[str]) -> Measurement:
    """visionflow's loop: ImageClassifier in a Trainer with visionflow's (MLflow-free) configuration."""
    import lightning as L
    import torch

    from visionflow.training.model import ImageClassifier
    from visionflow.training.runtime import AtomicCheckpointIO

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

    from visionflow.training.model import OPTIMIZERS

    cfg = ctx.params().train
    device = torch.device(prof.device)
    torch.manual_seed(0)
    start = time.perf_counter()
    net = _net(prof, len(classes), device)
    opt = OPTIMIZERS[cfg.optimizer](net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = None
    if cfg.scheduler != "none":
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=cfg.lr, total_steps=prof.total, pct_start=0.15, anneal_strategy="cos"
        )
    model = torch.compile(net) if prof.compile else net
    loss_fn = nn.CrossEntropyLoss()
    amp, amp_dtype = _amp(prof)
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

    device = torch.device(prof.device)
    net = _net(prof, N_CLASSES, device)
    x = torch.randint(0, 256, (2, prof.channels, prof.image_size, prof.image_size), dtype=torch.uint8, device=device)
    if prof.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.zeros(2, dtype=torch.long, device=device)
    amp, amp_dtype = _amp(prof)
    with FlopCounterMode(display=False) as counter:
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
            loss = nn_loss(net(x), y)
        loss.backward()
    return counter.get_total_flops() / 2


def nn_loss(logits, y):
    from torch import nn

    return nn.functional.cross_entropy(logits, y)
