"""A reduced-precision variant (registry.quantize) made from a registered fp32 classifier, registered as its own
model with lineage to the parent, and made that model's champion only through gates against the parent.

Both models are judged on the same images promotion uses (the clean test split, then every corruption at every
severity on the robustness subset). Gates:

- sanity: the variant's outputs have the parent's shapes and are finite;
- accuracy_drop: the paired-bootstrap lower bound of accuracy(variant) - accuracy(fp32), clean and corrupted
  together, is at least -export.quantize_max_drop (an accuracy loss is a gate, not a report);
- no_class_regression: no class's clean recall falls by more than registry.max_class_drop;
- latency: the variant's batch-1 median on one ONNX Runtime thread is within registry.latency_budget_ms, the
  budget the fp32 model meets. Not "faster than fp32": an fp16 variant exists for its size (and GPUs) and is not
  faster on CPU, and sub-millisecond medians of two models on shared cores differ by noise; the report shows the
  ratio for a person to read;
- parent_champion: the parent is its model's champion, so a variant never serves a model its own gates refused.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from visionflow.config import Params
from visionflow.data.imageio import sha256_file
from visionflow.paths import ProjectPaths
from visionflow.registry import quantize as q
from visionflow.registry.gates import Gate, variant_gates
from visionflow.registry.promotion import Comparison, ComparisonImages
from visionflow.report import write_json_atomic, write_text_atomic

# The parent's tags a variant inherits: where its weights come from is where the parent's came from
LINEAGE_KEYS = ("data_version", "git_commit", "params_hash", "flow_run_id")


@dataclass(frozen=True)
class VariantResult:
    """reports/quantize/<precision>.json: the decision, both models' figures side by side, where the report is."""

    model: str
    version: str
    precision: str
    parent_model: str
    parent_version: str
    promoted: bool
    champion_before: str | None
    champion_after: str | None
    gates: list[Gate]
    reasons: list[str]
    accuracy_delta: float  # accuracy(variant) - accuracy(fp32), clean + corrupted
    lower_bound: float  # its one-sided (1 - registry.bootstrap_alpha) bootstrap lower bound
    rows: list[dict[str, Any]]  # fp32 parent, then the variant: size, latency, accuracy
    report: str  # the markdown table, relative to the project root
    mlflow_run_id: str

    def headline(self) -> str:
        verdict = "champion" if self.promoted else "REFUSED: " + "; ".join(self.reasons)
        return (
            f"{self.model} v{self.version} ({self.precision} of {self.parent_model} v{self.parent_version}): "
            f"accuracy {self.accuracy_delta:+.4f} vs fp32 (lower bound {self.lower_bound:+.4f}); {verdict}"
        )


def model_bytes(path: Path) -> int:
    """The model's size with its weights inline (a registry download keeps weights in a file beside the graph)."""
    import onnx

    return onnx.load(str(path)).ByteSize()


def _figures(path: Path, images: Comparison) -> dict[str, Any]:
    """One model's outputs on every comparison image, per-image correctness, size and latency (on clean images)."""
    out = q.outputs(path, images.every)
    correct = out[0].argmax(1) == images.every_labels
    n = len(images.clean)
    ms = q.latency_ms(path, images.clean)
    return {
        "outputs": out,
        "correct": correct,
        "row": {
            "size_bytes": model_bytes(path),
            "ms_b1": ms["b1"],
            "ms_b32": ms["b32"],
            "accuracy_clean": float(correct[:n].mean()),
            "accuracy_corrupted": float(correct[n:].mean()) if len(correct) > n else None,
        },
    }


