"""Train the detector: the classification trainer's run machinery (run identity, MLflow run with params, metrics
and system metrics, resume from the last checkpoint, reuse when finished) around the FCOS LightningModule.

The run's TrainParams are p.train with the detection section's model, weights, input size, batch size, epochs and
learning rate put in, so that the shared pieces (runtime, MLflow params, step budget) read one object; the rest of
p.train (accelerator, precision, compile, num_workers, weight decay, augmentation, early stopping) applies as is.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from visionflow.config import Params
from visionflow.paths import ProjectPaths
from visionflow.registry.tracking import SystemMetrics
from visionflow.report import write_json_atomic
from visionflow.tasks.detection.detector_module import MONITOR, DetectorModule, load_detector
from visionflow.tasks.detection.trainset import DetectionDataset, augmentation, class_names, collate, read_split
from visionflow.training.callbacks import Log, RunFigures
from visionflow.training.datamodule import InputDecision, worker_context
from visionflow.training.run_records import log_figures, log_run_config
from visionflow.training.runtime import resolve_runtime
from visionflow.training.train import RunPlan, TrainResult, _mlflow_logger, _result, _trainer, run_key

__all__ = ["load_detector", "train"]

LOG = logging.getLogger(__name__)
# The sections a detection run reads: its identity changes when any of them does.
READS = ("base", "data", "train", "detection")


def _decision(paths: ProjectPaths, image_size: int) -> InputDecision:
    """What the detector's input is (recorded with the run's params as the classifier's input decision is)."""
    df = pd.read_csv(paths.splits / "train.csv", usecols=lambda c: c in ("width", "height"))
    median = (
        (int(df["height"].median()), int(df["width"].median()))
        if {"width", "height"} <= set(df) and len(df)
        else (0, 0)
    )
    note = (
        f"detection: RGB, resized inside the model to {image_size} px (training images median {median[1]}x{median[0]})"
    )
    return InputDecision(channels=3, image_size=image_size, colour_share=1.0, median_size=median, note=note, hint=None)


def _loaders(p: Params, plan: RunPlan) -> tuple[DataLoader, DataLoader]:
    cfg, seed = plan.cfg, p.base.seed
    train = DetectionDataset(read_split(plan.paths, "train"), plan.classes, augmentation(cfg.augment, seed), seed)
    val = DetectionDataset(read_split(plan.paths, "val"), plan.classes)
    common: dict[str, Any] = {
        "batch_size": cfg.batch_size,
        "num_workers": cfg.num_workers,
        "collate_fn": collate,
        "persistent_workers": cfg.num_workers > 0,
        "pin_memory": plan.rt.accelerator == "gpu",
        # forkserver workers, as the classifier's: a worker forked from a running flow inherits Prefect's threads
        # and dies at shutdown with exit code 1 (seen here at the end of the pipeline's detection training)
        "multiprocessing_context": worker_context() if cfg.num_workers > 0 else None,
    }
    return DataLoader(train, shuffle=True, **common), DataLoader(val, shuffle=False, **common)


def _plan(p: Params, root: Path, data_version: str | None) -> RunPlan:
    paths = ProjectPaths.of(p, root)
    classes = class_names(read_split(paths, "train"))
    d = p.detection
    cfg = p.train.model_copy(
        update={
            "model": d.model,
            "pretrained_weights": d.pretrained_weights,
            "image_size": d.image_size,
            "channels": 3,
            "batch_size": d.batch_size,
            "max_epochs": d.max_epochs,
            "lr": d.lr,
        }
    )
    L.seed_everything(p.base.seed, workers=True, verbose=False)
    rt = resolve_runtime(cfg)
    gpus = rt.devices if isinstance(rt.devices, int) else max(torch.cuda.device_count(), 1)
    per_node = gpus if rt.accelerator == "gpu" else 1
    n_train = len(read_split(paths, "train"))
    steps_per_epoch = math.ceil(n_train / (cfg.batch_size * per_node * rt.num_nodes))
    key = run_key(p, data_version, paths.splits, READS)
    return RunPlan(
        cfg=cfg,
        decision=_decision(paths, d.image_size),
        rt=rt,
        classes=classes,
        dm=None,  # the loaders go to fit() directly (see _loaders); no decode-once cache for boxes
        cache_done=time.perf_counter(),
        steps_per_epoch=steps_per_epoch,
        max_steps=steps_per_epoch * cfg.max_epochs,
        key=key,
        run_dir=paths.train_runs / f"detection-{key}",
        paths=paths,
    )


