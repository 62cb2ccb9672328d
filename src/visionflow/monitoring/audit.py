"""The training split's label audit (`visionflow audit-labels`): rank the training samples by area under the margin
(AUM), recorded per sample while the published model trained (visionflow.training.dynamics), and flag the ones
below a threshold as likely label errors.

The default threshold is AUM < -2: averaged over training, another class's logit beat the given label's by more
than 2, i.e. the network, which fits the clean majority of every class, kept firmly contradicting this label. It
was chosen on bench/label_audit.py (5% of Fashion-MNIST's training labels flipped, BENCHMARKS.md): AUM < 0, the
parameter-free choice, flagged 19% of the split (precision 0.25, recall 0.98: hard but right samples such as
shirt/T-shirt also have a slightly negative AUM), -1 gave precision 0.46 at recall 0.96, -2 gave 0.75 at 0.91
(measured at 3 epochs: a longer training widens the margins, so the benchmark should be rerun at the default
steps). It needs no extra training, unlike Pleiss et al.'s threshold samples (a second training with a share of
the samples moved to a fake extra class), which were not measured. --threshold changes it.

Outputs, under review.audit_dir (reports/label_audit/): suspects-train.csv (label_audit.SUSPECT_COLUMNS, method
"aum", scope "train", the flagged samples, lowest AUM first), summary-train.json (counts, share flagged, threshold,
per-class counts) and grid-train.png (the top 25 suspects: image, given label, suggested label). The file names
carry the scope because the folder is shared with the reviewed-batch audits. They are logged to the MLflow run
that trained the model (artifact folder label_audit/): the AUM came from that run, so the audit is a view of it,
and a person looking at the model finds its suspected labels there.
"""

from __future__ import annotations

import io
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from visionflow.config import Params
from visionflow.errors import DataError
from visionflow.monitoring.label_audit import write_suspects
from visionflow.paths import ProjectPaths
from visionflow.report import write_json_atomic
from visionflow.training.dynamics import TABLE_COLUMNS, file_sha256, read_meta

LOG = logging.getLogger(__name__)
DEFAULT_THRESHOLD = -2.0  # see above: measured by bench/label_audit.py
GRID = 25


@dataclass(frozen=True)
class TrainAudit:
    samples: int
    flagged: int
    share_flagged: float
    threshold: float
    epochs: int
    per_class: dict[str, int]  # given label -> flagged samples
    suspects: str  # the files written, relative to the project root
    summary: str
    grid: str | None
    mlflow_run_id: str | None


def load_dynamics(paths: ProjectPaths) -> tuple[pd.DataFrame, dict]:
    """The published model's training-dynamics table and its description, checked against the current train
    split; a DataError saying what to do when it is missing, damaged or from another split."""
    table, split = paths.training_dynamics, paths.splits / "train.csv"
    if not table.is_file() or not table.with_suffix(".json").is_file():
        raise DataError(
            f"no training dynamics ({paths.relative(table)}): run `visionflow train` first (a training run "
            "finished before per-sample dynamics were recorded has none: delete its folder under runs/train)"
        )
    try:
        meta = read_meta(table)
        frame = pd.read_csv(table, dtype={"path": str, "sha256": str, "label": str, "suggested": str})
    except (ValueError, OSError) as exc:
        raise DataError(f"{paths.relative(table)} is unreadable ({exc}): run `visionflow train` again") from exc
    if missing := set(TABLE_COLUMNS) - set(frame.columns):
        raise DataError(f"{paths.relative(table)} lacks columns {sorted(missing)}: run `visionflow train` again")
    if not split.is_file():
        raise DataError(f"{paths.relative(split)} not found: run `visionflow split` first")
    if meta.get("split_sha256") != file_sha256(split):
        raise DataError(
            f"{paths.relative(table)} was recorded on another version of {paths.relative(split)}: "
            "run `visionflow train` on the current split first"
        )
    return frame, meta