def _gates(p: Params, old: dict, new: dict, images: Comparison, classes: list[str], parent_is_champion: bool):
    """The variant's gates, (mean accuracy change, its lower bound); records its top-1 agreement with the parent
    on the clean images in its row."""
    n = len(images.clean)
    new["row"]["top1_agreement"] = float((old["outputs"][0][:n].argmax(1) == new["outputs"][0][:n].argmax(1)).mean())
    sanity = q.sanity_reasons(old["outputs"], new["outputs"])
    accuracy, (delta, lower) = variant_gates(
        cfg=p.registry,
        max_drop=p.export.quantize_max_drop,
        new=new["correct"],
        old=old["correct"],
        clean_new=new["correct"][:n],
        clean_old=old["correct"][:n],
        labels=images.clean_labels,
        classes=classes,
        seed=p.base.seed,
    )
    ms, budget = new["row"]["ms_b1"], p.registry.latency_budget_ms
    gates = [
        Gate("sanity", not sanity, "; ".join(sanity) or "outputs finite, shapes as the fp32 model's"),
        *accuracy,
        Gate(
            "latency",
            ms <= budget,
            f"batch-1 median {ms:.3f} ms on 1 ONNX Runtime thread ({ms / old['row']['ms_b1']:.2f}x fp32) vs "
            f"budget {budget} ms",
            ms,
        ),
        Gate(
            "parent_champion",
            parent_is_champion,
            f"fp32 parent {'is' if parent_is_champion else 'is not'} its model's champion",
        ),
    ]
    return gates, delta, lower


def _register(p: Params, parent: dict, variant: Path, card: dict, precision: str, row: dict):
    """The variant in the registry as `<model>-<precision>`, logged to a run of its own beside the parent's
    training run; returns (model, version, run id)."""
    import mlflow

    from visionflow.registry.store import TAG, register_onnx

    client = mlflow.MlflowClient()
    parent_run = client.get_run(parent["run_id"])
    link = {
        f"{TAG}parent_model": p.registry.model_name,
        f"{TAG}parent_version": parent["version"],
        f"{TAG}parent_run_id": parent["run_id"],
        f"{TAG}precision": precision,
    }
    run = client.create_run(
        parent_run.info.experiment_id, run_name=f"{parent_run.info.run_name}-{precision}", tags=link
    )
    run_id = run.info.run_id
    client.log_param(run_id, "precision", precision)
    name = q.variant_name(p.registry.model_name, precision)
    lineage = {f"{TAG}{k}": parent["tags"][f"{TAG}{k}"] for k in LINEAGE_KEYS if f"{TAG}{k}" in parent["tags"]}
    version = register_onnx(
        onnx_path=variant,
        card={**card, "onnx_sha256": sha256_file(variant), "mlflow_run_id": run_id},
        model_name=name,
        mlflow_run_id=run_id,
        tags={
            **lineage,
            **link,
            f"{TAG}mlflow_run_id": run_id,
            f"{TAG}parity.top1_agreement": f"{row['top1_agreement']:.6f}",
            f"{TAG}latency.ort_ms_b1": f"{row['ms_b1']:.3f}",
        },
        metrics={"test_accuracy": row["accuracy_clean"], "robust_accuracy": row["accuracy_corrupted"] or 0.0},
    )
    return name, version, run_id


def quantize_variant(
    p: Params,
    root: Path,
    parent_version: str | None = None,
    *,
    precision: str | None = None,
    calibration: np.ndarray | None = None,
) -> VariantResult:
    """Make, register and judge the `precision` variant (default export.quantize) of the fp32 model's
    `parent_version` (default: its champion). calibration: the int8 calibration images (NHWC uint8), default
    export.calibration_images training images over every class; given, it plants a calibration of its own."""
    from visionflow.data.imageio import DecodeRules
    from visionflow.registry.store import (
        CHAMPION,
        RegistryError,
        alias_version,
        apply_promotion,
        download_onnx,
        promotion_lock,
        version_info,
    )

    precision = precision or p.export.quantize
    paths, parent_model = ProjectPaths.of(p, root), p.registry.model_name
    champion = alias_version(parent_model, CHAMPION)
    parent_version = parent_version or champion
    if parent_version is None:
        raise RegistryError(f"{parent_model} has no champion to make a {precision} variant of: run the pipeline")
    with tempfile.TemporaryDirectory(prefix="visionflow-variant-") as tmp:
        fp32, card = download_onnx(parent_model, parent_version, Path(tmp) / "fp32")
        classes = card["classes"]
        images = ComparisonImages(
            paths=paths, cfg=p.evaluate, seed=p.base.seed, eval_batch=None, rules=DecodeRules.from_params(p.validation)
        ).for_card(card, classes)
        if precision == "int8" and calibration is None:
            calibration = training_calibration(p, paths, card, classes)
        variant = q.make_variant(precision, fp32, Path(tmp) / precision / "model.onnx", calibration)
        old, new = _figures(fp32, images), _figures(variant, images)
        gates, delta, lower = _gates(p, old, new, images, classes, parent_version == champion)
        parent = {"version": parent_version, **version_info(parent_model, parent_version)}
        card = {**card, "precision": precision, "parent": f"{parent_model} v{parent_version}"}
        if precision == "int8":
            card["quantization"] = f"ONNX Runtime static QDQ, per-channel, MinMax on {len(calibration)} images"
        name, version, run_id = _register(p, parent, variant, card, precision, new["row"])
        with promotion_lock(paths.mlruns, name):
            decision = apply_promotion(name, version, gates)
    rows = [
        {"model": parent_model, "version": parent_version, "precision": "fp32", **old["row"]},
        {"model": name, "version": version, "precision": precision, **new["row"]},
    ]
    res = VariantResult(
        **{k: getattr(decision, k) for k in ("model", "version", "promoted", "champion_before", "champion_after")},
        precision=precision,
        parent_model=parent_model,
        parent_version=parent_version,
        gates=decision.gates,
        reasons=decision.reasons,
        accuracy_delta=delta,
        lower_bound=lower,
        rows=rows,
        report=paths.relative(paths.quantize_reports / f"{precision}.md"),
        mlflow_run_id=run_id,
    )
    _write_report(paths, res, p.registry.bootstrap_alpha)
    return res


