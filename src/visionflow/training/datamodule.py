"""Albumentations augmentation and the LightningDataModule that feeds training from the decode-once cache.

Images are decoded (guarded) and resized once per split into a uint8 array on disk (visionflow.data.cache); every epoch
reads that array through a memory map, so no image is decoded twice and worker processes share the pages. Batches
stay uint8 until the model's own preprocessing layer, which keeps host-to-device copies four times smaller than
float32.
"""

from __future__ import annotations

import io
import multiprocessing
import random
from dataclasses import dataclass
from pathlib import Path

import albumentations as A
import cv2
import lightning as L
import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from visionflow.config import AugmentParams
from visionflow.data.cache import CachedSplit, build_cache
from visionflow.data.imageio import read_limited
from visionflow.data.validate import read_manifest
from visionflow.errors import DataError
from visionflow.paths import ProjectPaths


def build_train_transform(aug: AugmentParams, image_size: int, seed: int) -> A.Compose:
    """Augmentations from params.yaml; a probability of 0 leaves a transform out entirely."""
    candidates = [
        (aug.hflip, lambda p: A.HorizontalFlip(p=p)),
        (
            aug.shift_scale_rotate,
            lambda p: A.Affine(
                translate_percent=(-0.08, 0.08),
                scale=(0.9, 1.1),
                rotate=(-10, 10),
                border_mode=cv2.BORDER_CONSTANT,
                p=p,
            ),
        ),
        (aug.brightness_contrast, lambda p: A.RandomBrightnessContrast(0.2, 0.2, p=p)),
        (aug.blur, lambda p: A.GaussianBlur(blur_limit=(3, 5), p=p)),
        (aug.noise, lambda p: A.GaussNoise(std_range=(0.02, 0.08), p=p)),
        (aug.jpeg, lambda p: A.ImageCompression(quality_range=(40, 95), p=p)),
        (aug.random_crop, lambda p: A.RandomResizedCrop(size=(image_size, image_size), scale=(0.7, 1.0), p=p)),
    ]
    return A.Compose([make(p) for p, make in candidates if p > 0], seed=seed)


class CachedImageDataset(Dataset):
    """(image, label) pairs of a cached split; (image, label, index) with `with_index`, so that training can
    record what it did with each sample (visionflow.training.dynamics)."""

    def __init__(self, split: CachedSplit, transform: A.Compose | None = None, with_index: bool = False):
        self.split = split
        self.transform = transform
        self.with_index = with_index

    def __len__(self) -> int:
        return len(self.split.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int] | tuple[torch.Tensor, int, int]:
        img = np.asarray(self.split.images[i])
        if self.transform is not None:
            img = self.transform(image=img)["image"]
            if img.ndim == 2:
                img = img[..., None]
        x = torch.from_numpy(np.array(img.transpose(2, 0, 1), copy=True))
        return (x, int(self.split.labels[i]), i) if self.with_index else (x, int(self.split.labels[i]))


def init_worker(worker_id: int) -> None:
    """A loader worker's set-up: one OpenCV thread (the workers are the parallelism; each worker's own pool of
    one thread per core would oversubscribe the machine), and distinct, reproducible randomness per worker and
    epoch (torch derives initial_seed from the loader seed)."""
    cv2.setNumThreads(1)
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
    info = torch.utils.data.get_worker_info()
    transform = getattr(info.dataset, "transform", None) if info else None
    if transform is not None:
        transform.set_random_seed(seed)


