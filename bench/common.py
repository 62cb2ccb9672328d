"""What every benchmark shares: the run context, interleaved A/B timing, summaries, machine description, test data."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PARAMS = REPO / "params.yaml"


@dataclass
class Context:
    """Settings of this run plus a place for benchmarks to leave figures for later ones."""

    quick: bool
    repeats: int
    workdir: Path
    compile: bool = False
    peak_tflops: float = 989.0
    console: Any = None
    dvc_files: tuple[int, ...] | None = None  # dvc benchmark sizes; None: its default for the mode
    shared: dict[str, Any] = field(default_factory=dict)

    def log(self, msg: str) -> None:
        stamp = time.strftime("%H:%M:%S")
        if self.console is not None:
            self.console.print(f"[dim]{stamp}[/dim] {msg}", highlight=False)
        else:
            print(f"{stamp} {msg}", file=sys.stderr, flush=True)

    def tmp(self, name: str) -> Path:
        path = self.workdir / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def params(self, overrides: list[str] | None = None):
        from visionflow.config import load_params

        p = load_params(PARAMS, overrides)
        if p.train.channels == "auto":
            # The benchmarks build caches and networks directly, without training's decision; their data is
            # Fashion-MNIST, which "auto" trains as grey.
            p = load_params(PARAMS, [*(overrides or []), "train.channels=1"])
        return p


@dataclass
class Measurement:
    """One timed run: the headline value plus any side figures (summarised per repeat like the value)."""

    value: float
    extra: dict[str, float] = field(default_factory=dict)


class Skip(Exception):  # a signal, not an error
    """Raised by a benchmark variant that cannot run here (no GPU, no dataset): becomes a note, not a failure."""


def summary(values: list[float]) -> dict[str, Any]:
    vals = [float(v) for v in values]
    if not vals:
        return {"median": None, "min": None, "max": None, "values": []}
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "values": vals}


def goal(text: str, op: str, target: float, on: str = "ratio") -> dict[str, Any]:
    """A goal on the median of `on` ("ratio", "a", "b" or "extra.<key>"); evaluated after the run."""
    return {"text": text, "op": op, "target": target, "on": on, "met": None}


def _goal_value(row: dict[str, Any], on: str) -> float | None:
    if on == "value":
        return row.get("value")
    if on.startswith("extra."):
        entry = row.get("extra", {}).get(on.removeprefix("extra."))
        return entry.get("median") if isinstance(entry, dict) else entry
    part = row.get(on)
    return part.get("median") if isinstance(part, dict) else None


def judge(row: dict[str, Any]) -> dict[str, Any]:
    g = row.get("goal")
    if g:
        v = _goal_value(row, g["on"])
        g["met"] = None if v is None else (v >= g["target"] if g["op"] == ">=" else v <= g["target"])
    return row


def _as_measurement(x: float | Measurement) -> Measurement:
    return x if isinstance(x, Measurement) else Measurement(float(x))


def compare(
    ctx: Context,
    variant: str,
    run_a: Callable[[], float | Measurement],
    run_b: Callable[[], float | Measurement],
    *,
    repeats: int | None = None,
    **row: Any,
) -> dict[str, Any]:
    """Run A then B, `repeats` times (A, B, A, B, ...); the ratio is taken per pair, then summarised.
    Keyword arguments are paired_row's."""
    n = repeats or ctx.repeats
    a_runs: list[Measurement] = []
    b_runs: list[Measurement] = []
    for r in range(n):
        a = _as_measurement(run_a())
        b = _as_measurement(run_b())
        a_runs.append(a)
        b_runs.append(b)
        ctx.log(
            f"  {variant}: repeat {r + 1}/{n}  A {a.value:.4g}  B {b.value:.4g} {row.get('unit', '')}"
            f"  ratio {a.value / b.value if b.value else float('nan'):.3f}"
        )
    return paired_row(variant, a_runs, b_runs, **row)


def paired_row(
    variant: str,
    a_runs: list[Measurement],
    b_runs: list[Measurement],
    *,
    unit: str,
    a_label: str,
    b_label: str,
    higher_is_better: bool,
    ratio_definition: str = "A / B",
    the_goal: dict[str, Any] | None = None,
    notes: list[str] | None = None,
) -> dict[str, Any]:
    """The result row of interleaved pairs (a_runs[i], b_runs[i])."""
    ratios = [a.value / b.value if b.value else float("nan") for a, b in zip(a_runs, b_runs)]
    extra: dict[str, Any] = {}
    for prefix, runs in (("a_", a_runs), ("b_", b_runs)):
        keys = sorted({k for m in runs for k in m.extra})
        for k in keys:
            extra[prefix + k] = summary([m.extra[k] for m in runs if k in m.extra])
    row = {
        "variant": variant,
        "kind": "paired",
        "unit": unit,
        "higher_is_better": higher_is_better,
        "a": {"label": a_label, **summary([m.value for m in a_runs])},
        "b": {"label": b_label, **summary([m.value for m in b_runs])},
        "ratio": {"definition": ratio_definition, **summary(ratios)},
        "repeats": len(a_runs),
        "extra": extra,
        "goal": the_goal,
        "notes": list(notes or []),
    }
    return judge(row)