def training_calibration(p: Params, paths: ProjectPaths, card: dict, classes: list[str]) -> np.ndarray:
    from visionflow.data.cache import project_split

    train = project_split(paths, "train", classes=classes, image_size=card["image_size"], channels=card["channels"])
    return q.calibration_sample(train.images, train.labels, p.export.calibration_images, p.base.seed)


def report_markdown(res: VariantResult, alpha: float) -> str:
    """The side-by-side table (fp32, variant) and the gates."""

    def acc(v: float | None) -> str:
        return "-" if v is None else f"{v:.4f}"

    verdict = "champion" if res.promoted else "refused"
    lines = [
        f"# {res.precision} variant of {res.parent_model} v{res.parent_version}",
        "",
        "Latency: median ms per call, ONNX Runtime CPU provider, 1 thread.",
        "",
        "| model | precision | size (MB) | batch-1 ms | batch-32 ms | accuracy clean | accuracy corrupted | "
        "top-1 agreement with fp32 | gate |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res.rows:
        gate = (
            "parent"
            if r["precision"] == "fp32"
            else f"{verdict}: change {res.accuracy_delta:+.4f}, {1 - alpha:.0%} lower bound {res.lower_bound:+.4f}"
        )
        lines.append(
            f"| {r['model']} v{r['version']} | {r['precision']} | {r['size_bytes'] / 1e6:.3f} | {r['ms_b1']:.3f} | "
            f"{r['ms_b32']:.3f} | {acc(r['accuracy_clean'])} | {acc(r['accuracy_corrupted'])} | "
            f"{acc(r.get('top1_agreement', 1.0))} | {gate} |"
        )
    lines += ["", "| gate | result | detail |", "|---|---|---|"]
    lines += [f"| {g.name} | {'pass' if g.passed else 'FAIL'} | {g.detail} |" for g in res.gates]
    return "\n".join(lines) + "\n"


def _write_report(paths: ProjectPaths, res: VariantResult, alpha: float) -> None:
    """reports/quantize/<precision>.md and .json, and both as artifacts of the variant's run."""
    import mlflow

    md = paths.quantize_reports / f"{res.precision}.md"
    write_text_atomic(md, report_markdown(res, alpha))
    write_json_atomic(md.with_suffix(".json"), asdict(res))
    client = mlflow.MlflowClient()
    for f in (md, md.with_suffix(".json")):
        client.log_artifact(res.mlflow_run_id, str(f), "quantize")
    variant = res.rows[1]
    for k in ("size_bytes", "ms_b1", "ms_b32", "accuracy_clean", "accuracy_corrupted", "top1_agreement"):
        if variant.get(k) is not None:
            client.log_metric(res.mlflow_run_id, k, float(variant[k]))
    client.log_metric(res.mlflow_run_id, "accuracy_delta_lower_bound", res.lower_bound)
