"""How well the drift check separates the two cases it must: false alarms on batches from the reference
distribution, and detections on batches under a shift, each at the default batch size (`visionflow drift-eval`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from visionflow.config import Params
from visionflow.paths import ProjectPaths
from visionflow.report import write_json_atomic

REPORT_NAME = "evaluation.json"  # in ProjectPaths.drift_reports
FIRST_SEED = 1000  # away from the small seeds people give `visionflow simulate`


@dataclass(frozen=True)
class DriftRun:
    condition: str  # "reference" or "shifted"
    seed: int
    drifted: bool
    drift_share: float
    moved: list[str]  # the drifted features, most moved first
    accuracy: float | None


@dataclass(frozen=True)
class DriftEvaluation:
    batch_size: int
    batches: int
    shift: str
    severity: int
    false_alarms: int
    detections: int
    drift_share_threshold: float
    reference_shares: list[float]
    shifted_shares: list[float]
    runs: list[DriftRun]


def evaluate_detector(
    p: Params,
    root: Path,
    *,
    batches: int,
    shift: str,
    severity: int,
    progress: Callable[[int, int], None] | None = None,
) -> DriftEvaluation:
    """Simulate `batches` reference and `batches` shifted batches, check each against the champion (no MLflow
    runs, no HTML), and write the summary to reports/drift/evaluation.json. MLflow must point at the registry."""
    from visionflow.monitoring.drift import check, load_champion
    from visionflow.monitoring.simulate import simulate

    paths = ProjectPaths.of(p, root)
    champion = load_champion(p, root)
    plan = [(cond, sh) for cond, sh in (("reference", "none"), ("shifted", shift)) for _ in range(batches)]
    runs = []
    for k, (cond, sh) in enumerate(plan):
        seed = FIRST_SEED + k
        folder = paths.batches / "eval" / f"{cond}-{seed}"
        simulate(p, root, folder, shift=sh, severity=severity, n=p.drift.batch_size, seed=seed)
        v = check(p, root, batch=folder, champion=champion, log_to_mlflow=False, html=False, name=f"eval/{cond}-{seed}")
        runs.append(
            DriftRun(
                condition=cond,
                seed=seed,
                drifted=v["drifted"],
                drift_share=v["drift_share"],
                moved=v["moved"],
                accuracy=v["accuracy"],
            )
        )
        if progress:
            progress(k + 1, len(plan))
    reference = [r for r in runs if r.condition == "reference"]
    shifted = [r for r in runs if r.condition == "shifted"]
    result = DriftEvaluation(
        batch_size=p.drift.batch_size,
        batches=batches,
        shift=shift,
        severity=severity,
        false_alarms=sum(r.drifted for r in reference),
        detections=sum(r.drifted for r in shifted),
        drift_share_threshold=p.drift.drift_share,
        reference_shares=[r.drift_share for r in reference],
        shifted_shares=[r.drift_share for r in shifted],
        runs=runs,
    )
    write_json_atomic(paths.drift_reports / REPORT_NAME, asdict(result))
    return result
