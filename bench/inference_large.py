"""inference at a realistic model cost (opt-in): the same serving-vs-in-process comparison as `inference`, with
MobileNetV2 (untrained, 3 channels) at 128 px instead of the 28 px default, whose ONNX Runtime call costs ~0.1 ms
and leaves the HTTP server's fixed cost per request in front. Where the model's time dominates, as in most
production models, that fixed cost is what separates serving from in-process.
"""

from __future__ import annotations

from typing import Any

from bench.common import Context
from bench.inference_serving import serving
from bench.sample_data import N_CLASSES

MODEL, IMAGE_SIZE, CHANNELS = "mobilenetv2_100", 128, 3


def run(ctx: Context) -> dict[str, Any]:
    import torch

    from visionflow.registry.export import export_onnx
    from visionflow.training.model import build_net

    torch.manual_seed(0)
    net = build_net(MODEL, N_CLASSES, CHANNELS).eval()
    onnx_path = export_onnx(
        net, image_size=IMAGE_SIZE, channels=CHANNELS, path=ctx.tmp("inference_large/export") / "model.onnx"
    )
    ctx.log(f"[inference_large] {MODEL} at {IMAGE_SIZE} px exported to ONNX")
    return {
        "rows": serving(ctx, onnx_path, IMAGE_SIZE, CHANNELS, MODEL),
        "notes": [],
        "config": {"model": MODEL, "image_size": IMAGE_SIZE, "channels": CHANNELS, "device": "cpu"},
    }