def train(
    p: Params,
    root: Path,
    data_version: str | None,
    *,
    flow_run_id: str | None = None,
    progress: bool = True,
    log: Log | None = None,
) -> TrainResult:
    """Train (or resume, or reuse) the detector on data/splits. TrainResult.best_val_acc holds the best validation
    mAP@0.5 (the monitored metric; the shared result type keeps the classifier's field name).

    MLflow must be set up (registry.tracking.setup_mlflow) by the entry point.
    """
    start = time.perf_counter()
    log = log or LOG
    root = Path(root)
    plan = _plan(p, root, data_version)
    log.info(plan.decision.note)
    state_path = plan.run_dir / "state.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    if state.get("status") == "completed" and (root / state.get("best_checkpoint", "")).is_file():
        return TrainResult(
            **{**state["result"], "data_version": data_version, "reused": True, "seconds": time.perf_counter() - start}
        )
    return _fit(p, root, plan, state, start, data_version, flow_run_id, progress, log)


def _fit(
    p: Params,
    root: Path,
    plan: RunPlan,
    state: dict[str, Any],
    start: float,
    data_version: str | None,
    flow_run_id: str | None,
    progress: bool,
    log: Log,
) -> TrainResult:
    """The run, fresh or resumed from its last checkpoint; state.json says running until the result is in it."""
    import mlflow

    state_path = plan.run_dir / "state.json"
    uri = mlflow.get_tracking_uri()
    logger = _mlflow_logger(p, root, plan, uri, data_version, flow_run_id, state.get("mlflow_run_id"))
    run_id = logger.run_id
    resume_from = plan.run_dir / "checkpoints" / "last.ckpt"
    resumed = resume_from.is_file()
    write_json_atomic(state_path, {"status": "running", "mlflow_run_id": run_id, "experiment_id": logger.experiment_id})
    if not resumed:
        log_run_config(logger.experiment, run_id, p, plan)
    figures_cb = RunFigures(start, plan.cache_done)
    trainer, best_cb = _trainer(plan, logger, figures_cb, [], progress, log, monitor=MONITOR)
    cfg = plan.cfg
    module = DetectorModule(
        classes=plan.classes,
        image_size=cfg.image_size,
        model=cfg.model,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        pretrained_weights=cfg.pretrained_weights,
        score_threshold=p.detection.score_threshold,
    )
    if plan.rt.compile:
        module.net.backbone.compile()  # the backbone only: torchvision's box decoding does not compile
    train_loader, val_loader = _loaders(p, plan)
    with SystemMetrics(run_id, uri, cfg.system_metrics_interval_s, resumed):
        trainer.fit(module, train_loader, val_loader, ckpt_path=str(resume_from) if resumed else None)
    figures = figures_cb.figures()
    log.info("training figures: %s", ", ".join(f"{k} {v}" for k, v in figures.items()))
    best = plan.paths.relative(best_cb.best_model_path or resume_from)
    kwargs = {"mlflow_run_id": run_id, "resumed": resumed, "start": start, "figures": figures}
    result = replace(
        _result(plan, trainer, best_cb, best=best, data_version=data_version, **kwargs), monitor="val mAP@0.5"
    )
    if not np.isfinite(result.best_val_acc):
        log.warning("no validation mAP was recorded: the val split may be empty")
    logger.experiment.set_tag(run_id, "visionflow.train.global_step", str(result.global_step))
    logger.experiment.set_tag(run_id, "visionflow.task", "detection")
    log_figures(logger.experiment, run_id, figures, result.global_step)
    write_json_atomic(
        state_path, {"status": "completed", "mlflow_run_id": run_id, "best_checkpoint": best, "result": asdict(result)}
    )
    return result
