"""label_audit: does the training-split label audit (area under the margin, `visionflow audit-labels`) find flipped
labels, and does accepting its suggestions help?

In a scratch project with params.yaml's defaults (Fashion-MNIST, data.max_images 30,000, the default model and
steps): ingest, validate, split; then 5% of the train split's labels are flipped at random (seeded; each to a
uniformly random other class) by rewriting data/splits/train.csv. Training on it records every training sample's
margins (visionflow.training.dynamics); the audit (visionflow.monitoring.audit) ranks them by AUM and flags
those below its default threshold (monitoring.audit.DEFAULT_THRESHOLD).

Reported: precision and recall at finding the flipped labels at the audit's threshold (and at other thresholds,
to show why it was chosen); the precision at 0.8 recall from the ranking (goal >= 0.8); the share of the
unflipped labels (Fashion-MNIST's own) it flags; then the flagged samples are relabelled to the audit's suggestion
in the train split and the model retrained with the same steps: test accuracy noisy vs corrected, and vs the
clean labels (a third training; BENCH_LABEL_AUDIT_CLEAN=0 skips it). The top 25 suspects are drawn beside the
JSON (<out>.png), and the top 25 flagged among the unflipped labels (<out>-own.png): Fashion-MNIST's own
suspected errors, for a person to judge. --quick: 2,000 images, 3 epochs (checks that it runs; no measurement).
BENCH_LABEL_AUDIT_EPOCHS=N trains every model for N epochs instead of train.max_epochs (a busy machine: the
default 12 epochs of 22,500 images take about 40 minutes per training on 2 cores shared with other work; the
results record the epochs).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import Context, goal, scratch_project, single

NAME = "label_audit"
FLIP_SHARE = 0.05
FLIP_SEED = 20
THRESHOLDS = (1.0, 0.5, 0.0, -0.5, -1.0, -2.0)
QUICK = {"data.max_images": 2000, "train.max_epochs": 3}


def flip_labels(split_csv: Path, share: float, seed: int) -> dict[str, str]:
    """Flip `share` of the split's labels, each to a uniformly random other class; rewrites the CSV and returns
    {path: true label} of the flipped rows."""
    import pandas as pd

    df = pd.read_csv(split_csv)
    classes = sorted(df["label"].unique())
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(df), size=round(share * len(df)), replace=False)
    truth = dict(zip(df.loc[rows, "path"], df.loc[rows, "label"]))
    for r in rows:
        others = [c for c in classes if c != df.at[r, "label"]]
        df.at[r, "label"] = others[rng.integers(len(others))]
    df.to_csv(split_csv, index=False)
    return truth


def relabel(split_csv: Path, suggestions: dict[str, str]) -> None:
    """Accept the audit's suggestions: each flagged path's label becomes its suggested label."""
    import pandas as pd

    df = pd.read_csv(split_csv)
    df["label"] = [suggestions.get(path, label) for path, label in zip(df["path"], df["label"])]
    df.to_csv(split_csv, index=False)


def precision_at_recall(ranked_paths: list[str], wrong: set[str], recall: float) -> tuple[float | None, int]:
    """The precision of the shortest ranking prefix that reaches `recall`, and that prefix's length."""
    hits = np.cumsum([p in wrong for p in ranked_paths])
    reach = np.flatnonzero(hits >= recall * len(wrong))
    if not len(wrong) or not len(reach):
        return None, len(ranked_paths)
    k = int(reach[0]) + 1
    return round(float(hits[k - 1] / k), 4), k


def _train(ctx: Context, proj: Path, p, tag: str) -> dict[str, Any]:
    """Train (the default steps) and measure test accuracy; seconds and run id too."""
    from visionflow import stages
    from visionflow.data.cache import project_split
    from visionflow.paths import ProjectPaths
    from visionflow.training.evaluate import predict_logits
    from visionflow.training.train import load_classifier

    ctx.log(f"[label_audit] training on the {tag} labels")
    t0 = time.perf_counter()
    res = stages.train_stage(p, proj, f"bench-{tag}", progress=False)
    seconds = time.perf_counter() - t0
    model = load_classifier(proj / res.model_checkpoint)
    hp = model.hparams
    test = project_split(
        ProjectPaths.of(p, proj), "test", classes=list(hp.classes), image_size=hp.image_size, channels=hp.channels
    )
    acc = float((predict_logits(model.net, np.asarray(test.images)).argmax(1) == test.labels).mean())
    ctx.log(f"[label_audit] {tag}: test accuracy {acc:.4f} ({seconds:.0f} s, {res.global_step} steps)")
    return {"test_accuracy": round(acc, 4), "seconds": round(seconds, 1), "steps": res.global_step}


def _scores(ranked, truth: dict[str, str], threshold: float) -> dict[str, Any]:
    from visionflow.monitoring.label_audit import precision_recall

    flagged = ranked[ranked["aum"] < threshold]  # ranked's index is the position in the ranking
    wrong = np.flatnonzero(ranked["path"].isin(truth).to_numpy())
    precision, recall = precision_recall(flagged.index.to_numpy(), wrong)
    own = ~ranked["path"].isin(truth)
    hit = flagged["path"].isin(truth)
    right = flagged[hit]["suggested"].to_numpy() == np.array([truth[x] for x in flagged[hit]["path"]])
    return {
        "threshold": threshold,
        "flagged": len(flagged),
        "precision": round(precision, 4),
        "recall": round(recall, 4),
        "own_labels_flagged_share": round(float((ranked[own]["aum"] < threshold).mean()), 4),
        "suggestion_right_share": round(float(right.mean()), 4) if len(right) else None,
    }


