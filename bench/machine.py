"""The machine a run measured: CPU, memory, GPUs, library versions and the commit, recorded beside the figures."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

from bench.common import REPO


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def git_commit() -> str:
    from visionflow.registry.tracking import git_commit as commit_of

    return commit_of(REPO)


def machine_info() -> dict[str, Any]:
    import psutil
    import torch

    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            prop = torch.cuda.get_device_properties(i)
            gpus.append(
                {
                    "name": prop.name,
                    "memory_gib": round(prop.total_memory / 2**30, 1),
                    "capability": f"{prop.major}.{prop.minor}",
                    "multiprocessors": prop.multi_processor_count,
                }
            )
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    return {
        "cpu_model": _cpu_model(),
        "cpu_logical_cores": os.cpu_count(),
        "cpu_physical_cores": psutil.cpu_count(logical=False),
        "cpu_cores_usable": affinity,
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "gpu": gpus or None,
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {
            d: _version(d)
            for d in (
                "torch",
                "onnxruntime",
                "lightning",
                "timm",
                "albumentations",
                "mlflow",
                "prefect",
                "evidently",
                "dvc",
                "scipy",
                "fastapi",
                "uvicorn",
                "numpy",
            )
        },
        "git_commit": git_commit(),
    }
