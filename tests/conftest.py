"""Shared fixtures: tiny generated image datasets and throwaway project folders."""

from __future__ import annotations

import contextlib
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")


def make_image(rng: np.random.Generator, label_idx: int, size: int = 16, mode: str = "L") -> Image.Image:
    """A class-dependent pattern plus noise, so tiny models can learn it and images are all distinct."""
    yy, xx = np.mgrid[0:size, 0:size]
    base = ((np.sin((xx + label_idx * 3) / (1.5 + label_idx)) + 1) * 100).astype(np.float64)
    arr = np.clip(base + rng.normal(0, 20, (size, size)), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr, mode="L")
    return img.convert(mode) if mode != "L" else img


def make_folder_dataset(root: Path, classes: tuple[str, ...] = ("cat", "dog", "fox"), per_class: int = 20,
                        size: int = 16, seed: int = 0, fmt: str = "PNG") -> Path:
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
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + \
        chunk(b"IEND", b"")


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


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> Path:
    return make_folder_dataset(tmp_path / "images")


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


def register_champion(proj: Path, p, classes: list[str], *, channels: int = 1, image_size: int = 16, seed: int = 0,
                      tags: dict | None = None, metrics: dict | None = None) -> str:
    """An untrained tiny ONNX net (seeded) registered the way register_stage does it and promoted to champion;
    returns its version. For tests that need a real registry with a champion but not a trained model."""
    import mlflow
    import torch

    from visionflow.registry.export import export_onnx, write_model_card
    from visionflow.training.model import build_net
    from visionflow.registry.store import Gate, apply_promotion, register_onnx
    from visionflow.registry.tracking import setup_mlflow

    torch.manual_seed(seed)
    net = build_net("test_resnet", len(classes), channels).eval()
    onnx_path = export_onnx(net, image_size=image_size, channels=channels, path=proj / f"m{seed}" / "model.onnx")
    card = write_model_card(onnx_path, image_size=image_size, channels=channels, classes=list(classes),
                            model_name="test_resnet", data_version=(tags or {}).get("visionflow.data_version", "dv"))
    with mlflow.start_run(experiment_id=setup_mlflow(p.registry.tracking_uri, proj, p.base.project)) as run:
        pass
    version = register_onnx(onnx_path=onnx_path, card=card, model_name=p.registry.model_name,
                            mlflow_run_id=run.info.run_id, tags=tags or {}, metrics=metrics or {})
    apply_promotion(p.registry.model_name, version, [Gate("test", True, "set up by the test")])
    return version


def use_mlflow(p, proj: Path) -> str:
    """MLflow pointed at the project's store, as every entry point does once (stage functions assume it);
    returns the experiment id."""
    from visionflow.registry.tracking import setup_mlflow

    return setup_mlflow(p.registry.tracking_uri, proj, p.base.project, p.registry.artifact_location)
