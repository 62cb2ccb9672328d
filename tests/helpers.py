"""Helpers shared by the test tiers: generated images and datasets, throwaway projects, a registry champion, the
real CLI, free ports. Test modules import them from here, never from each other (pytest's conftest.py keeps only
fixtures). Heavy imports (torch, mlflow, the stages) stay inside the functions that need them."""

from __future__ import annotations

import contextlib
import functools
import io
import os
import shutil
import socket
import sqlite3
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["cat", "dog", "fox"]
DV = {"visionflow.data_version": "dv"}


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_image(rng: np.random.Generator, label_idx: int, size: int = 16, mode: str = "L") -> Image.Image:
    """A class-dependent pattern plus noise, so tiny models can learn it and images are all distinct."""
    yy, xx = np.mgrid[0:size, 0:size]
    base = ((np.sin((xx + label_idx * 3) / (1.5 + label_idx)) + 1) * 100).astype(np.float64)
    arr = np.clip(base + rng.normal(0, 20, (size, size)), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr, mode="L")
    return img.convert(mode) if mode != "L" else img


def make_folder_dataset(
    root: Path,
    classes: tuple[str, ...] = ("cat", "dog", "fox"),
    per_class: int = 20,
    size: int = 16,
    seed: int = 0,
    fmt: str = "PNG",
) -> Path:
    rng = np.random.default_rng(seed)
    ext = {"PNG": "png", "JPEG": "jpg", "BMP": "bmp", "WEBP": "webp"}[fmt]
    for i, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for j in range(per_class):
            mode = "RGB" if fmt == "JPEG" else "L"
            make_image(rng, i, size, mode).save(root / name / f"{name}_{j:04d}.{ext}", fmt)
    return root


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR claiming width x height, with a tiny IDAT: a decompression-bomb header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    )


@contextlib.contextmanager
def prefect_pointed_at(updates: dict):
    """This process's Prefect clients pointed at another server for the block (Prefect reads its settings once, at
    import, so after an earlier test imported it environment variables set now are ignored). On the way out,
    Prefect's background services are drained: each keeps the client it started with (the concurrency-slot
    service caches one per lock name), and would go on calling a server that the test is about to stop."""
    from prefect.concurrency.services import ConcurrencySlotAcquisitionWithLeaseService
    from prefect.settings import temporary_settings

    try:
        with temporary_settings(updates=updates):
            yield
    finally:
        # drain_all stops every instance of every Prefect queue service (they share one registry)
        ConcurrencySlotAcquisitionWithLeaseService.drain_all(timeout=30, at_exit=False)


def tiny_onnx_champion(path: Path, classes: list[str], size: int):
    """(version, session, card) of a tiny real ONNX model with the exported model's interface: linear_onnx with a
    fixed random projection."""
    from visionflow.onnxrt import ort_session

    w = np.random.default_rng(0).normal(size=(6, len(classes)))
    linear_onnx(path, w, np.zeros(len(classes)), size)
    return "1", ort_session(path), {"image_size": size, "channels": 3, "classes": classes, "onnx_sha256": "tiny"}


def linear_onnx(path: Path, weight: np.ndarray, bias: np.ndarray, size: int) -> Path:
    """A tiny real ONNX classifier with the exported model's interface (uint8 NCHW `image` in, `logits` and
    `embedding` out): embedding = per-channel means and peaks, logits = embedding @ weight + bias."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    k = len(bias)
    nodes = [
        helper.make_node("Cast", ["image"], ["x"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["x"], ["mean"], axes=[2, 3], keepdims=0),
        helper.make_node("ReduceMax", ["x"], ["peak"], axes=[2, 3], keepdims=0),
        helper.make_node("Concat", ["mean", "peak"], ["embedding"], axis=1),
        helper.make_node("MatMul", ["embedding", "w"], ["z"]),
        helper.make_node("Add", ["z", "b"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "linear",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, ["n", 3, size, size])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", k]),
            helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["n", 6]),
        ],
        initializer=[
            numpy_helper.from_array(np.asarray(weight, dtype=np.float32), "w"),
            numpy_helper.from_array(np.asarray(bias, dtype=np.float32), "b"),
        ],
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), str(path))
    return path


def make_project(root: Path, source: Path, **overrides: dict) -> Path:
    """A project folder with the repo's params.yaml and dvc.yaml, pointed at `source`, inside its own git repo."""
    root.mkdir(parents=True, exist_ok=True)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["source"] = str(source)
    params["data"]["max_images"] = None
    params["data"]["remote_url"] = str(root / "remote")
    for section, values in overrides.items():
        params.setdefault(section, {}).update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    (root / "data/reviewed").mkdir(parents=True, exist_ok=True)  # shipped in the repo; a DVC dependency of ingest
    shutil.copy(REPO / "data/reviewed/README.md", root / "data/reviewed/README.md")
    shutil.copy(REPO / "data/label_overrides.csv", root / "data/label_overrides.csv")  # a DVC dependency too
    (root / "src").symlink_to(REPO / "src")  # dvc.yaml stages depend on the code that runs them
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    return root


