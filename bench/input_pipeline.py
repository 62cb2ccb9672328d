"""input_pipeline: can visionflow's train loader feed the training step?

A: images/s delivered by ImageDataModule's train loader as training builds it (decode-once uint8 cache, the
   albumentations transform from params.yaml, DataLoader with train.num_workers spawned workers), iterated with no
   model: the rate the loader can supply.
B: images/s the training step consumes for the same model: visionflow's Lightning loop (the A side of
   train_step) on in-memory synthetic batches, so no loader limits it.
Ratio A / B >= 1.1 means the loader is not the bottleneck. Data: the real splits when data/splits + data/cache
exist (the whole train split and the pipeline's own cache for the CPU default; a subset for --quick and for the
GPU profile, cached at 224 px under the work folder), otherwise synthetic Fashion-MNIST-like PNGs.
"""

from __future__ import annotations

import time
from functools import partial
from typing import Any

from bench.common import Context, Measurement, compare, goal
from bench.sample_data import make_splits, synthetic_classes
from bench.train_data import synthetic_batches, train_datamodule
from bench.train_loops import lightning_run
from bench.train_profiles import Profile, profiles

NAME = "input_pipeline"
GOAL = 1.1


def loader_run(loader, prof: Profile, n_batches: int) -> Measurement:
    """Images/s over n_batches after the first batch of a fresh pass (the workers persist across passes)."""
    it = iter(loader)
    next(it)
    t0 = time.perf_counter()
    images = 0
    for _ in range(n_batches):
        x, _y = next(it)
        images += len(x)
    dt = time.perf_counter() - t0
    del it
    return Measurement(images / dt)


def _profile_row(ctx: Context, p, prof: Profile) -> tuple[dict[str, Any], dict[str, Any]]:
    """The loader against the step for one profile; with the profile's entry in the config."""
    n_batches = 6 if ctx.quick else (60 if prof.accelerator == "cpu" else 40)
    need = prof.batch_size * (n_batches + 2)
    whole = not ctx.quick and prof.accelerator == "cpu"
    data = make_splits(
        ctx, f"input_pipeline/{prof.name}", {"train": need, "val": 1, "test": 1}, use_whole_real_train=whole
    )
    dm = train_datamodule(prof, p, data.splits_dir, data.cache_dir, data.classes)
    ctx.log(
        f"[input_pipeline] {prof.name}: caching {data.counts['train']} images ({data.source}) at {prof.image_size} px"
    )
    split = dm.load("train")
    n_batches = min(n_batches, len(split.labels) // prof.batch_size - 1)
    loader = dm.train_dataloader()
    loader_run(loader, prof, 1)  # starts the spawned workers outside the timed runs
    consume = synthetic_batches(prof, prof.total)
    config = {
        **prof.describe(),
        "loader_batches_timed": n_batches,
        "data": data.source,
        "train_images": len(split.labels),
        "augment": p.train.augment.model_dump(),
    }
    before = ctx.shared.get("train_step", {}).get(prof.name, {}).get("images_per_s")
    row = compare(
        ctx,
        f"{prof.name} loader vs step",
        partial(loader_run, loader, prof, n_batches),
        partial(lightning_run, ctx, prof, consume, synthetic_classes()),
        unit="images/s",
        a_label="ImageDataModule train loader",
        b_label="training step (visionflow loop)",
        higher_is_better=True,
        the_goal=goal(f">= {GOAL}x: loader is not the bottleneck", ">=", GOAL),
        notes=[
            f"{data.source}, {len(split.labels)} images; {prof.workers} loader worker(s) "
            f"(train.num_workers), batch {prof.batch_size}"
            + (f"; train_step measured this loop at {before:.4g} images/s earlier in the run" if before else "")
        ],
    )
    return row, config  # the loader goes with this frame, and its spawned workers with it


def _add_verdict(row: dict[str, Any]) -> None:
    r = row["ratio"]["median"]
    row["verdict"] = (
        "loader is not the bottleneck"
        if r >= GOAL
        else "loader may limit training (ratio < 1.1): add train.num_workers or lighten augmentation"
    )
    row["notes"].append(row["verdict"])


def run(ctx: Context) -> dict[str, Any]:
    rows, notes, config = [], [], {}
    p = ctx.params()
    for prof in profiles(ctx):
        row, config[prof.name] = _profile_row(ctx, p, prof)
        _add_verdict(row)
        rows.append(row)
    return {"rows": rows, "notes": notes, "config": config}
