"""The serving path (app, registry download, ONNX Runtime session, decoding) must not need torch: the small CPU
serving image (infra/docker/serve.Dockerfile) has none."""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper
from PIL import Image

from tests.helpers import REPO


def test_serving_modules_decode_and_infer_without_importing_torch(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Cast", ["image"], ["logits"], to=TensorProto.FLOAT)],
        "g",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, ["n", 1, 28, 28])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 1, 28, 28])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, tmp_path / "m.onnx")
    buf = io.BytesIO()
    Image.fromarray(np.full((40, 40), 7, np.uint8)).save(buf, "PNG")
    (tmp_path / "x.png").write_bytes(buf.getvalue())
    code = f"""
import sys
from pathlib import Path
import visionflow.cli, visionflow.serving.app, visionflow.registry.store
from visionflow.data.imageio import DecodeRules, decode_with_properties
from visionflow.onnxrt import ort_logits, ort_session
arr, props = decode_with_properties(Path({str(tmp_path / "x.png")!r}).read_bytes(), 28, 1,
                                    DecodeRules(max_pixels=10**6, max_bytes=10**6))
out = ort_logits(ort_session(Path({str(tmp_path / "m.onnx")!r}), threads=1), arr[None])
assert out.shape == (1, 1, 28, 28) and float(out.max()) == 7.0, out.shape
heavy = sorted(m for m in ("torch", "lightning", "albumentations", "timm") if m in sys.modules)
print("heavy:", heavy)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("heavy: []"), proc.stdout