def run_cli(cwd: Path, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("visionflow")
    env = dict(os.environ, PATH=f"{exe.parent}{os.pathsep}{os.environ.get('PATH', '')}", COLUMNS="200")
    proc = subprocess.run([str(exe), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"visionflow {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def register_champion(
    proj: Path,
    p,
    classes: list[str],
    *,
    channels: int = 1,
    image_size: int = 16,
    seed: int = 0,
    tags: dict | None = None,
    metrics: dict | None = None,
) -> str:
    """An untrained tiny ONNX net (seeded) registered the way register_stage does it and promoted to champion;
    returns its version. For tests that need a real registry with a champion but not a trained model."""
    import mlflow
    import torch

    from visionflow.registry.export import export_onnx, write_model_card
    from visionflow.registry.gates import Gate
    from visionflow.registry.store import apply_promotion, register_onnx
    from visionflow.registry.tracking import setup_mlflow
    from visionflow.training.model import build_net

    torch.manual_seed(seed)
    net = build_net("test_resnet", len(classes), channels).eval()
    onnx_path = export_onnx(net, image_size=image_size, channels=channels, path=proj / f"m{seed}" / "model.onnx")
    card = write_model_card(
        onnx_path,
        image_size=image_size,
        channels=channels,
        classes=list(classes),
        model_name="test_resnet",
        data_version=(tags or {}).get("visionflow.data_version", "dv"),
    )
    with mlflow.start_run(experiment_id=setup_mlflow(p.registry.tracking_uri, proj, p.base.project)) as run:
        pass
    version = register_onnx(
        onnx_path=onnx_path,
        card=card,
        model_name=p.registry.model_name,
        mlflow_run_id=run.info.run_id,
        tags=tags or {},
        metrics=metrics or {},
    )
    apply_promotion(p.registry.model_name, version, [Gate("test", True, "set up by the test")])
    return version


def png(seed: int = 0, size: int = 20) -> bytes:
    """A seeded grey-noise PNG."""
    arr = np.random.default_rng(seed).integers(0, 255, (size, size), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def exif_jpeg() -> bytes:
    """A valid 24x20 JPEG with an EXIF block: orientation 6 (rotated), text, rationals, the Exif and GPS IFDs."""
    from PIL import TiffImagePlugin

    rational = TiffImagePlugin.IFDRational
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x010F] = "camera maker"
    exif[0x011A] = rational(72, 1)
    exif[0x0131] = "software"
    exif[0x8769] = {0x9003: "2020:01:01 00:00:00", 0x829A: rational(1, 250), 0x9286: b"ASCII\x00\x00\x00hello"}
    exif[0x8825] = {1: "N", 2: (rational(1, 1),) * 3}
    arr = np.random.default_rng(0).integers(0, 255, (20, 24, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", exif=exif.tobytes())
    return buf.getvalue()


@functools.lru_cache
def corrupt_exif_jpegs(n: int = 5, seed: int = 0) -> tuple[bytes, ...]:
    """JPEGs whose EXIF bytes were fuzzed until Pillow's own EXIF handling raises on them (struct.error, TypeError,
    AttributeError... while the pixels are intact): the first n such variants of a fixed seed."""
    import warnings

    from PIL import ImageOps

    good = exif_jpeg()
    start = good.index(b"Exif\x00\x00") + 6 + 8  # past the TIFF header: the IFD entries and their values
    end = start - 8 + int.from_bytes(good[start - 16 : start - 14], "big") - 8
    rng, found = np.random.default_rng(seed), []
    while len(found) < n:
        data = bytearray(good)
        for _ in range(int(rng.integers(1, 4))):
            data[int(rng.integers(start, end))] = int(rng.integers(0, 256))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ImageOps.exif_transpose(Image.open(io.BytesIO(bytes(data))))
        except Exception:  # noqa: BLE001 - the point: any exception type
            found.append(bytes(data))
    return tuple(found)


def make_read_only(db: Path) -> None:
    """Every write to every table fails as on a read-only database (chmod does not stop root, who runs CI here)."""
    with sqlite3.connect(db) as con:
        tables = [t for (t,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for t in tables:
            for op in ("INSERT", "UPDATE", "DELETE"):
                con.execute(
                    f"CREATE TRIGGER ro_{op}_{t} BEFORE {op} ON {t} "
                    "BEGIN SELECT RAISE(ABORT, 'attempt to write a readonly database'); END"
                )


TINY_TRAIN = {
    "model": "test_resnet",
    "image_size": 16,
    "channels": 1,
    "batch_size": 16,
    "max_epochs": 3,
    "num_workers": 0,
    "lr": 0.01,
    "early_stopping_patience": 10,
}


def tiny_project(root: Path, **train_overrides) -> Path:
    """A validated, split project of 120 tiny images that trains in seconds (TINY_TRAIN, overridable)."""
    from visionflow import stages
    from visionflow.config import load_params

    src = make_folder_dataset(root / "images", classes=("cat", "dog", "fox"), per_class=40, size=16)
    proj = make_project(
        root / "proj",
        src,
        train={**TINY_TRAIN, **train_overrides},
        registry={"tracking_uri": f"sqlite:///{root / 'proj' / 'mlflow.db'}"},
        evaluate={"robustness_images": 30, "severities": [1, 5]},
    )
    p = load_params(proj / "params.yaml")
    stages.ingest_stage(p, proj)
    stages.validate_stage(p, proj, None)
    stages.split_stage(p, proj)
    return proj


def champion_project(root: Path) -> tuple[Path, str]:
    """A validated, split project whose registry holds a champion (an untrained tiny ONNX net registered the
    way register_stage does it), and a 40-image batch folder to check for drift. Returns (project, batch)."""
    from visionflow import stages
    from visionflow.config import load_params

    src = make_folder_dataset(root / "images", classes=CLASSES, per_class=30)
    batch = root / "batch"  # a flat folder of unlabelled images, as production sends them
    for i, img in enumerate(
        sorted(make_folder_dataset(root / "batch-src", classes=CLASSES, per_class=14, seed=7).rglob("*.png"))
    ):
        batch.mkdir(exist_ok=True)
        img.rename(batch / f"{i:03d}.png")
    proj = make_project(
        root / "proj",
        src,
        registry={"tracking_uri": f"sqlite:///{root / 'proj' / 'mlflow.db'}"},
        drift={"min_batch_size": 10},
    )
    p = load_params(proj / "params.yaml")
    stages.ingest_stage(p, proj)
    stages.validate_stage(p, proj, None)
    stages.split_stage(p, proj)
    register_champion(
        proj, p, list(CLASSES), tags={"visionflow.data_version": "dv-test"}, metrics={"test_accuracy": 0.8733333333}
    )
    return proj, str(batch)


def use_mlflow(p, proj: Path) -> str:
    """MLflow pointed at the project's store, as every entry point does once (stage functions assume it);
    returns the experiment id."""
    from visionflow.registry.tracking import setup_mlflow

    return setup_mlflow(p.registry.tracking_uri, proj, p.base.project, p.registry.artifact_location)


# The test detector's classes and the score of the whole-image box it finds for each (detector_onnx): served
# (>= detection.score_threshold 0.3): cat and dog; dog is under detection.review_threshold 0.5, so the image is queued.
DETECTOR_CLASSES = ["cat", "dog", "fox"]
DETECTOR_SCORES = [0.9, 0.4, 0.1]


def detector_onnx(path: Path, classes: list[str], scores: list[float], image_size: int = 64) -> Path:
    """The real detector (FCOS, untrained backbone) with its head set so that it finds, in any image, one box per
    class covering the whole image, scoring scores[k] for classes[k] (zero weights: the head's outputs are its
    biases; a huge box regression is clipped to the image), exported to ONNX."""
    import math

    import torch

    from visionflow.tasks.detection.model import build_detector, export_onnx

    torch.manual_seed(0)
    net = build_detector(len(classes), image_size, weights=None).eval()
    head = net.head
    with torch.no_grad():
        # score = sqrt(sigmoid(class logit) * sigmoid(centredness)), the centredness's sigmoid 1
        logits = [-30.0] + [math.log(s * s / (1 - s * s)) for s in scores]  # (label 0: the background)
        head.classification_head.cls_logits.weight.zero_()
        head.classification_head.cls_logits.bias.copy_(torch.tensor(logits))
        for conv, bias in ((head.regression_head.bbox_reg, 50.0), (head.regression_head.bbox_ctrness, 30.0)):
            conv.weight.zero_()
            conv.bias.fill_(bias)
    return export_onnx(net, image_size, path)


def register_detector(proj: Path, p, onnx_path: Path, classes: list[str], image_size: int = 64) -> str:
    """The detector ONNX registered as detection.model_name's champion with a detection model card."""
    import mlflow

    from visionflow.data.imageio import sha256_file
    from visionflow.registry.gates import Gate
    from visionflow.registry.store import apply_promotion, register_onnx
    from visionflow.registry.tracking import setup_mlflow

    card = {"task": "detection", "format": "onnx", "classes": list(classes), "image_size": image_size,
            "input": {"name": "image", "dtype": "uint8", "layout": "NCHW", "shape": [1, 3, "height", "width"]},
            "score_threshold": p.detection.score_threshold, "outputs": ["boxes", "scores", "labels", "embedding"],
            "architecture": "fcos_mobilenetv2", "data_version": "dv",
            "onnx_sha256": sha256_file(onnx_path)}  # fmt: skip
    with mlflow.start_run(experiment_id=setup_mlflow(p.registry.tracking_uri, proj, p.base.project)) as run:
        pass
    version = register_onnx(
        onnx_path=onnx_path, card=card, model_name=p.detection.model_name, mlflow_run_id=run.info.run_id,
        tags=DV, metrics={},
    )  # fmt: skip
    apply_promotion(p.detection.model_name, version, [Gate("test", True, "set up by the test")])
    return version