def rank(frame: pd.DataFrame, threshold: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(every sample seen in training, lowest AUM first; the flagged ones: AUM < threshold)."""
    seen = frame[frame["epochs"] > 0].sort_values("aum", kind="stable").reset_index(drop=True)
    return seen, seen[seen["aum"] < threshold]


def audit_train(p: Params, root: Path, threshold: float | None = None) -> TrainAudit:
    """Audit the training split from reports/training_dynamics.csv and write the files above (log_audit logs
    them to MLflow); threshold None is DEFAULT_THRESHOLD."""
    threshold = DEFAULT_THRESHOLD if threshold is None else threshold
    if not np.isfinite(threshold):
        raise DataError(f"label audit: the threshold must be a finite number, not {threshold}")
    paths = ProjectPaths.of(p, root)
    frame, meta = load_dynamics(paths)
    ranked, flagged = rank(frame, threshold)
    out = paths.label_audit
    suspects = out / "suspects-train.csv"
    write_suspects(
        suspects,
        [
            {**row, "rank": i + 1, "score": row["aum"], "method": "aum", "scope": "train"}
            for i, row in enumerate(flagged.to_dict("records"))
        ],
    )
    per_class = {c: int((flagged["label"] == c).sum()) for c in meta.get("classes", sorted(frame["label"].unique()))}
    grid = out / "grid-train.png"
    if len(flagged):
        write_grid(grid, paths, flagged.head(GRID))
    else:
        grid.unlink(missing_ok=True)
    result = TrainAudit(
        samples=len(ranked),
        flagged=len(flagged),
        share_flagged=round(len(flagged) / max(len(ranked), 1), 5),
        threshold=float(threshold),
        epochs=int(meta.get("epochs", 0)),
        per_class=per_class,
        suspects=paths.relative(suspects),
        summary=paths.relative(out / "summary-train.json"),
        grid=paths.relative(grid) if len(flagged) else None,
        mlflow_run_id=meta.get("mlflow_run_id"),
    )
    summary = {
        **asdict(result),
        "method": "aum",
        "scope": "train",
        "table": paths.relative(paths.training_dynamics),
        "pairs": _pairs(flagged),
    }
    write_json_atomic(out / "summary-train.json", summary)
    return result


def _pairs(flagged: pd.DataFrame) -> dict[str, int]:
    """Flagged samples per (given -> suggested) pair, most common first: which confusions the audit finds."""
    counts = flagged.groupby(["label", "suggested"]).size().sort_values(ascending=False, kind="stable")
    return {f"{a} -> {b}": int(n) for (a, b), n in counts.items()}


def log_audit(result: TrainAudit, root: Path) -> None:
    """The audit's files as artifacts of the training run they came from (label_audit/); MLflow must be set up."""
    import mlflow

    if not result.mlflow_run_id:
        return
    client = mlflow.MlflowClient()
    for f in (result.suspects, result.summary, result.grid):
        if f:
            client.log_artifact(result.mlflow_run_id, str(Path(root) / f), "label_audit")


def write_grid(path: Path, paths: ProjectPaths, rows: pd.DataFrame) -> None:
    """The suspects as a 5-column image grid, each titled with its given and suggested label and its AUM."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    from visionflow.data.imageio import read_limited

    cols = 5
    n_rows = max(1, -(-len(rows) // cols))
    fig, axes = plt.subplots(n_rows, cols, figsize=(cols * 2.2, n_rows * 2.9), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, row in zip(axes.flat, rows.itertuples()):
        try:
            with Image.open(io.BytesIO(read_limited(paths.resolve(row.path), None))) as im:
                ax.imshow(np.asarray(im.convert("RGB")))
        except (OSError, ValueError) as exc:  # a file gone since training: the title still names it
            LOG.warning("label audit grid: %s unreadable (%s)", row.path, exc)
        ax.set_title(f"given {row.label}\nsuggested {row.suggested}\nAUM {row.aum:.2f}", fontsize=8)
    fig.suptitle("Likely label errors in the training split (lowest area under the margin first)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97))  # room for the title above the first row's labels
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
