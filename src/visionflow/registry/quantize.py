"""Reduced-precision variants of an exported classifier: int8 (ONNX Runtime static quantization) and fp16.

The exported graph takes uint8 images and preprocesses them itself (Cast, scale, shift), so a calibration batch
is exactly what the server feeds it: training-split images decoded at the model's size. Static quantization
leaves the uint8 input and its Cast in float (they are not quantizable ops) and quantizes from the first
arithmetic on: nothing needs excluding by hand. QDQ with per-channel weights: on this project's CPU QDQ and
QOperator ran within noise of each other (both ~1.5x faster than fp32 at batch 32), and QDQ is the format ONNX
Runtime recommends and other execution providers read; per-channel scales keep the narrow convolutions of small
nets accurate.

fp16 halves the file; ONNX Runtime's CPU provider has few fp16 kernels, so on CPU it is a size (and GPU) variant,
not a speed one. Its inputs and outputs stay uint8 / float32 (keep_io_types), so serving does not change.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from visionflow.errors import DataError
from visionflow.onnxrt import ort_outputs, ort_session

PRECISIONS = ("int8", "fp16")
OUTPUTS = ("logits", "embedding")


def variant_name(parent_model: str, precision: str) -> str:
    """The registered model a variant goes to: its own champion and aliases, apart from the fp32 model's."""
    return f"{parent_model}-{precision}"


def calibration_sample(images: np.ndarray, labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Up to n training images (NHWC uint8), drawn seeded and spread evenly over the classes, so activation
    ranges see every class (a calibration set of one class is the classic bad quantization)."""
    rng = np.random.default_rng(seed)
    by_class = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    picked = [idx[i] for i in range(max(len(x) for x in by_class)) for idx in by_class if i < len(idx)][:n]
    return np.asarray(images[np.sort(picked)])


def calibration_reader(images: np.ndarray, batch_size: int = 32):
    from onnxruntime.quantization import CalibrationDataReader

    class _Images(CalibrationDataReader):
        """The calibration images as the graph's `image` input, NCHW uint8, batch by batch."""

        def __init__(self) -> None:
            self._batches = iter(
                np.ascontiguousarray(images[i : i + batch_size].transpose(0, 3, 1, 2))
                for i in range(0, len(images), batch_size)
            )

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self._batches, None)
            return None if batch is None else {"image": batch}

    return _Images()


def int8_model(fp32: Path, out: Path, calibration: np.ndarray) -> Path:
    """Static INT8 (QDQ, per-channel int8 weights, uint8 activations, MinMax ranges) calibrated on
    `calibration`: NHWC uint8 images as the server decodes them."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if len(calibration) == 0:
        raise DataError("int8 quantization needs calibration images and got none: check the training split")
    with tempfile.TemporaryDirectory(prefix="visionflow-quantize-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32), str(prepared))  # shapes inferred and graph folded, as ORT recommends
        quantize_static(
            str(prepared),
            str(out),
            calibration_reader(calibration),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
    return out


def fp16_model(fp32: Path, out: Path) -> Path:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    onnx.save(convert_float_to_float16(onnx.load(str(fp32)), keep_io_types=True), str(out))
    return out


def make_variant(precision: str, fp32: Path, out: Path, calibration: np.ndarray | None = None) -> Path:
    """The `precision` variant of the fp32 ONNX at `out` (calibration: int8 only), checked by onnx's checker."""
    import onnx

    if precision not in PRECISIONS:
        raise DataError(f"unknown precision {precision!r}: one of {', '.join(PRECISIONS)}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        if precision == "int8":
            int8_model(fp32, out, calibration if calibration is not None else np.empty((0,), np.uint8))
        else:
            fp16_model(fp32, out)
        onnx.checker.check_model(str(out))
    except DataError:
        raise
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise DataError(f"could not make the {precision} variant of {fp32}: {first}") from exc
    return out


def outputs(path: Path, images: np.ndarray) -> list[np.ndarray]:
    """Logits and embedding of a model on NHWC uint8 images (the pipeline's batch session)."""
    return ort_outputs(ort_session(path, device="auto"), images, OUTPUTS)


def sanity_reasons(parent: list[np.ndarray], variant: list[np.ndarray]) -> list[str]:
    """Why a variant's outputs cannot stand in for its parent's (empty: they can): every output present with the
    parent's shape, and finite. Its logits are not expected to match the parent's to a tolerance; the accuracy
    gates judge how far they may move."""
    reasons = []
    for name, old, new in zip(OUTPUTS, parent, variant):
        if new.shape != old.shape:
            reasons.append(f"{name} shape {new.shape} != fp32 {old.shape}")
        elif not np.isfinite(new).all():
            reasons.append(f"{name}: {int((~np.isfinite(new)).sum())} values not finite")
    return reasons


def latency_ms(path: Path, images: np.ndarray, repeats: int = 100) -> dict[str, float]:
    """Median ms per call at batch 1 and batch 32 on ONNX Runtime's CPU provider with one thread (what one
    serving worker gets): {"b1": ..., "b32": ...}."""
    from visionflow.registry.export import median_ms

    session = ort_session(path, threads=1)
    b1 = np.ascontiguousarray(images[:1].transpose(0, 3, 1, 2))
    b32 = np.ascontiguousarray(images[:32].transpose(0, 3, 1, 2))
    return {
        "b1": median_ms(lambda: session.run(["logits"], {"image": b1}), repeats),
        "b32": median_ms(lambda: session.run(["logits"], {"image": b32}), max(10, repeats // 4)),
    }
