"""Process-wide state a benchmark touches, kept out of the figures: library chatter, printed banners, torch flags."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from collections.abc import Iterator


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
