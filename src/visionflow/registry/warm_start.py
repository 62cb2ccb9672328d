"""The backbone weights logged beside each registered model, and the champion's fetched back for a warm start.

Retraining on drift starts from the champion's backbone rather than from scratch: registration logs the trained
backbone's state dict to the training run, and `champion_weights` downloads the champion's.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported when weights are saved, not when the champion's are fetched
    from torch import nn

WEIGHTS_ARTIFACT = "weights/backbone.pt"


def log_backbone_weights(net: nn.Module, run_id: str, *, whole: bool = False) -> None:
    """The backbone's state dict (whole: the whole network's, as a detector warm-starts) as an artifact of the
    training run (MLflow set up by the entry point)."""
    import mlflow
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(WEIGHTS_ARTIFACT).name
        torch.save((net if whole else net.backbone).state_dict(), path)
        mlflow.MlflowClient().log_artifact(run_id, str(path), str(Path(WEIGHTS_ARTIFACT).parent))


def champion_weights(model_name: str, dest: Path) -> Path | None:
    """The champion's backbone weights, downloaded from its MLflow run into dest/v<version>; None when there is
    no champion, or it was registered before weights were logged."""
    import mlflow

    from visionflow.registry.store import CHAMPION, alias_version, version_info

    version = alias_version(model_name, CHAMPION)
    if version is None:
        return None
    run_id = version_info(model_name, version)["tags"].get("visionflow.mlflow_run_id")
    if not run_id:
        return None
    folder = Path(dest) / f"v{version}"
    folder.mkdir(parents=True, exist_ok=True)
    try:
        return Path(
            mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=WEIGHTS_ARTIFACT, dst_path=str(folder))
        )
    except (mlflow.exceptions.MlflowException, OSError):  # registered before weights were logged: from scratch
        return None