def worker_context() -> multiprocessing.context.BaseContext:
    """Loader workers forked from a forkserver that imported this module (torch, albumentations, cv2, lightning)
    once, instead of spawned workers that each import it again (about 12 s of CPU per worker on 2 cores, most of
    it lightning; with 8 train and 8 val workers that was the stall before the first step and the first
    validation). The forkserver starts from a fresh interpreter, so like spawned workers they inherit none of the
    orchestrator's threads and locks (Prefect's heartbeat and log shippers: a worker forked mid-flow has died at
    shutdown with exit code 1). It inherits the environment when it starts: NO_ALBUMENTATIONS_UPDATE, set by the
    entry points, reaches every worker."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["__main__", __name__])  # no effect once the server runs, which is fine
    return ctx


class ImageDataModule(L.LightningDataModule):
    def __init__(
        self,
        *,
        splits_dir: Path,
        cache_dir: Path,
        classes: list[str],
        image_size: int,
        channels: int,
        batch_size: int,
        num_workers: int,
        augment: AugmentParams,
        seed: int,
        project: ProjectPaths | None = None,
        train_index: bool = False,
    ):
        """train_index: the train loader's batches carry each sample's index in the split as a third element
        (training records per-sample dynamics from it); val and test batches stay (images, labels)."""
        super().__init__()
        self.splits_dir = Path(splits_dir)
        self.cache_dir = Path(cache_dir)
        self.classes = classes
        self.image_size = image_size
        self.channels = channels
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.augment = augment
        self.seed = seed
        self.project = project  # the manifests' relative paths are resolved against its root
        self.train_index = train_index
        self.splits: dict[str, CachedSplit] = {}
        self.loaders: dict[str, DataLoader] = {}

    def prepare_data(self) -> None:
        for name in ("train", "val", "test"):
            self.load(name)

    def load(self, name: str) -> CachedSplit:
        if name not in self.splits:
            manifest = self.splits_dir / f"{name}.csv"
            if not manifest.is_file():
                raise DataError(f"{manifest} not found: run `visionflow split` first")
            self.splits[name] = build_cache(
                manifest,
                self.cache_dir,
                classes=self.classes,
                image_size=self.image_size,
                channels=self.channels,
                project=self.project,
            )
        return self.splits[name]

    def setup(self, stage: str | None = None) -> None:
        self.prepare_data()

    def _loader(self, name: str, train: bool) -> DataLoader:
        """One loader per split for the DataModule's life: its persistent workers start once per run (Lightning
        asks for each loader once per fit and re-iterates it every epoch, which reuses persistent workers)."""
        if name not in self.loaders:
            transform = build_train_transform(self.augment, self.image_size, self.seed) if train else None
            generator = torch.Generator().manual_seed(self.seed)
            self.loaders[name] = DataLoader(
                CachedImageDataset(self.load(name), transform, with_index=train and self.train_index),
                batch_size=self.batch_size,
                shuffle=train,
                drop_last=False,
                generator=generator,
                num_workers=self.num_workers,
                worker_init_fn=init_worker,
                persistent_workers=self.num_workers > 0,
                pin_memory=torch.cuda.is_available(),
                multiprocessing_context=worker_context() if self.num_workers > 0 else None,
            )
        return self.loaders[name]

    def start_workers(self, name: str) -> None:
        """Start a split's loader workers now (they begin prefetching its first batches), so that the first
        validation does not wait for them: training calls this once for val as it starts. (A persistent loader
        keeps the iterator made here; the next iteration resets it without restarting the workers.)"""
        loader = self._loader(name, train=False)
        if loader.num_workers > 0:
            iter(loader)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)


# Sizes the image-size hint suggests (when the images are at least twice train.image_size): the largest one that
# the images' median short side still fills.
SUGGESTED_SIZES = (32, 48, 64, 96, 128, 160, 224)


@dataclass(frozen=True)
class InputDecision:
    """The network's input shape, and in words why (logged, and recorded with the run's params)."""

    channels: int
    image_size: int
    colour_share: float
    median_size: tuple[int, int]
    note: str
    hint: str | None


def decide_input(manifest: Path, channels: int | str, image_size: int) -> InputDecision:
    """Channels (when "auto") and an image-size hint from the modes and sizes recorded in a split manifest.

    "auto" is colour (3) when most images are colour, grey (1) otherwise: a stray greyscale file in a colour
    dataset (or a colour one in a grey dataset) does not change how the whole dataset is trained.
    """
    df = read_manifest(manifest)
    if df.empty:
        raise DataError(f"{manifest} lists no images: run `visionflow split` first")
    if not {"mode", "width", "height"} <= set(df.columns):  # a hand-written manifest (path, label): read headers
        df = pd.DataFrame([_header(Path(f)) for f in df["path"]])
    # Pillow's base mode is "L" for every mode without colour (1, L, LA, I, I;16, F)
    colour = df["mode"].map(lambda m: Image.getmodebase(m) != "L")
    share = float(colour.mean())
    modes = ", ".join(f"{m} {n / len(df):.0%}" for m, n in df["mode"].value_counts().items())
    if channels == "auto":
        resolved = 3 if share > 0.5 else 1
        note = (
            f"train.channels auto -> {resolved} ({'colour' if resolved == 3 else 'grey'}): "
            f"{int(colour.sum())} of {len(df)} images are colour (modes: {modes})"
        )
    else:
        resolved = int(channels)
        note = f"train.channels {resolved} (set in params; modes: {modes})"
        if resolved == 1 and share > 0.5:
            note += f"; {share:.0%} of the images are colour and train as grey: set train.channels: auto"
    median = (int(df["width"].median()), int(df["height"].median()))
    return InputDecision(
        channels=resolved,
        image_size=image_size,
        colour_share=round(share, 4),
        median_size=median,
        note=note,
        hint=_size_hint(min(median), image_size, median),
    )


def _header(path: Path) -> dict[str, object]:
    with Image.open(io.BytesIO(read_limited(path, None))) as im:  # decodes the header only
        return {"mode": im.mode, "width": im.size[0], "height": im.size[1]}


def _size_hint(short_side: int, image_size: int, median: tuple[int, int]) -> str | None:
    typical = f"the images' median size is {median[0]}x{median[1]} px"
    if short_side < image_size:
        return (
            f"{typical}, smaller than train.image_size {image_size}: they are upscaled; "
            f"train.image_size: {short_side} trains as well and faster"
        )
    fits = [s for s in SUGGESTED_SIZES if image_size < s <= short_side]
    if short_side < 2 * image_size or not fits:
        return None
    return (
        f"{typical}, trained at train.image_size {image_size}: train.image_size: {fits[-1]} keeps more "
        f"detail, at about {(fits[-1] / image_size) ** 2:.0f}x the compute"
    )


def class_names(splits_dir: Path) -> list[str]:
    """The class list, sorted; index i in the model's output is classes[i]."""
    labels: set[str] = set()
    for name in ("train", "val", "test"):
        path = Path(splits_dir) / f"{name}.csv"
        if path.is_file():
            labels |= set(read_manifest(path)["label"])
    if not labels:
        raise DataError(f"no split manifests in {splits_dir}: run `visionflow split` first")
    return sorted(labels)
