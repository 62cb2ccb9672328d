"""Stage entry points: params in, typed result out. The CLI, dvc.yaml (through the CLI) and the Prefect flows all
call these, so each stage is wired to its configuration in exactly one place.

Relative paths in params.yaml are relative to the project root (the folder holding params.yaml).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from visionflow.data import versioning
from visionflow.config import Params
from visionflow.errors import DataError, VersioningError
from visionflow.paths import ProjectPaths
from visionflow.data.ingest import IngestResult, Progress, ingest
from visionflow.report import write_json_atomic
from visionflow.data.split import SplitResult, split
from visionflow.data.validate import ValidationResult, validate

MODEL_CKPT = Path("models/model.ckpt")
TRAIN_REPORT = Path("reports/train.json")


def ingest_stage(p: Params, root: Path, *, force: bool = False, progress: Progress | None = None) -> IngestResult:
    return ingest(source=p.data.source, raw_dir=root / p.data.raw_dir, max_images=p.data.max_images,
                  seed=p.base.seed, cache_dir=root / "data/external", force=force, progress=progress,
                  reviewed_dir=root / p.serve.reviewed_dir)


def version_stage(p: Params, root: Path, *, push: bool = True) -> dict[str, Any]:
    url = versioning.ensure_repo(root, p.data.remote_name, p.data.remote_url)
    versioning.commit(root, [versioning.INGEST_STAGE])
    if push:
        versioning.push(root, p.data.remote_name)
    return {"data_version": versioning.data_version(root, p.data.raw_dir), "remote": url, "pushed": push}


def current_data_version(p: Params, root: Path) -> str | None:
    try:
        return versioning.data_version(root, p.data.raw_dir)
    except VersioningError:
        return None


def validate_stage(p: Params, root: Path, data_version: str | None,
                   progress: Progress | None = None) -> ValidationResult:
    cfg = p.validation.model_copy(update={"quarantine_dir": root / p.validation.quarantine_dir,
                                          "report_dir": root / p.validation.report_dir})
    return validate(raw_dir=root / p.data.raw_dir, cfg=cfg, manifest_path=root / p.data.manifest_path,
                    labels=p.data.labels, data_version=data_version, progress=progress,
                    project=ProjectPaths.of(p, root))


def split_stage(p: Params, root: Path) -> SplitResult:
    return split(manifest_path=root / p.data.manifest_path, out_dir=root / p.data.splits_dir,
                 val_fraction=p.data.val_fraction, test_fraction=p.data.test_fraction, seed=p.base.seed)


def train_stage(p: Params, root: Path, data_version: str | None, *, flow_run_id: str | None = None,
                progress: bool = True, log=None) -> dict[str, Any]:
    """Train (or resume, or reuse) and publish the best checkpoint at models/model.ckpt.

    log: a logger for the input decision and the per-epoch lines (default: the visionflow.training.train logger).
    """
    from visionflow.training.train import train

    res = train(p=p, root=root, data_version=data_version, flow_run_id=flow_run_id, progress=progress, log=log)
    target = root / MODEL_CKPT
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".ckpt.tmp")
    shutil.copyfile(res.best_checkpoint, tmp)
    os.replace(tmp, target)
    summary = {**asdict(res), "data_version": data_version, "model_checkpoint": str(MODEL_CKPT)}
    write_json_atomic(root / TRAIN_REPORT, summary)
    return summary


def evaluate_stage(p: Params, root: Path) -> dict[str, Any]:
    import json

    from visionflow.data.cache import build_cache
    from visionflow.training.evaluate import evaluate
    from visionflow.registry.tracking import setup_mlflow
    from visionflow.training.train import load_classifier

    report = root / TRAIN_REPORT
    if not report.is_file() or not (root / MODEL_CKPT).is_file():
        raise DataError(f"no trained model ({MODEL_CKPT}, {TRAIN_REPORT}): run `visionflow train` first")
    trained = json.loads(report.read_text())
    model = load_classifier(root / MODEL_CKPT)
    classes = list(model.hparams.classes)
    paths = ProjectPaths.of(p, root)
    test = build_cache(paths.splits / "test.csv", paths.cache, classes=classes, image_size=model.hparams.image_size,
                       channels=model.hparams.channels, project=paths)
    setup_mlflow(p.registry.tracking_uri, root, p.base.project, p.registry.artifact_location)
    res = evaluate(net=model.net, images=test.images, labels=test.labels, classes=classes, cfg=p.evaluate,
                   seed=p.base.seed, report_dir=root / p.evaluate.report_dir,
                   mlflow_run_id=trained["mlflow_run_id"])
    payload = json.loads((Path(res.report_dir) / "evaluation.json").read_text())
    payload["mlflow_run_id"] = trained["mlflow_run_id"]
    write_json_atomic(Path(res.report_dir) / "evaluation.json", payload)
    return {**asdict(res), "mlflow_run_id": trained["mlflow_run_id"]}


EXPORT_DIR = Path("models/onnx")
EXPORT_REPORT = Path("reports/export.json")
REGISTRY_REPORT = Path("reports/registry.json")


def _test_split(p: Params, root: Path, image_size: int, channels: int, classes: list[str]):
    from visionflow.data.cache import build_cache

    paths = ProjectPaths.of(p, root)
    return build_cache(paths.splits / "test.csv", paths.cache, classes=classes, image_size=image_size,
                       channels=channels, project=paths)


def export_stage(p: Params, root: Path) -> dict[str, Any]:
    """ONNX export with preprocessing inside, model card, and the parity gate (raises GateFailed on failure)."""
    import json

    from visionflow.registry.export import export_onnx, parity_check, parity_dict, write_model_card
    from visionflow.training.train import load_classifier

    if not (root / MODEL_CKPT).is_file():
        raise DataError(f"no trained model at {MODEL_CKPT}: run `visionflow train` first")
    model = load_classifier(root / MODEL_CKPT)
    hp = model.hparams
    trained = json.loads((root / TRAIN_REPORT).read_text()) if (root / TRAIN_REPORT).is_file() else {}
    onnx_path = export_onnx(model.net, image_size=hp.image_size, channels=hp.channels,
                            path=root / EXPORT_DIR / "model.onnx")
    test = _test_split(p, root, hp.image_size, hp.channels, list(hp.classes))
    n = min(len(test.labels), max(p.export.parity_images, 1))
    parity = parity_check(model.net, onnx_path, np.asarray(test.images[:n]), tolerance=p.export.parity_tolerance)
    card = write_model_card(onnx_path, image_size=hp.image_size, channels=hp.channels, classes=list(hp.classes),
                            model_name=hp.model_name, data_version=trained.get("data_version"),
                            extra={"mlflow_run_id": trained.get("mlflow_run_id")})
    summary = {"onnx_path": str(onnx_path.relative_to(root)), "card": card, **parity_dict(parity)}
    write_json_atomic(root / EXPORT_REPORT, summary)
    if trained.get("mlflow_run_id"):
        import mlflow

        from visionflow.registry.tracking import detail_tags, setup_mlflow

        setup_mlflow(p.registry.tracking_uri, root, p.base.project, p.registry.artifact_location)
        mlflow.MlflowClient().log_batch(trained["mlflow_run_id"], tags=detail_tags("onnx", {
            k: getattr(parity, k)
            for k in ("max_abs_diff", "top1_agreement", "ort_ms_b1", "torch_ms_b1", "ort_ms_b32", "torch_ms_b32")}))
    if not parity.passed:
        raise GateFailed("ONNX parity gate failed: " + "; ".join(parity.reasons))
    return summary


class GateFailed(DataError):
    """A gate refused the artifact; the message lists every reason."""


def register_stage(p: Params, root: Path, *, flow_run_id: str | None = None) -> dict[str, Any]:
    import json

    from visionflow.registry.store import register_onnx
    from visionflow.registry.tracking import lineage_tags, setup_mlflow

    for f in (TRAIN_REPORT, EXPORT_REPORT):
        if not (root / f).is_file():
            raise DataError(f"{f} not found: run `visionflow train`, `evaluate` and `export` first")
    trained = json.loads((root / TRAIN_REPORT).read_text())
    exported = json.loads((root / EXPORT_REPORT).read_text())
    ev_file = root / p.evaluate.report_dir / "evaluation.json"
    evaluated = json.loads(ev_file.read_text()) if ev_file.is_file() else {}
    if evaluated.get("mlflow_run_id") != trained["mlflow_run_id"]:
        raise DataError(f"{ev_file} does not describe the model in {TRAIN_REPORT} (MLflow run "
                        f"{trained['mlflow_run_id']}): run `visionflow evaluate` first")
    setup_mlflow(p.registry.tracking_uri, root, p.base.project, p.registry.artifact_location)
    tags = {**lineage_tags(data_version=trained.get("data_version"), root=root, params_digest=p.digest(),
                           flow_run_id=flow_run_id),
            "visionflow.mlflow_run_id": trained["mlflow_run_id"],
            "visionflow.gate.parity": "passed" if exported["passed"] else "failed",
            "visionflow.parity.max_abs_diff": f"{exported['max_abs_diff']:.3e}",
            "visionflow.parity.top1_agreement": f"{exported['top1_agreement']:.6f}",
            "visionflow.latency.ort_ms_b1": f"{exported['ort_ms_b1']:.3f}"}
    metrics = {k: evaluated[k] for k in ("test_accuracy", "macro_f1", "robust_accuracy", "ece") if k in evaluated}
    _log_backbone_weights(root, trained["mlflow_run_id"])
    version = register_onnx(onnx_path=root / exported["onnx_path"], card=exported["card"],
                            model_name=p.registry.model_name, mlflow_run_id=trained["mlflow_run_id"], tags=tags,
                            metrics=metrics)
    return {"model": p.registry.model_name, "version": version}


WEIGHTS_ARTIFACT = "weights/backbone.pt"


def _log_backbone_weights(root: Path, run_id: str) -> None:
    """The backbone's state dict beside the ONNX model, so retraining can warm-start from a registered model."""
    import tempfile

    import mlflow
    import torch

    from visionflow.training.train import load_classifier

    net = load_classifier(root / MODEL_CKPT).net
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(WEIGHTS_ARTIFACT).name
        torch.save(net.backbone.state_dict(), path)
        mlflow.MlflowClient().log_artifact(run_id, str(path), str(Path(WEIGHTS_ARTIFACT).parent))


