"""Training dynamics (visionflow.training.dynamics): per-sample margins recorded from training_step's logits."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from visionflow.monitoring.label_audit import margins
from visionflow.training.dynamics import TrainingDynamics


class Blobs(Dataset):
    """Three well-separated Gaussian blobs in 2-D, 30 samples each, with sample FLIPPED given the wrong label."""

    FLIPPED = 7

    def __init__(self):
        rng = np.random.default_rng(0)
        self.y = np.repeat(np.arange(3), 30)
        centres = np.array([[0.0, 4.0], [4.0, -2.0], [-4.0, -2.0]])
        self.x = (centres[self.y] + rng.normal(0, 0.7, (90, 2))).astype(np.float32)
        self.y[self.FLIPPED] = 2  # truly class 0

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return torch.from_numpy(self.x[i]), int(self.y[i]), i


class Linear(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(2, 3)

    def training_step(self, batch, _):
        logits = self.net(batch[0])
        return {"loss": torch.nn.functional.cross_entropy(logits, batch[1]), "logits": logits.detach()}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(dynamics: TrainingDynamics, epochs: int) -> None:
    torch.manual_seed(0)
    loader = DataLoader(Blobs(), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0))
    L.Trainer(
        max_epochs=epochs,
        callbacks=[dynamics],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    ).fit(Linear(), loader)


def test_a_flipped_label_gets_the_lowest_aum_and_its_true_class_as_suggestion():
    dynamics = TrainingDynamics(90, 3)
    _fit(dynamics, epochs=5)
    aum, suggested, seen = dynamics.result()
    assert (seen == 5).all()
    assert int(np.argmin(aum)) == Blobs.FLIPPED and aum[Blobs.FLIPPED] < 0
    assert suggested[Blobs.FLIPPED] == 0
    clean = np.delete(np.arange(90), Blobs.FLIPPED)
    assert (aum[clean] > 0).mean() > 0.9


def test_the_recorded_margin_is_label_audits_margin_averaged_over_visits():
    dynamics = TrainingDynamics(4, 3)
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [5.0, 0.0, 1.0]])
    labels, index = torch.tensor([0, 2, 1]), torch.tensor([3, 1, 0])
    for _ in range(2):  # two visits of the same samples: the mean is unchanged
        dynamics.on_train_batch_end(None, None, {"logits": logits}, (None, labels, index), 0)
    aum, suggested, seen = dynamics.result()
    expected = margins(logits.numpy(), labels.numpy())
    assert aum[[3, 1, 0]] == pytest.approx(expected)
    assert np.isnan(aum[2]) and seen.tolist() == [2, 2, 0, 2]
    assert suggested[[3, 1, 0]].tolist() == [1, 1, 0]  # the largest other logit of each


def test_the_state_travels_in_a_checkpoint_and_batches_without_indices_are_ignored():
    dynamics = TrainingDynamics(2, 2)
    dynamics.on_train_batch_end(
        None, None, {"logits": torch.tensor([[1.0, 0.0]])}, (None, torch.tensor([0]), torch.tensor([1])), 0
    )
    dynamics.on_train_batch_end(None, None, {"logits": torch.tensor([[9.0, 0.0]])}, (None, torch.tensor([0])), 0)
    resumed = TrainingDynamics(2, 2)
    resumed.load_state_dict(dynamics.state_dict())
    resumed.on_train_batch_end(
        None, None, {"logits": torch.tensor([[0.0, 2.0]])}, (None, torch.tensor([0]), torch.tensor([1])), 0
    )
    aum, _, seen = resumed.result()
    assert seen.tolist() == [0, 2] and aum[1] == pytest.approx((1.0 - 2.0) / 2)
    other_split = TrainingDynamics(3, 2)  # a checkpoint of another split is not carried over
    other_split.load_state_dict(dynamics.state_dict())
    assert other_split.result()[2].tolist() == [0, 0, 0]
