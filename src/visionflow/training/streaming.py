"""Streaming DDP training: every rank streams its own part of the shards from the DVC remote, no checkout needed.

    python -m visionflow.training.streaming --project . --devices 2 --epochs 1 --keys-dir reports/stream

With `data.layout: shards` and the data version pushed (`visionflow version`), each of `--devices` CPU processes
(DDP over gloo) reads dvc.lock and the remote's listing, fetches only the shards its part of the epoch touches
into --cache-dir, and trains the project's model (visionflow.training.model) on them. The samples are those of the
train split (data/splits/train.csv, a small file) when it is there, else every image of the data version. How
the epoch is cut across ranks, and why the shorter ranks repeat a sample, is in visionflow.data.shard_stream.

Each rank writes the sample keys it trained on to --keys-dir/rank<N>.json (with the padding samples listed apart),
so a run can be checked: disjoint parts that together cover the split once per epoch. Exit code 2 on bad input
(no remote, a damaged download, a split from another data version), with a one-line message.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from visionflow.config import Params, load_params
from visionflow.data.imageio import DecodeRules
from visionflow.data.shard_stream import ShardSource, StreamingShards
from visionflow.data.shards import Member, split_locator
from visionflow.data.validate import read_manifest
from visionflow.errors import ConfigError, DataError, VersioningError
from visionflow.training.datamodule import build_train_transform, class_names, decide_input, init_worker
from visionflow.training.model import ImageClassifier


def split_members(members: list[Member], split_csv: Path) -> list[Member]:
    """The members a split manifest lists (shard locators), checked against the data version's members."""
    by_name = {m.member: m for m in members}
    out = []
    for path in read_manifest(split_csv)["path"]:
        loc = split_locator(path)
        if loc is None:
            raise DataError(f"{split_csv} lists {path!r}, not a shard locator: streaming needs data.layout: shards")
        if loc[1] not in by_name:
            raise DataError(f"{split_csv} lists {loc[1]!r}, which the data version does not hold: split again")
        out.append(by_name[loc[1]])
    return out


def build_dataset(p: Params, root: Path, cache_dir: Path, split: Path | None, channels: int | None) -> StreamingShards:
    source = ShardSource.from_project(root, cache_dir, p.data.raw_dir)
    members = source.members()
    if split is not None:
        members = split_members(members, split)
        classes = class_names(split.parent)
    else:
        classes = sorted({m.label for m in members})
    if channels is None:
        if p.train.channels == "auto" and split is None:
            raise ConfigError("train.channels is auto and there is no split manifest to decide it from: --channels")
        channels = decide_input(split, p.train.channels, p.train.image_size).channels if split else p.train.channels
    return StreamingShards(
        source,
        members,
        classes,
        image_size=p.train.image_size,
        channels=int(channels),
        rules=DecodeRules.from_params(p.validation),
        seed=p.base.seed,
        batch_size=p.train.batch_size,
        transform=build_train_transform(p.train.augment, p.train.image_size, p.base.seed),
    )


class StreamingData(L.LightningDataModule):
    def __init__(self, dataset: StreamingShards, num_workers: int):
        super().__init__()
        self.dataset, self.num_workers = dataset, num_workers

    def train_dataloader(self) -> DataLoader:
        # the process group exists now: this process's part of the epoch is known
        self.dataset.rank, self.dataset.world_size = self.trainer.global_rank, self.trainer.world_size
        return DataLoader(
            self.dataset,
            batch_size=self.dataset.batch_size,
            num_workers=self.num_workers,
            worker_init_fn=init_worker,
            persistent_workers=False,  # workers take a fresh copy of the dataset, and so its epoch, every epoch
        )


