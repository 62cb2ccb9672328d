"""inference: ONNX Runtime vs PyTorch eager on CPU, and the serving app vs in-process ONNX Runtime.

1. A: ONNX Runtime (visionflow.registry.export.export_onnx of a freshly built net, ort_session on CPU) images/s at
   batch 1 and 32; B: the same net in PyTorch eager (eval, inference_mode) on the same uint8 batch. Goal >= 1.5x at
   batch 1.
2. A: requests/s per server core of the real serving app (`visionflow serve`, uvicorn in a subprocess on 127.0.0.1,
   pinned to all CPUs but the last) with a champion registered in a temporary SQLite MLflow store, driven from the
   last CPU by a closed loop of 4 x serve.max_concurrency keep-alive clients per server core (one connection
   each, each sending its next request when the last is answered); B: in-process single-image predictions/s on ONE
   of the server's CPUs on the same image bytes (decode_for_model + ONNX Runtime with one thread, one image per
   call). Goal >= 0.8x.
The model is params.yaml's train.model at its image size and channels, untrained (speed does not depend on the
weights). Torch and ONNX Runtime use their default thread counts in (1).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import Context, Measurement, compare, goal
from bench.inference_serving import serving
from bench.sample_data import N_CLASSES

NAME = "inference"


def onnx_vs_torch(ctx: Context, net, onnx_path: Path, image_size: int, channels: int) -> list[dict[str, Any]]:
    import torch

    from visionflow.onnxrt import ort_session

    session = ort_session(onnx_path)
    rng = np.random.default_rng(0)
    rows = []
    for batch, iters, the_goal in (
        (1, 30 if ctx.quick else 300, goal(">= 1.5x", ">=", 1.5)),
        (32, 4 if ctx.quick else 30, None),
    ):
        x = np.ascontiguousarray(rng.integers(0, 256, (batch, channels, image_size, image_size), dtype=np.uint8))
        t = torch.from_numpy(x.copy())
        feed = {"image": x}

        def ort_rate(feed=feed, batch=batch, iters=iters) -> Measurement:  # bound: compare() calls it now
            session.run(["logits"], feed)
            start = time.perf_counter()
            for _ in range(iters):
                session.run(["logits"], feed)
            return Measurement(batch * iters / (time.perf_counter() - start))

        def torch_rate(t=t, batch=batch, iters=iters) -> Measurement:
            with torch.inference_mode():
                net(t)
                start = time.perf_counter()
                for _ in range(iters):
                    net(t)
                return Measurement(batch * iters / (time.perf_counter() - start))

        rows.append(
            compare(
                ctx,
                f"onnx vs torch, batch {batch}",
                ort_rate,
                torch_rate,
                unit="images/s",
                a_label="ONNX Runtime (CPU)",
                b_label="PyTorch eager (CPU)",
                higher_is_better=True,
                the_goal=the_goal,
                notes=[f"{iters} calls per timed run, after one warm-up call"],
            )
        )
    return rows


def run(ctx: Context) -> dict[str, Any]:
    import torch

    from visionflow.registry.export import export_onnx
    from visionflow.training.model import build_net

    cfg = ctx.params().train
    torch.manual_seed(0)
    net = build_net(cfg.model, N_CLASSES, cfg.channels).eval()
    onnx_path = export_onnx(
        net, image_size=cfg.image_size, channels=cfg.channels, path=ctx.tmp("inference/export") / "model.onnx"
    )
    ctx.log(f"[inference] {cfg.model} at {cfg.image_size} px exported to ONNX; torch threads {torch.get_num_threads()}")
    rows = onnx_vs_torch(ctx, net, onnx_path, cfg.image_size, cfg.channels)
    rows += serving(ctx, onnx_path, cfg.image_size, cfg.channels, cfg.model)
    return {
        "rows": rows,
        "notes": [],
        "config": {"model": cfg.model, "image_size": cfg.image_size, "channels": cfg.channels, "device": "cpu"},
    }
