"""Training on an accelerator's terms, checked on CPU: torch.compile parity, system metrics, run figures."""

from __future__ import annotations

import json

import lightning as L
import mlflow
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from tests.helpers import REPO, tiny_project, use_mlflow
from visionflow import stages
from visionflow.config import load_params
from visionflow.training.model import ImageClassifier
from visionflow.training.runtime import resolve_runtime

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _no_env_tracking(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


class Losses(L.Callback):
    def __init__(self):
        self.values: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.values.append(float(outputs["loss"]))


def _loss_curve(compiled: bool, steps: int = 6) -> tuple[np.ndarray, list[str]]:
    """Per-step training losses of the default network (test_resnet), compiled in place as train() compiles it,
    on fixed synthetic batches; and its state-dict keys."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (8 * steps, 1, 16, 16), dtype=torch.uint8, generator=g)
    # learnable labels (brightness terciles) and SGD: a stable descent, where a rounding difference stays small
    # (AdamW's first steps are nearly sign(gradient), which turns a 1e-7 gradient difference into a whole step)
    y = torch.bucketize(x.float().mean((1, 2, 3)), x.float().mean((1, 2, 3)).quantile(torch.tensor([1 / 3, 2 / 3])))
    data = TensorDataset(x, y)
    model = ImageClassifier(
        model_name="test_resnet",
        classes=["a", "b", "c"],
        channels=1,
        image_size=16,
        lr=0.01,
        weight_decay=1e-4,
        optimizer="sgd",
        scheduler="none",
    )
    if compiled:
        model.net.compile()
    losses = Losses()
    L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        callbacks=[losses],
        limit_val_batches=0,
    ).fit(model, train_dataloaders=DataLoader(data, batch_size=8))
    return np.array(losses.values), sorted(model.state_dict())


def test_compiled_and_eager_training_give_the_same_loss_curve():
    """torch.compile (inductor, on CPU here) trains the same network: per-step losses agree to 1e-3 relative
    over six SGD steps (fp32; the differences are reassociated sums), and the state dict (checkpoints, export) keeps
    the eager module's keys."""
    eager, eager_keys = _loss_curve(False)
    compiled, compiled_keys = _loss_curve(True)
    assert len(compiled) == len(eager) == 6 and eager[0] != eager[-1]
    np.testing.assert_allclose(compiled, eager, rtol=1e-3, atol=1e-5)
    assert compiled_keys == eager_keys


@pytest.mark.parametrize("setting", ["true", "false", "auto"])
def test_train_compile_setting_reaches_the_runtime(setting):
    p = load_params(REPO / "params.yaml", [f"train.compile={setting}"])
    for accelerator in ("cpu", "auto"):
        rt = resolve_runtime(p.train.model_copy(update={"accelerator": accelerator}))
        expected = {"true": True, "false": False}.get(setting, torch.cuda.is_available() and accelerator == "auto")
        assert rt.compile is expected


@pytest.mark.parametrize("workers", [0, 1])
def test_training_run_has_system_metrics_and_figures(tmp_path, workers):
    """A real run against a real SQLite store: MLflow's system/ metrics, and the run's figures in
    reports/train.json and as perf/ metrics (on CPU the busy basis says it is wall time inside steps)."""
    proj = tiny_project(tmp_path, num_workers=workers, max_epochs=2)
    p = load_params(proj / "params.yaml")
    use_mlflow(p, proj)
    res = stages.train_stage(p, proj, "figures", progress=False)
    run = mlflow.MlflowClient(f"sqlite:///{proj / 'mlflow.db'}").get_run(res.mlflow_run_id)
    metrics = run.data.metrics
    assert "system/cpu_utilization_percentage" in metrics and "system/system_memory_usage_megabytes" in metrics
    figures = json.loads((proj / "reports/train.json").read_text())["figures"]
    assert figures["busy_basis"] == "cpu_wall_in_step"
    assert 0 < figures["busy_fraction"] <= 1 and figures["images_per_s"] > 0
    assert 0 <= figures["cache_s"] < figures["time_to_first_step_s"]
    assert figures["time_to_first_step_after_cache_s"] == pytest.approx(
        figures["time_to_first_step_s"] - figures["cache_s"], abs=2e-3
    )
    assert figures["steps"] == res.global_step and figures["images"] > figures["steps"]
    for k in ("images_per_s", "busy_fraction", "time_to_first_step_s", "cache_s"):
        assert metrics[f"perf/{k}"] == pytest.approx(figures[k])
    assert run.data.tags["visionflow.perf.busy_basis"] == "cpu_wall_in_step"
