"""Train: Lightning + timm on the decode-once cache, tracked in MLflow, checkpointed so that it can resume.

A training run is identified by (params digest, data version, split manifests). Running the same command again
resumes that run from its last checkpoint when it was interrupted, and reuses it when it finished; training is
bounded by a step budget (steps per epoch x max_epochs), so a resumed run does exactly as many steps in total as
an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint, RichProgressBar
from lightning.pytorch.loggers import MLFlowLogger

from visionflow.config import Params, TrainParams
from visionflow.datamodule import ImageDataModule, class_names, decide_input
from visionflow.model import ImageClassifier
from visionflow.report import write_json_atomic
from visionflow.tracking import lineage_tags, run_name, setup_mlflow, tracking_uri


@dataclass(frozen=True)
class Runtime:
    accelerator: str
    devices: int | str
    precision: str
    strategy: str
    channels_last: bool
    num_nodes: int = 1


def resolve_runtime(cfg: TrainParams) -> Runtime:
    """GPU when present: bf16 (or fp16) autocast and channels_last; CPU: plain fp32."""
    gpu = torch.cuda.is_available() if cfg.accelerator == "auto" else cfg.accelerator == "gpu"
    if cfg.precision != "auto":
        precision = cfg.precision
    elif gpu:
        precision = "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    else:
        precision = "32-true"
    return Runtime(accelerator="gpu" if gpu else "cpu", devices=cfg.devices if gpu else 1, precision=precision,
                   strategy=cfg.strategy, channels_last=gpu, num_nodes=cfg.num_nodes)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to a temporary file in the same folder, fsync, then rename: a crash leaves the old file intact."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                torch.save(checkpoint, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


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


Log = logging.Logger | logging.LoggerAdapter
LOG = logging.getLogger(__name__)


def _duration(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    return f"{m // 60}h{m % 60:02d}m" if m >= 60 else f"{m}m{s:02d}s"


class EpochLog(L.Callback):
    """One plain log line per epoch: loss, accuracy, images/s and the time left.

    A logger, not a progress bar, so that progress reaches a piped log file and Prefect's flow-run logs (the
    flow passes its run logger). Rates are timed from each epoch's first batch, so that starting the data
    loader's worker processes does not count. The ETA is the run's wall time per step so far (validation and
    loader start-ups included, which the images/s leave out) over the steps left in the budget (early stopping
    can end the run sooner).
    """

    def __init__(self, log: Log, max_steps: int, steps_per_epoch: int):
        self.out, self.max_steps, self.steps_per_epoch = log, max_steps, steps_per_epoch

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.fit_start, self.fit_first_step = time.perf_counter(), trainer.global_step

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.first_batch: float | None = None
        self.images, self.loss_sum = 0, 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.first_batch is None:
            self.first_batch = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        n = len(batch[1])
        self.images += n
        self.loss_sum += float(outputs["loss"]) * n
        self.batches_end = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.first_batch is None:  # resumed at the very end of an epoch: nothing was trained in it
            return
        now, m, step = time.perf_counter(), trainer.callback_metrics, trainer.global_step
        per_step = (now - self.fit_start) / max(step - self.fit_first_step, 1)
        val = (f"val loss {float(m['val/loss']):.4f} acc {float(m['val/acc']):.4f}"
               if "val/acc" in m else "no validation")
        self.out.info("epoch %d/%d (step %d/%d): train loss %.4f acc %s, %s, %.0f images/s, elapsed %s, ETA %s",
                      trainer.current_epoch + 1, math.ceil(self.max_steps / self.steps_per_epoch), step,
                      self.max_steps, self.loss_sum / max(self.images, 1),
                      f"{float(m['train/acc']):.4f}" if "train/acc" in m else "?", val,
                      self.images / max(self.batches_end - self.first_batch, 1e-9),
                      _duration(now - self.fit_start), _duration(per_step * (self.max_steps - step)))


def run_key(p: Params, data_version: str | None, splits_dir: Path) -> str:
    """What a training run depends on: the sections it reads, the data version and the split manifests."""
    sections = {k: v for k, v in p.as_dict().items() if k in ("base", "data", "train")}
    h = hashlib.sha256(json.dumps(sections, sort_keys=True).encode())
    h.update(str(data_version).encode())
    for name in ("train", "val", "test"):
        h.update(hashlib.sha256((Path(splits_dir) / f"{name}.csv").read_bytes()).digest())
    return h.hexdigest()[:12]


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def train(*, p: Params, root: Path, data_version: str | None, flow_run_id: str | None = None,
          runs_dir: Path | None = None, cache_dir: Path | None = None, progress: bool = True,
          max_steps_override: int | None = None, log: Log | None = None) -> TrainResult:
    """log: where the input decision and the per-epoch lines go (the flow passes Prefect's run logger)."""
    start = time.perf_counter()
    log = log or LOG
    root = Path(root)
    splits_dir = root / p.data.splits_dir if not Path(p.data.splits_dir).is_absolute() else p.data.splits_dir
    classes = class_names(splits_dir)
    decision = decide_input(splits_dir / "train.csv", p.train.channels, p.train.image_size)
    log.info(decision.note)
    if decision.hint:
        log.info("hint: %s", decision.hint)
    # Everything downstream (cache, network, MLflow params, model card) sees the decided channel count.
    cfg = p.train.model_copy(update={"channels": decision.channels})
    L.seed_everything(p.base.seed, workers=True, verbose=False)
    rt = resolve_runtime(cfg)

    dm = ImageDataModule(splits_dir=splits_dir, cache_dir=cache_dir or root / "data/cache", classes=classes,
                         image_size=cfg.image_size, channels=cfg.channels, batch_size=cfg.batch_size,
                         num_workers=cfg.num_workers, augment=cfg.augment, seed=p.base.seed)
    dm.prepare_data()
    per_node = rt.devices if isinstance(rt.devices, int) else max(torch.cuda.device_count(), 1) if rt.accelerator == "gpu" else 1
    world = per_node * rt.num_nodes
    steps_per_epoch = math.ceil(len(dm.load("train").labels) / (cfg.batch_size * world))
    max_steps = max_steps_override or steps_per_epoch * cfg.max_epochs

    key = run_key(p, data_version, splits_dir)
    run_dir = Path(runs_dir or root / "runs/train") / key
    ckpt_dir = run_dir / "checkpoints"
    state_path = run_dir / "state.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    if state.get("status") == "completed" and Path(state.get("best_checkpoint", "")).is_file():
        return TrainResult(**{**state["result"], "reused": True, "seconds": time.perf_counter() - start})

    experiment_id = setup_mlflow(p.registry.tracking_uri, root, p.base.project, p.registry.artifact_location)
    logger = MLFlowLogger(experiment_name=p.base.project, tracking_uri=tracking_uri(p.registry.tracking_uri, root),
                          run_id=state.get("mlflow_run_id"), log_model=False,
                          run_name=run_name(model=cfg.model, data_version=data_version, params_digest=p.digest()),
                          tags={**lineage_tags(data_version=data_version, root=root, params_digest=p.digest(),
                                               flow_run_id=flow_run_id), "visionflow.run_key": key})
    mlflow_run_id = logger.run_id
    resume_from = ckpt_dir / "last.ckpt"
    resumed = resume_from.is_file()
    write_json_atomic(state_path, {"status": "running", "mlflow_run_id": mlflow_run_id, "experiment_id": experiment_id})
    if not resumed:
        client = logger.experiment
        resolved = {**p.as_dict(), "train": cfg.model_dump(mode="json")}
        params = {**_flatten(resolved), "train.channels_decision": decision.note,
                  "train.image_size_hint": decision.hint or "none"}
        from mlflow.entities import Param

        client.log_batch(mlflow_run_id, params=[Param(k, str(v)[:6000]) for k, v in sorted(params.items())])
        client.log_dict(mlflow_run_id, resolved, "params.resolved.yaml")
        client.log_dict(mlflow_run_id, {"classes": classes, "runtime": asdict(rt), "max_steps": max_steps,
                                        "steps_per_epoch": steps_per_epoch, "input": asdict(decision)},
                        "run_config.json")

    model = ImageClassifier(model_name=cfg.model, classes=classes, channels=cfg.channels,
                            image_size=cfg.image_size, lr=cfg.lr, weight_decay=cfg.weight_decay,
                            optimizer=cfg.optimizer, scheduler=cfg.scheduler,
                            pretrained_weights=cfg.pretrained_weights, channels_last=rt.channels_last)
    best_cb = ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor="val/acc", mode="max", save_top_k=1,
                              auto_insert_metric_name=False, enable_version_counter=False)
    # Mid-epoch checkpoints (about four per epoch) bound what a crash can lose.
    last_cb = ModelCheckpoint(dirpath=ckpt_dir, filename="last", save_top_k=0, save_last=True,
                              every_n_train_steps=max(1, steps_per_epoch // 4), enable_version_counter=False)
    callbacks: list[Any] = [best_cb, last_cb, LearningRateMonitor(logging_interval="epoch"),
                            EarlyStopping(monitor="val/acc", mode="max", patience=cfg.early_stopping_patience)]
    callbacks.append(EpochLog(log, max_steps, steps_per_epoch))
    if progress:
        callbacks.append(RichProgressBar(leave=True))
    trainer = L.Trainer(
        accelerator=rt.accelerator, devices=rt.devices, num_nodes=rt.num_nodes, strategy=rt.strategy,
        precision=rt.precision, max_steps=max_steps, max_epochs=-1, logger=logger, callbacks=callbacks,
        plugins=[AtomicCheckpointIO()], deterministic=not torch.cuda.is_available(),
        log_every_n_steps=max(1, min(50, steps_per_epoch // 2)), enable_progress_bar=progress,
        enable_model_summary=False, default_root_dir=run_dir, num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=dm, ckpt_path=str(resume_from) if resumed else None)

    best = best_cb.best_model_path or str(resume_from)
    best_score = best_cb.best_model_score
    result = TrainResult(
        run_dir=str(run_dir), best_checkpoint=best, mlflow_run_id=mlflow_run_id, classes=classes,
        global_step=int(trainer.global_step), max_steps=max_steps, epochs_completed=int(trainer.current_epoch),
        best_val_acc=float(best_score) if best_score is not None else float("nan"), resumed=resumed,
        reused=False, seconds=time.perf_counter() - start, runtime=asdict(rt), channels=cfg.channels,
        input_decision=decision.note,
    )
    logger.experiment.set_tag(mlflow_run_id, "visionflow.train.global_step", str(result.global_step))
    write_json_atomic(state_path, {"status": "completed", "mlflow_run_id": mlflow_run_id,
                                   "best_checkpoint": best, "result": asdict(result)})
    return result


def load_classifier(checkpoint: Path | str) -> ImageClassifier:
    """The trained module from a checkpoint, in eval mode on CPU (pretrained weights are in the checkpoint)."""
    model = ImageClassifier.load_from_checkpoint(str(checkpoint), map_location="cpu", pretrained_weights=None,
                                                 channels_last=False)
    return model.eval()
