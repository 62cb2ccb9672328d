"""Register: the exported ONNX model into the MLflow registry, with its lineage, gate results and test metrics."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

# Evaluation figures copied onto the registered version (visionflow.metric.* tags)
METRICS = ("test_accuracy", "macro_f1", "robust_accuracy", "ece")


@dataclass(frozen=True)
class RegisterResult:
    model: str
    version: str


def version_tags(lineage: dict[str, str], mlflow_run_id: str, exported: dict[str, Any]) -> dict[str, str]:
    """A version's tags: its lineage, its training run, and the parity gate's result from reports/export.json
    (promotion reads them back)."""
    return {
        **lineage,
        "visionflow.mlflow_run_id": mlflow_run_id,
        "visionflow.gate.parity": "passed" if exported["passed"] else "failed",
        "visionflow.parity.max_abs_diff": f"{exported['max_abs_diff']:.3e}",
        "visionflow.parity.top1_agreement": f"{exported['top1_agreement']:.6f}",
        "visionflow.latency.ort_ms_b1": f"{exported['ort_ms_b1']:.3f}",
    }


def register(
    *,
    model_name: str,
    net: nn.Module,
    onnx_path: Path,
    exported: dict[str, Any],
    evaluated: dict[str, Any],
    mlflow_run_id: str,
    lineage: dict[str, str],
) -> RegisterResult:
    """Log the backbone weights (for warm starts) and register the ONNX model as the new challenger.

    exported, evaluated: reports/export.json and the evaluation.json of the same training run.
    """
    from visionflow.registry.store import register_onnx
    from visionflow.registry.warm_start import log_backbone_weights

    metrics = {k: evaluated[k] for k in METRICS if k in evaluated}
    log_backbone_weights(net, mlflow_run_id)
    version = register_onnx(
        onnx_path=onnx_path,
        card=exported["card"],
        model_name=model_name,
        mlflow_run_id=mlflow_run_id,
        tags=version_tags(lineage, mlflow_run_id, exported),
        metrics=metrics,
    )
    return RegisterResult(model=model_name, version=version)
