"""Train: Lightning + timm on the decode-once cache, tracked in MLflow, checkpointed so that it can resume.

A training run is identified by (params digest, data version, split manifests). Running the same command again
resumes that run from its last checkpoint when it was interrupted, and reuses it when it finished; training is
bounded by a step budget (steps per epoch x max_epochs), so a resumed run does exactly as many steps in total as
an uninterrupted one. Where the run executes (device, precision, checkpoint writes) is decided in
training.runtime; what it records in MLflow beyond Lightning's own logging is in training.run_records.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint, RichProgressBar
from lightning.pytorch.loggers import MLFlowLogger

from visionflow.config import Params, TrainParams
from visionflow.paths import ProjectPaths
from visionflow.registry.tracking import SystemMetrics, lineage_tags, run_name
from visionflow.report import write_json_atomic
from visionflow.training.callbacks import EpochLog, Log, RunFigures, StartValWorkers
from visionflow.training.datamodule import ImageDataModule, InputDecision, class_names, decide_input
from visionflow.training.dynamics import TrainingDynamics, record_table
from visionflow.training.model import ImageClassifier
from visionflow.training.run_records import log_figures, log_run_config
from visionflow.training.runtime import AtomicCheckpointIO, Runtime, resolve_runtime


@dataclass(frozen=True)
class TrainResult:
    run_dir: str
    best_checkpoint: str
    mlflow_run_id: str
    classes: list[str]
    global_step: int
    max_steps: int
    epochs_completed: int
    best_val_acc: float
    resumed: bool
    reused: bool
    seconds: float
    runtime: dict[str, Any]
    # The channels trained on, and why (train.channels "auto" is decided from the data); None in the state of a
    # run finished before they were recorded.
    channels: int | None = None
    input_decision: str | None = None
    # RunFigures.figures() of the run's training process, plus cache_s (None in older states)
    figures: dict[str, Any] | None = None
    data_version: str | None = None  # the data version trained on (the run's identity includes it)
    # Where train_stage published best_checkpoint, relative to the project root (models/model.ckpt); None from
    # train() itself
    model_checkpoint: str | None = None
    # The per-sample training dynamics table (visionflow.training.dynamics) in the run's folder, relative to the
    # project root; None in older states
    training_dynamics: str | None = None
    # What best_val_acc measures: validation accuracy here; a detector's trainer reports its validation mAP@0.5
    monitor: str = "val accuracy"


LOG = logging.getLogger(__name__)


def run_key(
    p: Params, data_version: str | None, splits_dir: Path, reads: tuple[str, ...] = ("base", "data", "train")
) -> str:
    """What a training run depends on: the sections it reads, the data version and the split manifests."""
    sections = {k: v for k, v in p.as_dict().items() if k in reads}
    h = hashlib.sha256(json.dumps(sections, sort_keys=True).encode())
    h.update(str(data_version).encode())
    for name in ("train", "val", "test"):
        h.update(hashlib.sha256((Path(splits_dir) / f"{name}.csv").read_bytes()).digest())
    return h.hexdigest()[:12]


@dataclass(frozen=True)
class RunPlan:
    """What a training run is: its inputs decided, its data ready, its step budget and its folder."""

    cfg: TrainParams  # p.train with the decided channel count
    decision: InputDecision
    rt: Runtime
    classes: list[str]
    dm: ImageDataModule
    cache_done: float  # perf_counter() when the decode-once cache was ready
    steps_per_epoch: int
    max_steps: int
    key: str  # run_key: the run's identity
    run_dir: Path
    paths: ProjectPaths


def _plan(
    p: Params,
    root: Path,
    data_version: str | None,
    runs_dir: Path | None,
    cache_dir: Path | None,
    max_steps_override: int | None,
    log: Log,
) -> RunPlan:
    paths = ProjectPaths.of(p, root)
    classes = class_names(paths.splits)
    decision = decide_input(paths.splits / "train.csv", p.train.channels, p.train.image_size)
    log.info(decision.note)
    if decision.hint:
        log.info("hint: %s", decision.hint)
    # Everything downstream (cache, network, MLflow params, model card) sees the decided channel count.
    cfg = p.train.model_copy(update={"channels": decision.channels})
    L.seed_everything(p.base.seed, workers=True, verbose=False)
    rt = resolve_runtime(cfg)
    dm = ImageDataModule(
        splits_dir=paths.splits,
        cache_dir=cache_dir or paths.cache,
        classes=classes,
        image_size=cfg.image_size,
        channels=cfg.channels,
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        augment=cfg.augment,
        seed=p.base.seed,
        project=paths,
        train_index=True,  # per-sample training dynamics (the label audit)
    )
    dm.prepare_data()  # the decode-once cache: built here, timed as the run's cache seconds
    cache_done = time.perf_counter()
    per_node = (
        rt.devices
        if isinstance(rt.devices, int)
        else max(torch.cuda.device_count(), 1)
        if rt.accelerator == "gpu"
        else 1
    )
    steps_per_epoch = math.ceil(len(dm.load("train").labels) / (cfg.batch_size * per_node * rt.num_nodes))
    key = run_key(p, data_version, paths.splits)
    return RunPlan(
        cfg=cfg,
        decision=decision,
        rt=rt,
        classes=classes,
        dm=dm,
        cache_done=cache_done,
        steps_per_epoch=steps_per_epoch,
        max_steps=max_steps_override or steps_per_epoch * cfg.max_epochs,
        key=key,
        run_dir=Path(runs_dir or paths.train_runs) / key,
        paths=paths,
    )


def _mlflow_logger(
    p: Params,
    root: Path,
    plan: RunPlan,
    uri: str,
    data_version: str | None,
    flow_run_id: str | None,
    run_id: str | None,
) -> MLFlowLogger:
    """The run's MLflow logger (resuming run_id when given)."""
    return MLFlowLogger(
        experiment_name=p.base.project,
        tracking_uri=uri,
        run_id=run_id,
        log_model=False,
        run_name=run_name(model=plan.cfg.model, data_version=data_version, params_digest=p.digest()),
        tags={
            **lineage_tags(data_version=data_version, root=root, params_digest=p.digest(), flow_run_id=flow_run_id),
            "visionflow.run_key": plan.key,
        },
    )


