"""Register a detector and promote it behind gates, with the registry machinery classification uses.

register: models/onnx/model.onnx and its card (task: detection) under detection.model_name, with lineage, the
parity verdict of reports/export.json and the evaluation's figures, as the new challenger.

promote: both models (the challenger, and the champion fetched from the registry) run under ONNX Runtime on the
same images (visionflow.tasks.detection.comparison); the gates, each with its reason:
- parity: the export's parity gate passed (a version tag written at registration);
- map_floor: challenger mAP@0.5 on the clean test split >= detection.map_floor;
- latency: ONNX Runtime batch-1 p50 on CPU <= detection.latency_budget_ms;
and against a champion (none: the first model is judged on the gates above only):
- beats_champion: the paired bootstrap over images (clean test + eval batch) of the mAP@0.5 difference has its
  one-sided (1 - registry.bootstrap_alpha) lower bound above registry.min_gain;
- no_class_regression: no class's AP@0.5 on the clean test split drops by more than detection.max_class_ap_drop;
- robustness: mAP@0.5 on the corrupted test images drops by no more than that same limit.
Aliases then move as for classification (registry.store.apply_promotion, under the promotion lock).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from visionflow.config import Params
from visionflow.errors import DataError
from visionflow.paths import ProjectPaths
from visionflow.registry.gates import Gate
from visionflow.registry.register import RegisterResult
from visionflow.tasks.detection.comparison import Comparison
from visionflow.tasks.detection.metrics import Matches, map50, paired_bootstrap_map

EVALUATION = "evaluation.json"  # in evaluate.report_dir, as for classification


@dataclass(frozen=True)
class DetectionPromoteResult:
    """The decision (reports/registry.json): gates, aliases before and after, and both models' figures."""

    model: str
    version: str
    promoted: bool
    champion_before: str | None
    champion_after: str | None
    gates: list[Gate]
    reasons: list[str]  # the failed gates, "name: detail"
    map50: dict[str, dict[str, Any]]  # clean / corrupted: challenger, champion (None without one), n_images
    class_ap50: dict[str, dict[str, float | None]]  # per class on the clean split: challenger, champion
    latency_ms: float
    eval_batch: str | None = None
    eval_batch_map50: dict[str, Any] | None = None  # as map50's entries, on the eval batch (when one was given)
    eval_batch_skipped: list[str] | None = None  # eval batch images left out, with why

    def summary(self) -> dict[str, Any]:
        """The decision as the pipeline report carries it (metric: what the *_metric entries measure)."""
        return {
            "model": self.model,
            "version": self.version,
            "promoted": self.promoted,
            "reasons": self.reasons,
            "champion": self.champion_after,
            "champion_before": self.champion_before,
            "metric": "mAP@0.5",
            "clean_metric": self.map50.get("clean"),
            "corrupted_metric": self.map50.get("corrupted"),
            "eval_batch_metric": self.eval_batch_map50,
            "latency_ms": self.latency_ms,
        }


def _reports(paths: ProjectPaths) -> tuple[dict, dict, dict]:
    """train.json, export.json and the evaluation of the same training run, or a DataError saying what to run."""
    for f in (paths.train_report, paths.export_report):
        if not f.is_file():
            raise DataError(f"{paths.relative(f)} not found: run `visionflow train`, `evaluate` and `export` first")
    trained = json.loads(paths.train_report.read_text())
    exported = json.loads(paths.export_report.read_text())
    ev_file = paths.evaluation_reports / EVALUATION
    evaluated = json.loads(ev_file.read_text()) if ev_file.is_file() else {}
    if evaluated.get("mlflow_run_id") != trained.get("mlflow_run_id"):
        raise DataError(
            f"{ev_file} does not describe the model in {paths.relative(paths.train_report)} (MLflow run "
            f"{trained.get('mlflow_run_id')}): run `visionflow evaluate` first"
        )
    return trained, exported, evaluated


def _card(onnx_path: Path) -> dict[str, Any]:
    """The detection model card beside the ONNX file, checked to describe that very file."""
    from visionflow.data.imageio import sha256_file

    card_file = onnx_path.with_name("model_card.json")
    if not onnx_path.is_file() or not card_file.is_file():
        raise DataError(f"{onnx_path} or its model_card.json is missing: run `visionflow export` first")
    card = json.loads(card_file.read_text())
    if card.get("task") != "detection":
        raise DataError(f"{card_file} describes a {card.get('task', 'classification')} model, not a detector")
    sha = sha256_file(onnx_path)
    if card.setdefault("onnx_sha256", sha) != sha:
        raise DataError(f"{card_file} describes another ONNX file than {onnx_path.name}: rerun `visionflow export`")
    return card