def single(
    variant: str,
    value: float | None,
    *,
    unit: str,
    label: str,
    the_goal: dict[str, Any] | None = None,
    notes: list[str] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A figure that is not an A/B pair (read from a report, or derived from other rows)."""
    row = {
        "variant": variant,
        "kind": "single",
        "unit": unit,
        "label": label,
        "value": value,
        "extra": dict(extra or {}),
        "goal": the_goal,
        "notes": list(notes or []),
    }
    return judge(row)


# --------------------------------------------------------------------------------------------------- machine


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


# ------------------------------------------------------------------------------------------------- quietness


def quiet() -> None:
    """Keep library chatter (Lightning's banners, deprecation warnings) out of the benchmark's output."""
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    warnings.filterwarnings("ignore")
    for name in (
        "lightning",
        "lightning.pytorch",
        "lightning.fabric",
        "pytorch_lightning",
        "mlflow",
        "alembic",
        "httpx",
        "evidently",
        "numexpr",
    ):
        logging.getLogger(name).setLevel(logging.ERROR)


def quiet_lightning() -> None:
    """Lightning sets its loggers to INFO when imported: call after importing it."""
    import lightning  # noqa: F401

    for name in (
        "lightning",
        "lightning.pytorch",
        "lightning.fabric",
        "lightning.pytorch.utilities.rank_zero",
        "lightning.fabric.utilities.rank_zero",
    ):
        logging.getLogger(name).setLevel(logging.ERROR)


@contextlib.contextmanager
def torch_state() -> Iterator[None]:
    """Lightning's Trainer sets process-wide torch flags (deterministic algorithms, cuDNN benchmark): undo them
    after each run so the baseline that follows runs with PyTorch's defaults, as a hand-written script would."""
    import torch

    det = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    bench = torch.backends.cudnn.benchmark
    cudnn_det = torch.backends.cudnn.deterministic
    cublas = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(det, warn_only=warn_only)
        torch.backends.cudnn.benchmark = bench
        torch.backends.cudnn.deterministic = cudnn_det
        if cublas is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = cublas


@contextlib.contextmanager
def silenced(logs: bool = False) -> Iterator[None]:
    """Swallow stdout/stderr prints of a noisy call (Lightning's rank-zero banners go through both); with logs,
    log records up to WARNING too (set-up only: Prefect ships its run logs to its API, part of what is timed)."""
    if logs:
        logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        if logs:
            logging.disable(logging.NOTSET)


# -------------------------------------------------------------------------------------------------- test data


@dataclass
class SplitData:
    """Split manifests (train/val/test csv) and the cache folder build_cache writes into."""

    splits_dir: Path
    cache_dir: Path
    classes: list[str]
    source: str  # "real (...)" or "synthetic (...)"
    counts: dict[str, int]


def real_data_available() -> bool:
    return (REPO / "data/splits/train.csv").is_file() and (REPO / "data/cache").is_dir()


def _png(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def synthetic_pngs(n: int, size: int = 28, seed: int = 0) -> list[bytes]:
    """n distinct grayscale PNGs shaped like Fashion-MNIST (a blob on a dark background plus noise)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    out = []
    for _ in range(n):
        cy, cx, r = rng.uniform(size * 0.3, size * 0.7, 2).tolist() + [rng.uniform(size * 0.2, size * 0.45)]
        blob = ((yy - cy) ** 2 + (xx - cx) ** 2 < r * r) * rng.uniform(80, 220)
        arr = np.clip(blob + rng.normal(0, 25, (size, size)), 0, 255).astype(np.uint8)
        out.append(_png(arr))
    return out


def make_splits(
    ctx: Context, name: str, counts: dict[str, int], *, use_whole_real_train: bool = False, n_classes: int = 10
) -> SplitData:
    """Train/val/test manifests for a benchmark: the real splits (a seeded subset of each, or the whole real
    train split with the pipeline's own cache when use_whole_real_train) when data/splits and data/cache exist,
    else synthetic Fashion-MNIST-like PNGs written under the work folder."""
    import pandas as pd

    from visionflow.data.validate import read_manifest
    from visionflow.training.datamodule import class_names

    real_dir = REPO / "data/splits"
    if real_data_available():
        classes = class_names(real_dir)
        if use_whole_real_train:
            n = {s: len(read_manifest(real_dir / f"{s}.csv")) for s in ("train", "val", "test")}
            return SplitData(real_dir, REPO / "data/cache", classes, "real (data/splits, data/cache)", n)
        out = ctx.tmp(f"{name}/splits")
        got = {}
        for split, k in counts.items():
            df = read_manifest(real_dir / f"{split}.csv")
            df = df.sample(n=min(k, len(df)), random_state=0) if k < len(df) else df
            df["path"] = [str(REPO / x) for x in df["path"]]  # stored relative to the project root
            df.to_csv(out / f"{split}.csv", index=False)
            got[split] = len(df)
        return SplitData(out, ctx.tmp(f"{name}/cache"), classes, "real subset of data/splits", got)
    classes = [f"class_{i}" for i in range(n_classes)]
    root = ctx.tmp(f"{name}/images")
    out = ctx.tmp(f"{name}/splits")
    seed = 0
    for split, k in counts.items():
        rows = []
        for i, data in enumerate(synthetic_pngs(k, seed=seed)):
            label = classes[i % n_classes]
            path = root / split / label / f"{i:06d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            rows.append({"path": str(path), "label": label})
        pd.DataFrame(rows).to_csv(out / f"{split}.csv", index=False)
        seed += 1
    return SplitData(
        out, ctx.tmp(f"{name}/cache"), classes, "synthetic PNGs (no data/splits + data/cache)", dict(counts)
    )


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    tmp.replace(path)