def run(ctx: Context) -> dict[str, Any]:
    from visionflow import stages
    from visionflow.monitoring.audit import DEFAULT_THRESHOLD, audit_train, load_dynamics, rank, write_grid
    from visionflow.paths import ProjectPaths
    from visionflow.registry.tracking import setup_mlflow

    settings = dict(QUICK) if ctx.quick else {}
    if os.environ.get("BENCH_LABEL_AUDIT_EPOCHS"):
        settings["train.max_epochs"] = int(os.environ["BENCH_LABEL_AUDIT_EPOCHS"])
    proj, p = scratch_project(ctx, "label_audit/project", settings)
    paths = ProjectPaths.of(p, proj)
    setup_mlflow(p.registry.tracking_uri, proj, p.base.project, p.registry.artifact_location)
    ctx.log(f"[label_audit] ingest, validate, split ({p.data.max_images} images)")
    stages.ingest_stage(p, proj)
    stages.validate_stage(p, proj, None)
    stages.split_stage(p, proj)
    split = paths.splits / "train.csv"
    clean_split = split.read_bytes()
    truth = flip_labels(split, FLIP_SHARE, FLIP_SEED)
    noisy = _train(ctx, proj, p, "noisy")

    audit = audit_train(p, proj, DEFAULT_THRESHOLD)
    frame, _ = load_dynamics(paths)
    ranked, flagged = rank(frame, DEFAULT_THRESHOLD)
    p_at_80, k_at_80 = precision_at_recall(list(ranked["path"]), set(truth), 0.8)
    by_threshold = [_scores(ranked, truth, t) for t in THRESHOLDS]
    chosen = next(s for s in by_threshold if s["threshold"] == DEFAULT_THRESHOLD)
    ctx.log(f"[label_audit] audit: {chosen}; precision at 0.8 recall {p_at_80} (top {k_at_80})")
    plots = {}
    if ctx.out is not None:
        ctx.out.parent.mkdir(parents=True, exist_ok=True)
        if audit.grid:
            plots["grid"] = ctx.out.with_suffix(".png")
            shutil.copyfile(proj / audit.grid, plots["grid"])
        own = flagged[~flagged["path"].isin(truth)].head(25)
        if len(own):
            plots["own_grid"] = ctx.out.with_name(ctx.out.stem + "-own.png")
            write_grid(plots["own_grid"], paths, own)

    relabel(split, dict(zip(flagged["path"], flagged["suggested"])))
    corrected = _train(ctx, proj, p, "corrected")
    clean = None
    if os.environ.get("BENCH_LABEL_AUDIT_CLEAN", "1") != "0":
        split.write_bytes(clean_split)
        clean = _train(ctx, proj, p, "clean")

    rows = [
        single(
            "precision at 0.8 recall (ranking by AUM)",
            p_at_80,
            unit="precision",
            label=f"{len(truth)} flipped of {len(ranked)} training labels; top {k_at_80} of the ranking",
            the_goal=goal("precision >= 0.8 at 0.8 recall", ">=", 0.8, on="value"),
        ),
        single(
            f"precision at AUM < {DEFAULT_THRESHOLD:g}",
            chosen["precision"],
            unit="precision",
            label=f"{chosen['flagged']} flagged",
        ),
        single(
            f"recall at AUM < {DEFAULT_THRESHOLD:g}", chosen["recall"], unit="recall", label=f"{len(truth)} flipped"
        ),
        single(
            f"own labels flagged at AUM < {DEFAULT_THRESHOLD:g}",
            chosen["own_labels_flagged_share"],
            unit="share",
            label="unflipped (Fashion-MNIST's own) labels the audit flags",
        ),
        single("test accuracy, noisy labels", noisy["test_accuracy"], unit="accuracy", label="5% flipped"),
        single(
            "test accuracy, suggestions accepted",
            corrected["test_accuracy"],
            unit="accuracy",
            label=f"{chosen['flagged']} labels changed to the suggestion",
            extra={"gain_over_noisy": round(corrected["test_accuracy"] - noisy["test_accuracy"], 4)},
        ),
    ]
    if clean is not None:
        rows.append(single("test accuracy, clean labels", clean["test_accuracy"], unit="accuracy", label="no flips"))
    config = {
        "images": p.data.max_images,
        "train_samples": len(ranked),
        "flipped": len(truth),
        "flip_share": FLIP_SHARE,
        "flip_seed": FLIP_SEED,
        "threshold": DEFAULT_THRESHOLD,
        "max_epochs": p.train.max_epochs,
        "by_threshold": by_threshold,
        "precision_at_0.8_recall": p_at_80,
        "ranking_prefix_at_0.8_recall": k_at_80,
        "per_class_flagged": audit.per_class,
        "trainings": {"noisy": noisy, "corrected": corrected, "clean": clean},
        "plots": {k: str(v) for k, v in plots.items()},
    }
    return {"rows": rows, "notes": [] if clean else ["clean-label training skipped"], "config": config}