def _trainer(
    plan: RunPlan,
    logger: MLFlowLogger,
    figures_cb: RunFigures,
    extra: list[L.Callback],
    progress: bool,
    log: Log,
    monitor: str = "val/acc",
) -> tuple[L.Trainer, ModelCheckpoint]:
    """The Lightning trainer with its callbacks (`extra` after the shared ones); returns it and the best-checkpoint
    callback. monitor: the validation metric (higher is better) that picks the best checkpoint and stops early."""
    cfg, ckpt_dir = plan.cfg, plan.run_dir / "checkpoints"
    best_cb = ModelCheckpoint(
        dirpath=ckpt_dir,
        filename="best",
        monitor=monitor,
        mode="max",
        save_top_k=1,
        auto_insert_metric_name=False,
        enable_version_counter=False,
    )
    # Mid-epoch checkpoints (about four per epoch) bound what a crash can lose.
    last_cb = ModelCheckpoint(
        dirpath=ckpt_dir,
        filename="last",
        save_top_k=0,
        save_last=True,
        every_n_train_steps=max(1, plan.steps_per_epoch // 4),
        enable_version_counter=False,
    )
    callbacks: list[Any] = [
        best_cb,
        last_cb,
        LearningRateMonitor(logging_interval="epoch"),
        EarlyStopping(monitor=monitor, mode="max", patience=cfg.early_stopping_patience),
    ]
    # EpochLog reads figures_cb's timing of the epoch at its end; neither resets it before the next epoch starts
    callbacks += [
        figures_cb,
        EpochLog(log, plan.max_steps, plan.steps_per_epoch, figures_cb, monitor),
        StartValWorkers(),
        *extra,
    ]
    if progress:
        callbacks.append(RichProgressBar(leave=True))
    rt = plan.rt
    trainer = L.Trainer(
        accelerator=rt.accelerator,
        devices=rt.devices,
        num_nodes=rt.num_nodes,
        strategy=rt.strategy,
        precision=rt.precision,
        max_steps=plan.max_steps,
        max_epochs=-1,
        logger=logger,
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
        deterministic=not torch.cuda.is_available(),
        log_every_n_steps=max(1, min(50, plan.steps_per_epoch // 2)),
        enable_progress_bar=progress,
        enable_model_summary=False,
        default_root_dir=plan.run_dir,
        num_sanity_val_steps=0,
    )
    return trainer, best_cb


def _classifier(plan: RunPlan) -> ImageClassifier:
    cfg = plan.cfg
    model = ImageClassifier(
        model_name=cfg.model,
        classes=plan.classes,
        channels=cfg.channels,
        image_size=cfg.image_size,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        optimizer=cfg.optimizer,
        scheduler=cfg.scheduler,
        pretrained_weights=cfg.pretrained_weights,
        channels_last=plan.rt.channels_last,
    )
    if plan.rt.compile:
        model.net.compile()  # in place: the state dict, checkpoints and export keep the plain module's keys
    return model


def train(
    *,
    p: Params,
    root: Path,
    data_version: str | None,
    flow_run_id: str | None = None,
    runs_dir: Path | None = None,
    cache_dir: Path | None = None,
    progress: bool = True,
    max_steps_override: int | None = None,
    log: Log | None = None,
) -> TrainResult:
    """log: where the input decision and the per-epoch lines go (the flow passes Prefect's run logger).

    MLflow must be set up (registry.tracking.setup_mlflow) by the entry point.
    """
    start = time.perf_counter()
    log = log or LOG
    root = Path(root)
    plan = _plan(p, root, data_version, runs_dir, cache_dir, max_steps_override, log)
    state_path = plan.run_dir / "state.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    # state.json names the checkpoint relative to the project root, so a moved or cloned project reuses its runs
    if state.get("status") == "completed" and (root / state.get("best_checkpoint", "")).is_file():
        return TrainResult(
            **{**state["result"], "data_version": data_version, "reused": True, "seconds": time.perf_counter() - start}
        )
    return _fit(
        p,
        root,
        plan,
        state,
        start=start,
        data_version=data_version,
        flow_run_id=flow_run_id,
        progress=progress,
        log=log,
    )


def _fit(
    p: Params,
    root: Path,
    plan: RunPlan,
    state: dict[str, Any],
    *,
    start: float,
    data_version: str | None,
    flow_run_id: str | None,
    progress: bool,
    log: Log,
) -> TrainResult:
    """The run itself, tracked in MLflow: fresh, or the interrupted one (state's MLflow run) resumed from its last
    checkpoint. Its state.json says running until the result is recorded in it."""
    import mlflow

    state_path = plan.run_dir / "state.json"
    uri = mlflow.get_tracking_uri()  # the store the entry point set up
    logger = _mlflow_logger(p, root, plan, uri, data_version, flow_run_id, state.get("mlflow_run_id"))
    mlflow_run_id = logger.run_id
    resume_from = plan.run_dir / "checkpoints" / "last.ckpt"
    resumed = resume_from.is_file()
    write_json_atomic(
        state_path, {"status": "running", "mlflow_run_id": mlflow_run_id, "experiment_id": logger.experiment_id}
    )
    if not resumed:
        log_run_config(logger.experiment, mlflow_run_id, p, plan)
    figures_cb = RunFigures(start, plan.cache_done)
    dynamics = TrainingDynamics(len(plan.dm.load("train").labels), len(plan.classes))
    trainer, best_cb = _trainer(plan, logger, figures_cb, [dynamics], progress, log)
    with SystemMetrics(mlflow_run_id, uri, plan.cfg.system_metrics_interval_s, resumed):
        trainer.fit(_classifier(plan), datamodule=plan.dm, ckpt_path=str(resume_from) if resumed else None)
    figures = figures_cb.figures()
    log.info("training figures: %s", ", ".join(f"{k} {v}" for k, v in figures.items()))

    best = plan.paths.relative(best_cb.best_model_path or resume_from)  # the project may move; see train()
    result = _result(
        plan,
        trainer,
        best_cb,
        best=best,
        mlflow_run_id=mlflow_run_id,
        resumed=resumed,
        start=start,
        figures=figures,
        data_version=data_version,
    )
    logger.experiment.set_tag(mlflow_run_id, "visionflow.train.global_step", str(result.global_step))
    log_figures(logger.experiment, mlflow_run_id, figures, result.global_step)
    if trainer.is_global_zero:
        table = record_table(
            dynamics,
            plan.run_dir / "training_dynamics.csv",
            (plan.dm.load("train"), plan.paths.splits / "train.csv", plan.classes),
            {"mlflow_run_id": mlflow_run_id, "run_key": plan.key, "resumed": resumed},
            logger.experiment,
            log,
        )
        result = replace(result, training_dynamics=plan.paths.relative(table) if table else None)
    write_json_atomic(
        state_path,
        {"status": "completed", "mlflow_run_id": mlflow_run_id, "best_checkpoint": best, "result": asdict(result)},
    )
    return result


def _result(
    plan: RunPlan,
    trainer: L.Trainer,
    best_cb: ModelCheckpoint,
    *,
    best: str,
    mlflow_run_id: str,
    resumed: bool,
    start: float,
    figures: dict[str, Any],
    data_version: str | None,
) -> TrainResult:
    """What a finished fit did: its best checkpoint (`best`) and score, the steps and epochs it reached."""
    best_score = best_cb.best_model_score
    return TrainResult(
        run_dir=plan.paths.relative(plan.run_dir),
        best_checkpoint=best,
        mlflow_run_id=mlflow_run_id,
        classes=plan.classes,
        global_step=int(trainer.global_step),
        max_steps=plan.max_steps,
        epochs_completed=int(trainer.current_epoch),
        best_val_acc=float(best_score) if best_score is not None else float("nan"),
        resumed=resumed,
        reused=False,
        seconds=time.perf_counter() - start,
        runtime=asdict(plan.rt),
        channels=plan.cfg.channels,
        input_decision=plan.decision.note,
        figures=figures,
        data_version=data_version,
    )


def load_classifier(checkpoint: Path | str) -> ImageClassifier:
    """The trained module from a checkpoint, in eval mode on CPU (pretrained weights are in the checkpoint)."""
    model = ImageClassifier.load_from_checkpoint(
        str(checkpoint), map_location="cpu", pretrained_weights=None, channels_last=False
    )
    return model.eval()
