"""`python -m bench.quantize_variants [--root PROJECT]`: the reduced-precision variants of a project's fp32
champion through their gates, and planted int8 calibrations (one class; underexposed; constant), side by side.

Writes to that project's registry (variants `<model>-int8`, `<model>-fp16`) and reports/quantize/, like
`visionflow --set export.quantize=int8 quantize`; prints one table. Also times the two ONNX Runtime
quantization formats (QDQ, QOperator) on the same calibration, so the choice in registry.quantize can be checked.
No speed is asserted.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np


def _formats(fp32: Path, calibration: np.ndarray, images: np.ndarray) -> dict[str, dict[str, float]]:
    """Median ms at batch 1 and 32 (1 thread) of fp32 and int8 in each quantization format."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from visionflow.registry import quantize as q

    out = {"fp32": q.latency_ms(fp32, images, repeats=300)}
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32), str(prepared))
        for fmt in (QuantFormat.QDQ, QuantFormat.QOperator):
            path = Path(tmp) / f"{fmt.name}.onnx"
            quantize_static(
                str(prepared),
                str(path),
                q.calibration_reader(calibration),
                quant_format=fmt,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
            )
            out[fmt.name] = q.latency_ms(path, images, repeats=300)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.quantize_variants", description=__doc__)
    ap.add_argument("--root", type=Path, default=Path("."), help="project folder (params.yaml, mlruns/)")
    args = ap.parse_args(argv)

    from visionflow.config import load_params
    from visionflow.data.cache import project_split
    from visionflow.paths import ProjectPaths
    from visionflow.registry.store import CHAMPION, alias_version, download_onnx
    from visionflow.registry.tracking import setup_mlflow
    from visionflow.registry.variants import quantize_variant, training_calibration

    root = args.root.resolve()
    p = load_params(root / "params.yaml", ["export.quantize=int8"])
    setup_mlflow(p.registry.tracking_uri, root, p.base.project, p.registry.artifact_location)
    parent = alias_version(p.registry.model_name, CHAMPION)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        fp32, card = download_onnx(p.registry.model_name, parent, Path(tmp))
        paths = ProjectPaths.of(p, root)
        calibration = training_calibration(p, paths, card, card["classes"])
        train = project_split(
            paths, "train", classes=card["classes"], image_size=card["image_size"], channels=card["channels"]
        )
        one_class = np.asarray(train.images[np.flatnonzero(train.labels == 0)[: len(calibration)]])
        results["formats_ms"] = _formats(fp32, calibration, np.asarray(train.images[:32]))
    runs = {  # the int8 of record last: reports/quantize/int8.md is the last int8 judged
        "fp16": ("fp16", None),
        "int8 calibrated on one class": ("int8", one_class),
        # a camera's underexposed frames: activation ranges a quarter wide, every brighter image clipped
        "int8 calibrated on underexposed images (x0.25)": ("int8", (calibration * 0.25).astype(np.uint8)),
        "int8 calibrated on constant images": ("int8", np.full_like(calibration, 128)),
        "int8": ("int8", None),
    }
    for label, (precision, calib) in runs.items():
        res = quantize_variant(p, root, parent, precision=precision, calibration=calib)
        results[label] = {
            "version": res.version,
            "promoted": res.promoted,
            "reasons": res.reasons,
            "accuracy_delta": res.accuracy_delta,
            "lower_bound": res.lower_bound,
            "rows": res.rows,
        }
    print(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
