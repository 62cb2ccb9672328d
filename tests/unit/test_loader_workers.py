"""Loader workers: started once per run for train and for val, one OpenCV thread each, no online checks."""

from __future__ import annotations

import os
import subprocess
import sys

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from tests.helpers import REPO, make_folder_dataset
from visionflow.config import AugmentParams
from visionflow.training.datamodule import ImageDataModule


class Probe(Dataset):
    """What a worker's set-up left: its OpenCV thread count, the update-check switch, its process id."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int):
        import cv2

        return cv2.getNumThreads(), os.environ.get("NO_ALBUMENTATIONS_UPDATE", ""), os.getpid()


def _datamodule(tmp_path, workers: int) -> ImageDataModule:
    import pandas as pd

    src = make_folder_dataset(tmp_path / "images", per_class=8, size=12)
    splits = tmp_path / "splits"
    splits.mkdir()
    files = sorted(src.rglob("*.png"))
    for name in ("train", "val", "test"):
        pd.DataFrame({"path": [str(f) for f in files], "label": [f.parent.name for f in files]}).to_csv(
            splits / f"{name}.csv", index=False
        )
    return ImageDataModule(
        splits_dir=splits,
        cache_dir=tmp_path / "cache",
        classes=["cat", "dog", "fox"],
        image_size=12,
        channels=1,
        batch_size=4,
        num_workers=workers,
        augment=AugmentParams(),
        seed=0,
    )


@pytest.mark.parametrize("workers", [1, 2])
def test_loader_workers_run_opencv_single_threaded_without_update_checks(tmp_path, monkeypatch, workers):
    """The train loader's own worker set-up and start method, on a probe dataset."""
    monkeypatch.setenv("NO_ALBUMENTATIONS_UPDATE", "1")  # as the entry points set it
    real = _datamodule(tmp_path, workers).train_dataloader()
    probe = DataLoader(
        Probe(),
        batch_size=1,
        num_workers=workers,
        worker_init_fn=real.worker_init_fn,
        multiprocessing_context=real.multiprocessing_context,
    )
    seen = [(int(t), flag[0], int(pid)) for t, flag, pid in probe]
    assert {t for t, _, _ in seen} == {1}
    assert {flag for _, flag, _ in seen} == {"1"}
    assert len({pid for _, _, pid in seen}) == workers and os.getpid() not in {pid for _, _, pid in seen}


class Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(144, 3))

    def training_step(self, batch, _):
        return torch.nn.functional.cross_entropy(self.net(batch[0].float()), batch[1])

    def validation_step(self, batch, _):
        self.log("val/loss", torch.nn.functional.cross_entropy(self.net(batch[0].float()), batch[1]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class WorkerPids(L.Callback):
    """The worker processes each loader has at every epoch (train) and validation (val)."""

    def __init__(self, dm: ImageDataModule):
        self.dm, self.pids = dm, {"train": [], "val": [], "val_ready_at_epoch0": None}

    def _pids(self, name: str) -> tuple[int, ...]:
        return tuple(w.pid for w in self.dm.loaders[name]._iterator._workers)

    def on_train_epoch_start(self, trainer, pl_module):
        if self.pids["val_ready_at_epoch0"] is None:
            self.pids["val_ready_at_epoch0"] = (
                self.dm.loaders.get("val") is not None and self.dm.loaders["val"]._iterator is not None
            )
        self.pids["train"].append(self._pids("train"))

    def on_validation_epoch_start(self, trainer, pl_module):
        self.pids["val"].append(self._pids("val"))


def test_train_and_val_workers_start_once_per_run(tmp_path):
    """Three epochs with validation after each: the same worker processes serve every epoch, and the val
    workers are already started when the first epoch begins (not at the first validation)."""
    from visionflow.training.callbacks import StartValWorkers

    dm = _datamodule(tmp_path, 1)
    spy = WorkerPids(dm)
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[spy, StartValWorkers()],
    )
    trainer.fit(Tiny(), datamodule=dm)
    assert len(spy.pids["train"]) == 3 and len(set(spy.pids["train"])) == 1
    assert len(spy.pids["val"]) == 3 and len(set(spy.pids["val"])) == 1
    assert spy.pids["val_ready_at_epoch0"] is True


@pytest.mark.parametrize("preset", [None, "0"])
def test_cli_entry_point_turns_the_update_check_off_unless_set(preset):
    """The CLI sets NO_ALBUMENTATIONS_UPDATE=1 before any command imports albumentations; an explicit value wins."""
    env = {k: v for k, v in os.environ.items() if k != "NO_ALBUMENTATIONS_UPDATE"}
    if preset is not None:
        env["NO_ALBUMENTATIONS_UPDATE"] = preset
    code = (
        "import os, sys; from visionflow.cli import main; main(['--help']); "
        "print('SEEN', os.environ.get('NO_ALBUMENTATIONS_UPDATE'), 'albumentations' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=120
    ).stdout
    assert f"SEEN {preset or '1'} False" in out
