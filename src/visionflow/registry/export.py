"""Export: ONNX with preprocessing inside the graph, a model card beside it, and the parity gate.

The graph takes uint8 images (batch, channels, size, size) and returns logits and the penultimate-layer
embedding (the drift check reads it). Parity compares ONNX Runtime with PyTorch on held-out images at several
batch sizes; a model that disagrees on any top-1 prediction, or whose logits differ by more than the tolerance,
fails the export.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from visionflow.data.imageio import sha256_file
from visionflow.onnxrt import ort_logits, ort_session
from visionflow.training.evaluate import predict_logits


class _Exportable(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.net.preprocess(image)
        feats = self.net.backbone.forward_features(x)
        embedding = self.net.backbone.forward_head(feats, pre_logits=True)
        return self.net.backbone.get_classifier()(embedding), embedding


def export_onnx(net: nn.Module, *, image_size: int, channels: int, path: Path, opset: int = 17) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = _Exportable(net).eval()
    dummy = torch.zeros(2, channels, image_size, image_size, dtype=torch.uint8)
    tmp = path.with_suffix(".onnx.tmp")
    with torch.inference_mode():
        torch.onnx.export(
            module,
            (dummy,),
            str(tmp),
            input_names=["image"],
            output_names=["logits", "embedding"],
            dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}, "embedding": {0: "batch"}},
            opset_version=opset,
            dynamo=False,
        )
    import onnx

    onnx.checker.check_model(str(tmp))
    tmp.replace(path)
    return path


def onnx_signature(model) -> Any:
    """The MLflow signature of an ONNX graph (names, dtypes, shapes; a symbolic axis such as batch is -1), so the
    registry shows the model's inputs and outputs."""
    import onnx
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    def schema(values) -> Schema:
        specs = []
        for v in values:
            t = v.type.tensor_type
            shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim)
            specs.append(TensorSpec(onnx.helper.tensor_dtype_to_np_dtype(t.elem_type), shape, v.name))
        return Schema(specs)

    return ModelSignature(inputs=schema(model.graph.input), outputs=schema(model.graph.output))


def model_card_markdown(card: dict[str, Any]) -> str:
    """The card as the registry's version description: what a person reads in the MLflow UI. A detector's card
    ("task": "detection") may describe its input and outputs its own way: rows it lacks are left out."""
    rows = [
        ("architecture", str(card.get("architecture", "unknown"))),
        ("data version", card.get("data_version") or "unversioned"),
    ]
    if isinstance(card.get("input"), dict) and {"name", "dtype", "layout", "shape"} <= set(card["input"]):
        shape = " x ".join(str(d) for d in card["input"]["shape"])
        rows.append(
            ("input", f"`{card['input']['name']}` {card['input']['dtype']} {card['input']['layout']} ({shape})")
        )
    if isinstance(card.get("outputs"), list):
        rows.append(("outputs", ", ".join(f"`{o}`" for o in card["outputs"])))
    rows += [
        ("classes", f"{len(card['classes'])}: " + ", ".join(card["classes"])),
        ("ONNX sha256", f"`{card['onnx_sha256']}`"),
    ]
    rows += [
        (k, str(v))
        for k, v in card.items()
        if k
        not in {
            "format",
            "input",
            "outputs",
            "image_size",
            "channels",
            "classes",
            "architecture",
            "data_version",
            "onnx_sha256",
        }
    ]
    return "\n".join(
        [
            f"**visionflow {'object detector' if card.get('task') == 'detection' else 'image classifier'}** "
            "(ONNX, preprocessing inside the graph)",
            "",
            "| | |",
            "|---|---|",
            *(f"| {k} | {v.replace('|', '/')} |" for k, v in rows),
        ]
    )