class KeyRecordingClassifier(ImageClassifier):
    """The project's classifier, trained on (image, label, key) batches; it keeps the keys each epoch saw."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.dataset: StreamingShards | None = None  # set after construction: not a hyperparameter
        self.seen: list[list[str]] = []
        self.padding: list[list[str]] = []

    def on_train_epoch_start(self) -> None:
        # Lightning makes the epoch's loader iterator after this hook (the first epoch's, made earlier, is epoch 0)
        self.dataset.epoch = self.current_epoch
        self.seen.append([])
        self.padding.append([m.member for m in self.dataset.rank_samples()[1]])

    def training_step(self, batch, batch_idx):
        x, y, keys = batch
        self.seen[-1].extend(keys)
        return super().training_step((x, y), batch_idx)


def run(args: argparse.Namespace) -> dict:
    root = Path(args.project).resolve()
    p = load_params(root / "params.yaml", args.set)
    split = None if args.split == "none" else root / (args.split or Path(p.data.splits_dir) / "train.csv")
    if split is not None and not split.is_file():
        raise DataError(f"{split} not found: run `visionflow split`, or pass --split none to stream every image")
    torch.set_num_threads(args.threads)
    dataset = build_dataset(p, root, Path(args.cache_dir or root / ".cache/shard-stream"), split, args.channels)
    per_rank = -(-len(dataset.members) // args.devices)
    if dataset.batch_size > 1 and per_rank % dataset.batch_size == 1:
        # every sample is kept (no drop_last), and batch norm cannot train on a batch of one
        raise ConfigError(
            f"each rank has {per_rank} samples: with train.batch_size {dataset.batch_size} its last batch holds one "
            "sample, which batch norm cannot train on; set another train.batch_size"
        )
    model = KeyRecordingClassifier(
        model_name=p.train.model,
        classes=dataset.classes,
        channels=dataset.channels,
        image_size=p.train.image_size,
        lr=p.train.lr,
        weight_decay=p.train.weight_decay,
        optimizer=p.train.optimizer,
        scheduler=p.train.scheduler,
    )
    model.dataset = dataset
    from lightning.pytorch.strategies import DDPStrategy

    trainer = L.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=DDPStrategy(process_group_backend="gloo") if args.devices > 1 else "auto",
        max_epochs=args.epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=args.keys_dir,
    )
    t0 = time.monotonic()
    trainer.fit(model, datamodule=StreamingData(dataset, args.num_workers))
    checkpoint = Path(args.checkpoint or Path(args.keys_dir) / "model.ckpt")
    trainer.save_checkpoint(checkpoint)  # every rank calls it; rank 0 writes (the weights are the same on all)
    record = {
        "checkpoint": str(checkpoint),
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "samples": len(dataset.members),
        "keys": model.seen,
        "padding": model.padding,
        "fit_s": round(time.monotonic() - t0, 2),
    }
    out = Path(args.keys_dir) / f"rank{trainer.global_rank}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record))
    return record


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m visionflow.training.streaming",
        description="Train the project's model with DDP on CPU, each rank streaming its part of the shards from "
        "the DVC remote (no `dvc checkout`).",
    )
    ap.add_argument("--project", default=".", help="project root (params.yaml, dvc.lock, .dvc/)")
    ap.add_argument("--devices", type=int, default=2, help="DDP processes (gloo on CPU)")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--num-workers", type=int, default=0, help="DataLoader workers per rank")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--keys-dir", required=True, help="where each rank writes rank<N>.json (the keys it saw)")
    ap.add_argument("--checkpoint", help="where the trained model is saved (default: <keys-dir>/model.ckpt)")
    ap.add_argument("--cache-dir", help="local shard cache (default: <project>/.cache/shard-stream)")
    ap.add_argument("--split", help="split manifest relative to the project (default: <splits_dir>/train.csv); none")
    ap.add_argument("--channels", type=int, choices=(1, 3), help="model input channels (default: train.channels)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override params.yaml")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.devices < 1 or args.epochs < 1 or args.num_workers < 0 or args.threads < 1:
        print("error: --devices, --epochs and --threads must be >= 1, --num-workers >= 0", file=sys.stderr)
        return 2
    try:
        record = run(args)
    except (DataError, ConfigError, VersioningError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in record.items() if k not in ("keys", "padding")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