def champion_weights(p: Params, root: Path) -> Path | None:
    """The champion's backbone weights (downloaded from its MLflow run), or None when there is no champion."""
    import mlflow

    from visionflow.registry.store import CHAMPION, alias_version, version_info
    from visionflow.registry.tracking import setup_mlflow

    setup_mlflow(p.registry.tracking_uri, root, p.base.project, p.registry.artifact_location)
    version = alias_version(p.registry.model_name, CHAMPION)
    if version is None:
        return None
    run_id = version_info(p.registry.model_name, version)["tags"].get("visionflow.mlflow_run_id")
    if not run_id:
        return None
    dest = root / "models/warm_start" / f"v{version}"
    dest.mkdir(parents=True, exist_ok=True)
    try:
        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=WEIGHTS_ARTIFACT,
                                                        dst_path=str(dest)))
    except (mlflow.exceptions.MlflowException, OSError):  # registered before weights were logged: from scratch
        return None


def _correctness(session, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    from visionflow.registry.export import ort_logits

    return ort_logits(session, images).argmax(1) == labels


def labelled_batch(p: Params, folder: Path, image_size: int, channels: int,
                   classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """A reviewed batch (images + labels.csv) decoded for a model; unreadable or unlabelled images are left out."""
    from visionflow.data.imageio import DecodeRules, RejectedImage, decode_for_model, read_limited
    from visionflow.monitoring.simulate import load_batch

    batch = load_batch(folder)
    if batch.labels is None:
        raise DataError(f"{folder} has no labels.csv: an evaluation batch needs reviewed labels")
    rules = DecodeRules.from_params(p.validation)
    images, labels = [], []
    for f, label in zip(batch.images, batch.labels):
        if label not in classes:
            continue
        try:
            images.append(decode_for_model(read_limited(f, rules.max_bytes), image_size, channels, rules))
        except RejectedImage:
            continue
        labels.append(classes.index(label))
    if not images:
        raise DataError(f"{folder}: no readable image with a known label")
    return np.stack(images), np.asarray(labels)


def promote_stage(p: Params, root: Path, version: str | None = None,
                  eval_batch: Path | None = None) -> dict[str, Any]:
    """Judge a registered version against every gate and the current champion; move aliases if it wins.

    eval_batch: a reviewed production batch (e.g. the drifted data that triggered retraining) added to the paired
    comparison, and reported separately as `eval_batch_accuracy` for challenger and champion.
    """
    from visionflow.onnxrt import ort_session
    from visionflow.registry.store import (
        CHALLENGER, CHAMPION, RegistryError, alias_version, apply_promotion, download_onnx, gate_decision,
        promotion_lock, version_info,
    )
    from visionflow.training.robustness import corrupt_batch
    from visionflow.registry.tracking import setup_mlflow

    setup_mlflow(p.registry.tracking_uri, root, p.base.project, p.registry.artifact_location)
    name = p.registry.model_name
    version = version or alias_version(name, CHALLENGER)
    if version is None:
        raise RegistryError(f"no version given and {name} has no challenger: register a model first")
    # the models are only read into ONNX Runtime sessions: their downloads go when the promotion is decided
    with promotion_lock(root / "mlruns", name), tempfile.TemporaryDirectory(prefix="visionflow-promote-") as tmp:
        info = version_info(name, version)
        champion = alias_version(name, CHAMPION)
        new_path, card = download_onnx(name, version, Path(tmp) / version)
        classes = card["classes"]
        new_sess = ort_session(new_path, accelerated=True)

        def views(c: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            test = _test_split(p, root, c["image_size"], c["channels"], classes)
            imgs = np.asarray(test.images)
            subset = np.sort(np.random.default_rng(p.base.seed).permutation(len(imgs))[:p.evaluate.robustness_images])
            corrupted = [corrupt_batch(imgs[subset], name_, sev, seed=p.base.seed)
                         for name_ in p.evaluate.corruptions for sev in p.evaluate.severities]
            extra = [labelled_batch(p, eval_batch, c["image_size"], c["channels"], classes)] if eval_batch else []
            every = np.concatenate([imgs, *corrupted, *(e[0] for e in extra)])
            every_labels = np.concatenate([test.labels] + [test.labels[subset]] * len(corrupted)
                                          + [e[1] for e in extra])
            return imgs, test.labels, every, every_labels

        imgs, labels, every, every_labels = views(card)
        clean_new = _correctness(new_sess, imgs, labels)
        all_new = _correctness(new_sess, every, every_labels)
        clean_old = all_old = None
        if champion is not None and champion != version:
            old_path, old_card = download_onnx(name, champion, Path(tmp) / champion)
            if old_card["classes"] != classes:
                raise RegistryError(f"champion v{champion} predicts classes {old_card['classes']}, challenger "
                                    f"v{version} predicts {classes}: promote by hand after review")
            old_sess = ort_session(old_path, accelerated=True)
            o_imgs, o_labels, o_every, o_every_labels = views(old_card)
            clean_old = _correctness(old_sess, o_imgs, o_labels)
            all_old = _correctness(old_sess, o_every, o_every_labels)
        tags = info["tags"]
        parity_ok = tags.get("visionflow.gate.parity") == "passed"
        gates = gate_decision(
            cfg=p.registry, parity_passed=parity_ok,
            parity_detail=(f"max |logit diff| {tags.get('visionflow.parity.max_abs_diff')}, top-1 agreement "
                           f"{tags.get('visionflow.parity.top1_agreement')}"),
            latency_ms=float(tags.get("visionflow.latency.ort_ms_b1", "inf")), clean_new=clean_new,
            labels=labels, classes=classes, seed=p.base.seed, clean_old=clean_old, all_new=all_new,
            all_old=all_old, compared_on="clean+corrupted+eval-batch" if eval_batch else "clean+corrupted")
        decision = apply_promotion(name, version, gates)
    out = decision.as_dict()
    out["clean_accuracy"] = {"challenger": round(float(clean_new.mean()), 4),
                             "champion": round(float(clean_old.mean()), 4) if clean_old is not None else None,
                             "n_images": int(len(clean_new))}
    if eval_batch:
        n_extra = len(labelled_batch(p, eval_batch, card["image_size"], card["channels"], classes)[1])
        out["eval_batch"] = str(eval_batch)
        out["eval_batch_accuracy"] = {"challenger": round(float(all_new[-n_extra:].mean()), 4),
                                      "champion": (round(float(all_old[-n_extra:].mean()), 4)
                                                   if all_old is not None else None), "n_images": n_extra}
    write_json_atomic(root / REGISTRY_REPORT, out)
    return out