def write_model_card(
    onnx_path: Path,
    *,
    image_size: int,
    channels: int,
    classes: list[str],
    model_name: str,
    data_version: str | None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    card = {
        "format": "onnx",
        "input": {
            "name": "image",
            "dtype": "uint8",
            "layout": "NCHW",
            "shape": ["batch", channels, image_size, image_size],
        },
        "outputs": ["logits", "embedding"],
        "image_size": image_size,
        "channels": channels,
        "classes": classes,
        "architecture": model_name,
        "data_version": data_version,
        "onnx_sha256": sha256_file(onnx_path),
        **(extra or {}),
    }
    Path(onnx_path).with_name("model_card.json").write_text(json.dumps(card, indent=2))
    return card


@dataclass(frozen=True)
class ParityResult:
    passed: bool
    n_images: int
    top1_agreement: float
    max_abs_diff: float
    tolerance: float
    batch_sizes: list[int]
    ort_ms_b1: float
    torch_ms_b1: float
    ort_ms_b32: float
    torch_ms_b32: float
    reasons: list[str]


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def parity_check(
    net: nn.Module,
    onnx_path: Path,
    images: np.ndarray,
    *,
    tolerance: float,
    batch_sizes: tuple[int, ...] = (1, 7, 32),
    repeats: int = 30,
) -> ParityResult:
    session = ort_session(onnx_path)
    reference = predict_logits(net, images)
    worst, agree = 0.0, 1.0
    for bs in batch_sizes:
        got = ort_logits(session, images, batch_size=bs)
        worst = max(worst, float(np.abs(got - reference).max()))
        agree = min(agree, float((got.argmax(1) == reference.argmax(1)).mean()))
    reasons = []
    if agree < 1.0:
        reasons.append(f"ONNX top-1 agreement {agree:.4%} < 100%")
    if worst > tolerance:
        reasons.append(f"largest logit difference {worst:.2e} > export.parity_tolerance {tolerance:.0e}")

    def nchw(batch: np.ndarray) -> np.ndarray:
        return np.array(batch.transpose(0, 3, 1, 2), order="C", copy=True)  # writable, contiguous

    b1, b32 = nchw(np.asarray(images[:1])), nchw(np.asarray(images[:32]))
    net.eval()
    with torch.inference_mode():
        t1, t32 = torch.from_numpy(b1), torch.from_numpy(b32)
        torch_b1 = median_ms(lambda: net(t1), repeats)
        torch_b32 = median_ms(lambda: net(t32), max(5, repeats // 3))
    ort_b1 = median_ms(lambda: session.run(["logits"], {"image": b1}), repeats)
    ort_b32 = median_ms(lambda: session.run(["logits"], {"image": b32}), max(5, repeats // 3))
    return ParityResult(
        passed=not reasons,
        n_images=len(images),
        top1_agreement=agree,
        max_abs_diff=worst,
        tolerance=tolerance,
        batch_sizes=list(batch_sizes),
        ort_ms_b1=ort_b1,
        torch_ms_b1=torch_b1,
        ort_ms_b32=ort_b32,
        torch_ms_b32=torch_b32,
        reasons=reasons,
    )


@dataclass(frozen=True)
class ExportResult(ParityResult):
    """The export stage's result (reports/export.json): the parity figures, where the model is, and its card."""

    onnx_path: str  # relative to the project root
    card: dict[str, Any]

    def headline(self) -> str:
        """The one line the pipeline logs."""
        return (
            f"ONNX parity passed: max |diff| {self.max_abs_diff:.2e}, top-1 agreement {self.top1_agreement:.4f}; "
            f"ORT {self.ort_ms_b1:.2f} ms vs torch {self.torch_ms_b1:.2f} ms at batch 1"
        )

    def summary(self) -> dict[str, Any]:
        """The parity figures the pipeline report carries (as the training run's tags)."""
        return {k: getattr(self, k) for k in PARITY_TAGS}


# The parity figures a training run carries as visionflow.onnx.* tags (registration reads them back from the report)
PARITY_TAGS = ("max_abs_diff", "top1_agreement", "ort_ms_b1", "torch_ms_b1", "ort_ms_b32", "torch_ms_b32")


def log_parity(run_id: str, parity: ParityResult) -> None:
    """The parity and latency figures as tags of the training run (one-off figures, not metric charts)."""
    import mlflow

    from visionflow.registry.tracking import detail_tags

    mlflow.MlflowClient().log_batch(run_id, tags=detail_tags("onnx", {k: getattr(parity, k) for k in PARITY_TAGS}))
