"""What the timed training loops read: synthetic uint8 batches in memory, or ImageDataModule's train loader."""

from __future__ import annotations

from typing import Any

from bench.common import Context, Skip
from bench.sample_data import N_CLASSES, make_splits, real_data_available
from bench.train_profiles import Profile


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


def train_datamodule(prof: Profile, p, splits_dir, cache_dir, classes: list[str]):
    """ImageDataModule as training builds it (params.yaml's augmentation and seed) at the profile's size, batch and
    workers."""
    from visionflow.training.datamodule import ImageDataModule

    return ImageDataModule(
        splits_dir=splits_dir,
        cache_dir=cache_dir,
        classes=classes,
        image_size=prof.image_size,
        channels=prof.channels,
        batch_size=prof.batch_size,
        num_workers=prof.workers,
        augment=p.train.augment,
        seed=p.base.seed,
    )


def real_loader(ctx: Context, prof: Profile):
    """ImageDataModule's train loader on the real cached dataset (a subset for the GPU profile and --quick)."""
    if not real_data_available():
        raise Skip("no real dataset here (data/splits/train.csv + data/cache): run `make pipeline` first")
    need = prof.batch_size * (prof.total + 2)
    whole = not ctx.quick and prof.accelerator == "cpu"
    data = make_splits(ctx, f"train_step/{prof.name}", {"train": need, "val": 1, "test": 1}, use_whole_real_train=whole)
    dm = train_datamodule(prof, ctx.params(), data.splits_dir, data.cache_dir, data.classes)
    split = dm.load("train")
    if len(split.labels) < need - prof.batch_size:
        raise Skip(f"the real train split has {len(split.labels)} images, fewer than the {need} this run needs")
    loader = dm.train_dataloader()
    for i, _ in enumerate(loader):  # start the (persistent, spawned) workers outside the timed runs
        if i >= 1:
            break
    return LoaderView(loader), data