def register(p: Params, root: Path, *, flow_run_id: str | None = None) -> RegisterResult:
    """Register the exported detector as detection.model_name's new challenger (MLflow set up by the caller)."""
    from visionflow.registry.store import register_onnx
    from visionflow.registry.tracking import lineage_tags

    paths = ProjectPaths.of(p, root)
    trained, exported, evaluated = _reports(paths)
    onnx_path = paths.resolve(exported.get("onnx_path") or paths.relative(paths.onnx_dir / "model.onnx"))
    card = _card(onnx_path)
    run_id = trained["mlflow_run_id"]
    lineage = lineage_tags(
        data_version=trained.get("data_version"), root=root, params_digest=p.digest(), flow_run_id=flow_run_id
    )
    figures = {k: v for k, v in exported.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    tags = {
        **lineage,
        "visionflow.task": "detection",
        "visionflow.mlflow_run_id": run_id,
        "visionflow.gate.parity": {True: "passed", False: "failed"}.get(exported.get("passed"), "missing"),
        "visionflow.parity.reasons": "; ".join(exported.get("reasons") or [])[:5000],
        **{f"visionflow.parity.{k}": f"{v:.6g}" for k, v in figures.items()},
    }
    metrics = {k: v for k, v in evaluated.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    version = register_onnx(
        onnx_path=onnx_path,
        card=card,
        model_name=p.model_name,
        mlflow_run_id=run_id,
        tags=tags,
        metrics=metrics,
    )
    if paths.checkpoint.is_file():  # the whole detector's weights, for a warm-started retraining
        from visionflow.registry.warm_start import log_backbone_weights
        from visionflow.tasks.detection.detector_module import load_detector

        log_backbone_weights(load_detector(paths.checkpoint)[0], run_id, whole=True)
    return RegisterResult(model=p.model_name, version=version)


def _comparison(p: Params, paths: ProjectPaths, classes: list[str], eval_batch: Path | None):
    from visionflow.data.imageio import DecodeRules
    from visionflow.tasks.detection.comparison import eval_batch as read_batch
    from visionflow.tasks.detection.comparison import test_split
    from visionflow.training.evaluate import robustness_subset

    rules = DecodeRules.from_params(p.validation)
    clean = test_split(paths.splits / "test.csv", paths.root, classes, rules)
    batch, skipped = read_batch(eval_batch, classes, rules) if eval_batch else ([], [])
    corruptions = [(c, s) for c in p.evaluate.corruptions for s in p.evaluate.severities]
    subset = robustness_subset(len(clean), p.detection.robustness_images, p.base.seed)
    return Comparison(clean, subset, corruptions, batch, seed=p.base.seed), skipped


def promote(
    p: Params, root: Path, version: str | None = None, eval_batch: Path | None = None
) -> DetectionPromoteResult:
    """Judge `version` (default: the challenger) against every gate and the current champion; move the aliases
    if it wins; write reports/registry.json. Runs under the promotion lock; downloaded models go afterwards."""
    from visionflow.registry.store import (
        CHALLENGER,
        CHAMPION,
        RegistryError,
        alias_version,
        apply_promotion,
        download_onnx,
        promotion_lock,
        version_info,
    )
    from visionflow.report import write_json_atomic
    from visionflow.tasks.detection.comparison import judge, latency_ms

    paths, name = ProjectPaths.of(p, root), p.model_name
    version = version or alias_version(name, CHALLENGER)
    if version is None:
        raise RegistryError(f"no version given and {name} has no challenger: register a model first")
    with promotion_lock(paths.mlruns, name), tempfile.TemporaryDirectory(prefix="visionflow-promote-") as tmp:
        tags = version_info(name, version)["tags"]
        champion = alias_version(name, CHAMPION)
        new_path, card = download_onnx(name, version, Path(tmp) / version)
        if card.get("task") != "detection":
            raise RegistryError(f"{name} v{version} is not a detector (its card says task {card.get('task')!r})")
        classes = list(card["classes"])
        images, skipped = _comparison(p, paths, classes, eval_batch)
        new = judge(new_path, images, len(classes))
        latency = latency_ms(new_path, images.clean[0].image)
        old = None
        if champion is not None and champion != version:
            old_path, old_card = download_onnx(name, champion, Path(tmp) / champion)
            if old_card.get("classes") != classes:
                raise RegistryError(
                    f"champion v{champion} predicts classes {old_card.get('classes')}, challenger v{version} "
                    f"predicts {classes}: promote by hand after review"
                )
            old = judge(old_path, images, len(classes))
        parity = (tags.get("visionflow.gate.parity") == "passed", _parity_detail(tags))
        gates = detection_gates(p, parity, latency, new, old, images.groups(), classes)
        d = apply_promotion(name, version, gates)
    res = _result(d, new, old, images, classes, latency, eval_batch, skipped)
    write_json_atomic(paths.registry_report, asdict(res))
    return res


def _parity_detail(tags: dict[str, str]) -> str:
    verdict = tags.get("visionflow.gate.parity", "missing")
    if verdict == "missing":
        return "reports/export.json held no parity verdict when this version was registered"
    return f"export parity gate {verdict}" + (f": {tags['visionflow.parity.reasons']}" if verdict == "failed" else "")


def detection_gates(
    p: Params,
    parity: tuple[bool, str],
    latency: float,
    new: Matches,
    old: Matches | None,
    groups: dict[str, np.ndarray],
    classes: list[str],
) -> list[Gate]:
    """Every gate (see the module docstring); old is None without a champion."""
    det = p.detection
    score, _ = map50(new, groups["clean"])
    gates = [
        Gate("parity", parity[0], parity[1]),
        Gate(
            "map_floor",
            score >= det.map_floor,
            f"test mAP@0.5 {score:.4f} {'>=' if score >= det.map_floor else '<'} floor {det.map_floor}",
            score,
        ),
        Gate(
            "latency",
            latency <= det.latency_budget_ms,
            f"ONNX Runtime batch-1 p50 {latency:.2f} ms vs budget {det.latency_budget_ms} ms",
            latency,
        ),
    ]
    return gates if old is None else gates + _champion_gates(p, new, old, groups, classes)


def _champion_gates(
    p: Params, new: Matches, old: Matches, groups: dict[str, np.ndarray], classes: list[str]
) -> list[Gate]:
    reg, limit = p.registry, p.detection.max_class_ap_drop
    judged = np.concatenate([groups["clean"], groups["eval_batch"]])
    on = "clean test + eval-batch" if len(groups["eval_batch"]) else "clean test"
    gain, lower = paired_bootstrap_map(
        new, old, judged, n_boot=reg.bootstrap_samples, alpha=reg.bootstrap_alpha, seed=p.base.seed
    )
    gates = [
        Gate(
            "beats_champion",
            lower > reg.min_gain,
            f"mAP@0.5 gain over champion {gain:+.4f} on {len(judged)} {on} images, {1 - reg.bootstrap_alpha:.0%} "
            f"lower bound {lower:+.4f} {'>' if lower > reg.min_gain else '<='} margin {reg.min_gain}",
            lower,
        )
    ]
    drop = map50(old, groups["clean"])[1] - map50(new, groups["clean"])[1]
    if not np.isnan(drop).all():
        worst = int(np.nanargmax(drop))
        gates.append(
            Gate(
                "no_class_regression",
                bool(drop[worst] <= limit),
                f"largest per-class AP@0.5 drop {drop[worst]:+.4f} ({classes[worst]}) vs limit {limit}",
                float(drop[worst]),
            )
        )
    if len(groups["corrupted"]):
        fall = map50(old, groups["corrupted"])[0] - map50(new, groups["corrupted"])[0]
        gates.append(
            Gate(
                "robustness",
                bool(fall <= limit),
                f"mAP@0.5 drop on {len(groups['corrupted'])} corrupted test images {fall:+.4f} vs limit {limit}",
                fall,
            )
        )
    return gates


def _scores(new: Matches, old: Matches | None, images: np.ndarray) -> dict[str, Any]:
    return {
        "challenger": round(map50(new, images)[0], 4),
        "champion": round(map50(old, images)[0], 4) if old is not None else None,
        "n_images": int(len(images)),
    }


def _result(d, new, old, images: Comparison, classes, latency, batch, skipped) -> DetectionPromoteResult:
    groups = images.groups()
    ap_new = map50(new, groups["clean"])[1]
    ap_old = map50(old, groups["clean"])[1] if old is not None else None

    def num(x: float) -> float | None:
        return None if np.isnan(x) else round(float(x), 4)

    return DetectionPromoteResult(
        model=d.model,
        version=d.version,
        promoted=d.promoted,
        champion_before=d.champion_before,
        champion_after=d.champion_after,
        gates=d.gates,
        reasons=d.reasons,
        map50={g: _scores(new, old, groups[g]) for g in ("clean", "corrupted") if len(groups[g])},
        class_ap50={
            c: {"challenger": num(ap_new[k]), "champion": num(ap_old[k]) if ap_old is not None else None}
            for k, c in enumerate(classes)
        },
        latency_ms=round(latency, 3),
        eval_batch=str(batch) if batch else None,
        eval_batch_map50=_scores(new, old, groups["eval_batch"]) if batch else None,
        eval_batch_skipped=skipped if batch else None,
    )
